"""N QUIC listeners in one process, for bench/quic.py: each joins over
QUIC (relay listen --quic's client), counts what it receives and loses, and
leaves after the given seconds. Prints one JSON line of totals.

    python bench/peers/quic_crowd.py HOST:PORT CERT_SHA256 ROOM N SECONDS
"""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from relay.client.quic import QuicListenClient  # noqa: E402


async def main(server: str, cert: str, room: str, n: int, seconds: float) -> dict:
    clients = [QuicListenClient(server, room, cert_sha256=cert) for _ in range(n)]

    async def one(i: int, c: QuicListenClient) -> bool:
        await asyncio.sleep(i * 0.01)   # a steady trickle, not a storm
        try:
            await c.listen(seconds - i * 0.01)
            return True
        except Exception:
            return False
        finally:
            await c.aclose()

    ok = await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))
    return {"joined": sum(ok), "received": sum(c.stats.received for c in clients),
            "lost": sum(c.stats.lost for c in clients)}


if __name__ == "__main__":
    import uvloop
    server, cert, room, n, seconds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    print(json.dumps(uvloop.run(main(server, cert, room, n, seconds))), flush=True)
