"""A fixed fan-out workload for valgrind --tool=callgrind: L listener
sockets (never read), P real Opus packets. Run once with P=0 and once with
P>0; the difference in user-space instructions over L*P is the cost of one
delivered listener-packet, start-up excluded.

    python bench/cg_workload.py relay|python L P
"""
from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.testing.loadgen import member_address, raise_fd_limit  # noqa: E402
from relay.client.publish import RtpPacketizer, encode_tone  # noqa: E402


def sinks(n: int) -> list[socket.socket]:
    raise_fd_limit(n + 64)
    out = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.bind((member_address(i), 0))
        out.append(s)
    return out


def relay(n: int, packets: list[bytes]) -> None:
    from relay._core import Core
    from relay.wire.addr import to_sockaddr
    core = Core(n + 1, rooms=1, shards=1)
    core.room_open(0, True)
    socks = sinks(n)
    for i, s in enumerate(socks):
        core.listener_add(0, to_sockaddr(s.getsockname()), i, 0, 0)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    src = to_sockaddr(("127.0.0.1", 1))
    for p in packets:
        core.feed(0, p, src)
        core.flush(tx.fileno())


def python(n: int, packets: list[bytes]) -> None:
    import uvloop
    from peers.python_relay import Fanout
    socks = sinks(n)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        out, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                     local_addr=("127.0.0.1", 0))
        fan = Fanout(out, [s.getsockname() for s in socks])
        for p in packets:
            fan.datagram_received(p, ("127.0.0.1", 1))
        out.close()

    uvloop.run(run())


if __name__ == "__main__":
    kind, n, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rtp = RtpPacketizer(ssrc=1)
    # the same encoding work in both runs, so only the fan-out differs
    payloads = encode_tone(440.0, 0.5)
    packets = [rtp.packet(payloads[k % len(payloads)]) for k in range(count)]
    {"relay": relay, "python": python}[kind](n, packets)
