"""The stage's messages beside a room's audio (docs/protocol.md): a
listener's raised hand and reactions, and the node's reactions summary and
invitation. Same header and framing as every control message (protocol.py,
which hands these kinds to this module).

    HAND       listener -> node   session id, flags bit 0: raised (else lowered)
    REACTION   listener -> node   session id, one byte: an index into REACTIONS_SET
    REACTIONS  node -> sessions   count n, then n x (index, u16 how many in the last second)
    INVITE     node -> listener   the host invites it on stage: it joins again as a speaker
                                  with the token it has (its `sub` may speak now)

Over UDP a HAND or REACTION names the session like a KEEPALIVE does; the
node takes it only from the session's own address. None of them carries a
secret, and an INVITE only asks the listener to try a JOIN the node checks.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from relay.wire.protocol import HEADER, MAGIC, SESSION_ID_LEN, VERSION, MsgType, ProtocolError

# the reactions a listener may send, by index: a fixed set keeps the
# summary one small datagram whatever the crowd does
REACTIONS_SET = ("👏", "❤️", "😂", "🎉", "🔥", "👍")
HAND_RAISED = 0x01


@dataclass(frozen=True)
class Hand:
    session_id: bytes
    raised: bool = True


@dataclass(frozen=True)
class Reaction:
    session_id: bytes
    index: int


@dataclass(frozen=True)
class Reactions:
    counts: tuple[tuple[int, int], ...]     # (index, how many in the last second)


@dataclass(frozen=True)
class Invite:
    pass


StageMessage = Hand | Reaction | Reactions | Invite
KINDS = (MsgType.HAND, MsgType.REACTION, MsgType.REACTIONS, MsgType.INVITE)


def encode(msg: StageMessage) -> bytes:
    """Serialise one of this module's messages."""
    if isinstance(msg, Hand):
        return HEADER.pack(MAGIC, VERSION, MsgType.HAND, HAND_RAISED if msg.raised else 0) + msg.session_id
    if isinstance(msg, Reaction):
        if not 0 <= msg.index < len(REACTIONS_SET):
            raise ValueError(f"reaction {msg.index}: one of 0..{len(REACTIONS_SET) - 1}")
        return HEADER.pack(MAGIC, VERSION, MsgType.REACTION, 0) + msg.session_id + bytes([msg.index])
    if isinstance(msg, Reactions):
        body = b"".join(struct.pack("!BH", i, min(n, 0xFFFF)) for i, n in msg.counts[:len(REACTIONS_SET)])
        return HEADER.pack(MAGIC, VERSION, MsgType.REACTIONS, 0) + bytes([len(body) // 3]) + body
    if isinstance(msg, Invite):
        return HEADER.pack(MAGIC, VERSION, MsgType.INVITE, 0)
    raise TypeError(f"not a stage message: {msg!r}")


def decode_body(kind: int, flags: int, body: bytes) -> StageMessage:
    """One of this module's messages from what follows its header."""
    if kind == MsgType.HAND:
        if len(body) < SESSION_ID_LEN:
            raise ProtocolError("message truncated")
        return Hand(body[:SESSION_ID_LEN], bool(flags & HAND_RAISED))
    if kind == MsgType.REACTION:
        if len(body) < SESSION_ID_LEN + 1:
            raise ProtocolError("message truncated")
        index = body[SESSION_ID_LEN]
        if index >= len(REACTIONS_SET):
            raise ProtocolError(f"reaction {index} is not one of the {len(REACTIONS_SET)}")
        return Reaction(body[:SESSION_ID_LEN], index)
    if kind == MsgType.REACTIONS:
        if not body or len(body) < 1 + 3 * body[0]:
            raise ProtocolError("message truncated")
        return Reactions(tuple(struct.unpack_from("!BH", body, 1 + 3 * k) for k in range(body[0])))
    if kind == MsgType.INVITE:
        return Invite()
    raise ProtocolError(f"unknown message type {kind}")
