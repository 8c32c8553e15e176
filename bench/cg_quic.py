"""A fixed QUIC fan-out workload for callgrind: L QUIC listeners, P Opus
packets, everything in one process with no sockets. The node's side is the
real code (Core pull listeners, the QUIC endpoint's pump, aioquic's packet
building and AEAD); the listeners are aioquic client connections fed from
memory, on a simulated clock.

Only the node's work is counted: it runs inside a ctypes callback, and
callgrind runs with --toggle-collect='ffi_call*', so the clients' decryption
and ACK building (which a real listener does on its own machine) are not
counted. Run with P=0 and P>0; the difference over L*P delivered datagrams
is the node's cost of one QUIC datagram.

    python bench/cg_quic.py L P
"""
from __future__ import annotations

import asyncio
import ctypes
import ssl
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aioquic.quic.configuration import QuicConfiguration  # noqa: E402
from aioquic.quic.connection import QuicConnection  # noqa: E402
from aioquic.quic.events import DatagramFrameReceived  # noqa: E402

from relay._core import Core  # noqa: E402
from relay.wire.config import NodeConfig  # noqa: E402
from relay.client.publish import RtpPacketizer, encode_tone  # noqa: E402
from relay.node.quic import ListenerConnection, QuicEndpoint  # noqa: E402
from relay.node.sessions import RoomState, Sessions  # noqa: E402
from relay.wire.protocol import Reject  # noqa: E402
from relay.wire.tokens import Auth  # noqa: E402
from relay.wire.protocol import ALPN_QUIC, MAX_DATAGRAM_FRAME  # noqa: E402

SERVER = ("127.0.0.1", 7443)


class Wire(asyncio.DatagramTransport):
    """Stands in for the node's UDP socket: keeps what the node sends."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.out.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 7443) if name == "sockname" else default


def pair(endpoint: QuicEndpoint, i: int) -> tuple[QuicConnection, ListenerConnection, Wire]:
    """One handshaken client/node connection pair, exchanged in memory."""
    clock = asyncio.get_running_loop().time
    cconf = QuicConfiguration(is_client=True, alpn_protocols=[ALPN_QUIC],
                              max_datagram_frame_size=MAX_DATAGRAM_FRAME, verify_mode=ssl.CERT_NONE)
    client = QuicConnection(configuration=cconf)
    addr = ("127.0.0.2", 10000 + i)
    client.connect(SERVER, now=clock())
    server = QuicConnection(configuration=endpoint.configuration(),
                            original_destination_connection_id=client.original_destination_connection_id)
    conn = ListenerConnection(server, endpoint=endpoint)
    wire = Wire()
    conn.connection_made(wire)
    for _ in range(10):
        for data, _ in client.datagrams_to_send(now=clock()):
            conn.datagram_received(data, addr)
        for data in wire.out:
            client.receive_datagram(data, SERVER, now=clock())
        wire.out.clear()
        while client.next_event() is not None:
            pass
    assert server._handshake_complete, "handshake did not complete"
    return client, conn, wire


async def main(listeners: int, count: int) -> None:
    rtp = RtpPacketizer(ssrc=1)
    payloads = encode_tone(440.0, 0.5)
    packets = [rtp.packet(payloads[k % len(payloads)]) for k in range(count)]
    clock = asyncio.get_running_loop().time
    core = Core(listeners + 1, rooms=1, shards=1)
    core.room_open(0, True)
    cfg = NodeConfig(quic=SERVER, max_load=0, join_rate=1e9, join_rate_per_source=1e9)
    sessions = Sessions(core, cfg, {"r": RoomState("r", 0, 0)}, Auth("open"))
    endpoint = QuicEndpoint(core, sessions)
    pairs = [pair(endpoint, i) for i in range(listeners)]
    for _, conn, _ in pairs:
        conn.transport_name = "quic"
        joined = sessions.join(conn, "quic", "r", "", "127.0.0.2", 0.0)
        assert not isinstance(joined, Reject), joined
        conn.session = joined
    acks: list[list[bytes]] = [[] for _ in pairs]
    src = b"\x02\x00\x00\x01\x7f\x00\x00\x01" + bytes(8)
    current = [b""]

    def node_step() -> None:
        # what the node does per room packet: the listeners' ACKs in, the
        # packet ingested, every QUIC listener topped up (the endpoint's own
        # pump: pull, DATAGRAM frames, packets built, sealed and "sent")
        for (_, conn, _), pending in zip(pairs, acks, strict=True):
            for data in pending:
                conn.datagram_received(data, ("127.0.0.2", 0))
            pending.clear()
        core.feed(0, current[0], src)
        for _, conn, _ in pairs:
            endpoint._pump(conn)

    step = ctypes.CFUNCTYPE(None)(node_step)
    delivered = 0
    for p in packets:
        current[0] = p
        step()
        for (client, _, wire), pending in zip(pairs, acks, strict=True):
            for data in wire.out:
                client.receive_datagram(data, SERVER, now=clock())
            wire.out.clear()
            while (ev := client.next_event()) is not None:
                delivered += isinstance(ev, DatagramFrameReceived)
            pending.extend(d for d, _ in client.datagrams_to_send(now=clock() + 0.03))
        await asyncio.sleep(0)
    print(f"delivered {delivered} of {listeners * count}", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
