"""Opus RTP packets made in the test (opuslib), for feeding renditions without a node."""
from __future__ import annotations

import struct

import numpy as np
import opuslib

FRAME = 960


def tone_packets(n: int, hz: float = 440.0, first_seq: int = 0, first_ts: int = 0) -> list[bytes]:
    """`n` RTP packets of 20 ms stereo Opus carrying a tone, numbered from the given bases."""
    enc = opuslib.Encoder(48000, 2, opuslib.APPLICATION_AUDIO)
    t = np.arange(n * FRAME)
    pcm = np.repeat((np.sin(2 * np.pi * hz * t / 48000) * 8000).astype("<i2"), 2)
    out = []
    for i in range(n):
        payload = enc.encode(pcm[i * FRAME * 2:(i + 1) * FRAME * 2].tobytes(), FRAME)
        out.append(struct.pack("!BBHII", 0x80, 111, (first_seq + i) & 0xFFFF,
                               (first_ts + i * FRAME) & 0xFFFFFFFF, 0x1234) + payload)
    return out
