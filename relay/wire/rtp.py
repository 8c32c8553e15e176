"""What the node reads of an RTP packet outside the core: sequence,
timestamp, payload, its RFC 6464 audio level (a stage's speakers), and
whether an RTCP compound carries a BYE."""
from __future__ import annotations

import struct

LEVEL_EXT_ID = 1             # RFC 6464 audio level: the one-byte extension id speakers use


def rtp_payload(packet: bytes) -> tuple[int, int, bytes, int | None] | None:
    """(sequence number, timestamp, payload, RFC 6464 level or None) of
    an RTP packet, or None if it is not one we can use."""
    if len(packet) < 12 or packet[0] >> 6 != 2:
        return None
    b0 = packet[0]
    seq, ts = struct.unpack_from("!HI", packet, 2)
    off = 12 + 4 * (b0 & 0x0F)
    level = None
    end = len(packet)
    if b0 & 0x10:
        if off + 4 > end:
            return None
        profile, words = struct.unpack_from("!HH", packet, off)
        ext_end = off + 4 + 4 * words
        if profile == 0xBEDE:
            level = level_ext(packet, off + 4, min(ext_end, end))
        off = ext_end
    if b0 & 0x20:
        end -= packet[-1]
    if off >= end:
        return None
    return seq, ts, packet[off:end], level


def has_bye(packet: bytes) -> bool:
    """Does a compound RTCP packet carry a BYE (RFC 3550 6.6)?"""
    at = 0
    while at + 4 <= len(packet) and packet[at] >> 6 == 2:
        if packet[at + 1] == 203:
            return True
        at += 4 * (struct.unpack_from("!H", packet, at + 2)[0] + 1)
    return False


def level_ext(packet: bytes, at: int, end: int) -> int | None:
    """The audio level in one-byte header extensions (RFC 8285), if any."""
    while at < end:
        b = packet[at]
        if b == 0:
            at += 1
            continue
        ext_id, size = b >> 4, (b & 0x0F) + 1
        if ext_id == 15:
            return None
        if ext_id == LEVEL_EXT_ID and at + 1 < end:
            return packet[at + 1] & 0x7F
        at += 1 + size
    return None
