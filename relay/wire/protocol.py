"""The listener control protocol (version 1), sans-IO: bytes in, values out.

Every message starts with MAGIC, a byte in the range RFC 7983 leaves
unassigned (4..15; RFC 9443 keeps it free of QUIC too), so the listener port
can carry control, RTP and RTCP side by side and tell them apart from the
first byte. The full wire format is in docs/protocol.md; this module is its
only implementation. Nothing here touches a socket or a clock: callers pass
`now` in.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from relay.wire.keyx import MAC_LEN

if TYPE_CHECKING:     # stage_msgs builds on this module
    from relay.wire.stage_msgs import StageMessage

MAGIC = 0x0B
VERSION = 1
HEADER = struct.Struct("!BBBB")  # magic, version, type, reserved
# A JOIN is padded to at least this size, so that the CHALLENGE and a REJECT
# with a redirect always fit under it: no reply is larger than its request.
MIN_JOIN = 128
MAX_ROOM = 64
MAX_TOKEN = 2048
MAX_REDIRECT = 96
SESSION_ID_LEN = 8
COOKIE_LEN = 20
PROOF_LEN = 8
KEEPALIVE_PAD = 4
# the longest control message there is: a JOIN with the longest room, token
# and cookie (header, room length, room, token length, token, cookie
# length, cookie); receivers size their buffers from it
MAX_CONTROL = 4 + 1 + MAX_ROOM + 2 + MAX_TOKEN + 1 + 255


class MsgType(IntEnum):
    JOIN = 1
    CHALLENGE = 2
    ACCEPT = 3
    REJECT = 4
    KEEPALIVE = 5
    LEAVE = 6
    SPEAKERS = 7
    HAND = 8          # the stage's messages (stage_msgs.py)
    REACTION = 9
    REACTIONS = 10
    INVITE = 11


class Reason(IntEnum):
    """Why a JOIN (or a session) was refused. Stable numbers: clients
    switch on them."""
    BAD_REQUEST = 1
    UNSUPPORTED_VERSION = 2
    BAD_TOKEN = 3
    EXPIRED_TOKEN = 4
    WRONG_ROOM = 5
    UNKNOWN_ROOM = 6
    NODE_FULL = 7
    ROOM_FULL = 8
    STALE_COOKIE = 9
    UNKNOWN_SESSION = 10
    DRAINING = 11
    WRONG_ROLE = 12
    RATE_LIMITED = 13
    TOKEN_IN_USE = 14
    STAGE_FULL = 15      # the room has max_speakers speakers already
    NO_STAGE = 16        # the room takes no speakers (its audio comes from ingest or upstream)
    ROOM_ENDED = 17      # the host ended the room
    REMOVED = 18         # the host removed this token's subject from the room
    AUDIENCE = 19        # the host moved this speaker back to the audience: join again as a listener


class ProtocolError(ValueError):
    """Bytes that are not a valid control message; `reason` says why."""

    def __init__(self, message: str, reason: Reason = Reason.BAD_REQUEST) -> None:
        super().__init__(message)
        self.reason = reason


# JOIN's flags (the header's fourth byte)
JOIN_SPEAKER = 0x01      # join the stage: publish (role `publish`) and hear the mix-minus
JOIN_RELAY = 0x02        # a node below taking the room (role `relay`)
JOIN_RESUME = 0x04       # a listener moving from a node that died: the last origin sequence number it has
JOIN_SEALED = 0x08       # a speaker's key exchange (keyx.py): its public key and its token, sealed
CHALLENGE_KEY = 0x01     # the CHALLENGE carries the node's public key for the exchange
ACCEPT_ORIGIN = 0x02     # the ACCEPT says the session's offsets from the origin's numbering, and an alternate
ACCEPT_SPEAKER = 0x04    # the ACCEPT puts the joiner on the stage, with the keys of its exchange
CONTROL_MAC = 0x01       # a KEEPALIVE or LEAVE carries a counter and the MAC of a speaker's control key
MAX_SPEAKER_TEXT = 32    # a speaker's id and display name, in bytes, in SPEAKERS
MAX_SPEAKERS_BYTES = 1200  # a SPEAKERS message fits one datagram on any path


@dataclass(frozen=True)
class Join:
    room: str
    token: str
    cookie: bytes = b""
    speaker: bool = False
    # another node taking the room (a cascade): in open mode this flag is
    # its only credential; a token's role decides otherwise
    relay: bool = False
    # a listener moving from a node that died: the origin's sequence number
    # of the last packet it has; the node sends what it still has after it
    resume: int | None = None
    # a speaker's key exchange: asked for on the first JOIN (`keyx`, nothing
    # else), then its public key and its token sealed (the token field empty)
    keyx: bool = False
    public: bytes = b""
    sealed: bytes = b""


@dataclass(frozen=True)
class Challenge:
    cookie: bytes
    public: bytes = b""      # the node's, for a speaker's key exchange


@dataclass(frozen=True)
class Accept:
    session_id: bytes
    ssrc: int
    keepalive_ms: int
    timeout_ms: int
    # on the stage: the session's keys are those of the JOIN's exchange
    speaker: bool = False
    # what this session adds to the origin's sequence number and timestamp
    # (so a listener counts loss in the origin's numbering across moves),
    # and the node to move to if this one dies ("" for none)
    origin: tuple[int, int] | None = None
    alternate: str = ""


@dataclass(frozen=True)
class Reject:
    reason: Reason
    redirect: str = ""
    # PROOF_LEN bytes that show the REJECT comes from the node the listener
    # talks to: its session id once it has one, or the MAC of the cookie it
    # joined with (an off-path attacker sees neither). Empty when neither
    # exists yet. Not part of equality: it says who sent it, not what.
    proof: bytes = field(default=b"", compare=False)


@dataclass(frozen=True)
class Keepalive:
    session_id: bytes
    # a speaker's: a counter that grows, and the MAC of it under its control key
    counter: int = 0
    mac: bytes = b""


@dataclass(frozen=True)
class Leave:
    session_id: bytes
    counter: int = 0         # a speaker's, as in its KEEPALIVE
    mac: bytes = b""


SILENT_LEVEL = 127       # RFC 6464: digital silence, -127 dBov


def rfc6464_level(rms: float) -> int:
    """RFC 6464's level of 16-bit audio with this RMS: -dBov, 0 (full
    scale) to 127 (silence)."""
    if rms < 1.0:
        return SILENT_LEVEL
    return min(SILENT_LEVEL, max(0, round(-20 * math.log10(rms / 32768))))


@dataclass(frozen=True)
class Speaker:
    id: str
    name: str
    level: int          # RFC 6464: -dBov, 0 (loudest) to 127 (silence)
    active: bool        # speaking now
    muted: bool = False  # muted by the host: out of the mix until unmuted


@dataclass(frozen=True)
class Speakers:
    """Who is on the stage: sent to a room's sessions every second or so."""
    speakers: tuple[Speaker, ...]


Message = Join | Challenge | Accept | Reject | Keepalive | Leave | Speakers   # and stage_msgs.StageMessage


def cookie_proof(cookie: bytes) -> bytes:
    """What a REJECT to a JOIN carrying `cookie` shows as its proof."""
    return cookie[4:4 + PROOF_LEN]


def is_control(datagram: bytes) -> bool:
    """True if the first byte says this is ours (RFC 7983 style demux)."""
    return len(datagram) > 0 and datagram[0] == MAGIC


def _head(kind: MsgType, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, flags)


def _short(text: str) -> bytes:
    """`text` in at most MAX_SPEAKER_TEXT bytes of UTF-8, cut on a character."""
    return text.encode()[:MAX_SPEAKER_TEXT].decode(errors="ignore").encode()


def encode(msg: Message | StageMessage) -> bytes:
    """Serialise a message. JOINs are padded to MIN_JOIN bytes."""
    if isinstance(msg, Join):
        out = _join_body(msg)
        return out + bytes(max(0, MIN_JOIN - len(out)))
    if isinstance(msg, Challenge):
        if len(msg.public) not in (0, 32):
            raise ValueError("a CHALLENGE's public key is 32 bytes")
        return (_head(MsgType.CHALLENGE, CHALLENGE_KEY if msg.public else 0) + bytes([len(msg.cookie)])
                + msg.cookie + msg.public)
    if isinstance(msg, Accept):
        origin = b""
        if msg.origin is not None:
            alternate = msg.alternate.encode()[:MAX_REDIRECT]
            origin = struct.pack("!HIB", msg.origin[0] & 0xFFFF, msg.origin[1] & 0xFFFFFFFF, len(alternate)) + alternate
        flags = (ACCEPT_ORIGIN if origin else 0) | (ACCEPT_SPEAKER if msg.speaker else 0)
        return (_head(MsgType.ACCEPT, flags) + msg.session_id
                + struct.pack("!III", msg.ssrc, msg.keepalive_ms, msg.timeout_ms) + origin)
    if isinstance(msg, Speakers):
        # as many as fit one datagram (and a one-byte count), loudest first
        # as the stage lists them: a stage at its bound, or past it, is
        # told about its loudest, never refused with an error
        entries = []
        size = HEADER.size + 1
        for sp in msg.speakers[:255]:
            sid, name = _short(sp.id), _short(sp.name)
            # the id's length is at most 32: its top bit says "muted"
            entry = (bytes([min(max(sp.level, 0), 127) | (0x80 if sp.active else 0),
                            len(sid) | (0x80 if sp.muted else 0)]) + sid + bytes([len(name)]) + name)
            if size + len(entry) > MAX_SPEAKERS_BYTES:
                break
            entries.append(entry)
            size += len(entry)
        return _head(MsgType.SPEAKERS) + bytes([len(entries)]) + b"".join(entries)
    if isinstance(msg, Reject):
        redirect = msg.redirect.encode()[:MAX_REDIRECT]
        if len(msg.proof) not in (0, PROOF_LEN):
            raise ValueError(f"a REJECT's proof is {PROOF_LEN} bytes")
        return _head(MsgType.REJECT) + bytes([msg.reason, len(redirect)]) + redirect + msg.proof
    if isinstance(msg, Keepalive):
        # padded so that the REJECT unknown_session answering it, with its
        # proof, is not larger than the KEEPALIVE (no amplification)
        return (_head(MsgType.KEEPALIVE, CONTROL_MAC if msg.mac else 0) + msg.session_id + _mac(msg)
                + bytes(KEEPALIVE_PAD))
    if isinstance(msg, Leave):
        return _head(MsgType.LEAVE, CONTROL_MAC if msg.mac else 0) + msg.session_id + _mac(msg)
    from relay.wire import stage_msgs   # it builds on this module
    return stage_msgs.encode(msg)       # raises TypeError for anything else


def _join_body(msg: Join) -> bytes:
    """A JOIN without its padding (a stream has no need of it)."""
    room, token = msg.room.encode(), msg.token.encode()
    if len(room) > MAX_ROOM or len(token) > MAX_TOKEN or len(msg.cookie) > 255 or len(msg.sealed) > MAX_TOKEN + 16:
        raise ValueError("room, token or cookie too long")
    if len(msg.public) not in (0, 32):
        raise ValueError("a JOIN's public key is 32 bytes")
    flags = ((JOIN_SPEAKER if msg.speaker else 0) | (JOIN_RELAY if msg.relay else 0)
             | (JOIN_RESUME if msg.resume is not None else 0) | (JOIN_SEALED if msg.keyx else 0))
    out = (_head(MsgType.JOIN, flags) + bytes([len(room)]) + room
           + struct.pack("!H", len(token)) + token + bytes([len(msg.cookie)]) + msg.cookie)
    if msg.resume is not None:
        out += struct.pack("!H", msg.resume & 0xFFFF)
    if msg.keyx:
        out += bytes([len(msg.public)]) + msg.public + struct.pack("!H", len(msg.sealed)) + msg.sealed
    return out


def _mac(msg: Keepalive | Leave) -> bytes:
    if not msg.mac:
        return b""
    if len(msg.mac) != MAC_LEN:
        raise ValueError(f"a control MAC is {MAC_LEN} bytes")
    return struct.pack("!I", msg.counter & 0xFFFFFFFF) + msg.mac


class _Reader:
    def __init__(self, data: bytes, offset: int) -> None:
        self.data, self.at = data, offset

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise ProtocolError("message truncated")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def text(self, n: int) -> str:
        try:
            return self.take(n).decode()
        except UnicodeDecodeError:
            raise ProtocolError("text is not UTF-8") from None


def decode(data: bytes) -> Message:
    """Parse one control datagram; raises ProtocolError with a reason."""
    if len(data) < HEADER.size or data[0] != MAGIC:
        raise ProtocolError("not a control message")
    _, version, kind, flags = HEADER.unpack_from(data)
    if version != VERSION:
        raise ProtocolError(f"version {version} not supported", Reason.UNSUPPORTED_VERSION)
    r = _Reader(data, HEADER.size)
    if kind == MsgType.JOIN:
        n = r.u8()
        if n > MAX_ROOM:
            raise ProtocolError("room name too long")
        room = r.text(n)
        (n,) = struct.unpack("!H", r.take(2))
        if n > MAX_TOKEN:
            raise ProtocolError("token too long")
        token = r.text(n)
        cookie = r.take(r.u8())
        resume = struct.unpack("!H", r.take(2))[0] if flags & JOIN_RESUME else None
        public = sealed = b""
        if flags & JOIN_SEALED:
            public = r.take(r.u8())
            if len(public) not in (0, 32):
                raise ProtocolError("a JOIN's public key is 32 bytes")
            (n,) = struct.unpack("!H", r.take(2))
            if n > MAX_TOKEN + 16:
                raise ProtocolError("sealed token too long")
            sealed = r.take(n)
        return Join(room, token, cookie, bool(flags & JOIN_SPEAKER), bool(flags & JOIN_RELAY), resume,
                    bool(flags & JOIN_SEALED), public, sealed)
    if kind == MsgType.CHALLENGE:
        cookie = r.take(r.u8())
        return Challenge(cookie, r.take(32) if flags & CHALLENGE_KEY else b"")
    if kind == MsgType.ACCEPT:
        sid = r.take(SESSION_ID_LEN)
        ssrc, keepalive, timeout = struct.unpack("!III", r.take(12))
        origin, alternate = None, ""
        if flags & ACCEPT_ORIGIN:
            seq_off, ts_off, n = struct.unpack("!HIB", r.take(7))
            origin, alternate = (seq_off, ts_off), r.text(n)
        return Accept(sid, ssrc, keepalive, timeout, bool(flags & ACCEPT_SPEAKER), origin, alternate)
    if kind == MsgType.REJECT:
        code = r.u8()
        try:
            reason = Reason(code)
        except ValueError:
            raise ProtocolError(f"unknown reject reason {code}") from None
        redirect = r.text(r.u8())
        proof = r.take(PROOF_LEN) if len(data) - r.at >= PROOF_LEN else b""
        return Reject(reason, redirect, proof)
    if kind == MsgType.KEEPALIVE:
        sid = r.take(SESSION_ID_LEN)
        counter, mac = _read_mac(r) if flags & CONTROL_MAC else (0, b"")
        return Keepalive(sid, counter, mac)
    if kind == MsgType.LEAVE:
        sid = r.take(SESSION_ID_LEN)
        counter, mac = _read_mac(r) if flags & CONTROL_MAC else (0, b"")
        return Leave(sid, counter, mac)
    if kind == MsgType.SPEAKERS:
        speakers = []
        for _ in range(r.u8()):
            level, n = r.u8(), r.u8()
            speaker_id = r.text(n & 0x7F)
            speakers.append(Speaker(speaker_id, r.text(r.u8()), level & 0x7F, bool(level & 0x80), bool(n & 0x80)))
        return Speakers(tuple(speakers))
    if kind in (MsgType.HAND, MsgType.REACTION, MsgType.REACTIONS, MsgType.INVITE):
        from relay.wire import stage_msgs   # it builds on this module
        return stage_msgs.decode_body(kind, flags, data[HEADER.size:])  # type: ignore[return-value]
    raise ProtocolError(f"unknown message type {kind}")


def _read_mac(r: _Reader) -> tuple[int, bytes]:
    (counter,) = struct.unpack("!I", r.take(4))
    return counter, r.take(MAC_LEN)


# --- the same messages on a QUIC or WebTransport stream

MAX_FRAME = 4096
ALPN_QUIC = "relay-listen/1"     # plain QUIC listeners; browsers use h3 + WebTransport
WEBTRANSPORT_PATH = "/relay"     # the extended CONNECT's path
MAX_DATAGRAM_FRAME = 65536       # QUIC DATAGRAM frame size both sides advertise
# The largest audio packet a QUIC or WebTransport listener can be sent: a
# DATAGRAM frame never spans QUIC packets (RFC 9221 section 5), and a QUIC
# packet must fit the 1,200-byte datagram every path carries. 48 bytes go
# to the short header (a 20-byte connection id at most, a 4-byte packet
# number), the AEAD tag, the frame's type and length, and WebTransport's
# quarter stream id. Any 20 ms Opus frame up to 450 kbit/s fits.
MAX_QUIC_AUDIO = 1200 - 48


def frame(msg: Message) -> bytes:
    """A message on a stream: a 2-byte big-endian length, then the message.
    (A stream has no datagram boundaries; padding is for UDP only, QUIC's
    handshake already proved the address.)"""
    body = _join_body(msg) if isinstance(msg, Join) else encode(msg)
    return struct.pack("!H", len(body)) + body


class FrameReader:
    """Reassembles framed messages from stream bytes as they arrive."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[Message]:
        """Add bytes; return the messages now complete. Raises
        ProtocolError on an oversized frame or a bad message."""
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= 2:
            (n,) = struct.unpack_from("!H", self._buf)
            if n > MAX_FRAME:
                raise ProtocolError(f"frame of {n} bytes")
            if len(self._buf) < 2 + n:
                if len(self._buf) > 2 + MAX_FRAME:
                    raise ProtocolError("frame too long")
                break
            out.append(decode(self._buf[2:2 + n]))
            self._buf = self._buf[2 + n:]
        return out
