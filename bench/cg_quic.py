"""A fixed QUIC fan-out workload for callgrind: L QUIC listeners, P Opus
packets, in one process. The node's side is the real code: the QUIC
endpoint's join, which puts each connection on the core's QUIC path, the
core sealing every packet and sending it with sendmmsg on a real loopback
socket (inline mode: Core.flush), and the core reading the listeners' ACKs
from that socket (QuicPath.ingest), handing up what is the library's. With
`--library`, the QUIC path is off and the endpoint's own pump builds and
seals every datagram through aioquic, as before the core's QUIC path. The listeners are
aioquic client connections on their own loopback sockets.

Only the node's work is counted: it runs inside a ctypes callback, and
callgrind runs with --toggle-collect='ffi_call*', so the clients'
decryption and ACK building (which a real listener does on its own
machine) are not counted. Run with P=0 and P>0; the difference over L*P
delivered datagrams is the node's cost of one QUIC datagram.

    python bench/cg_quic.py L P [--library]
"""
from __future__ import annotations

import asyncio
import ctypes
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aioquic.quic.configuration import QuicConfiguration  # noqa: E402
from aioquic.quic.connection import QuicConnection  # noqa: E402
from aioquic.quic.events import DatagramFrameReceived  # noqa: E402

from relay._core import Core  # noqa: E402
from relay.client.publish import RtpPacketizer, encode_tone  # noqa: E402
from relay.listeners.quic.connection import ListenerConnection  # noqa: E402
from relay.listeners.quic.endpoint import QuicEndpoint  # noqa: E402
from relay.listeners.sessions import RoomState, Sessions  # noqa: E402
from relay.wire.config import NodeConfig  # noqa: E402
from relay.wire.protocol import ALPN_QUIC, MAX_DATAGRAM_FRAME, Join, Reject  # noqa: E402
from relay.wire.tokens import Auth  # noqa: E402

SERVER = ("127.0.0.1", 7443)   # what the clients believe; the node's socket is `Node.sock`


def udp(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return s


class Wire(asyncio.DatagramTransport):
    """aioquic's side of the node's QUIC socket: what the library sends goes out on it."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.sock.sendto(data, addr)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock.getsockname() if name == "sockname" else default


class Listener:
    """One aioquic client on its own socket, and the node's connection for it."""

    def __init__(self, endpoint: QuicEndpoint, wire: Wire, node: "NodeSide") -> None:
        clock = asyncio.get_running_loop().time
        self.node = node
        self.sock = udp("127.0.0.2")
        self.addr, self.node_addr = self.sock.getsockname(), node.sock.getsockname()
        cconf = QuicConfiguration(is_client=True, alpn_protocols=[ALPN_QUIC],
                                  max_datagram_frame_size=MAX_DATAGRAM_FRAME, verify_mode=ssl.CERT_NONE)
        self.client = QuicConnection(configuration=cconf)
        self.client.connect(SERVER, now=clock())
        server = QuicConnection(configuration=endpoint.configuration(),
                                original_destination_connection_id=self.client.original_destination_connection_id)
        self.conn = ListenerConnection(server, endpoint=endpoint)
        self.conn.connection_made(wire)
        self.delivered = 0
        for _ in range(10):
            self.to_node()
            self.from_node()
        assert server._handshake_complete, "handshake did not complete"

    def to_node(self) -> None:
        for data, _ in self.client.datagrams_to_send(now=asyncio.get_running_loop().time() + 0.03):
            self.sock.sendto(data, self.node_addr)

    def from_node(self) -> None:
        clock = asyncio.get_running_loop().time
        # (before the QUIC path, the handshake's packets arrive through the node's socket too)
        self.node.drain(self)
        while True:
            try:
                data = self.sock.recv(2048)
            except BlockingIOError:
                break
            self.client.receive_datagram(data, SERVER, now=clock())
        while (ev := self.client.next_event()) is not None:
            self.delivered += isinstance(ev, DatagramFrameReceived)


class NodeSide:
    """The node's QUIC socket, read as the node reads it."""

    def __init__(self, endpoint: QuicEndpoint, sock: socket.socket) -> None:
        self.endpoint, self.sock = endpoint, sock
        self.by_addr: dict[Any, ListenerConnection] = {}

    def drain(self, lis: Listener | None = None) -> None:
        if lis is not None:
            self.by_addr[lis.addr] = lis.conn
        if self.endpoint.path is not None:
            up = self.endpoint.path.ingest(self.sock.fileno())
        else:
            up = []
            while True:
                try:
                    data, addr = self.sock.recvfrom(2048)
                except BlockingIOError:
                    break
                up.append((data, addr))
        for data, addr in up:
            conn = self.by_addr[addr]
            if conn.link is not None:
                conn.link.to_library()
            conn.datagram_received(data, addr)


async def main(listeners: int, count: int, library: bool) -> None:
    rtp = RtpPacketizer(ssrc=1)
    payloads = encode_tone(440.0, 0.5)
    packets = [rtp.packet(payloads[k % len(payloads)]) for k in range(count)]
    core = Core(listeners + 1, rooms=1, shards=1, depth=64)
    core.room_open(0, True)
    cfg = NodeConfig(quic=SERVER, max_load=0, join_rate=1e9, join_rate_per_source=1e9,
                     quic_fast_path=not library)
    sessions = Sessions(core, cfg, {"r": RoomState("r", 0, 0)}, Auth("open"))
    endpoint = QuicEndpoint(core, sessions)
    sock, out = udp("127.0.0.1"), udp("127.0.0.1")
    if endpoint.path is not None:
        endpoint.path.socket(sock.fileno())
    node_side = NodeSide(endpoint, sock)
    wire = Wire(sock)
    crowd = [Listener(endpoint, wire, node_side) for _ in range(listeners)]
    for lis in crowd:
        lis.conn.transport_name = "quic"
        answer = endpoint.join(lis.conn, Join("r", ""))
        assert not isinstance(answer, Reject), answer
        assert (lis.conn.link is None) == library
    src = b"\x02\x00\x00\x01\x7f\x00\x00\x01" + bytes(8)
    current = [b""]

    def node_step() -> None:
        # what the node does per room packet: the listeners' ACKs in, the
        # packet ingested, fanned out and sent (the QUIC path: sealed and
        # sent in the core's flush; else the endpoint's pump through aioquic)
        node_side.drain()
        core.feed(0, current[0], src)
        core.flush(out.fileno())
        if library:
            for lis in crowd:
                endpoint._pump(lis.conn)

    step = ctypes.CFUNCTYPE(None)(node_step)
    for p in packets:
        current[0] = p
        step()
        for lis in crowd:
            lis.from_node()
            lis.to_node()
        await asyncio.sleep(0)
    delivered = sum(lis.delivered for lis in crowd)
    print(f"delivered {delivered} of {listeners * count}", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), "--library" in sys.argv[3:]))
