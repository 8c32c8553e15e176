"""`relay listen --quic`: a listener over QUIC (ALPN relay-listen/1).

Joins with a framed JOIN on a bidirectional stream and receives RTP as QUIC
DATAGRAM frames. The RTP handling (ordering, loss counting, sinks) is the
UDP client's; only the transport differs. There are no NACKs: QUIC
datagrams are not retransmitted and a late packet is worth nothing live.

The node's certificate is checked one of three ways: against the system's
CAs (a deployed node), against a CA file, or by pinning its SHA-256 (a
node's self-signed certificate, as the browser page does).
"""
from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import time
from contextlib import AsyncExitStack
from typing import Any, Callable

from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (ConnectionTerminated, DatagramFrameReceived, QuicEvent,
                                 StreamDataReceived)
from cryptography.hazmat.primitives.serialization import Encoding

from relay.client.listen import JoinRefused, ListenClient, ListenStats, Unreachable
from relay.wire.protocol import Accept, FrameReader, Join, Leave, ProtocolError, Reason, Reject, frame
from relay.wire.protocol import ALPN_QUIC, MAX_DATAGRAM_FRAME
from relay.wire.stage_msgs import Hand, Reaction


# QUIC's CRYPTO_ERROR range: 0x100 plus a TLS alert (RFC 9001 4.8)
TLS_ALERT = 0x100


class CertificateMismatch(Exception):
    """The node's certificate is not the one pinned, or not trusted."""


class _Conn(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_datagram: Callable[[bytes], None] = lambda d: None
        self.control: asyncio.Queue = asyncio.Queue()
        self.reader = FrameReader()
        self.terminated: ConnectionTerminated | None = None

    async def wait_connected(self) -> None:
        # aioquic shields this future, so it outlives a timed-out wait and
        # would log "exception never retrieved" when the attempt is refused
        if self._connected:
            return
        waiter = self._connected_waiter = self._loop.create_future()
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.shield(waiter)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, DatagramFrameReceived):
            self.on_datagram(event.data)
        elif isinstance(event, StreamDataReceived):
            try:
                for msg in self.reader.feed(event.data):
                    self.control.put_nowait(msg)
            except ProtocolError:
                self.control.put_nowait(ConnectionError("the node sent a malformed control frame"))
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event
            self.control.put_nowait(ConnectionError(f"connection closed: {event.reason_phrase or event.error_code}"))


class QuicListenClient(ListenClient):
    """One listener over QUIC; `sink` gets each RTP packet in order."""

    def __init__(self, server: str, room: str, token: str = "",
                 sink: Callable[[bytes], None] | None = None, cert_sha256: str = "",
                 cafile: str | None = None) -> None:
        super().__init__(server, room, token, sink=sink, nack=False)
        self.cert_sha256 = bytes.fromhex(cert_sha256) if cert_sha256 else b""
        self.cafile = cafile
        self._conn: _Conn | None = None
        self._stack: AsyncExitStack | None = None
        self._stream = -1

    def _configuration(self) -> QuicConfiguration:
        conf = QuicConfiguration(is_client=True, alpn_protocols=[ALPN_QUIC],
                                 max_datagram_frame_size=MAX_DATAGRAM_FRAME,
                                 server_name=self.server[0])
        if self.cert_sha256:
            conf.verify_mode = ssl.CERT_NONE   # checked by pin after the handshake
        elif self.cafile:
            conf.load_verify_locations(self.cafile)
        return conf

    async def _connect(self, timeout: float) -> _Conn:
        await self._disconnect()
        self._stack = AsyncExitStack()
        made: list[_Conn] = []

        def protocol(*args: Any, **kwargs: Any) -> _Conn:
            made.append(_Conn(*args, **kwargs))
            return made[-1]
        try:
            conn = await asyncio.wait_for(self._stack.enter_async_context(
                connect(self.server[0], self.server[1], configuration=self._configuration(),
                        create_protocol=protocol)), timeout)
        except socket.gaierror as e:
            raise Unreachable(f"cannot resolve {self._where()}: {e.strerror}") from None
        except ConnectionError:
            ended = made[-1].terminated if made else None
            if ended is not None and TLS_ALERT <= ended.error_code < TLS_ALERT + 0x100:
                # our TLS refused the node's certificate: retrying cannot help
                await self._disconnect()
                raise CertificateMismatch(
                    f"the node's certificate is not trusted here ({ended.reason_phrase}): pin it with "
                    "--cert-hash (the node's admin port serves it at /quic.json) or pass --cafile") from None
            raise
        assert isinstance(conn, _Conn)
        if self.cert_sha256:
            peer = conn._quic.tls._peer_certificate
            der = peer.public_bytes(Encoding.DER) if peer is not None else b""
            if hashlib.sha256(der).digest() != self.cert_sha256:
                await self._disconnect()
                raise CertificateMismatch("the node's certificate does not match --cert-hash")
        conn.on_datagram = self._datagram
        self._conn = conn
        return conn

    async def _disconnect(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._conn = self._stack, None, None
            await stack.aclose()

    async def join(self, attempts: int = 5, timeout: float = 3.0) -> Accept:
        """Connect and JOIN; follows up to 3 redirects. Raises JoinRefused,
        TimeoutError or CertificateMismatch."""
        for _hop in range(4):
            conn = await self._connect_retrying(attempts, timeout)
            self._stream = conn._quic.get_next_available_stream_id()
            conn._quic.send_stream_data(self._stream, frame(Join(self.room, self.token, speaker=self.speaker)))
            conn.transmit()
            msg = await self._next_control(timeout)
            if isinstance(msg, Accept):
                return self._joined(msg)
            if self._redirected(msg.reason, msg.redirect):
                continue
            raise self._refused(msg)
        raise JoinRefused(Reason.NODE_FULL, "")

    def _say(self, msg: Hand | Reaction) -> None:
        """A hand or a reaction, on the join stream."""
        if self._conn is not None and self._stream >= 0:
            self._conn._quic.send_stream_data(self._stream, frame(msg))  # type: ignore[arg-type]
            self._conn.transmit()

    def send_audio(self, packet: bytes) -> None:
        """A speaker's RTP packet, as a QUIC datagram: plain RTP, which the
        connection encrypts and authenticates (no SRTP, no key exchange)."""
        if self._conn is not None:
            self._conn._quic.send_datagram_frame(packet)
            self._conn.transmit()

    async def _connect_retrying(self, attempts: int, timeout: float) -> _Conn:
        # a node in a join storm may take a while to answer a handshake
        for _ in range(attempts):
            try:
                return await self._connect(timeout)
            except (asyncio.TimeoutError, ConnectionError):
                await self._disconnect()
        raise TimeoutError(f"no QUIC answer from {self._where()}")

    async def _next_control(self, timeout: float | None) -> Accept | Reject:
        assert self._conn is not None
        while True:
            item = await asyncio.wait_for(self._conn.control.get(), timeout)
            if isinstance(item, Exception):
                raise item
            if isinstance(item, (Accept, Reject)):
                return item

    async def listen(self, duration: float | None = None, dead_after: float | None = None) -> ListenStats:
        """Join, then receive until `duration` seconds pass (forever if None).
        A node that drains with a redirect is followed there. (`dead_after`
        is the UDP client's; QUIC's idle timeout ends a dead connection.)"""
        # waiting for a place on a full node counts against `duration`; the
        # listening itself then gets all of it, as before
        await self.join_when_room(None if duration is None else time.monotonic() + duration)
        deadline = None if duration is None else time.monotonic() + duration
        while deadline is None or time.monotonic() < deadline:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                msg = await self._next_control(wait)
            except asyncio.TimeoutError:
                break
            except ConnectionError as e:
                self._event(str(e))
                break
            if isinstance(msg, Reject):
                self._event(f"node says {msg.reason.name.lower()}"
                            + (f", moving to {msg.redirect}" if msg.redirect else ""))
                if not msg.redirect:
                    break
                await self._move(msg.redirect)
        return self.stats

    async def aclose(self) -> None:
        """Say LEAVE, close the connection."""
        self._flush_held()
        if self._conn is not None and self._session is not None and self._stream >= 0:
            self._conn._quic.send_stream_data(self._stream, frame(Leave(self._session.session_id)),
                                              end_stream=True)
            self._conn.transmit()
        await self._disconnect()

