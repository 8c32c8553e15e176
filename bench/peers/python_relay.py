"""The obvious Python relay: what most people would write first.

asyncio with uvloop, one datagram endpoint for ingest and one for egress;
for every ingest packet, for every listener, rewrite the SSRC and call
transport.sendto. Listeners come from a file of "ip port" lines (no control
protocol: this peer measures fan-out only).

    python bench/peers/python_relay.py INGEST_PORT DEST_FILE
"""
from __future__ import annotations

import asyncio
import signal
import struct
import sys

import uvloop


class Fanout(asyncio.DatagramProtocol):
    def __init__(self, out: asyncio.DatagramTransport, listeners: list[tuple[str, int]]) -> None:
        self.out = out
        # each listener gets its own SSRC, as the real relay gives it
        self.listeners = [(addr, struct.pack("!I", 0x10000 + i)) for i, addr in enumerate(listeners)]

    def datagram_received(self, data: bytes, addr) -> None:
        head, body = data[:8], data[12:]
        for dest, ssrc in self.listeners:
            self.out.sendto(head + ssrc + body, dest)


async def main() -> None:
    port, dest_file = int(sys.argv[1]), sys.argv[2]
    with open(dest_file) as f:
        listeners = [(ip, int(p)) for ip, p in (line.split() for line in f if line.strip())]
    loop = asyncio.get_running_loop()
    out, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
    await loop.create_datagram_endpoint(lambda: Fanout(out, listeners), local_addr=("127.0.0.1", port))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


if __name__ == "__main__":
    uvloop.run(main())
