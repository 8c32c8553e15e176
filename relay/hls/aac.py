"""The AAC-LC rendition: a room's Opus decoded and encoded once per node
with PyAV (libavcodec's libopus decoder and native AAC encoder), for
native players that cannot play Opus in MP4.

Lost packets reach here as TOC-only Opus packets (opus.lost_frame), which
the decoder conceals, so the AAC timeline keeps the Opus one's length and
the two renditions' segments cover the same seconds."""
from __future__ import annotations

import logging

import av
from av.audio.fifo import AudioFifo

from relay.hls.fmp4 import AudioTrack
from relay.hls.opus import SAMPLE_RATE

log = logging.getLogger("relay.hls")

AAC_BITRATE = 96_000
AAC_FRAME = 1024
# AudioSpecificConfig (ISO/IEC 14496-3 1.6.2.1): object type 2 (LC), 48 kHz (index 3), 2 channels
AAC_CONFIG = bytes([(2 << 3) | (3 >> 1), ((3 & 1) << 7) | (2 << 3)])
AAC_TRACK = AudioTrack("aac", SAMPLE_RATE, 2, AAC_CONFIG, AAC_BITRATE)


class AacEncoder:
    """Opus packets in, AAC-LC access units (1024 samples each) out."""

    def __init__(self) -> None:
        self._dec = av.CodecContext.create("libopus", "r")
        self._dec.sample_rate = SAMPLE_RATE     # type: ignore[attr-defined]
        self._dec.layout = "stereo"             # type: ignore[attr-defined]
        self._enc = av.CodecContext.create("aac", "w")
        self._enc.sample_rate = SAMPLE_RATE     # type: ignore[attr-defined]
        self._enc.layout = "stereo"             # type: ignore[attr-defined]
        self._enc.format = "fltp"               # type: ignore[attr-defined]
        self._enc.bit_rate = AAC_BITRATE
        self._enc.open()
        self._fifo = AudioFifo()
        self.errors = 0

    def encode(self, opus_packet: bytes) -> list[bytes]:
        """Decode one Opus packet and return the AAC frames now complete.
        A packet the decoder refuses is counted and skipped (its time is
        lost from this rendition, not the room)."""
        try:
            frames = self._dec.decode(av.Packet(opus_packet))
        except av.FFmpegError as e:
            self._refused(e)
            return []
        out = []
        for f in frames:
            f.pts = None   # the fifo re-times; the track's own clock places them
            self._fifo.write(f)
        while self._fifo.samples >= AAC_FRAME:
            frame = self._fifo.read(AAC_FRAME)
            try:
                out += [bytes(p) for p in self._enc.encode(frame)]
            except av.FFmpegError as e:
                self._refused(e)
        return out

    def _refused(self, e: Exception) -> None:
        if self.errors == 0:
            log.warning("HLS AAC rendition: a packet could not be transcoded (%s); counted in "
                        "relay_hls_dropped_total{reason=\"transcode\"}", e)
        self.errors += 1
