"""The QUIC port's server side: aioquic's server, changed where a node that
many strangers connect to needs it. The endpoint it serves (relay.listeners.quic.endpoint)
decides whether a source may open another connection and is told of each
one that opens."""
from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, Callable

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer as _AioquicServer
from aioquic.buffer import Buffer
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from relay._core import QuicPath


class QuicServer(_AioquicServer):
    """aioquic's server, with three changes for a node that many strangers
    connect to. The core reads the port and ends the QUIC path listeners'
    ACKs (relay.listeners.quic.path); what it hands up for such a connection
    first has the library's expected packet number moved on. Forgetting a closed connection touches only that
    connection's ids (aioquic walks every id of every connection, so
    closing N connections cost O(N²): 1,500 at once stalled the loop for
    13 s). And a new connection is not created at all while too many that
    have not joined are open, node-wide or from one source (dropped before
    any state or key exchange; the client's handshake times out)."""

    def __init__(self, endpoint: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.endpoint = endpoint

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        assert isinstance(data, bytes)
        if data and not data[0] & 0x80:
            # a short header the core has already seen (QuicPath.ingest) and left to the library
            conn = self._protocols.get(data[1:1 + self._configuration.connection_id_length])
            link = getattr(conn, "link", None)
            if link is not None:
                link.to_library()
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=self._configuration.connection_id_length)
        except ValueError:
            return
        known = header.destination_cid in self._protocols
        # only an Initial that carries our Retry token can open a connection
        if (not known and header.packet_type == QuicPacketType.INITIAL and header.token
                and not self.endpoint.may_open(addr)):
            return
        super().datagram_received(data, addr)
        if not known:
            protocol = self._protocols.get(header.destination_cid)
            if protocol is not None:
                self.endpoint.opened(protocol, addr)  # type: ignore[arg-type]

    def _connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        quic = protocol._quic
        cids = {c.cid for c in quic._host_cids}
        cids.add(quic.original_destination_connection_id)
        if quic._retry_source_connection_id:
            cids.add(quic._retry_source_connection_id)
        for cid in cids:
            if self._protocols.get(cid) is protocol:
                del self._protocols[cid]


class CoreReadTransport(asyncio.DatagramTransport):
    """The QUIC port's socket as aioquic's server sees it, when the core
    reads it: the event loop calls `readable` when datagrams wait, the core
    takes them with recvmmsg and ends the QUIC path's ACKs, and the rest go
    to the server. Sending is a plain non-blocking sendto: a full socket
    drops the datagram, which QUIC recovers like any loss."""

    def __init__(self, sock: socket.socket, server: QuicServer, path: QuicPath,
                 busy: Callable[[int], None]) -> None:
        super().__init__()
        self.sock, self.server, self.path, self.busy = sock, server, path, busy
        self.loop = asyncio.get_running_loop()
        self._closing = False
        server.connection_made(self)
        self.loop.add_reader(sock.fileno(), self.readable)

    @classmethod
    def bind(cls, addr: tuple[str, int], server: QuicServer, path: QuicPath,
             busy: Callable[[int], None]) -> "CoreReadTransport":
        """Bind the port (OSError if it is taken), serve it, and give the
        core its socket to send on."""
        sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
        transport = cls(sock, server, path, busy)
        path.socket(sock.fileno())
        return transport

    def readable(self) -> None:
        t0 = time.perf_counter_ns()
        up = self.path.ingest(self.sock.fileno())
        self.busy(time.perf_counter_ns() - t0)     # the listeners' ACKs: the sessions' steady cost
        for data, addr in up:
            self.server.datagram_received(data, addr)

    def sendto(self, data: Any, addr: Any = None) -> None:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass    # an unreachable peer: its connection times out

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self.sock.getsockname()
        if name == "socket":
            return self.sock
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
