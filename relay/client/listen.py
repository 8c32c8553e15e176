"""`relay listen`: join a room over UDP, keep the session alive, and hand the
audio to sinks (an Ogg Opus file, a local RTP port for ffplay).

The client speaks the control protocol of docs/protocol.md: JOIN, answer the
cookie CHALLENGE, wait for ACCEPT, send KEEPALIVEs at the interval the node
asked for, NACK gaps, follow a redirect when the node is full or draining.
A short reorder buffer lets NACKed resends land in order.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import struct
import time
from dataclasses import replace
from typing import Callable

from relay.client import moves
from relay.client.outcomes import HOST_ENDED, JoinRefused, ListenStats, Unreachable  # noqa: F401 (re-exported)
from relay.wire.addr import parse_hostport
from relay.wire.protocol import (Accept, Challenge, Join, Keepalive, Leave, ProtocolError, Reason,
                                 Reject, Speakers, cookie_proof, decode, encode, is_control)
from relay.wire.rtcp import build_nack
from relay.wire.stage_msgs import REACTIONS_SET, Hand, Invite, Reaction, Reactions

log = logging.getLogger("relay.client.listen")

REORDER_PACKETS = 4   # hold this many packets for late resends before giving up a gap
EARLY_PACKETS = 64    # audio kept while a join's ACCEPT is on its way
# a packet this far behind or ahead of the newest is a numbering that
# started again, as the core takes it (core/rtp.pxi)
RESTART_BEHIND, RESTART_AHEAD = 100, 3000


# what a node may tell a listener, clamped: a keepalive interval of 0 would
# make a client send keepalives as fast as it can
KEEPALIVE_MS = (100, 600_000)
# with somewhere to move to (the ACCEPT's alternate, or `via`), audio that
# stops for this long is answered with a keepalive; a node that does not
# echo it within as long again is dead, and the listener moves: under half
# a second from its last packet. A node that echoes is alive and its room
# quiet, and is not asked again until audio has come and gone again.
PROBE_S = 0.25
# a full node that names nowhere else may have a place again soon (a
# listener leaves, a session times out): `relay listen` asks again for this
# long, waiting from the first to the longest pause, doubling, with jitter so
# that a crowd turned away together does not come back together
FULL_PATIENCE_S = 30.0
FULL_BACKOFF_S = (0.5, 5.0)
WAITED_FOR = (Reason.NODE_FULL, Reason.ROOM_FULL, Reason.RATE_LIMITED)


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, client: "ListenClient") -> None:
        self.client = client

    def datagram_received(self, data: bytes, addr) -> None:
        self.client._datagram(data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors while the node restarts; keepalives find out


class ListenClient:
    """One listener. `sink` gets each RTP packet, in sequence order."""

    def __init__(self, server: str, room: str, token: str = "",
                 sink: Callable[[bytes], None] | None = None, nack: bool = True,
                 via: list[str] | None = None) -> None:
        # `via`: URLs of nodes' GET /join, asked where to go when the node
        # we listen to goes silent (or, with no server, where to start)
        self.via = via or []
        self.server = parse_hostport(server) if server else ("", 0)
        self.room, self.token, self.sink, self.nack = room, token, sink, nack
        self.stats = ListenStats()
        self._transport: asyncio.DatagramTransport | None = None
        self._control: asyncio.Queue = asyncio.Queue()
        self._session: Accept | None = None
        self._next: int | None = None          # next extended seq to deliver
        self._held: dict[int, bytes] = {}
        self._high: int | None = None
        self._nacked: set[int] = set()
        self._sender_ssrc = int.from_bytes(os.urandom(4), "big")
        self.on_event: Callable[[str], None] | None = None   # told each event as it happens
        self._via = ""    # how we came to the current server, for error messages
        self._warned_unproven = False
        self.last_heard = time.monotonic()   # when the node last sent us anything
        self.speaker = False                 # join the room's stage (SpeakerClient)
        self.relay = False                   # a node taking the room for those below it
        self.speakers: Speakers | None = None  # who is on the stage, as the node last said
        # seconds listen() keeps asking a full node; 0 for a node pulling a
        # room upstream, which has its own way of moving on
        self.full_patience = 0.0
        self.last_audio = time.monotonic()   # when the node last sent us audio
        self._resume: int | None = None      # the origin sequence number to resume after, on a move
        self._packet_at: float | None = None  # when the last audio packet came, across moves
        # audio that came before its session's ACCEPT (the node's sender
        # threads can beat its event loop): kept until the ACCEPT says whose
        self._early: list[bytes] = []

    def _event(self, text: str) -> None:
        self.stats.events.append(text)
        if self.on_event is not None:
            self.on_event(text)

    def _where(self) -> str:
        return f"{self.server[0]}:{self.server[1]}" + (f" ({self._via})" if self._via else "")

    async def _open(self) -> None:
        if self._transport is not None:
            self._transport.close()
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.server[0] else socket.AF_UNSPEC
        try:
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _Proto(self), remote_addr=self.server, family=family)
        except socket.gaierror as e:
            raise Unreachable(f"cannot resolve {self._where()}: {e.strerror}") from None
        except OSError as e:
            raise Unreachable(f"cannot send to {self._where()}: {e.strerror}") from None

    def _send(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.sendto(data)

    async def _await_control(self, timeout: float):
        return await asyncio.wait_for(self._control.get(), timeout)

    async def join(self, attempts: int = 5, timeout: float = 1.0) -> Accept:
        """Run the JOIN handshake; follows up to 3 redirects. Raises
        JoinRefused or TimeoutError."""
        for _hop in range(4):
            await self._open()
            try:
                return await self._handshake(attempts, timeout)
            except JoinRefused as e:
                if self._redirected(e.reason, e.redirect):
                    continue
                raise
        raise JoinRefused(Reason.NODE_FULL, "")

    async def join_when_room(self, until: float | None = None) -> Accept:
        """join(), asking again with backoff while the node is full (or
        limits joins) and names nowhere else to go, for `full_patience`
        seconds and not past `until` (a time.monotonic()); each wait is an
        event. Then the refusal is raised as join() raises it."""
        give_up = time.monotonic() + self.full_patience
        if until is not None:
            give_up = min(give_up, until)
        backoff = FULL_BACKOFF_S[0]
        while True:
            try:
                return await self.join()
            except JoinRefused as e:
                pause = backoff * random.uniform(0.8, 1.2)
                if e.reason not in WAITED_FOR or e.redirect or time.monotonic() + pause > give_up:
                    raise
                self._event(f"{e.reason.name.lower().replace('_', ' ')}, retrying in {pause:.1f} s")
                await asyncio.sleep(pause)
                backoff = min(2 * backoff, FULL_BACKOFF_S[1])

    # the parts of joining and leaving every transport's client shares

    def _redirected(self, reason: Reason, redirect: str) -> bool:
        """Take a refusal's redirect if it is one to follow; True if taken."""
        if not redirect or reason not in (Reason.NODE_FULL, Reason.ROOM_FULL, Reason.DRAINING,
                                          Reason.RATE_LIMITED):
            return False
        here = f"{self.server[0]}:{self.server[1]}"
        try:
            self.server = parse_hostport(redirect)
        except ValueError as e:
            self._event(f"{here} said {reason.name.lower()} and sent us to {redirect!r}, "
                        f"which is not an address ({e}): not following it")
            return False
        self._via = f"sent there by {here}: {reason.name.lower()}"
        self._event(f"{here} said {reason.name.lower()}: going to {redirect}")
        return True

    def _proven(self, msg: Reject, proof: bytes) -> bool:
        """Is this REJECT from our node? Once we hold a cookie or a session
        it must carry its proof, or anyone who can forge the node's address
        could end our session or send us elsewhere. Before that only a
        refusal without a redirect counts (a version the node does not speak)."""
        if proof and msg.proof == proof:
            return True
        if not proof and not msg.redirect:
            return True
        if not self._warned_unproven:
            self._warned_unproven = True
            what = "this session's id" if self._session is not None else "the join's cookie"
            self._event(f"ignored a REJECT that did not carry {what} ({msg.reason.name.lower()}"
                        + (f", to {msg.redirect}" if msg.redirect else "") + ")")
        return False

    def _refused(self, msg: Reject) -> JoinRefused:
        return JoinRefused(msg.reason, msg.redirect, had_token=bool(self.token))

    def _joined(self, msg: Accept) -> Accept:
        lo, hi = KEEPALIVE_MS
        if not lo <= msg.keepalive_ms <= hi:
            self._event(f"the node asked for keepalives every {msg.keepalive_ms} ms; using "
                        f"{min(max(msg.keepalive_ms, lo), hi)} ms")
            msg = replace(msg, keepalive_ms=min(max(msg.keepalive_ms, lo), hi))
        if (self._session is not None and self._session.session_id != msg.session_id
                and (self._session.origin is None or msg.origin is None)):
            # a new session (a move, a rejoin) without the origin's numbering
            # to count on: its numbering is its own
            self._flush_held()
            self._next = self._high = None
            self._nacked.clear()
        self._session = msg
        self._resume = None
        early, self._early = self._early, []
        if msg.origin is not None:
            # a move's missed audio comes ahead of the ACCEPT, and the new
            # node's live audio may overtake it: oldest first, so none of it
            # counts as a gap given up
            base = msg.origin[0] + (self._high or 0) - 0x8000
            early.sort(key=lambda d: (struct.unpack_from("!H", d, 2)[0] - base) & 0xFFFF)
        for data in early:          # the join's burst, if it beat the ACCEPT here
            if struct.unpack_from("!I", data, 8)[0] == msg.ssrc:
                self._datagram(data)
        self.stats.ssrc = msg.ssrc
        self.stats.joined_at = time.monotonic()
        return msg

    async def _move(self, redirect: str) -> None:
        """The node sent us elsewhere mid-session: join there."""
        try:
            self.server = parse_hostport(redirect)
        except ValueError as e:
            raise Unreachable(f"the node sent us to {redirect!r}, which is not an address: {e}") from None
        self._via = "sent there by the draining node"
        self.stats.rejoins += 1
        await self.join()

    def raise_hand(self, raised: bool = True) -> None:
        """Raise (or lower) our hand: the room's hosts see it in their queue."""
        if self._session is not None:
            self._say(Hand(self._session.session_id, raised))

    def react(self, emoji: str) -> None:
        """Send one of the room's reactions (stage_msgs.REACTIONS_SET)."""
        if self._session is not None:
            self._say(Reaction(self._session.session_id, REACTIONS_SET.index(emoji)))

    def _say(self, msg: Hand | Reaction) -> None:
        self._send(encode(msg))

    def resume_after(self, seq: int | None) -> None:
        """Ask, in the next JOIN, for what the room still holds after `seq`
        (the origin's numbering); None asks for nothing."""
        self._resume = seq

    def _flush_held(self) -> None:
        # packets waiting for a gap to fill go out as they are
        if self._held and self._next is not None:
            self._deliver(flush=True)

    def _join_message(self, challenge: Challenge | None) -> Join:
        """The JOIN to send: the first, or the one answering `challenge`."""
        return Join(self.room, self.token, challenge.cookie if challenge else b"", self.speaker, self.relay,
                    self._resume)

    def _keepalive(self) -> Keepalive:
        assert self._session is not None
        return Keepalive(self._session.session_id)

    def _leave(self) -> Leave:
        assert self._session is not None
        return Leave(self._session.session_id)

    async def _handshake(self, attempts: int, timeout: float) -> Accept:
        cookie = b""
        challenge: Challenge | None = None
        for _ in range(attempts):
            self._send(encode(self._join_message(challenge)))
            try:
                while True:
                    msg = await self._await_control(timeout)
                    if isinstance(msg, Challenge):
                        if cookie == msg.cookie:
                            continue
                        cookie, challenge = msg.cookie, msg
                        self._send(encode(self._join_message(challenge)))
                    elif isinstance(msg, Accept):
                        return self._joined(msg)
                    elif isinstance(msg, Reject):
                        if self._proven(msg, cookie_proof(cookie) if cookie else b""):
                            raise self._refused(msg)
            except asyncio.TimeoutError:
                continue
        raise TimeoutError(f"no answer from {self._where()}")

    def _datagram(self, data: bytes) -> None:
        self.last_heard = time.monotonic()
        if is_control(data):
            try:
                msg = decode(data)
            except ProtocolError:
                return
            if isinstance(msg, Keepalive):
                return
            if isinstance(msg, Speakers):
                self._on_speakers(msg)
                return
            if isinstance(msg, Reactions):
                self.stats.reactions.update({REACTIONS_SET[i]: n for i, n in msg.counts if i < len(REACTIONS_SET)})
                return
            self._control.put_nowait(msg)
            return
        if len(data) < 12 or data[0] >> 6 != 2:
            return
        seq, _ts, ssrc = struct.unpack_from("!HII", data, 2)
        if self._session is None or ssrc != self._session.ssrc:
            if len(self._early) < EARLY_PACKETS:
                self._early.append(data)
            return
        self.last_audio = self.last_heard
        if self._packet_at is not None:
            self.stats.longest_silence = max(self.stats.longest_silence, self.last_heard - self._packet_at)
        self._packet_at = self.last_heard
        # counted in the origin's numbering where the node tells it, so a
        # move to another node neither hides a gap nor opens a false one
        origin = self._session.origin
        if origin is not None:
            seq = (seq - origin[0]) & 0xFFFF
        self.stats.received += 1
        self.stats.bytes += len(data)
        if self.stats.first_packet_at is None:
            self.stats.first_packet_at = time.monotonic()
        ext = seq if self._high is None else self._high + ((seq - self._high + 0x8000) & 0xFFFF) - 0x8000
        if self._high is not None and not -RESTART_BEHIND < ext - self._high <= RESTART_AHEAD:
            # the stream's numbering started again (a new publisher stream
            # behind an origin pair, which forwards its numbering as it
            # comes): not a gap to count, nor old packets to drop
            self._flush_held()
            self._next = self._high = None
            self._nacked.clear()
            self._event("the stream's numbering started again")
            ext = seq
        if self._next is None:
            self._next = ext
        if ext < self._next or ext in self._held:
            self.stats.duplicates += 1
            return
        self._held[ext] = data
        if self._high is None or ext > self._high:
            if self.nack and self._high is not None and ext > self._high + 1:
                missing = [s for s in range(self._high + 1, ext) if s not in self._nacked][:16]
                if missing:
                    self._nacked.update(missing)
                    self.stats.nacks_sent += 1
                    shift = origin[0] if origin is not None else 0
                    self._send(build_nack(self._sender_ssrc, self._session.ssrc,
                                          [(s + shift) & 0xFFFF for s in missing]))
            self._high = ext
        self._deliver()

    def _on_speakers(self, msg: Speakers) -> None:
        """Who is on the stage: an event when the set speaking changes."""
        if self._session is None:
            return
        speaking = [s.name for s in msg.speakers if s.active]
        before = [s.name for s in self.speakers.speakers if s.active] if self.speakers else None
        self.speakers = msg
        if speaking != before:
            self._event("speaking: " + (", ".join(speaking) or "nobody")
                        + f" ({len(msg.speakers)} on stage)")

    def _deliver(self, flush: bool = False) -> None:
        assert self._next is not None
        while self._held:
            if self._next in self._held:
                pkt = self._held.pop(self._next)
                self.stats.delivered += 1
                if self.sink is not None:
                    self.sink(pkt)
                self._nacked.discard(self._next)
                self._next += 1
            elif flush or (self._high is not None and self._high - self._next >= REORDER_PACKETS):
                self.stats.lost += 1
                self._nacked.discard(self._next)
                self._next += 1
            else:
                break

    async def listen(self, duration: float | None = None, dead_after: float | None = None) -> ListenStats:
        """Join, then receive until `duration` seconds pass (forever if None).
        Rejoins when the node forgets the session. A listener with somewhere
        to go (the ACCEPT's alternate, or `via`) moves there, resuming after
        the last packet it has, when its node dies. With `dead_after`, sends
        keepalives often enough to hear the node's echo and raises
        Unreachable once nothing at all came from it for that long (a node
        taking a room from another must notice a dead upstream at once)."""
        deadline = None if duration is None else time.monotonic() + duration
        if not self.server[0]:
            await moves.relocate(self, "no node given")
        else:
            await self.join_when_room(deadline)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await self.receive(left, dead_after)
            except Unreachable as e:
                if dead_after is not None or not await moves.move_on(self, str(e)):
                    raise

    async def receive(self, duration: float | None = None, dead_after: float | None = None) -> ListenStats:
        """listen(), once joined. Keepalives go out on their own schedule:
        no message, forged or not, can put them off."""
        assert self._session is not None
        now = time.monotonic()
        self.last_heard = self.last_audio = now
        deadline = None if duration is None else now + duration
        interval = self._session.keepalive_ms / 1000
        if dead_after is not None:
            interval = min(interval, dead_after / 3)
        next_keepalive = now + interval
        probe_at: float | None = None    # a keepalive sent to ask a silent node whether it lives
        probed = -1.0                    # the last audio before that probe
        while deadline is None or time.monotonic() < deadline:
            now = time.monotonic()
            if dead_after is not None and now - self.last_heard > dead_after:
                raise Unreachable(f"nothing from {self._where()} for {dead_after:g} s")
            wait = next_keepalive - now
            if dead_after is None and moves.movable(self):
                if probe_at is not None and self.last_heard > probe_at:
                    probe_at = None                       # it answered: a quiet room
                if probe_at is None and now - self.last_audio > PROBE_S and self.last_audio != probed:
                    self._send(encode(self._keepalive()))
                    probe_at, probed = now, self.last_audio
                elif probe_at is not None and now - probe_at > PROBE_S:
                    raise Unreachable(f"{self._where()} stopped answering")
                wait = min(wait, PROBE_S / 5)
            if now >= next_keepalive:
                self._send(encode(self._keepalive()))
                next_keepalive = now + interval
                continue
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - now))
            try:
                msg = await self._await_control(max(0.0, wait))
            except asyncio.TimeoutError:
                continue
            if isinstance(msg, Reject) and self._proven(msg, self._session.session_id):
                if msg.reason == Reason.UNKNOWN_SESSION:
                    self.stats.rejoins += 1
                    self._event("session forgotten by the node: rejoining")
                    await self.join()
                elif msg.reason == Reason.DRAINING:
                    self._event("node draining" + (f", moving to {msg.redirect}" if msg.redirect else ""))
                    if not msg.redirect:
                        break
                    await self._move(msg.redirect)
                elif msg.reason in HOST_ENDED:
                    self.stats.ended = msg.reason
                    self._event(HOST_ENDED[msg.reason])
                    break
            elif isinstance(msg, Invite) and not self.stats.invited:
                self.stats.invited = True
                self._event("the host invites you to speak: join again as a speaker with the same token")
        return self.stats

    async def aclose(self) -> None:
        """close(), for callers that hold either transport's client."""
        self.close()

    def close(self) -> None:
        """Say LEAVE and release the socket."""
        self._flush_held()
        if self._transport is not None:
            if self._session is not None:
                self._send(encode(self._leave()))
            self._transport.close()
            self._transport = None
