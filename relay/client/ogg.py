"""A minimal Ogg Opus writer (RFC 7845): what `relay listen --out` saves,
playable by ffmpeg and browsers."""
from __future__ import annotations

import struct
from typing import BinaryIO

from relay.wire.opus import packet_samples


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_CRC = _crc_table()


def ogg_crc(data: bytes) -> int:
    """The Ogg page checksum (CRC-32, polynomial 0x04C11DB7, not reflected)."""
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC[(crc >> 24) ^ b]
    return crc


class OggOpusWriter:
    """Writes Opus packets as an Ogg Opus stream, one packet per page."""

    PRE_SKIP = 312

    def __init__(self, out: BinaryIO, channels: int = 2, serial: int = 0x52454C59) -> None:
        self.out, self.serial, self.seqno, self.granule = out, serial, 0, self.PRE_SKIP
        head = b"OpusHead" + struct.pack("<BBHIhB", 1, channels, self.PRE_SKIP, 48000, 0, 0)
        tags = b"OpusTags" + struct.pack("<I", 5) + b"relay" + struct.pack("<I", 0)
        self._page(head, 0, 0x02)
        self._page(tags, 0, 0x00)
        self.packets = 0
        self._held: bytes | None = None

    def _page(self, packet: bytes, granule: int, flags: int) -> None:
        lacing = bytes([255] * (len(packet) // 255) + [len(packet) % 255])
        hdr = struct.pack("<4sBBqIIIB", b"OggS", 0, flags, granule, self.serial, self.seqno, 0,
                          len(lacing)) + lacing
        crc = ogg_crc(hdr + packet)
        self.out.write(hdr[:22] + struct.pack("<I", crc) + hdr[26:] + packet)
        self.seqno += 1

    def write(self, packet: bytes) -> None:
        """Append one Opus packet (an RTP payload)."""
        # held back one packet so the last page can carry end-of-stream
        if self._held is not None:
            self._page(self._held, self.granule, 0)
        self.granule += packet_samples(packet)
        self._held = packet
        self.packets += 1

    def close(self) -> None:
        """Write the last page, marked end-of-stream."""
        if self._held is not None:
            self._page(self._held, self.granule, 0x04)
            self._held = None
        self.out.flush()
