"""Opus packets (RFC 6716) as far as anyone here needs to read one: how
many 48 kHz samples it holds, from its TOC byte. An Ogg writer's granule
positions and an LL-HLS track's sample durations both come from it."""
from __future__ import annotations

SAMPLE_RATE = 48_000

# samples per frame by the TOC byte's config (RFC 6716 3.1): SILK 10/20/40/60 ms,
# hybrid 10/20 ms, CELT 2.5/5/10/20 ms
_FRAME = ([480, 960, 1920, 2880] * 3 + [480, 960] * 2 + [120, 240, 480, 960] * 4)
MAX_PACKET_SAMPLES = 5760   # 120 ms, the most one packet may hold


def packet_samples(packet: bytes) -> int:
    """Samples (at 48 kHz) in an Opus packet, or 0 if it is not a valid one."""
    if not packet:
        return 0
    toc = packet[0]
    frame = _FRAME[toc >> 3]
    code = toc & 0x3
    if code == 0:
        n = 1
    elif code in (1, 2):
        n = 2
    else:
        if len(packet) < 2:
            return 0
        n = packet[1] & 0x3F
    total = n * frame
    return total if 0 < total <= MAX_PACKET_SAMPLES else 0
