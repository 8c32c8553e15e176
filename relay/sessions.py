"""Listener sessions: who may join, who is still there, who gets a resend.

Sans-IO policy over the core: `on_control` and `on_rtcp` take a datagram,
its source and the time, and return the reply to send (or None); joining and
leaving are calls into the core's arena. The server's protocol class only
moves bytes. Every refusal is counted by reason; nothing here raises on bad
input.
"""
from __future__ import annotations

import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from relay._core import Core
from relay.admission import JoinLimiter
from relay.addr import to_sockaddr
from relay.config import NodeConfig
from relay.protocol import (MIN_JOIN, Accept, Challenge, CookieJar, Join, Keepalive, Leave,
                            ProtocolError, Reason, Reject, decode, encode, parse_rtcp)
from relay.tokens import Auth, TokenError

log = logging.getLogger("relay.sessions")


@dataclass
class Session:
    addr: tuple
    room: str
    slot: int
    ssrc: int
    session_id: bytes
    last_seen: float
    nack_budget: float = 0.0
    nack_at: float = 0.0


@dataclass
class RoomState:
    name: str
    index: int
    max_listeners: int


@dataclass
class SessionCounters:
    joins: int = 0
    leaves: int = 0
    timeouts: int = 0
    challenges: int = 0
    keepalives: int = 0
    nacks: int = 0
    nack_rate_limited: int = 0
    control_malformed: int = 0
    replies_suppressed: int = 0
    rejections: Counter = field(default_factory=Counter)
    rate_limited: Counter = field(default_factory=Counter)
    rejections_load: int = 0      # of the node_full rejections, those for load


class Sessions:
    """The session table of one node (or one shard)."""

    # resends per listener: a burst of this many, refilled per second
    NACK_BURST = 32.0
    NACK_RATE = 16.0

    def __init__(self, core: Core, cfg: NodeConfig, rooms: dict[str, RoomState],
                 auth: Auth, cookies: CookieJar | None = None) -> None:
        self.core, self.cfg, self.rooms, self.auth = core, cfg, rooms, auth
        self.cookies = cookies or CookieJar(os.urandom(32))
        self.by_addr: dict[tuple, Session] = {}
        self.counters = SessionCounters()
        self.draining = False
        self.limiter = JoinLimiter(cfg.join_rate, cfg.join_rate_per_source)
        self.load = 0.0           # fan-out duty cycle at the last measurement
        self.load_listeners = 0   # listeners at that measurement
        self._rng = random.SystemRandom()

    # ---------------------------------------------------------------- control

    def on_control(self, data: bytes, addr: tuple, now: float) -> bytes | None:
        """Handle one control datagram from `addr`; returns the reply."""
        try:
            msg = decode(data)
        except ProtocolError as e:
            self.counters.control_malformed += 1
            if e.reason == Reason.UNSUPPORTED_VERSION:
                return self._reply(Reject(Reason.UNSUPPORTED_VERSION), data)
            return None
        if isinstance(msg, Join):
            return self._on_join(msg, data, addr, now)
        if isinstance(msg, Keepalive):
            s = self.by_addr.get(addr)
            if s is None or s.session_id != msg.session_id:
                return self._reject(Reason.UNKNOWN_SESSION, data)
            s.last_seen = now
            self.counters.keepalives += 1
            return data  # the echo lets the client see the node is alive
        if isinstance(msg, Leave):
            s = self.by_addr.get(addr)
            if s is not None and s.session_id == msg.session_id:
                self._remove(s)
                self.counters.leaves += 1
            return None
        # CHALLENGE/ACCEPT/REJECT only flow node -> listener
        self.counters.control_malformed += 1
        return None

    def _reply(self, msg, request: bytes) -> bytes | None:
        out = encode(msg)
        if len(out) > len(request):
            # the rule that makes us useless for amplification: never answer
            # with more bytes than we were sent
            if isinstance(msg, Reject) and msg.redirect:
                return self._reply(Reject(msg.reason), request)
            self.counters.replies_suppressed += 1
            return None
        return out

    def _reject(self, reason: Reason, request: bytes, redirect: str = "") -> bytes | None:
        return self._reply(self._refuse(reason, redirect), request)

    def _on_join(self, msg: Join, data: bytes, addr: tuple, now: float) -> bytes | None:
        if len(data) < MIN_JOIN:
            self.counters.control_malformed += 1
            return None
        raw = to_sockaddr(addr)
        if not msg.cookie:
            self.counters.challenges += 1
            return self._reply(Challenge(self.cookies.make(raw, now)), data)
        if not self.cookies.check(msg.cookie, raw, now):
            # forged, stale or for another address: ask again, never admit
            self.counters.rejections["stale_cookie"] += 1
            self.counters.challenges += 1
            return self._reply(Challenge(self.cookies.make(raw, now)), data)
        # the address is proven from here on
        existing = self.by_addr.get(addr)
        if existing is not None and existing.room == msg.room:
            existing.last_seen = now  # a retransmitted JOIN: the ACCEPT was lost
            return self._reply(self._accept(existing), data)
        admitted = self.admit(msg.room, msg.token, addr[0], now, sockaddr=raw, leaving=existing)
        if isinstance(admitted, Reject):
            return self._reply(admitted, data)
        slot, ssrc = admitted
        s = Session(addr, msg.room, slot, ssrc, os.urandom(8), now, self.NACK_BURST, now)
        self.by_addr[addr] = s
        return self._reply(self._accept(s), data)

    def admit(self, room_name: str, token: str, source_ip: str, now: float, *,
              sockaddr: bytes = b"", pull: bool = False, redirect: str | None = None,
              leaving: "Session | None" = None,
              transport_full: Callable[[], bool] | None = None) -> tuple[int, int] | Reject:
        """The join policy every transport shares, once the joiner's address
        is proven: draining, room, rate limits, token, node and room limits,
        then a slot in the core. Returns (slot, ssrc), or the Reject to send
        (already counted). `leaving` is the caller's current session, ended
        once the token checks out (a room switch). `pull` listeners (QUIC)
        are drained by their transport instead of sendmmsg; such a transport
        passes `transport_full`, its own load test, checked with the node's."""
        redirect = self.cfg.redirect if redirect is None else redirect
        if self.draining:
            return self._refuse(Reason.DRAINING, redirect)
        room = self.rooms.get(room_name)
        if room is None:
            return self._refuse(Reason.UNKNOWN_ROOM)
        # rate limits come before the token check, whose HMAC is the
        # costliest step a flood could make us repeat
        limited = self.limiter.allow(source_ip, now)
        if limited is not None:
            self.counters.rate_limited[limited] += 1
            return self._refuse(Reason.RATE_LIMITED, redirect if limited == "node" else "")
        try:
            self.auth.check(token, room_name)
        except TokenError as e:
            return self._refuse(e.reason)
        if leaving is not None:
            self._remove(leaving)  # switching rooms
        if self.core.listeners >= self.cfg.max_listeners or self._over_load(transport_full):
            return self._refuse(Reason.NODE_FULL, redirect)
        if room.max_listeners and self.core.room_listeners(room.index) >= room.max_listeners:
            return self._refuse(Reason.ROOM_FULL, redirect)
        ssrc = self._rng.getrandbits(32)
        slot = self.core.listener_add(room.index, sockaddr, ssrc, self._rng.getrandbits(16),
                                      self._rng.getrandbits(32), pull=pull, burst=self.cfg.burst_packets)
        if slot < 0:
            return self._refuse(Reason.NODE_FULL, redirect)
        self.counters.joins += 1
        return slot, ssrc

    def _refuse(self, reason: Reason, redirect: str = "") -> Reject:
        self.counters.rejections[reason.name.lower()] += 1
        return Reject(reason, redirect)

    def note_load(self, duty: float, listeners: int) -> None:
        """The fan-out's measured duty cycle (0..1 of a core) with this many
        listeners; admission extrapolates from it."""
        self.load, self.load_listeners = duty, listeners

    def _over_load(self, transport_full: Callable[[], bool] | None = None) -> bool:
        # cost grows with listeners, so one more listener costs about
        # load / load_listeners; below 5 % the measure is mostly noise (or
        # the publisher is quiet) and only max_listeners applies
        over = (self.cfg.max_load > 0 and self.load >= 0.05 and self.load_listeners > 0
                and self.load * (self.core.listeners + 1) / self.load_listeners > self.cfg.max_load)
        if over or (transport_full is not None and transport_full()):
            self.counters.rejections_load += 1
            return True
        return False

    def _accept(self, s: Session) -> Accept:
        return Accept(s.session_id, s.ssrc, int(self.cfg.keepalive_interval * 1000),
                      int(self.cfg.session_timeout * 1000))

    def _remove(self, s: Session) -> None:
        self.core.listener_remove(s.slot)
        del self.by_addr[s.addr]

    # ------------------------------------------------------------------ RTCP

    def on_rtcp(self, data: bytes, addr: tuple, now: float, fd: int) -> int:
        """Receiver reports keep a session alive; NACKs are answered from the
        listener's ring, rate-limited per listener. Returns resends sent."""
        s = self.by_addr.get(addr)
        if s is None:
            return 0  # unproven address: nothing is sent back, ever
        ok, nacks = parse_rtcp(data)
        if not ok:
            self.counters.control_malformed += 1
            return 0
        s.last_seen = now
        sent = 0
        for nack in nacks:
            if nack.media_ssrc != s.ssrc:
                continue
            for seq in nack.seqs:
                self.counters.nacks += 1
                s.nack_budget = min(self.NACK_BURST, s.nack_budget + (now - s.nack_at) * self.NACK_RATE)
                s.nack_at = now
                if s.nack_budget < 1:
                    self.counters.nack_rate_limited += 1
                    continue
                s.nack_budget -= 1
                if self.core.resend(fd, s.slot, seq) == 1:
                    sent += 1
        return sent

    # ------------------------------------------------------------- lifecycle

    def expire(self, now: float) -> int:
        """End sessions silent for longer than the timeout (consent lapsed:
        we stop sending). Returns how many ended."""
        cutoff = now - self.cfg.session_timeout
        stale = [s for s in self.by_addr.values() if s.last_seen < cutoff]
        for s in stale:
            self._remove(s)
        self.counters.timeouts += len(stale)
        return len(stale)

    def end_room(self, room: str) -> list[tuple[tuple, bytes]]:
        """End every session of a room that is going away; returns the
        REJECT(UNKNOWN_ROOM) each listener should get."""
        bye = encode(Reject(Reason.UNKNOWN_ROOM))
        gone = [s for s in self.by_addr.values() if s.room == room]
        for s in gone:
            self._remove(s)
        return [(s.addr, bye) for s in gone]

    def reconfigure(self, cfg: NodeConfig, auth: Auth) -> None:
        """New limits and token settings, for joins from now on."""
        self.cfg, self.auth = cfg, auth
        self.limiter = JoinLimiter(cfg.join_rate, cfg.join_rate_per_source)

    def drain(self) -> list[tuple[tuple, bytes]]:
        """Stop admitting; end every session and return the REJECT(DRAINING)
        each listener should get, with the redirect if one is configured."""
        self.draining = True
        bye = encode(Reject(Reason.DRAINING, self.cfg.redirect))
        out = [(s.addr, bye) for s in self.by_addr.values()]
        for s in list(self.by_addr.values()):
            self._remove(s)
        return out
