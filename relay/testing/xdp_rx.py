"""Receivers for the AF_XDP test, run inside its namespace: UDP sockets on
a range of ports that keep every datagram, and a packet socket on the
interface that checks every UDP checksum itself (the kernel would drop a
bad one silently). Prints one JSON line when no packet came for `--idle`
seconds or `--expect` arrived (bounded by `--timeout`).

    python -m relay.testing.xdp_rx --ip fd00:201:0::2 --port 6000 --count 8 --iface rx1b --expect 400
"""
from __future__ import annotations

import argparse
import json
import selectors
import socket
import struct
import time

from relay.testing.model import _csum

ETH_P_ALL = 0x0003


def udp_checksum_ok(frame: bytes) -> bool | None:
    """None if the frame is not UDP over IPv4/IPv6; else whether its UDP checksum verifies."""
    kind = struct.unpack_from("!H", frame, 12)[0]
    if kind == 0x86DD and len(frame) >= 62 and frame[20] == 17:
        src_dst, udp = frame[22:54], frame[54:]
        pseudo = src_dst + struct.pack("!IxxxB", len(udp), 17)
    elif kind == 0x0800 and len(frame) >= 42 and frame[23] == 17:
        ihl = (frame[14] & 15) * 4
        src_dst, udp = frame[26:34], frame[14 + ihl:]
        if udp[6:8] == b"\0\0":
            return True          # IPv4 allows "no checksum"
        pseudo = src_dst + struct.pack("!xBH", 17, len(udp))
    else:
        return None
    return _csum(pseudo + udp) == 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ip", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--iface", default="")
    ap.add_argument("--expect", type=int, default=0)
    ap.add_argument("--idle", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=15.0)
    a = ap.parse_args()
    family = socket.AF_INET6 if ":" in a.ip else socket.AF_INET
    sel = selectors.DefaultSelector()
    got: dict[int, list[str]] = {}
    for port in range(a.port, a.port + a.count):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        s.bind((a.ip, port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, port)
        got[port] = []
    checked = bad = 0
    if a.iface:
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        raw.bind((a.iface, 0))
        raw.setblocking(False)
        sel.register(raw, selectors.EVENT_READ, -1)
    print("ready", flush=True)
    end, last, total = time.monotonic() + a.timeout, time.monotonic(), 0
    while time.monotonic() < end and time.monotonic() - last < a.idle and not (a.expect and total >= a.expect
                                                                                and checked >= a.expect):
        for key, _ in sel.select(0.1):
            while True:
                try:
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]   # we registered sockets
                except BlockingIOError:
                    break
                except OSError:          # the veth went away under us: report what came
                    end = 0
                    break
                last = time.monotonic()
                if key.data < 0:
                    ok = udp_checksum_ok(data)
                    if ok is not None:
                        checked += 1
                        bad += not ok
                else:
                    got[key.data].append(data.hex())
                    total += 1
    print(json.dumps({"ports": got, "checked": checked, "bad": bad}), flush=True)


if __name__ == "__main__":
    main()
