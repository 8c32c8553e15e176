"""One rendition of a room: samples in, CMAF parts and segments out, and
the requests held until the part they ask for exists.

The timeline is the track's own sample clock from its first sample. Parts
end on 200 ms boundaries of that clock and segments on 1 s ones, so two
renditions of a room (Opus, AAC) number the same moment alike: a segment's
media sequence number is the room's first number plus whole seconds. A
sample goes in the part its end falls in, so no part is longer than the
part target by more than one sample (parts of 1024-sample AAC frames are
9 or 10 frames: the playlist's PART-TARGET says the longest)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

from relay.hls import fmp4

PART_S = 0.2
PARTS_PER_SEGMENT = 5
WINDOW_SEGMENTS = 16        # segments a live playlist lists (>= 2 x the delta skip, 6 s, plus margin)
PART_SEGMENTS = 4           # the newest segments whose parts are still listed and served


@dataclass
class Part:
    msn: int
    index: int
    data: bytes
    duration: float           # seconds


@dataclass
class Segment:
    msn: int
    wall: float                # when its first sample was heard (EXT-X-PROGRAM-DATE-TIME)
    parts: list[Part] = field(default_factory=list)
    done: bool = False
    data: bytes = b""          # the whole segment once done: its parts end to end

    @property
    def duration(self) -> float:
        return sum(p.duration for p in self.parts)


Position = tuple[int, int]     # (media sequence number, part index)


class Track:
    """Parts and segments of one rendition, and waiters for the next ones."""

    def __init__(self, name: str, info: fmp4.AudioTrack, codecs: str, bandwidth: int, first_msn: int) -> None:
        self.name, self.info, self.codecs, self.bandwidth = name, info, codecs, bandwidth
        self.init = fmp4.init_segment(info)
        self.first_msn = first_msn
        self.segments: list[Segment] = []
        self.part_target = PART_S
        self._part_samples = round(PART_S * info.sample_rate)
        self._clock = 0                              # samples placed so far
        self._pending: list[tuple[bytes, int]] = []
        self._pending_start = 0
        self._part_no = 0                            # parts since the first sample
        self._fragments = 0
        self._started_wall = 0.0
        self._waiters: list[tuple[Position, bool, asyncio.Future[None]]] = []
        self.version = 0                             # bumped per part: playlist caches key on it
        self.parts_made = 0
        self.on_segment: Callable[[Track, Segment], None] | None = None   # the recorder, if any

    # ---------------------------------------------------------------- input

    def start(self, first_msn: int, wall: float) -> None:
        """Number the first segment `first_msn`, its first sample heard at `wall` (Unix time)."""
        self.first_msn, self._started_wall = first_msn, wall

    def reanchor(self, wall: float) -> None:
        """The stream restarted after a pause: what comes next was heard at
        `wall`, so its PROGRAM-DATE-TIME says so (the media timeline itself
        runs on without a gap)."""
        self._started_wall = wall - self._clock / self.info.sample_rate

    def add(self, data: bytes, duration: int) -> None:
        """Append one sample (`duration` in the track's timescale)."""
        if not self._started_wall:
            self._started_wall = time.time()
        boundary = (self._part_no + 1) * self._part_samples
        if self._pending and self._clock + duration > boundary:
            self._close_part()
        if not self._pending:
            self._pending_start = self._clock
        self._pending.append((data, duration))
        self._clock += duration
        if self._clock >= (self._part_no + 1) * self._part_samples:
            self._close_part()

    def _close_part(self) -> None:
        samples, self._pending = self._pending, []
        msn = self.first_msn + self._part_no // PARTS_PER_SEGMENT
        index = self._part_no % PARTS_PER_SEGMENT
        rate = self.info.sample_rate
        seg = self.segments[-1] if self.segments and not self.segments[-1].done else None
        if seg is None or seg.msn != msn:
            if seg is not None:
                self._finish(seg)
            seg = Segment(msn, self._started_wall + self._pending_start / rate)
            self.segments.append(seg)
        self._fragments += 1
        data = fmp4.fragment(self._fragments, self._pending_start, samples)
        dur = sum(d for _, d in samples) / rate
        seg.parts.append(Part(msn, index, data, dur))
        self.part_target = max(self.part_target, dur)
        self._part_no += 1
        if index == PARTS_PER_SEGMENT - 1:
            self._finish(seg)
        self._trim()
        self.version += 1
        self.parts_made += 1
        self._wake()

    def _finish(self, seg: Segment) -> None:
        seg.done = True
        seg.data = b"".join(p.data for p in seg.parts)
        if self.on_segment is not None:
            self.on_segment(self, seg)

    def _trim(self) -> None:
        # a delta update skips what is older than 6 s, and the window keeps
        # more than twice that, as the spec asks of a playlist that offers it
        del self.segments[:max(0, len(self.segments) - WINDOW_SEGMENTS)]
        for seg in self.segments[:-PART_SEGMENTS]:
            for p in seg.parts:
                p.data = b""

    # ----------------------------------------------------------- positions

    @property
    def empty(self) -> bool:
        return not self.segments

    def last_position(self) -> Position | None:
        """The newest part's (msn, index)."""
        if not self.segments:
            return None
        p = self.segments[-1].parts[-1]
        return (p.msn, p.index)

    def next_position(self) -> Position:
        """Where the next part will be: the preload hint."""
        msn = self.first_msn + self._part_no // PARTS_PER_SEGMENT
        return (msn, self._part_no % PARTS_PER_SEGMENT)

    def has(self, msn: int, part: int | None) -> bool:
        """Does the playlist already hold segment `msn` whole (part None),
        or its part `part` or anything later?"""
        if not self.segments:
            return False
        last = self.segments[-1]
        if part is None:
            done = last.msn if last.done else last.msn - 1
            return done >= msn
        p = last.parts[-1]
        return (p.msn, p.index) >= (msn, part)

    def part(self, msn: int, index: int) -> bytes | None:
        for seg in reversed(self.segments):
            if seg.msn == msn:
                for p in seg.parts:
                    if p.index == index and p.data:
                        return p.data
                return None
        return None

    def segment(self, msn: int) -> bytes | None:
        for seg in reversed(self.segments):
            if seg.msn == msn:
                return seg.data if seg.done else None
        return None

    # ------------------------------------------------------------- waiting

    def waiter(self, msn: int, part: int | None) -> asyncio.Future[None]:
        """A future that completes once `has(msn, part)`; the caller bounds
        how long it waits and cancels it then."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.has(msn, part):
            fut.set_result(None)
        else:
            self._waiters.append(((msn, -1 if part is None else part), part is None, fut))
        return fut

    def _wake(self) -> None:
        keep = []
        for pos, whole, fut in self._waiters:
            if fut.done():
                continue
            if self.has(pos[0], None if whole else pos[1]):
                fut.set_result(None)
            else:
                keep.append((pos, whole, fut))
        self._waiters = keep

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, f in self._waiters if not f.done())
