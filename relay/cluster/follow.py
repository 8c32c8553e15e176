"""What a node feeds its room from two parents: both copies while the
parents agree, one parent's stream while they do not.

Parents that carry one numbering (every relay of a pass-through room, the
two origins of a pass-through pair) send copies: the same sequence number
carries the same bytes from both, and the core merges them, first copy
wins (core/rtp.pxi). Parents that do not agree send two streams: a mixed
stage on an origin pair (each origin mixes and encodes on its own), or a
second origin configured by mistake. Merged packet by packet, those would
be a garbled mix of two encoders, so the node follows one of them, and
when that one goes quiet while the other goes on, it splices the other
onto the room's numbering at a frame boundary:
- while both are heard, each packet of the unfollowed parent is paired
  with the followed one's that arrived at about the same time (both
  origins mix the same speakers in real time); the offset between their
  numberings that most pairs give is the splice point;
- the other parent's last packets are kept, so the frames it sent while
  the followed one was already silent go out at the switch: the room loses
  only what neither parent sent, give or take the frame the pairing may
  be off by.

A node starts following one parent, and merges once AGREE copies matched
(same number, same bytes); any copy that disagrees sends it back to
following, with one log line naming both parents. Sans-IO: packets in,
packets out.
"""
from __future__ import annotations

import logging
import struct
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

from relay.wire.rtp import rtp_payload

log = logging.getLogger("relay.upstream")

# the followed parent silent this long while the other delivers: it is
# taken for dead (two 20 ms frames: one late packet is not)
SWITCH_S = 0.04
# a packet of the other parent pairs with the followed one's that arrived
# within this of it (half a frame: the nearest frame, not its neighbour)
PAIR_S = 0.01
# copies with the same number and bytes, in a row, before the parents are merged
AGREE = 3
# a payload this short (DTX, silence) repeats too often to prove agreement
MIN_MATCH = 16
# each parent's latest packets kept for pairing and for the switch (320 ms)
KEEP = 16
# two numberings further apart than this are two streams
FAR = 64

Numbering = tuple[int, int]     # (sequence number, timestamp)


@dataclass
class Parent:
    """What one link has sent lately, in its own numbering."""
    recent: deque = field(default_factory=lambda: deque(maxlen=KEEP))   # (seq, ts, payload, packet, at)
    last_at: float | None = None
    offset: Numbering | None = None                 # onto the room's numbering, while followed
    votes: deque = field(default_factory=lambda: deque(maxlen=8))       # offsets pairs suggested

    def copy_of(self, seq: int) -> bytes | None:
        """The payload this parent sent under `seq` lately, if it did."""
        return next((p[2] for p in self.recent if p[0] == seq), None)

    def estimate(self) -> Numbering | None:
        """The offset onto the room's numbering most pairs agree on."""
        if len(self.votes) < 2:
            return None
        best, n = Counter(self.votes).most_common(1)[0]
        return best if n >= 2 else None


class Merge:
    """The room's feed from links 0 and 1 (see the module's docstring)."""

    def __init__(self, room: str, parent_name: Callable[[int], str] = str) -> None:
        self.room = room
        self.parent_name = parent_name     # a link's parent, for the log line
        self.parents = [Parent(), Parent()]
        self.merging = False
        self.followed: int | None = None
        self.agreed = 0
        self.fed: deque = deque(maxlen=KEEP)   # (seq, ts, at) in the room's numbering, as fed
        self.splices = 0                       # switches from a silent followed parent to the other
        self.disagreements = 0                 # times the parents were found to send two streams
        self._logged = False

    def reset(self, k: int) -> None:
        """Link `k` joined a parent: what it sent before is another stream's."""
        self.parents[k] = Parent()
        self.agreed = 0
        if self.followed == k:
            self.followed = None

    def packet(self, k: int, pkt: bytes, now: float) -> list[bytes]:
        """A packet from link `k`: the packets to feed the room now."""
        parsed = rtp_payload(pkt)
        if parsed is None:
            return [pkt]          # not audio: the core counts it
        seq, ts, payload, _ = parsed
        me, other = self.parents[k], self.parents[1 - k]
        self._compare(k, seq, ts, payload, other, now)
        me.recent.append((seq, ts, payload, pkt, now))
        me.last_at = now
        if self.merging:
            return [pkt]
        if self.followed is None or self.parents[self.followed].last_at is None:
            self.followed = k
            if me.offset is None:
                me.offset = (0, 0)
        if k == self.followed:
            out = self._renumber(me, seq, ts, pkt)
            self.fed.append((*_numbers(out), now))
            self._pair_with(other, now)
            return [out]
        self._pair(me, seq, ts, now)
        followed = self.parents[self.followed]
        if followed.last_at is not None and now - followed.last_at >= SWITCH_S:
            return self._switch(k, now)
        return []

    # -------------------------------------------------------------- agreement

    def _compare(self, k: int, seq: int, ts: int, payload: bytes, other: Parent, now: float) -> None:
        """Evidence that the parents send copies of one stream, or two."""
        if other.last_at is None or now - other.last_at > 0.5:
            return
        theirs = other.copy_of(seq)
        if theirs is not None:
            if theirs == payload:
                if len(payload) >= MIN_MATCH:
                    self.agreed += 1
                    if (self.agreed >= AGREE and not self.merging and self.followed is not None
                            and self.parents[self.followed].offset == (0, 0)):
                        self.merging = True
                return
        elif not other.recent or abs(_delta16(seq, other.recent[-1][0])) <= FAR:
            return
        self._disagree(k)

    def _disagree(self, k: int) -> None:
        self.agreed = 0
        if self.merging or not self._logged:
            self.disagreements += 1
        if self.merging:
            # the parent the room heard longest goes on, in the numbering
            # the merge fed (its own)
            self.merging = False
            self.followed = 1 - k
            self.parents[1 - k].offset = (0, 0)
            self.fed.clear()
        if not self._logged:
            self._logged = True
            log.warning("room %r: parents %s and %s send two different streams (a mixed stage on an origin "
                        "pair, or a misconfigured origin): following one, switching when it goes quiet",
                        self.room, self.parent_name(0), self.parent_name(1),
                        extra={"fields": {"event": "upstream_disagree", "room": self.room}})

    # ------------------------------------------------------------- following

    def _pair(self, p: Parent, seq: int, ts: int, at: float) -> None:
        """The unfollowed parent's packet, arrived at `at`: the fed packet
        that arrived nearest it gives an offset."""
        near = min(self.fed, key=lambda f: abs(f[2] - at), default=None)
        if near is not None and abs(near[2] - at) <= PAIR_S:
            p.votes.append(((near[0] - seq) & 0xFFFF, (near[1] - ts) & 0xFFFFFFFF))

    def _pair_with(self, p: Parent, at: float) -> None:
        """A fed packet, arrived at `at`: the unfollowed parent's packet that
        arrived nearest it (before it) gives an offset."""
        near = min(p.recent, key=lambda r: abs(r[4] - at), default=None)
        if near is not None and abs(near[4] - at) <= PAIR_S:
            seq, ts, _ = self.fed[-1]
            p.votes.append(((seq - near[0]) & 0xFFFF, (ts - near[1]) & 0xFFFFFFFF))

    def _switch(self, k: int, now: float) -> list[bytes]:
        """The followed parent went quiet: follow link `k` from here, its
        frames the room has not had yet first."""
        p = self.parents[k]
        offset = p.estimate()
        newest = p.recent[-1]
        if offset is None and self.fed:
            # never paired (it had just joined): continue by the time that passed
            seq, ts, at = self.fed[-1]
            frames = max(1, round((newest[4] - at) / 0.02))
            offset = ((seq + frames - newest[0]) & 0xFFFF, (ts + 960 * frames - newest[1]) & 0xFFFFFFFF)
        p.offset = offset or (0, 0)
        self.followed = k
        self.splices += 1
        log.info("room %r: %s went quiet; following %s", self.room, self.parent_name(1 - k),
                 self.parent_name(k), extra={"fields": {"event": "upstream_splice", "room": self.room}})
        last = self.fed[-1][0] if self.fed else None
        out = []
        for seq, ts, _payload, pkt, at in sorted(p.recent, key=lambda r: _delta16(r[0], newest[0])):
            renumbered = self._renumber(p, seq, ts, pkt)
            out_seq, out_ts = _numbers(renumbered)
            if last is None or _delta16(out_seq, last) > 0:
                out.append(renumbered)
                self.fed.append((out_seq, out_ts, at))
                last = out_seq
        return out

    @staticmethod
    def _renumber(p: Parent, seq: int, ts: int, pkt: bytes) -> bytes:
        assert p.offset is not None
        if p.offset == (0, 0):
            return pkt
        return (pkt[:2] + struct.pack("!HI", (seq + p.offset[0]) & 0xFFFF, (ts + p.offset[1]) & 0xFFFFFFFF)
                + pkt[8:])


def _numbers(pkt: bytes) -> Numbering:
    return struct.unpack_from("!HI", pkt, 2)


def _delta16(a: int, b: int) -> int:
    """a - b on the 16-bit sequence circle."""
    return (a - b + 0x8000) % 0x10000 - 0x8000
