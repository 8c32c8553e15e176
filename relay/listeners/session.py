"""What the session table holds, and what its calls hand the adapters: a
Session (one listener, speaker or node below), the counters, and the small
records of what to send (`Send`, `Resend`, `Tell`). Policy is in sessions.py."""
from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable, NamedTuple

from relay.wire.protocol import Reject, encode

UDP = "udp"
# RTCP a listener may send us: an RR and a NACK of a few dozen FCIs fit
# many times over; anything longer is not from a well-behaved listener
MAX_RTCP = 512
PULLED = ("quic", "webtransport")   # transports that pull from their rings


def relay_ssrc(room: str) -> int:
    """The SSRC every node sends a room under to the nodes below it."""
    return zlib.crc32(b"relay:" + room.encode())


class Send(NamedTuple):
    """Send `data` to `addr` on the listener socket."""
    addr: tuple
    data: bytes


class Resend(NamedTuple):
    """Send these ring packets of listener `slot` again (its own sequence numbers)."""
    slot: int
    seqs: tuple[int, ...]


class Tell(NamedTuple):
    """A session has ended: tell its listener `reject` on its own transport."""
    session: "Session"
    reject: Reject


@dataclass(eq=False)
class Session:
    key: Hashable        # UDP: the listener's address; QUIC: its connection
    transport: str       # "udp", "quic" or "webtransport"
    room: str
    slot: int
    ssrc: int
    session_id: bytes
    last_seen: float
    nack_budget: float = 0.0
    nack_at: float = 0.0
    token: str = ""      # what admitted it, for the per-token session cap
    # "listen"; "relay": another node taking the room (cascade); "publish": a
    # speaker on the room's stage, listening to its mix-minus
    role: str = "listen"
    srtp_key: bytes = b""  # a speaker's: what its RTP must authenticate with (from its key exchange)
    control_key: bytes = b""  # a speaker's: what its KEEPALIVEs and LEAVE must carry the MAC of
    control_counter: int = 0  # the highest counter of those seen: a copy of one is worth nothing
    # what the session adds to the origin's (seq, ts); None for a speaker
    origin: tuple[int, int] | None = None
    expires_at: float = 0.0  # a speaker's token expiry (Unix time): it leaves the stage then
    sub: str = ""        # its token's subject and display name: for hosts' actions and the hands queue
    name: str = ""


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
    control_unsigned: int = 0     # speakers' KEEPALIVEs and LEAVEs without a valid MAC, ignored
    rejections: Counter = field(default_factory=Counter)
    rate_limited: Counter = field(default_factory=Counter)
    rejections_load: int = 0      # of the node_full rejections, those for load
    replaced: int = 0             # speakers' sessions ended by the same speaker joining again
    resumes: int = 0              # joins that moved here with a resume point
    resumed_packets: int = 0      # packets they were sent from the room's history


def udp_sends(tells: list[Tell]) -> list[Send]:
    """The UDP datagrams among `tells`: each ended session's REJECT to its address."""
    return [Send(t.session.key, encode(t.reject)) for t in tells  # type: ignore[arg-type]
            if t.session.transport == UDP]  # a UDP session's key is its address
