"""A listener that moves here from a dead node says the last packet it has
(its JOIN's resume point, in the origin's numbering). It gets what the room's
history still holds after that point, in its own numbering and ahead of its
ACCEPT, so that a node's death within the history costs it no packet.

The history (core/history.pxi) is four ring depths (1.28 s of 20 ms audio
at the default depth of 16), and a listener's ring only one: the missed
packets go out here, from Python, once per move, not through its ring.
"""
from __future__ import annotations

import struct

from relay._core import Core, room_history
from relay.wire.config import NodeConfig

# a move is noticed within 0.5 s and a rejoin takes a few round trips: a
# second of audio covers it, and fits the client's early-packet buffer (64)
RESUME_PACKETS = 50


def missed(core: Core, room: int, resume: int, ssrc: int, seq_off: int, ts_off: int) -> list[bytes]:
    """The room's packets after `resume` (the room's numbering, which on any
    node is the origin's) that its history still holds, numbered for the
    listener that asks: its SSRC, and its offsets from the room's numbering."""
    out = []
    for p in room_history(core, room, resume, RESUME_PACKETS):
        seq, ts = struct.unpack_from("!HI", p, 2)
        out.append(p[:2] + struct.pack("!HII", (seq + seq_off) & 0xFFFF, (ts + ts_off) & 0xFFFFFFFF, ssrc)
                   + p[12:])
    return out


def first_burst(core: Core, cfg: NodeConfig, room: int, resume: int | None) -> int:
    """Recent packets a new session starts with: the configured burst, or
    for a QUIC listener moving from a dead node, what it missed after the
    last packet it has (in the origin's numbering, which is the room's
    here), as much as its ring holds. A forged resume point asks for at
    most the history any listener of the room may hear."""
    if resume is None:
        return cfg.burst_packets
    behind = (core.room_stats(room)["out_seq"] - resume) & 0xFFFF
    # the newest of what it missed, as much as a ring holds: older is gone
    return min(behind, cfg.ring_depth - 1) if 0 < behind < 0x8000 else cfg.burst_packets
