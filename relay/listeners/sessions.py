"""Listener sessions: who may join, who is still there, who gets a resend.

Sans-IO policy over the core, one session table for every transport. The
calls take what arrived (a datagram and its source, or a QUIC join), a
monotonic `now` and return what the adapters must do: the reply bytes for
a control datagram's source, `Resend` these sequence numbers of this slot,
`Tell` an ended session why (`Send` these bytes to this address for UDP). Joining and leaving are calls into the core's
arena. Random numbers (SSRCs, offsets, session ids, the cookie secret) come
from an injected source. Every refusal is counted by reason; nothing here
raises on bad input.
"""
from __future__ import annotations

import hmac
import logging
import random
import time
from collections import Counter
from dataclasses import replace
from typing import Callable, Hashable

from relay._core import Core
from relay.listeners.admission import JoinLimiter, LoadGate
from relay.listeners.resume import first_burst, missed
# the session table's records: imported from here by the node and the adapters
from relay.listeners.session import (MAX_RTCP, PULLED, UDP, Resend, RoomState, Send, Session,  # noqa: F401
                                     SessionCounters, Tell, relay_ssrc)
from relay.stage.moderation import Moderation
from relay.stage.stages import Stages, seat_of
from relay.wire.addr import to_sockaddr
from relay.wire.config import NodeConfig
from relay.wire.keyx import Keys, SealError, mac, node_keys, node_public
from relay.wire.cookies import CookieJar
from relay.wire.protocol import (MIN_JOIN, Accept, Challenge, Join, Keepalive, Leave, MsgType,
                                 ProtocolError, Reason, Reject, cookie_proof, decode, encode)
from relay.wire.rtcp import parse_rtcp
from relay.wire.stage_msgs import Hand, Reaction
from relay.wire.tokens import Auth, TokenError

log = logging.getLogger("relay.sessions")

class Sessions:
    """The session table of one node."""

    # resends per listener: a burst of this many, refilled per second
    NACK_BURST = 32.0
    NACK_RATE = 16.0

    def __init__(self, core: Core, cfg: NodeConfig, rooms: dict[str, RoomState],
                 auth: Auth, rng: random.Random | None = None) -> None:
        self.core, self.cfg, self.rooms, self.auth = core, cfg, rooms, auth
        self.rng = rng or random.SystemRandom()
        self.cookies = CookieJar(self.rng.randbytes(32))
        self.keyx_secret = self.rng.randbytes(32)   # the node's side of speakers' key exchanges
        self.table: dict[Hashable, Session] = {}
        self.counters = SessionCounters()
        # told of a QUIC session about to leave the core (relay.listeners.quic.endpoint): before its slot goes
        self.before_remove: Callable[[Session], None] | None = None
        self.draining = False
        self.limiter = JoinLimiter(cfg.join_rate, cfg.join_rate_per_source)
        self.gate = LoadGate(cfg.load_floor)
        self._by_room: Counter = Counter()    # (room, transport) -> sessions
        self._pulled: set[Hashable] = set()   # keys of sessions whose transport pulls
        self._by_token: Counter = Counter()   # token -> sessions it holds
        # where to send a joiner this node refuses: (room, transport) -> an
        # address, or "" for the configured redirect (the cluster directory
        # sets it; it reads a local table, never the network)
        self.route: Callable[[str, str], str] | None = None
        # where a listener of a room should move if this node dies (told in
        # its ACCEPT): the node keeps it fresh, without asking per join
        self.alternate: Callable[[str], str] = lambda room: self.cfg.redirect
        self.stages: Stages | None = None     # the node's stages, for speakers
        self.moderation = Moderation()          # hosts' decisions and listeners' hands, per room
        # datagrams to send before the reply on_control returns (a resuming
        # listener's missed audio, which must reach it ahead of its ACCEPT)
        self.outbox: list[Send] = []
        # told of a listener resuming here (room, its resume point): a room
        # this node does not carry yet asks its parents for the history
        self.resumed: Callable[[str, int], None] | None = None
        # told (address, True) when a UDP session starts at an address and
        # (address, False) when it ends: the listener port's gate lets that
        # address's datagrams through before any stranger's
        self.on_address: Callable[[tuple, bool], None] | None = None
        # told of every UDP listener the core sends to (slot, sockaddr): the
        # AF_XDP egress routes it through its interface (relay.listeners.xdp)
        self.placed: Callable[[int, bytes], object] | None = None

    # ---------------------------------------------------------------- control

    def on_control(self, data: bytes, addr: tuple, now: float) -> bytes | None:
        """Handle one UDP control datagram from `addr`; returns the reply to
        send back to `addr`, if any (never longer than `data`)."""
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
            s = self.table.get(addr)
            if s is None or s.session_id != msg.session_id:
                # echo the id asked about: proof to the listener that this
                # answer saw its KEEPALIVE
                return self._reply(replace(self._refuse(Reason.UNKNOWN_SESSION), proof=msg.session_id), data)
            if not self._signed(s, MsgType.KEEPALIVE, msg):
                return None
            s.last_seen = now
            self.counters.keepalives += 1
            return data  # the echo lets the client see the node is alive
        if isinstance(msg, Leave):
            s = self.table.get(addr)
            if s is not None and s.session_id == msg.session_id and self._signed(s, MsgType.LEAVE, msg):
                self.end(addr, "left")
            return None
        if isinstance(msg, (Hand, Reaction)):
            s = self.table.get(addr)
            if s is not None and s.session_id == msg.session_id:
                self.on_stage_message(s, msg, now)
            else:
                self.counters.control_malformed += 1
            return None
        # CHALLENGE/ACCEPT/REJECT only flow node -> listener
        self.counters.control_malformed += 1
        return None

    def on_stage_message(self, s: Session, msg: Hand | Reaction, now: float) -> None:
        """A session's raised hand or reaction (from any transport)."""
        if isinstance(msg, Hand):
            self.moderation.hand(s.room, s.key, s.sub, s.name, msg.raised, now)
        else:
            self.moderation.reaction(s.room, s.key, msg.index, now)

    def _signed(self, s: Session, kind: int, msg: Keepalive | Leave) -> bool:
        """A speaker's KEEPALIVE or LEAVE must carry the MAC of its control
        key over a counter that grows (its session id alone is seen by
        anyone watching); a listener's needs none. Counted when refused."""
        if not s.control_key:
            return True
        if (msg.mac and msg.counter > s.control_counter
                and hmac.compare_digest(msg.mac, mac(s.control_key, kind, s.session_id, msg.counter))):
            s.control_counter = msg.counter
            return True
        self.counters.control_unsigned += 1
        return False

    def _reply(self, msg: Challenge | Accept | Reject, request: bytes) -> bytes | None:
        out = encode(msg)
        if len(out) > len(request):
            # the rule that makes us useless for amplification: never answer
            # with more bytes than we were sent
            if isinstance(msg, Reject) and msg.redirect:
                return self._reply(Reject(msg.reason, proof=msg.proof), request)
            if isinstance(msg, Reject) and msg.proof:
                # an unpadded KEEPALIVE: the refusal without its proof
                return self._reply(Reject(msg.reason), request)
            if isinstance(msg, Accept) and msg.alternate:
                return self._reply(replace(msg, alternate=""), request)
            self.counters.replies_suppressed += 1
            return None
        return out

    def _on_join(self, msg: Join, data: bytes, addr: tuple, now: float) -> bytes | None:
        if len(data) < MIN_JOIN:
            self.counters.control_malformed += 1
            return None
        raw = to_sockaddr(addr)
        if not msg.cookie or not self.cookies.check(msg.cookie, raw, now):
            if msg.cookie:
                # forged, stale or for another address: ask again, never admit
                self.counters.rejections["stale_cookie"] += 1
            self.counters.challenges += 1
            cookie = self.cookies.make(raw, now)
            # a speaker's exchange: the node's public key comes with the cookie
            public = node_public(self.keyx_secret, cookie) if msg.keyx else b""
            return self._reply(Challenge(cookie, public), data)
        # the address is proven from here on
        existing = self.table.get(addr)
        if existing is not None and existing.room == msg.room and (existing.role == "publish") == msg.speaker:
            existing.last_seen = now  # a retransmitted JOIN: the ACCEPT was lost
            return self._reply(self.accept_message(existing), data)
        token, keys = msg.token, None
        if msg.speaker:
            # a speaker's token and keys travel only through the exchange
            try:
                if not msg.keyx or not msg.public:
                    raise SealError("a speaker's JOIN carries a key exchange")
                keys = node_keys(self.keyx_secret, msg.cookie, msg.public)
                token = keys.open(msg.sealed)
            except SealError:
                return self._reply(replace(self._refuse(Reason.BAD_REQUEST), proof=cookie_proof(msg.cookie)), data)
        joined = self.join(addr, UDP, msg.room, token, addr[0], now, sockaddr=raw, speaker=msg.speaker,
                           relay=msg.relay, resume=msg.resume, keys=keys)
        if isinstance(joined, Reject):
            return self._reply(replace(joined, proof=cookie_proof(msg.cookie)), data)
        if msg.resume is not None and joined.origin is not None:
            self._resume(joined, addr, msg.resume)
        return self._reply(self.accept_message(joined), data)

    def _resume(self, s: Session, addr: tuple, resume: int) -> None:
        """Queue what a listener moving here missed after `resume`. Only
        the room its token admitted it to, and only what the room's history
        still holds: a forged point gets no more than any listener may hear."""
        assert s.origin is not None
        packets = missed(self.core, self.rooms[s.room].index, resume, s.ssrc, *s.origin)
        self.counters.resumes += 1
        self.counters.resumed_packets += len(packets)
        self.outbox.extend(Send(addr, p) for p in packets)
        if self.resumed is not None:
            self.resumed(s.room, resume)

    def join(self, key: Hashable, transport: str, room_name: str, token: str, source_ip: str,
             now: float, *, sockaddr: bytes = b"",
             transport_full: Callable[[], bool] | None = None, speaker: bool = False,
             relay: bool = False, resume: int | None = None, keys: Keys | None = None) -> Session | Reject:
        """The join policy every transport shares, once the joiner's address
        is proven: draining, room, rate limits, token, node and room limits,
        then a slot in the core and a row in the table under `key`. Returns
        the Session, or the Reject to send (already counted). A session
        already under `key` ends once the token checks out (a room switch).
        Pulled transports (QUIC) are drained by their adapter instead of
        sendmmsg; such an adapter passes `transport_full`, its own load
        test, checked with the node's. A `speaker` joins the room's stage
        with a publish token, and listens to its mix-minus."""
        def redirect() -> str:   # only worked out for a refusal that carries one
            return self.redirect_for(room_name, transport)
        if self.draining:
            return self._refuse(Reason.DRAINING, redirect())
        room = self.rooms.get(room_name)
        if room is None:
            return self._refuse(Reason.UNKNOWN_ROOM)
        # The per-source limit comes before the token check, whose HMAC is
        # the costliest step one source could make us repeat; the node-wide
        # budget after it, so only joins that can succeed spend it.
        if not self.limiter.allow_source(source_ip, now):
            self.counters.rate_limited["source"] += 1
            return self._refuse(Reason.RATE_LIMITED)
        try:
            # open mode admits the first role: a node below says it is one
            # a host speaks too; a listener the host invited speaks with its listen token
            roles = ("publish", "host", "listen") if speaker else ("relay", "listen") if relay else ("listen", "relay")
            claims = self.auth.claims(token, room_name, roles)
        except TokenError as e:
            return self._refuse(e.reason)
        role = str(claims["role"])
        sub = str(claims.get("sub") or "")
        barred = self.moderation.refusal(room_name, sub)
        if barred:
            return self._refuse(Reason.ROOM_ENDED if barred == "ended" else Reason.REMOVED)
        if speaker and role == "listen" and not self.moderation.may_speak(room_name, sub):
            return self._refuse(Reason.WRONG_ROLE)
        if speaker and self.stages is not None and (seat := seat_of(claims)):
            # one speaker (one `sub`, or one token without) holds one seat: a
            # speaker that rejoins (its process killed and relaunched, another
            # device) replaces its old session at once, rather than wait for
            # it to time out
            old = self.stages.holder(room_name, seat)
            if old is not None and old != key and old in self.table:
                self.end(old, "replaced")
                self.counters.replaced += 1
        if not self.limiter.allow_node(now):
            self.counters.rate_limited["node"] += 1
            return self._refuse(Reason.RATE_LIMITED, redirect())
        # one token may hold only so many sessions at once (a rejoin of the
        # session it already holds does not count twice)
        current = self.table.get(key)
        held = self.cfg.max_sessions_per_token
        # a parent feeds as many nodes below it as ask: their relay tokens
        # are not a listener's to share
        if (held and token and role != "relay" and self._by_token[token] >= held
                and (current is None or current.token != token)):
            return self._refuse(Reason.TOKEN_IN_USE)
        if key in self.table:
            self._remove(self.table[key])  # switching rooms
        if speaker:
            return self._join_stage(key, transport, room_name, token, now, sockaddr, claims, redirect, keys)
        # A node below this one in the tree is admitted past the load and
        # room limits: it is one session that serves thousands, and refusing
        # it would cut a whole branch off. Only a full arena refuses it.
        if role != "relay":
            if self.core.listeners >= self.cfg.max_listeners or self._over_load(now, transport_full):
                return self._refuse(Reason.NODE_FULL, redirect())
            if room.max_listeners and self.core.room_listeners(room.index) >= room.max_listeners:
                return self._refuse(Reason.ROOM_FULL, redirect())
        pull = transport != UDP
        if role == "relay":
            # a node below gets the room as it is numbered here, which is the
            # origin's, under one SSRC every node uses for the room: two
            # parents then send it identical copies to merge
            ssrc, seq_off, ts_off = relay_ssrc(room_name), 0, 0
        else:
            ssrc, seq_off, ts_off = self.rng.getrandbits(32), self.rng.getrandbits(16), self.rng.getrandbits(32)
        # a UDP listener that resumes gets its missed audio from the room's
        # history instead (_resume), which reaches further back than a ring
        burst = 0 if resume is not None and not pull else first_burst(self.core, self.cfg, room.index, resume)
        slot = self.core.listener_add(room.index, sockaddr, ssrc, seq_off, ts_off, pull=pull, burst=burst)
        if slot < 0:
            return self._refuse(Reason.NODE_FULL, redirect())
        if not pull and self.placed is not None:
            self.placed(slot, sockaddr)
        return self._add(Session(key, transport, room_name, slot, ssrc, self.rng.randbytes(8), now,
                                 self.NACK_BURST, now, token, role, origin=(seq_off, ts_off), sub=sub,
                                 name=str(claims.get("name") or "")))

    def _join_stage(self, key: Hashable, transport: str, room: str, token: str, now: float, sockaddr: bytes,
                    claims: dict, redirect: Callable[[], str], keys: Keys | None) -> Session | Reject:
        """A speaker: a place on the stage, then a slot in its mix-minus room.
        Like a relay it passes the node's load limits (a stage has a few
        speakers, and refusing one silences a room); a full arena refuses.
        Over UDP its SRTP and control keys are those of its JOIN's exchange;
        over QUIC or WebTransport the connection already authenticates and
        encrypts both ways, and its audio comes as plain RTP datagrams."""
        if self.stages is None or (transport == UDP and keys is None):
            return self._refuse(Reason.NO_STAGE)
        srtp_key, control_key = (keys.srtp_key, keys.control_key) if keys is not None else (b"", b"")
        minus = self.stages.admit(room, key, claims, srtp_key)
        if isinstance(minus, Reason):
            return self._refuse(minus, redirect() if minus == Reason.NODE_FULL else "")
        seat = seat_of(claims)
        if seat and seat in self.moderation.room(room).muted:
            self.stages.mute(room, seat, True)      # a muted speaker that joins again stays muted
        ssrc = self.rng.getrandbits(32)
        slot = self.core.listener_add(minus, sockaddr, ssrc, self.rng.getrandbits(16), self.rng.getrandbits(32),
                                      pull=transport != UDP)
        if slot < 0:
            self.stages.leave(key)
            return self._refuse(Reason.NODE_FULL, redirect())
        if self.placed is not None:
            self.placed(slot, sockaddr)
        return self._add(Session(key, transport, room, slot, ssrc, self.rng.randbytes(8), now, self.NACK_BURST,
                                 now, token, "publish", srtp_key, expires_at=float(claims.get("exp") or 0),
                                 control_key=control_key, sub=str(claims.get("sub") or ""),
                                 name=str(claims.get("name") or "")))

    def _add(self, s: Session) -> Session:
        self.counters.joins += 1
        key, token = s.key, s.token
        self.table[key] = s
        self._by_room[(s.room, s.transport)] += 1
        if token:
            self._by_token[token] += 1
        if s.transport != UDP:
            self._pulled.add(key)
        elif self.on_address is not None:
            self.on_address(key, True)  # type: ignore[arg-type]
        return s

    def redirect_for(self, room: str, transport: str) -> str:
        """Where to send a listener of `room` on `transport` that this node
        will not take: the directory's pick, else the configured redirect."""
        picked = self.route(room, transport) if self.route is not None else ""
        return picked or (self.cfg.redirect if transport == UDP else self.cfg.quic_redirect)

    def _refuse(self, reason: Reason, redirect: str = "") -> Reject:
        self.counters.rejections[reason.name.lower()] += 1
        return Reject(reason, redirect)

    def note_load(self, duty: float, machine: float, listeners: int, relay_share: float = 0.0,
                  behind: bool = False) -> None:
        """The relay's measured fan-out duty cycle (0..1 of a core) with this
        many listeners, the machine's CPU busy fraction and the relay's own
        share of it (0..1), and whether its senders fell behind."""
        self.gate.note(duty, machine, listeners, relay_share, behind)

    def _over_load(self, now: float, transport_full: Callable[[], bool] | None = None) -> bool:
        if not self.gate.refuses(now, self.core.listeners, self.cfg.max_load, self.cfg.max_machine_load,
                                 transport_full):
            return False
        self.counters.rejections_load += 1
        return True

    def accept_message(self, s: Session) -> Accept:
        """The ACCEPT that tells a listener its session."""
        return Accept(s.session_id, s.ssrc, int(self.cfg.keepalive_interval * 1000),
                      int(self.cfg.session_timeout * 1000), s.role == "publish", s.origin,
                      self.alternate(s.room) if s.origin is not None else "")

    def _remove(self, s: Session) -> None:
        if self.before_remove is not None and s.transport in PULLED:
            self.before_remove(s)
        self.core.listener_remove(s.slot)
        if s.role == "publish" and self.stages is not None:
            self.stages.leave(s.key)
        self.moderation.gone(s.room, s.key)
        del self.table[s.key]
        if s.transport == UDP and self.on_address is not None:
            self.on_address(s.key, False)  # type: ignore[arg-type]
        self._by_room[(s.room, s.transport)] -= 1
        if s.token:
            self._by_token[s.token] -= 1
            if not self._by_token[s.token]:
                del self._by_token[s.token]
        self._pulled.discard(s.key)

    def end(self, key: Hashable, why: str) -> Session | None:
        """End the session under `key`, if there is one; `why` is "left"
        (LEAVE, or a closed connection), "timeout" or "replaced" (its
        speaker joined again), for the counters."""
        s = self.table.get(key)
        if s is None:
            return None
        self._remove(s)
        if why == "left":
            self.counters.leaves += 1
        elif why == "timeout":
            self.counters.timeouts += 1
        return s

    # ------------------------------------------------------------------ RTCP

    def on_rtcp(self, data: bytes, addr: tuple, now: float) -> Resend | None:
        """NACKs from a UDP session become a Resend of what the listener's
        budget allows. The budget is checked before anything is parsed and
        bounds how much of a NACK is read, so a flood of huge NACKs costs
        the loop a table lookup each, and only the sender pays for it.
        RTCP does not renew consent: only a KEEPALIVE, which carries the
        session id, does (an RR is easy to forge from a departed listener's
        address)."""
        s = self.table.get(addr)
        if s is None:
            return None  # unproven address: nothing is sent back, ever
        s.nack_budget = min(self.NACK_BURST, s.nack_budget + (now - s.nack_at) * self.NACK_RATE)
        s.nack_at = now
        if s.nack_budget < 1:
            # at least one sequence number asked for, none parsed
            self.counters.nacks += 1
            self.counters.nack_rate_limited += 1
            return None
        if len(data) > MAX_RTCP:
            self.counters.control_malformed += 1
            return None
        ok, nacks = parse_rtcp(data, max_seqs=int(s.nack_budget) + 1)
        if not ok:
            self.counters.control_malformed += 1
            return None
        seqs: list[int] = []
        for nack in nacks:
            if nack.media_ssrc != s.ssrc:
                continue
            for seq in nack.seqs:
                self.counters.nacks += 1
                if s.nack_budget < 1:
                    self.counters.nack_rate_limited += 1
                    continue
                s.nack_budget -= 1
                seqs.append(seq)
        return Resend(s.slot, tuple(seqs)) if seqs else None

    # ------------------------------------------------------------- lifecycle

    def expire(self, now: float, wall: float | None = None) -> int:
        """End UDP sessions silent for longer than the timeout (consent
        lapsed: we stop sending); QUIC's own idle timeout ends QUIC ones.
        And speakers whose token has expired (`wall`: Unix time, default
        now): a token's expiry takes its speaker off the stage, it does not
        only stop the next join. Returns how many ended."""
        cutoff = now - self.cfg.session_timeout
        wall = time.time() if wall is None else wall
        stale = [s for s in self.table.values() if s.transport == UDP and s.last_seen < cutoff]
        lapsed = [s for s in self.table.values() if s.expires_at and s.expires_at <= wall and s not in stale]
        for s in stale:
            self.end(s.key, "timeout")
        for s in lapsed:
            self.end(s.key, "expired")
            self.counters.rejections["expired_token"] += 1
        return len(stale) + len(lapsed)

    def pulled(self) -> list[Hashable]:
        """Keys (connections) of the sessions their transport pulls audio for."""
        return list(self._pulled)

    def listeners(self, room: str, transport: str) -> int:
        """Sessions in `room` over `transport`."""
        return self._by_room[(room, transport)]

    def end_room(self, room: str) -> list[Tell]:
        """End every session of a room that is going away."""
        gone = [s for s in self.table.values() if s.room == room]
        for s in gone:
            self._remove(s)
        return [Tell(s, Reject(Reason.UNKNOWN_ROOM, proof=s.session_id)) for s in gone]

    def reconfigure(self, cfg: NodeConfig, auth: Auth) -> None:
        """New limits and token settings, for joins from now on."""
        self.cfg, self.auth = cfg, auth
        self.limiter = JoinLimiter(cfg.join_rate, cfg.join_rate_per_source)
        self.gate.floor = cfg.load_floor

    def drain(self, limit: int | None = None) -> list[Tell]:
        """Stop admitting; end every session (or the `limit` oldest), each
        told DRAINING with its transport's redirect if one is configured."""
        self.draining = True
        out = []
        for s in list(self.table.values())[:limit]:
            self._remove(s)
            out.append(Tell(s, Reject(Reason.DRAINING, self.redirect_for(s.room, s.transport), s.session_id)))
        return out
