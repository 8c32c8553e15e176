"""N QUIC listeners whose handshake is Python and whose listening is C, for
bench/quic.py: each joins as `relay listen --quic` does (aioquic:
handshake, JOIN, ACCEPT), then its socket and 1-RTT keys are handed to one
bench/quic_crowd.c process, which from then on reads, opens and ACKs its
packets, so that thousands of listeners fit on the core beside the node's.
On SIGTERM (or after SECONDS) it stops the C side and prints one JSON line
of totals: joined, failed joins, and the C side's packets, audio received
and lost, undecodable packets and ACKs sent.

    python bench/peers/quic_c_crowd.py HOST:PORT CERT_SHA256 ROOM N SECONDS [CONCURRENT]

CONCURRENT: joins in flight at once (default 8): the joins go as fast as
the node answers them, never as a storm. The listeners never say LEAVE (the
bench stops the node after each point).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from aioquic import tls  # noqa: E402
from aioquic.quic.crypto import derive_key_iv_hp  # noqa: E402

from receivers import build  # noqa: E402
from relay.client.quic import QuicListenClient  # noqa: E402

# bench/quic_crowd.c's struct handoff
HANDOFF = struct.Struct("<HBBBBBxQQ32s12s32s32s12s32s20s20s")


def handoff(control: socket.socket, client: QuicListenClient) -> None:
    """Give the joined listener's socket and keys to the C side, and stop
    reading it here. Nothing awaits in between, so no packet is read twice
    or by neither side."""
    conn = client._conn
    assert conn is not None
    quic = conn._quic
    crypto = quic._cryptos[tls.Epoch.ONE_RTT]
    rk, riv, rhp = derive_key_iv_hp(cipher_suite=crypto.recv.cipher_suite, secret=crypto.recv.secret,
                                    version=crypto.recv.version)
    sk, siv, shp = derive_key_iv_hp(cipher_suite=crypto.send.cipher_suite, secret=crypto.send.secret,
                                    version=crypto.send.version)
    if conn._timer is not None:          # the library no longer times this connection
        conn._timer.cancel()
        conn._timer = None
    transport = conn._transport
    sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
    try:
        # connected, so the C side sends its ACKs with send()
        sock.connect(quic._network_paths[0].addr)
        rec = HANDOFF.pack(int(crypto.send.cipher_suite), len(rk), crypto.recv.key_phase, crypto.send.key_phase,
                           len(quic.host_cid), len(quic._peer_cid.cid),
                           quic._spaces[tls.Epoch.ONE_RTT].expected_packet_number, quic._packet_number,
                           rk, riv, rhp, sk, siv, shp, quic.host_cid, quic._peer_cid.cid)
        socket.send_fds(control, [rec], [sock.fileno()])
    finally:
        sock.close()
    transport.close()


async def main(server: str, cert: str, room: str, n: int, seconds: float, concurrent: int) -> dict:
    control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # the C side outlives SECONDS by a margin: this process stops it first
    listener = subprocess.Popen([build("quic_crowd", ("-lcrypto",)), str(theirs.fileno()), str(seconds + 30)],
                                pass_fds=[theirs.fileno()], stdout=subprocess.PIPE, text=True)
    theirs.close()
    joined = failed = 0
    clients: list[QuicListenClient] = []   # kept: their connections' objects stay alive
    gate = asyncio.Semaphore(concurrent)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    async def one() -> None:
        nonlocal joined, failed
        async with gate:
            if stop.is_set():
                return
            client = QuicListenClient(server, room, cert_sha256=cert)
            try:
                await client.join()
                handoff(control, client)
            except Exception:  # noqa: BLE001 -- a listener that did not join is counted, not fatal
                failed += 1
                return
        clients.append(client)
        joined += 1

    t0 = time.monotonic()
    joins = asyncio.gather(*(one() for _ in range(n)))
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    stop.set()
    joins.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await joins
    control.close()
    listener.send_signal(signal.SIGTERM)
    out, _ = await loop.run_in_executor(None, listener.communicate)
    totals = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": "quic_crowd printed nothing"}
    return {"joined": joined, "failed_joins": failed, **totals, "seconds": round(time.monotonic() - t0, 1)}


if __name__ == "__main__":
    import uvloop
    server, cert, room, n, seconds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    concurrent = int(sys.argv[6]) if len(sys.argv) > 6 else 8
    print(json.dumps(uvloop.run(main(server, cert, room, n, seconds, concurrent))), flush=True)
    # the handed-over connections are never closed here: no LEAVE, no CONNECTION_CLOSE
    os._exit(0)
