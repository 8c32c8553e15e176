"""What a room's hosts decide, and what its listeners ask: raised hands,
invitations, mutes, removals, an ended room, and reactions counted per
second. Sans-IO state, read by the join policy (sessions.py) and changed by
the host's actions (relay/ops/hosting.py) and the listeners' messages.

A host is a token with role `host` for the room: it may speak, and it may
moderate. It may not be removed by another host's action on itself, and a
removal lasts until the removed token expires (a new token for the same
`sub` is refused too until then) or until a host lets the `sub` back.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable

from relay.wire.stage_msgs import REACTIONS_SET

# what one session may send: a hand is raised or lowered a few times a
# minute, a reaction a few times a second; past that, counted and dropped
HAND_PER_S, HAND_BURST = 0.5, 3
REACTION_PER_S, REACTION_BURST = 5.0, 10
# a removal without a known expiry (an open-mode session) lasts this long
REMOVED_DEFAULT_S = 24 * 3600.0
MAX_HANDS = 1000          # a room's queue, oldest first; a flood of sessions cannot grow it past this


@dataclass
class Raised:
    """A raised hand: who, and since when (Unix time)."""
    sub: str
    name: str
    since: float


@dataclass
class RoomModeration:
    hands: dict[Hashable, Raised] = field(default_factory=dict)     # session key -> its raised hand
    invited: set[str] = field(default_factory=set)                  # subs that may speak with any token
    removed: dict[str, float] = field(default_factory=dict)         # sub -> refused until (Unix time)
    muted: set[str] = field(default_factory=set)                    # speaker ids out of the mix
    ended: bool = False
    reactions: Counter = field(default_factory=Counter)             # index -> this second's count


@dataclass
class Bucket:
    rate: float
    burst: float
    tokens: float
    at: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Moderation:
    """Every room's moderation on one node."""

    def __init__(self) -> None:
        self.rooms: dict[str, RoomModeration] = {}
        self.drops: Counter = Counter()        # by reason: hand_rate, reaction_rate, hands_full
        self.actions: Counter = Counter()      # host actions taken, by name
        self.hands_raised = 0
        self.reactions_in = 0
        self._buckets: dict[tuple[Hashable, str], Bucket] = {}

    def room(self, name: str) -> RoomModeration:
        return self.rooms.setdefault(name, RoomModeration())

    # ------------------------------------------------------------ join policy

    def refusal(self, room: str, sub: str, now: float | None = None) -> str:
        """Why a session of `sub` may not join `room` now ("" if it may):
        "ended" or "removed"."""
        r = self.rooms.get(room)
        if r is None:
            return ""
        if r.ended:
            return "ended"
        until = r.removed.get(sub) if sub else None
        if until is not None:
            if (now if now is not None else time.time()) < until:
                return "removed"
            del r.removed[sub]
        return ""

    def may_speak(self, room: str, sub: str) -> bool:
        """Has a host invited `sub` on stage (so its listen token may speak)?"""
        r = self.rooms.get(room)
        return bool(sub) and r is not None and sub in r.invited

    # --------------------------------------------------------------- listeners

    def _allow(self, key: Hashable, what: str, now: float) -> bool:
        rate, burst = (HAND_PER_S, HAND_BURST) if what == "hand" else (REACTION_PER_S, REACTION_BURST)
        b = self._buckets.get((key, what))
        if b is None:
            b = self._buckets[(key, what)] = Bucket(rate, burst, burst, now)
        if b.take(now):
            return True
        self.drops[f"{what}_rate"] += 1
        return False

    def hand(self, room: str, key: Hashable, sub: str, name: str, raised: bool, now: float) -> None:
        """A listener raised (or lowered) its hand."""
        if not self._allow(key, "hand", now):
            return
        r = self.room(room)
        if not raised:
            r.hands.pop(key, None)
            return
        if key not in r.hands:
            if len(r.hands) >= MAX_HANDS:
                self.drops["hands_full"] += 1
                return
            r.hands[key] = Raised(sub, name or sub or "a listener", time.time())
            self.hands_raised += 1

    def reaction(self, room: str, key: Hashable, index: int, now: float) -> None:
        """A listener reacted: counted into this second's summary."""
        if 0 <= index < len(REACTIONS_SET) and self._allow(key, "reaction", now):
            self.room(room).reactions[index] += 1
            self.reactions_in += 1

    def gone(self, room: str, key: Hashable) -> None:
        """A session ended: its hand goes down, its buckets go."""
        r = self.rooms.get(room)
        if r is not None:
            r.hands.pop(key, None)
        self._buckets.pop((key, "hand"), None)
        self._buckets.pop((key, "reaction"), None)

    def take_reactions(self) -> dict[str, tuple[tuple[int, int], ...]]:
        """Each room's reactions since the last call (once a second), reset."""
        out = {}
        for name, r in self.rooms.items():
            if r.reactions:
                out[name] = tuple(sorted(r.reactions.items()))
                r.reactions.clear()
        return out
