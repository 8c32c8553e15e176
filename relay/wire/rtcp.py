"""RTCP from listeners: RFC 3550 receiver reports and RFC 4585 generic
NACKs, the only feedback a node reads. Parsing is bounded by the sender's
resend budget, so a huge NACK costs its reader no more than a small one."""
from __future__ import annotations

import struct
from dataclasses import dataclass

RTCP_RR = 201
RTCP_RTPFB = 205
NACK_FMT = 1


@dataclass(frozen=True)
class Nack:
    media_ssrc: int
    seqs: tuple[int, ...]


def parse_rtcp(data: bytes, max_seqs: int = 1 << 30) -> tuple[bool, list[Nack]]:
    """Walk a compound RTCP packet. Returns (is_rtcp, NACKs found). A packet
    that is not well-formed RTCP returns (False, []). NACKs are expanded to
    at most `max_seqs` sequence numbers in all: a 2 KB NACK names thousands,
    and the caller can only afford to resend a few."""
    nacks: list[Nack] = []
    at = 0
    seen = False
    room = max_seqs
    while at + 4 <= len(data):
        b0, pt, words = struct.unpack_from("!BBH", data, at)
        size = 4 * (words + 1)
        if b0 >> 6 != 2 or not 192 <= pt <= 223 or at + size > len(data):
            return False, []
        seen = True
        if pt == RTCP_RTPFB and (b0 & 0x1F) == NACK_FMT and size >= 16 and room > 0:
            (media,) = struct.unpack_from("!I", data, at + 8)
            seqs: list[int] = []
            for fci in range(at + 12, at + size - 3, 4):
                if len(seqs) >= room:
                    break
                pid, blp = struct.unpack_from("!HH", data, fci)
                seqs.append(pid)
                if blp:
                    seqs += [(pid + 1 + bit) & 0xFFFF for bit in range(16) if blp >> bit & 1]
            del seqs[room:]
            room -= len(seqs)
            nacks.append(Nack(media, tuple(seqs)))
        at += size
    if not seen or at != len(data):
        return False, []  # trailing bytes: not a compound packet we trust
    return True, nacks


def build_nack(sender_ssrc: int, media_ssrc: int, seqs: list[int]) -> bytes:
    """A generic NACK (RFC 4585 6.2.1) asking for `seqs`."""
    fcis = b""
    todo = sorted(set(s & 0xFFFF for s in seqs))
    while todo:
        pid = todo.pop(0)
        blp = 0
        for s in list(todo):
            d = (s - pid - 1) & 0xFFFF
            if d < 16:
                blp |= 1 << d
                todo.remove(s)
        fcis += struct.pack("!HH", pid, blp)
    words = 2 + len(fcis) // 4
    return struct.pack("!BBHII", 0x80 | NACK_FMT, RTCP_RTPFB, words, sender_ssrc, media_ssrc) + fcis


def build_receiver_report(sender_ssrc: int) -> bytes:
    """An empty RTCP receiver report: a keepalive a standard RTP client
    could send too."""
    return struct.pack("!BBHI", 0x80, RTCP_RR, 1, sender_ssrc)
