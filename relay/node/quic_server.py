"""The QUIC port's server side: aioquic's server, changed where a node that
many strangers connect to needs it. The endpoint it serves (relay.node.quic)
decides whether a source may open another connection and is told of each
one that opens."""
from __future__ import annotations

import time
from typing import Any

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer as _AioquicServer
from aioquic.buffer import Buffer
from aioquic.quic.packet import QuicPacketType, pull_quic_header


class QuicServer(_AioquicServer):
    """aioquic's server, with three changes for a node that many strangers
    connect to. A listener's short-header packets go to its connection's
    link to the core's QUIC path first (relay.node.quic_path), which ends
    most of them (ACKs) before any Python parsing. Forgetting a closed connection touches only that
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
            # a short header: most often a listener's ACK, for the core's QUIC path
            conn = self._protocols.get(data[1:1 + self._configuration.connection_id_length])
            link = getattr(conn, "link", None)
            if link is not None:
                t0 = time.perf_counter_ns()
                conn.unanswered_since = None  # type: ignore[union-attr]
                handled = link.received(data, addr, conn._loop.time())  # type: ignore[union-attr]
                self.endpoint.load.busy_ns += time.perf_counter_ns() - t0
                if handled:
                    return
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
