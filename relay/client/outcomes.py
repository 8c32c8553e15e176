"""What a listener's session comes to: its statistics, and the ways a join
or a session ends (refused, unreachable, or ended by the room's host)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from relay.wire.protocol import Reason


class JoinRefused(Exception):
    """The node said no; `reason` and `redirect` say why and where to go."""

    def __init__(self, reason: Reason, redirect: str = "", had_token: bool = True) -> None:
        if reason == Reason.BAD_TOKEN and not had_token:
            text = "join refused: this room needs a token (pass --token or set RELAY_TOKEN)"
        else:
            text = f"join refused: {reason.name.lower()}" + (f", go to {redirect}" if redirect else "")
        super().__init__(text)
        self.reason, self.redirect = reason, redirect


class Unreachable(Exception):
    """The node's address cannot be used (a name that does not resolve, an
    address this machine cannot send to); the message says which and why."""


# a host's decisions that end a listener's session (the node proves they are its own)
HOST_ENDED = {Reason.ROOM_ENDED: "the host ended the room", Reason.REMOVED: "the host removed you from the room",
              Reason.AUDIENCE: "the host moved you back to the audience"}


@dataclass
class ListenStats:
    received: int = 0
    delivered: int = 0
    duplicates: int = 0
    lost: int = 0
    nacks_sent: int = 0
    bytes: int = 0
    first_packet_at: float | None = None
    joined_at: float | None = None
    rejoins: int = 0
    ssrc: int = 0
    # the longest time between two audio packets, moves included (a quiet
    # publisher's pauses too: it is what the listener heard)
    longest_silence: float = 0.0
    events: list[str] = field(default_factory=list)
    reactions: Counter = field(default_factory=Counter)   # the room's reactions heard, by emoji
    ended: Reason | None = None      # the host ended the session: room_ended, removed or audience
    invited: bool = False            # the host invited us to speak (rejoin as a speaker, same token)
