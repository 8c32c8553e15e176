"""What LL-HLS needs of an Opus packet (RFC 6716): how many 48 kHz samples
it holds (relay/wire/opus.py), and a packet that stands for a lost frame of
the same length."""
from __future__ import annotations

from relay.wire.opus import MAX_PACKET_SAMPLES, SAMPLE_RATE, packet_samples

__all__ = ["MAX_PACKET_SAMPLES", "SAMPLE_RATE", "packet_samples", "lost_frame"]


def lost_frame(like: bytes) -> bytes:
    """A TOC-only packet (one frame of zero bytes) in the same mode and
    frame size as `like`: a decoder conceals it, so a hole in the stream
    keeps its length in the track instead of shifting what follows."""
    return bytes([like[0] & 0xFC])
