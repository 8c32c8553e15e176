"""The QUIC endpoint's side of the core's QUIC path (docs/quic-fast-path.md).

Once a QUIC or WebTransport listener has joined, its audio leaves the QUIC
library: the core seals it on the sender threads and sends it in their
sendmmsg batches, and reads the listener's ACK-only packets. The library
keeps the rest of the connection. A Link keeps the two owners coherent:

- packet numbers: before the library sends anything, the core pauses and
  the library goes on from the core's next number; afterwards the core
  resumes from the library's. One increasing sequence, no number twice.
- keys: the core gets the current key phase's keys when it takes the
  connection, and again whenever the library's secrets change (a key
  update), always before the library sends again.
- receiving: the core reads the QUIC port (QuicPath.ingest) and ends a
  listener's ACK-only packets there; the library's idle timer follows the
  last packet the core opened. Everything else reaches the library with its
  expected packet number moved past what the core opened; so do ACKs while
  the library waits for ACKs of its own packets (a PING, a control
  message).
"""
from __future__ import annotations

from typing import Any

from aioquic import tls
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoContext, derive_key_iv_hp

from relay._core import QuicPath
from relay.wire.addr import to_sockaddr
from relay.wire.protocol import MAX_QUIC_AUDIO

ONE_RTT = tls.Epoch.ONE_RTT
SUITES = (0x1301, 0x1302, 0x1303)
KIND = {"quic": 1, "webtransport": 2}


def first_hp(quic: QuicConnection) -> tuple[bytes, bytes] | None:
    """The header-protection keys (send, receive) of the first 1-RTT
    secrets: they never change with key updates (RFC 9001 6), and the
    library keeps only the current secret, so they are taken at the end of
    the handshake."""
    crypto = quic._cryptos.get(ONE_RTT)
    if crypto is None or not crypto.send.is_valid() or not crypto.recv.is_valid():
        return None
    return _keys(crypto.send)[2], _keys(crypto.recv)[2]


def _keys(ctx: CryptoContext) -> tuple[bytes, bytes, bytes]:
    assert ctx.secret is not None and ctx.cipher_suite is not None and ctx.version is not None
    return derive_key_iv_hp(cipher_suite=ctx.cipher_suite, secret=ctx.secret, version=ctx.version)


def _sockaddr(addr: Any) -> bytes:
    return to_sockaddr(tuple(addr))


class Link:
    """One connection's audio on the core's QUIC path."""

    def __init__(self, path: QuicPath, slot: int, quic: QuicConnection, hp: tuple[bytes, bytes],
                 kind: str, prefix: bytes) -> None:
        self.path, self.slot, self.quic, self.hp = path, slot, quic, hp
        net = quic._network_paths[0]
        self.addr, self.peer_cid = net.addr, quic._peer_cid.cid
        self.space = quic._spaces[ONE_RTT]
        self.crypto = quic._cryptos[ONE_RTT]
        self._secrets: tuple[Any, Any] = (None, None)
        path.attach(slot, KIND[kind], _sockaddr(self.addr), self.peer_cid, quic.host_cid, prefix,
                    quic._remote_ack_delay_exponent, quic._loss.max_ack_delay)
        self.sync_keys()
        path.resume(slot, quic._packet_number)
        self.idle = quic._idle_timeout()

    @staticmethod
    def possible(quic: QuicConnection, hp: tuple[bytes, bytes] | None, prefix: bytes) -> bool:
        """Can the core carry this connection's audio? An established 1-RTT
        connection on a validated path, with a cipher suite the core knows,
        whose peer takes DATAGRAM frames as large as our audio."""
        crypto = quic._cryptos.get(ONE_RTT)
        limit = quic._remote_max_datagram_frame_size
        return (hp is not None and crypto is not None and crypto.send.is_valid()
                and int(crypto.send.cipher_suite or 0) in SUITES and bool(quic._network_paths)
                and quic._network_paths[0].is_validated and quic._peer_cid is not None
                and limit is not None and limit >= 1 + len(prefix) + MAX_QUIC_AUDIO)

    def sync_keys(self) -> None:
        """Hand the core the current phase's keys if the library's changed."""
        send, recv = self.crypto.send, self.crypto.recv
        if (send.secret, recv.secret) == self._secrets:
            return
        sk, siv, _ = _keys(send)
        rk, riv, _ = _keys(recv)
        self.path.keys(self.slot, int(send.cipher_suite or 0), sk, siv, self.hp[0], send.key_phase,
                       rk, riv, self.hp[1], recv.key_phase)
        self._secrets = (send.secret, recv.secret)

    def around_send(self, transmit: Any) -> None:
        """Let the library send: the core pauses, the library's packet
        numbers go on from the core's, then the core's from the library's."""
        quic = self.quic
        quic._packet_number = max(quic._packet_number, self.path.pause(self.slot))
        self.sync_keys()
        transmit()
        self.path.resume(self.slot, quic._packet_number)
        self.path.waiting(self.slot, bool(self.space.ack_eliciting_in_flight))

    def detach(self) -> None:
        """The session ends: the core sends no more, and the library's next
        packet number follows the core's last."""
        self.quic._packet_number = max(self.quic._packet_number, self.path.pause(self.slot))

    def to_library(self) -> None:
        """A packet of this connection goes to the library: its expected
        packet number must not be behind what the core has opened."""
        expected = self.path.expected(self.slot)
        if expected > self.space.expected_packet_number:
            self.space.expected_packet_number = expected

    def refresh_idle(self, now: float) -> None:
        """Before the library's timer decides the peer is idle: the packets
        the core ended count as heard."""
        heard = self.path.heard(self.slot)
        if heard is not None and self.quic._close_at is not None:
            self.quic._close_at = max(self.quic._close_at, now - heard + self.idle)

    def follow_path(self) -> None:
        """After a migration or a new connection id, send where the library does."""
        net = self.quic._network_paths[0] if self.quic._network_paths else None
        if net is None or not net.is_validated:
            return
        if net.addr != self.addr or self.quic._peer_cid.cid != self.peer_cid:
            self.addr, self.peer_cid = net.addr, self.quic._peer_cid.cid
            self.path.path(self.slot, _sockaddr(self.addr), self.peer_cid)

    def quiet(self) -> tuple[float, float | None]:
        """(seconds since the first audio packet sent after the listener was
        last heard from, 0.0 if it has answered; seconds since the core
        last sent it audio, None if never)."""
        return self.path.quiet(self.slot)  # type: ignore[no-any-return]
