"""A room's LL-HLS: its tap on the core and its two renditions.

The tap is one pull listener in the core's room (as a QUIC session
without the fast path is), so the core copies each packet into one more
ring and never learns of HLS; the event loop drains that ring a few times
a part. Packets come out with the room's own numbering (SSRC, sequence
and timestamp offsets zero). From them: the Opus rendition takes each
payload as one sample, the AAC one transcodes it. A hole in the RTP
timestamps (loss, a ring that overflowed) is filled with frames the
decoder conceals, so the track's clock stays the room's."""
from __future__ import annotations

import time
from collections import Counter
from typing import Callable

from relay.hls import opus
from relay.hls.aac import AAC_BITRATE, AAC_TRACK, AacEncoder
from relay.hls.fmp4 import AudioTrack
from relay.hls.replay import Recorder
from relay.hls.track import Track
from relay.wire.rtp import rtp_payload

OPUS_TRACK = AudioTrack("opus", opus.SAMPLE_RATE, 2)
OPUS_BANDWIDTH = 96_000      # what the variant says: a typical speech Opus stream plus framing
MAX_FILL_S = 1.0             # holes up to this are filled; past it the stream has restarted
PULL_BATCH = 256

# what the renditions could not use, and "concealed": 20 ms frames of a hole
# (loss upstream, or the tap's ring overflowing) filled with concealment
DROPS = ("malformed", "late", "transcode", "concealed")


class RoomHls:
    """A room's renditions, fed RTP packets in the room's numbering."""

    def __init__(self, name: str, aac: bool = True, clock: Callable[[], float] = time.time,
                 recorder: Recorder | None = None) -> None:
        self.name = name
        self.recorder = recorder
        self.opus = Track("opus", OPUS_TRACK, "opus", OPUS_BANDWIDTH, 0)
        self.aac: Track | None = Track("aac", AAC_TRACK, "mp4a.40.2", AAC_BITRATE + 16_000, 0) if aac else None
        self._encoder = AacEncoder() if aac else None
        self._clock = clock
        self._next_ts: int | None = None
        self._last: bytes = b""
        self.drops: Counter[str] = Counter()
        self.restarts = 0
        self.last_packet = 0.0         # time.monotonic() of the last packet fed
        if recorder is not None:
            for t in self.tracks:
                t.on_segment = recorder.segment

    @property
    def tracks(self) -> list[Track]:
        """The renditions, AAC first (the multivariant playlist's order)."""
        return [t for t in (self.aac, self.opus) if t is not None]

    def feed(self, packet: bytes) -> None:
        """One RTP packet of the room, in order as the core numbered it."""
        got = rtp_payload(packet)
        samples = opus.packet_samples(got[2]) if got is not None else 0
        if got is None or not samples:
            self.drops["malformed"] += 1
            return
        _, ts, payload, _ = got
        if self._next_ts is None:
            now = self._clock()
            # numbers start at the wall clock's second, so a restarted node
            # never reuses a URL a CDN has cached as immutable
            for t in self.tracks:
                t.start(int(now), now)
        else:
            ahead = (ts - self._next_ts + (1 << 31)) % (1 << 32) - (1 << 31)
            if ahead < 0:
                self.drops["late"] += 1
                return
            if 0 < ahead <= MAX_FILL_S * opus.SAMPLE_RATE and self._last:
                filler = opus.lost_frame(self._last)
                step = opus.packet_samples(filler)
                for _ in range(ahead // step):
                    self._sample(filler, step)
                self.drops["concealed"] += ahead // step
            elif ahead > 0:
                self.restarts += 1    # a new stream: the timeline just goes on, its dates anew
                now = self._clock()
                for t in self.tracks:
                    t.reanchor(now)
                if self.recorder is not None:
                    self.recorder.discontinuity()
        self._sample(payload, samples)
        self.last_packet = time.monotonic()
        self._last = payload
        self._next_ts = (ts + samples) & 0xFFFFFFFF

    def _sample(self, payload: bytes, samples: int) -> None:
        self.opus.add(payload, samples)
        if self.aac is not None and self._encoder is not None:
            errors = self._encoder.errors
            for unit in self._encoder.encode(payload):
                self.aac.add(unit, 1024)
            self.drops["transcode"] += self._encoder.errors - errors


class Tap:
    """The pull listener a room's HLS reads from the core."""

    def __init__(self, core, index: int, room: RoomHls) -> None:
        self.core, self.index, self.room = core, index, room
        self.slot = core.listener_add(index, b"", 0, 0, 0, pull=True)
        if self.slot < 0:
            raise RuntimeError(f"room {room.name!r}: no listener slot left for its HLS tap")

    def drain(self) -> int:
        """Feed everything the ring holds to the room's renditions; returns packets read."""
        n = 0
        while True:
            packets = self.core.pull(self.slot, PULL_BATCH)
            for p in packets:
                self.room.feed(p)
            n += len(packets)
            if len(packets) < PULL_BATCH:
                return n

    def close(self) -> None:
        try:
            self.core.listener_remove(self.slot)
        except ValueError:
            pass   # the room was closed and took its listeners with it
