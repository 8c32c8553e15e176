"""N QUIC listeners in one process, light enough that this 2-core machine
can run thousands beside the node, for bench/quic.py. Each joins as `relay
listen --quic` does (aioquic: handshake, JOIN, ACCEPT); from then on it
reads its audio DATAGRAMs and answers with ACK-only packets through the
core's own QUIC protection (relay._core's QuicOpener and QuicSealer), as a
browser's QUIC stack in C or C++ would, instead of through aioquic's
Python. It counts what it receives and loses, says LEAVE through aioquic
after the given seconds, and prints one JSON line of totals.

    python bench/peers/quic_light_crowd.py HOST:PORT CERT_SHA256 ROOM N SECONDS [STAGGER]

STAGGER: seconds between this process's joins (default 0.01).
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from aioquic import tls  # noqa: E402
from aioquic.buffer import encode_uint_var  # noqa: E402
from aioquic.quic.crypto import derive_key_iv_hp  # noqa: E402

from relay._core import QuicOpener, QuicSealer  # noqa: E402
from relay.client.quic import QuicListenClient  # noqa: E402

ACK_EVERY = 2       # an ACK for every second packet, as RFC 9000 13.2.2 recommends
MAX_RANGES = 8


class Light:
    """One joined listener, its packets read and acknowledged in C."""

    def __init__(self, client: QuicListenClient) -> None:
        conn = client._conn
        assert conn is not None
        self.client, self.conn, self.quic = client, conn, conn._quic
        crypto = self.quic._cryptos[tls.Epoch.ONE_RTT]

        def keys(ctx: Any) -> tuple[bytes, bytes, bytes]:
            return derive_key_iv_hp(cipher_suite=ctx.cipher_suite, secret=ctx.secret, version=ctx.version)
        rk, riv, rhp = keys(crypto.recv)
        sk, siv, shp = keys(crypto.send)
        suite = int(crypto.send.cipher_suite)
        self.opener = QuicOpener(suite, rk, riv, rhp, self.quic.host_cid, crypto.recv.key_phase)
        self.sealer = QuicSealer(suite, sk, siv, shp, self.quic._peer_cid.cid, b"", crypto.send.key_phase)
        self.addr = self.quic._network_paths[0].addr
        self.expected = self.quic._spaces[tls.Epoch.ONE_RTT].expected_packet_number
        self.ranges: list[list[int]] = []       # received packet numbers, highest range first
        self.unacked = 0
        self.received = self.lost = self.undecodable = 0
        self.next_seq = -1
        # from now on the library does not see this connection's packets, nor time it out
        if conn._timer is not None:
            conn._timer.cancel()
            conn._timer = None
        conn.datagram_received = self.datagram_received   # type: ignore[method-assign]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        opened = self.opener.payload(data, self.expected)
        if opened is None:
            self.undecodable += 1
            return
        pn, plain = opened
        if pn >= self.expected:
            self.expected = pn + 1
        self._note(pn)
        if plain[:1] == b"\x30" and len(plain) >= 13:      # the core's audio: one DATAGRAM frame
            seq = int.from_bytes(plain[3:5], "big")
            if self.next_seq >= 0:
                gap = (seq - self.next_seq) & 0xFFFF
                if gap < 0x8000:
                    self.lost += gap
            self.next_seq = (seq + 1) & 0xFFFF
            self.received += 1
        self.unacked += 1
        if self.unacked >= ACK_EVERY:
            self._ack()

    def _note(self, pn: int) -> None:
        for r in self.ranges:
            if r[0] - 1 <= pn <= r[1] + 1:
                r[0], r[1] = min(r[0], pn), max(r[1], pn)
                break
        else:
            self.ranges.append([pn, pn])
        self.ranges.sort(key=lambda r: -r[1])
        merged = [self.ranges[0]]
        for r in self.ranges[1:]:
            if r[1] + 1 >= merged[-1][0]:
                merged[-1][0] = min(merged[-1][0], r[0])
            else:
                merged.append(r)
        self.ranges = merged[:MAX_RANGES]

    def _ack(self) -> None:
        self.unacked = 0
        top = self.ranges[0]
        frame = bytearray(b"\x02")
        frame += encode_uint_var(top[1]) + encode_uint_var(0) + encode_uint_var(len(self.ranges) - 1)
        frame += encode_uint_var(top[1] - top[0])
        low = top[0]
        for r in self.ranges[1:]:
            frame += encode_uint_var(low - r[1] - 2) + encode_uint_var(r[1] - r[0])
            low = r[0]
        pn = self.quic._packet_number
        self.quic._packet_number += 1
        self.conn._transport.sendto(self.sealer.seal(bytes(frame), pn, frames=True), self.addr)

    async def leave(self) -> None:
        """LEAVE through the library, whose packet numbers follow ours."""
        self.quic._spaces[tls.Epoch.ONE_RTT].expected_packet_number = self.expected
        await self.client.aclose()


async def main(server: str, cert: str, room: str, n: int, seconds: float, stagger: float) -> dict:
    lights: list[Light | None] = [None] * n

    async def one(i: int) -> None:
        await asyncio.sleep(i * stagger)   # a steady trickle, not a storm
        client = QuicListenClient(server, room, cert_sha256=cert)
        try:
            await client.join()
        except Exception:
            await client.aclose()
            return
        lights[i] = Light(client)
        await asyncio.sleep(max(0.0, seconds - i * stagger))
        await lights[i].leave()   # type: ignore[union-attr]

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    joined = [x for x in lights if x is not None]
    return {"joined": len(joined), "received": sum(x.received for x in joined),
            "lost": sum(x.lost for x in joined), "undecodable": sum(x.undecodable for x in joined),
            "seconds": round(time.monotonic() - t0, 1)}


if __name__ == "__main__":
    import uvloop
    server, cert, room, n, seconds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    stagger = float(sys.argv[6]) if len(sys.argv) > 6 else 0.01
    print(json.dumps(uvloop.run(main(server, cert, room, n, seconds, stagger))), flush=True)
