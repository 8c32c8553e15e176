"""Helpers to build RTP packets for tests (kept apart from the product code
so the tests do not borrow the parser they are checking)."""
from __future__ import annotations

import socket
import struct

from relay.wire.addr import to_sockaddr


def rtp(seq: int, ts: int, ssrc: int, payload: bytes, pt: int = 111, marker: bool = False,
        csrc: int = 0, ext_words: int | None = None, pad: int = 0) -> bytes:
    b0 = 0x80 | csrc | (0x10 if ext_words is not None else 0) | (0x20 if pad else 0)
    out = struct.pack("!BBHII", b0, (0x80 if marker else 0) | pt, seq & 0xFFFF,
                      ts & 0xFFFFFFFF, ssrc)
    out += bytes(4 * csrc)
    if ext_words is not None:
        out += struct.pack("!HH", 0xBEDE, ext_words) + bytes(4 * ext_words)
    out += payload
    if pad:
        out += bytes(pad - 1) + bytes([pad])
    return out


def header(pkt: bytes) -> tuple[int, int, int]:
    """(seq, ts, ssrc) of an RTP packet."""
    return struct.unpack_from("!HII", pkt, 2)


SRC_A = to_sockaddr(("127.0.0.1", 40000), socket.AF_INET)
SRC_B = to_sockaddr(("127.0.0.1", 40001), socket.AF_INET)
SRC_FOREIGN = to_sockaddr(("127.0.0.9", 40000), socket.AF_INET)
