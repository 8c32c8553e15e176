"""QUIC and WebTransport listeners (aioquic, on the node's uvloop loop).

One UDP port, two ALPNs:

- "relay-listen/1": plain QUIC. The client opens a bidirectional stream and
  sends a framed JOIN (docs/protocol.md, "QUIC and WebTransport"); the node
  answers ACCEPT or REJECT on it, then sends the room's RTP as QUIC
  DATAGRAM frames (RFC 9221).
- "h3": HTTP/3 with WebTransport, for browsers. The page opens a session
  with an extended CONNECT to /relay, then speaks the same framed JOIN on a
  bidirectional WebTransport stream; audio arrives as HTTP datagrams
  (RFC 9297) of that session.

Once joined, a listener's audio and ACKs are the core's (path.py beside
this module, docs/quic-fast-path.md): the sender threads seal and send its
ring, the core reads its ACKs and keeps its congestion window, and a
listener whose window is shut loses only its own oldest audio. Without the
QUIC path (quic_fast_path = false, or a connection the core cannot carry)
the fan-out signals `core.pull_fd` and the loop tops each connection up
through aioquic, a few datagrams in flight. QUIC's handshake proves the
client's address, so no cookie is needed; the session ends when the
connection closes or goes idle.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter
from functools import partial
from typing import Any

from aioquic.buffer import encode_uint_var

from relay._core import Core, QuicPath
from relay.listeners.quic import tls as certs
from relay.listeners.admission import source_key
from relay.listeners.load import PATH_SESSION_COST_GUESS, SESSION_COST_GUESS, QuicLoad
from relay.listeners.quic.certificates import QuicCertificates
from relay.listeners.quic.connection import STALL_S, ListenerConnection, QuicCounters
from relay.listeners.quic.path import Link
from relay.listeners.quic.server import CoreReadTransport, QuicServer
from relay.listeners.sessions import Session, Sessions
from relay.wire.protocol import (ALPN_QUIC, MAX_QUIC_AUDIO, WEBTRANSPORT_PATH, Accept, Join, Reject, Speakers, frame)
from relay.wire.stage_msgs import Hand, Reaction, StageMessage

log = logging.getLogger("relay.quic")

# a connection that has not sent its JOIN this long after it was opened is
# closed: a listener joins at once, an idle connection only holds memory
JOIN_DEADLINE_S = 5.0
# a joined listener that has not answered for STALL_S + GONE_S has gone (a
# killed process, a lost network): its session ends then, not at the idle
# timeout; while stalled it is held out of the fan-out, so its backlog is
# not counted as egress drops
GONE_S = 2.0
# at most one line a minute about audio packets too large for QUIC
TOO_LARGE_LOG_EVERY_S = 60.0


class QuicEndpoint(QuicCertificates):
    """The node's QUIC/WebTransport listener port. It sees the core (its
    QUIC path, and rings to pull from without it) and the session table
    (the shared join policy and the one place sessions live), nothing else
    of the node."""

    def __init__(self, core: Core, sessions: Sessions) -> None:
        self.core, self.sessions = core, sessions
        cfg = sessions.cfg
        assert cfg.quic is not None
        self.addr = cfg.quic
        self.files = certs.fingerprint(cfg.quic_cert, cfg.quic_key) if cfg.quic_cert else b""
        self.creds = certs.load(cfg.quic_cert, cfg.quic_key) if cfg.quic_cert else self._self_signed()
        self.counters = QuicCounters()
        self._too_large_logged = -TOO_LARGE_LOG_EVERY_S
        self._core_too_large = 0     # the core's count when last looked at
        self.server: QuicServer | None = None
        # connections that have not joined yet: when they opened, and from where
        self.pending: dict[ListenerConnection, tuple[float, str]] = {}
        self._pending_by_source: Counter = Counter()
        # joined listeners' audio and ACKs in the core (quic_path.py), unless turned off
        self.path = QuicPath(core) if sessions.cfg.quic_fast_path else None
        # what QUIC costs the loop thread: handshakes, control streams, ACKs
        self.load = QuicLoad(PATH_SESSION_COST_GUESS if self.path is not None else SESSION_COST_GUESS)
        sessions.before_remove = self._unlink

    async def start(self) -> None:
        """Bind the UDP port; raises OSError if it is taken."""
        # the event loop reports a failed bind without its errno; a plain
        # bind first gives the real reason ("Address already in use")
        probe = socket.socket(socket.AF_INET6 if ":" in self.addr[0] else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind(self.addr)
        finally:
            probe.close()
        # Retry (RFC 9000 8.1.2): a client proves its address with a token
        # before the node spends a key exchange and a signature on it, so a
        # flood of spoofed Initials costs one stateless reply each
        def server() -> QuicServer:
            return QuicServer(self, configuration=self.configuration(),
                              create_protocol=partial(ListenerConnection, endpoint=self), retry=True)
        if self.path is None:
            _, self.server = await asyncio.get_running_loop().create_datagram_endpoint(server, local_addr=self.addr)
        else:       # the core reads and writes the port itself (the QUIC path)
            self.server = server()
            CoreReadTransport.bind(self.addr, self.server, self.path, self.load.add_busy)
        asyncio.get_running_loop().add_reader(self.core.pull_fd, self._on_pull_ready)
        log.info("QUIC/WebTransport listeners on %s:%d (certificate %s, sha-256 %s)",
                 self.addr[0], self.port, "self-signed" if self.creds.self_signed else "configured",
                 self.creds.sha256.hex())

    @property
    def port(self) -> int:
        if self.server is not None and self.server._transport is not None:
            return self.server._transport.get_extra_info("sockname")[1]
        return self.addr[1]

    def _connections(self) -> list[ListenerConnection]:
        return self.sessions.pulled()  # type: ignore[return-value]  # QUIC sessions are keyed by connection

    # ------------------------------------------------------------ connections

    def may_open(self, addr: Any) -> bool:
        """May this source open one more connection? Not while the node, or
        this source (an IPv4 address or IPv6 /64), holds its cap of
        connections that have not joined."""
        cfg = self.sessions.cfg
        if len(self.pending) >= cfg.quic_max_pending or \
                self._pending_by_source[source_key(str(addr[0]))] >= cfg.quic_max_pending_per_source:
            self.counters.refused_connections += 1
            return False
        return True

    def opened(self, conn: ListenerConnection, addr: Any) -> None:
        key = source_key(str(addr[0]))
        self.pending[conn] = (time.monotonic(), key)
        self._pending_by_source[key] += 1

    def not_pending(self, conn: ListenerConnection) -> None:
        entry = self.pending.pop(conn, None)
        if entry is not None:
            self._pending_by_source[entry[1]] -= 1
            if not self._pending_by_source[entry[1]]:
                del self._pending_by_source[entry[1]]

    # --------------------------------------------------------------- sessions

    def join(self, conn: ListenerConnection, msg: Join) -> Accept | Reject:
        """Admit a listener through the node's shared policy."""
        s = conn.session
        if s is not None and s.room == msg.room:
            return self.sessions.accept_message(s)
        # the validated path's address: what the per-source join limit keys on
        paths = conn._quic._network_paths
        peer = paths[0].addr if paths else ("", 0)
        joined = self.sessions.join(conn, conn.transport_name, msg.room, msg.token, str(peer[0]),
                                    time.monotonic(), resume=msg.resume, speaker=msg.speaker,
                                    transport_full=lambda: self.load.full(len(self.sessions.pulled()),
                                                                          self.sessions.cfg.max_load))
        if isinstance(joined, Reject):
            # a room switch refused after the token check has ended the old session
            conn.session = self.sessions.table.get(conn)  # type: ignore[assignment]
            return joined
        conn.session = joined
        self.not_pending(conn)
        prefix = encode_uint_var(conn.wt_session // 4) if conn.wt_session is not None else b""
        if self.path is not None and Link.possible(conn._quic, conn.hp, prefix):
            conn.link = Link(self.path, joined.slot, conn._quic, conn.hp, conn.transport_name, prefix)  # type: ignore[arg-type]
        self._pump(conn)
        return self.sessions.accept_message(joined)

    def speaker_audio(self, conn: ListenerConnection, data: bytes) -> None:
        """A datagram from a connection: a speaker's RTP goes to its stage
        (plain: QUIC has authenticated and decrypted it); a listener has
        nothing to send on datagrams, and what it sends is counted and dropped."""
        s = conn.session
        if s is None or s.role != "publish" or self.sessions.stages is None:
            self.counters.stray_datagrams += 1
            return
        self.sessions.stages.on_rtp(data, conn)

    def stage_message(self, conn: ListenerConnection, msg: Hand | Reaction) -> None:
        """A session's raised hand or reaction, on its join stream."""
        if conn.session is not None:
            self.sessions.on_stage_message(conn.session, msg, time.monotonic())

    def note_load(self, loop_duty: float, interval_ns: int) -> None:
        """The loop thread's busy fraction over the last `interval_ns`."""
        self.load.note(loop_duty, interval_ns, len(self.sessions.pulled()))

    def leave(self, conn: ListenerConnection, why: str = "") -> None:
        """End the connection's session, if it has one; `why` is "left"
        (LEAVE or a closed connection) or "timeout" (idle), for the counters."""
        if conn.session is not None:
            self.sessions.end(conn, why)
            conn.session = None

    def _unlink(self, session: Session) -> None:
        """A session is ending, however: its connection's audio leaves the
        core's QUIC path before its slot does, and the library's packet
        numbers go on from the core's."""
        conn = session.key
        if isinstance(conn, ListenerConnection) and conn.link is not None:
            conn.link.detach()
            conn.link = None

    def describe(self) -> dict[str, Any]:
        """Where and how to connect, for the web page and `relay listen
        --quic`: the WebTransport URL and, for a self-signed certificate, the
        SHA-256 to pin. A wildcard bind has no one address to give: then
        "quic" and "webtransport" are null and a client uses the host it
        reached the admin port by, with "port" and "path" (never a name
        taken from a request's Host header, which anyone can write)."""
        host = self.addr[0]
        shown = None if host in ("0.0.0.0", "::", "") else (f"[{host}]" if ":" in host else host)
        return {"quic": f"{shown}:{self.port}" if shown else None, "port": self.port, "alpn": ALPN_QUIC,
                "path": WEBTRANSPORT_PATH,
                "webtransport": f"https://{shown}:{self.port}{WEBTRANSPORT_PATH}" if shown else None,
                "cert_sha256": self.creds.sha256.hex() if self.creds.self_signed else None}

    # ------------------------------------------------------------ data path

    def _on_pull_ready(self) -> None:
        t0 = time.perf_counter_ns()
        try:
            os.read(self.core.pull_fd, 8)
        except BlockingIOError:
            pass
        for conn in self._connections():
            self._pump(conn)
        self.load.busy_ns += time.perf_counter_ns() - t0

    def _pump(self, conn: ListenerConnection) -> None:
        now = time.monotonic()
        room = conn.can_take(now)
        if room <= 0 or conn.session is None or conn.link is not None:
            return  # this path is behind: its ring drops its own oldest audio
        packets = self.core.pull(conn.session.slot, room)
        if not packets:
            return
        if conn.unanswered_since is None:
            conn.unanswered_since = now
        conn.last_ping = now   # audio elicits ACKs as well as a PING would
        kind = conn.transport_name
        sent = 0
        for p in packets:
            if len(p) > MAX_QUIC_AUDIO:
                # it would never leave: aioquic keeps an unsendable DATAGRAM
                # at the head of its queue, and everything behind it waits
                self._too_large(kind, len(p), now)
                continue
            conn.send_datagram(p)
            sent += 1
            self.counters.bytes_sent[kind] += len(p)
        self.counters.datagrams_sent[kind] += sent
        conn.transmit()

    def _too_large(self, kind: str, size: int, now: float) -> None:
        self.counters.too_large[kind] += 1
        self._warn_too_large(size, now)

    def _warn_too_large(self, size: int, now: float) -> None:
        if now - self._too_large_logged >= TOO_LARGE_LOG_EVERY_S:
            self._too_large_logged = now
            log.warning("QUIC listeners cannot be sent %d-byte audio packets (a QUIC datagram carries at "
                        "most %d): they hear gaps; lower the publisher's bitrate or frame length "
                        "(relay_quic_too_large_total counts them)", size, MAX_QUIC_AUDIO)

    # ---------------------------------------------------------- housekeeping

    def keepalive(self, now: float) -> None:
        """PING sessions that have had nothing to send for a while (a quiet
        publisher), so the idle timeout only ends sessions whose listener
        has really gone."""
        interval = self.sessions.cfg.keepalive_interval
        self.renew_if_due()
        if self.path is not None:
            c = self.core.counters()
            big = c["quic_too_large"] + c["webtransport_too_large"]
            if big > self._core_too_large:
                self._core_too_large = big
                self._warn_too_large(c["quic_too_large_len"], now)
        for conn in self._connections():
            self._watch(conn, now)
            if conn.link is not None:
                conn.link.follow_path()
                sent = conn.link.quiet()[1]
                if sent is not None:
                    conn.last_ping = max(conn.last_ping, now - sent)
            if conn.session is not None and now - conn.last_ping >= interval:
                conn.keepalive_ping(now)
        late = [c for c, (opened, _) in self.pending.items() if now - opened > JOIN_DEADLINE_S]
        for conn in late:
            self.not_pending(conn)
            self.counters.join_deadline += 1
            conn._close("no JOIN in time")

    def _watch(self, conn: ListenerConnection, now: float) -> None:
        """Hold a stalled listener out of the fan-out, put it back when it
        answers, end its session when it has gone."""
        s = conn.session
        if s is None:
            return
        quiet = now - conn.unanswered_since if conn.unanswered_since is not None else 0.0
        if conn.link is not None:
            quiet = max(quiet, conn.link.quiet()[0])
        if quiet > STALL_S + GONE_S:
            self.counters.gone += 1
            self.leave(conn, "timeout")
            conn._close("listener stopped answering")
        elif quiet > STALL_S and not conn.held:
            self.core.listener_hold(s.slot, True)
            conn.held = True
        elif quiet <= STALL_S and conn.held:
            self.core.listener_hold(s.slot, False)
            conn.held = False

    def tell_room(self, room: str, message: Speakers | StageMessage) -> None:
        """Who is speaking, or the room's reactions, to every QUIC and
        WebTransport session of `room`, on its join stream."""
        framed = frame(message)  # type: ignore[arg-type]
        for conn in self._connections():
            if conn.session is not None and conn.session.room == room:
                conn.send_framed(framed)

    def say(self, session: Session, message: StageMessage) -> None:
        """One message (a host's INVITE) to one session, on its join stream."""
        conn: ListenerConnection = session.key  # type: ignore[assignment]
        conn.send_framed(frame(message))  # type: ignore[arg-type]

    def tell(self, session: Session, reject: Reject, close: str = "") -> None:
        """An ended session's listener is told why on its join stream; with
        `close`, its connection is closed with that reason too."""
        conn: ListenerConnection = session.key  # type: ignore[assignment]
        conn.session = None
        conn.send(reject)
        if close:
            conn._close(close)

    def close(self) -> None:
        """Close every connection and the port."""
        try:
            asyncio.get_running_loop().remove_reader(self.core.pull_fd)
        except RuntimeError:
            pass
        for conn in self._connections():
            self.leave(conn)
        if self.path is not None:
            self.path.socket(-1)
        if self.server is not None:
            self.server.close()
            self.server = None
