"""The relay's data path as bench/xdp.py runs it: a threaded Core with one
sender shard, N listeners on the veth peer's address, ingest read by the
main thread with Core.ingest (as the node's event loop does) and the shard
thread sending, with sendmmsg or (--egress xdp) through AF_XDP via the
node's own egress policy (relay/listeners/xdp.py). The session layer is
left out: it costs nothing per packet.

    python bench/xdp_sender.py --ingest PORT --to IP --from IP --port0 P --listeners N
                               --egress xdp --iface IFACE --seconds S

Prints "ready", runs S seconds (or until SIGTERM), then one JSON line:
packets the core sent and the AF_XDP counters.
"""
from __future__ import annotations

import argparse
import json
import logging
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay._core import Core  # noqa: E402
from relay.listeners.xdp import XdpListeners  # noqa: E402
from relay.wire.addr import to_sockaddr  # noqa: E402
from relay.wire.egress_config import XdpConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ingest", type=int, required=True)
    ap.add_argument("--to", required=True)
    ap.add_argument("--from", dest="src", required=True)
    ap.add_argument("--port0", type=int, default=10000)
    ap.add_argument("--listeners", type=int, required=True)
    ap.add_argument("--egress", choices=("sendmmsg", "xdp"), default="sendmmsg")
    ap.add_argument("--iface", default="")
    ap.add_argument("--seconds", type=float, default=10)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="sender: %(message)s", stream=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    core = Core(a.listeners, rooms=1, depth=16, ring_bytes=3840, shards=1, threaded=True)
    core.room_open(0, any_source=True)
    ingest = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ingest.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    ingest.bind(("127.0.0.1", a.ingest))
    ingest.setblocking(False)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    out.bind((a.src, 7000))
    out.setblocking(False)
    xl = None
    if a.egress == "xdp":
        xl = XdpListeners(core, XdpConfig(a.iface))
        if not xl.start(out):
            return 3
    placed = 0
    for n in range(a.listeners):
        sa = to_sockaddr((a.to, a.port0 + n))
        slot = core.listener_add(0, sa, 0x1000 + n, n & 0xFFFF, n)
        placed += bool(xl and xl.place(slot, sa))
    if xl and placed != a.listeners:
        print(f"sender: only {placed} of {a.listeners} listeners go through AF_XDP", file=sys.stderr)
        return 4
    shard = threading.Thread(target=core.run_shard, args=(0, out.fileno()), daemon=True)
    shard.start()
    print("ready", flush=True)
    end = time.monotonic() + a.seconds
    while not stop.is_set() and time.monotonic() < end:
        if select.select([ingest], [], [], 0.2)[0]:
            core.ingest(ingest.fileno(), 0, out.fileno())
    core.stop_shards()
    shard.join(5)
    c = core.counters()
    result = {"sent": c["packets_out"], "xdp": xl.xdp.counters() if xl else None,
              "drops": {k: v for k, v in c.items() if k.startswith("drop")}}
    if xl:
        xl.close()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
