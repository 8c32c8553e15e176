"""The node's HLS side: which rooms have it, their taps drained on a timer,
and the port. node.py opens and closes rooms here and hands it nothing but
the core; the metrics collector reads `stats()`."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from relay.hls import replay
from relay.hls.room import DROPS, RoomHls, Tap
from relay.hls.server import HlsCounters, HlsServer

log = logging.getLogger("relay.hls")

# the tap's ring holds [node] ring_depth packets (16: 320 ms of 20 ms
# frames); draining four times as often as that fills keeps it far from
# overflowing while the loop does other work
DRAIN_S = 0.05
ROOM_END_S = 10.0        # a recorded room silent this long has ended: its replay becomes a VOD
EXPIRE_EVERY_S = 600.0   # how often recordings past their retention are deleted


@dataclass
class HlsStats:
    """What the collector reads: the port's counters and the rooms' own."""
    port: HlsCounters
    rooms: int = 0
    parts: Counter[str] = field(default_factory=Counter)       # by rendition
    dropped: Counter[str] = field(default_factory=Counter)     # by reason (room.DROPS)
    mux_seconds: float = 0.0                                    # CPU time spent draining and muxing


class HlsRooms:
    """Rooms with LL-HLS on this node, and the HTTP port that serves them."""

    def __init__(self, core, max_held: int = 10_000, max_connections: int = 20_000,
                 record_dir: str = "", record_retention: float = 7 * 86400.0) -> None:
        self.core = core
        self.rooms: dict[str, tuple[RoomHls, Tap]] = {}
        self.record_root = Path(record_dir) if record_dir else None
        self.record_retention = record_retention
        self._expired_at = 0.0
        self.server = HlsServer(self.get, max_held, max_connections, self.record_root)
        self._timer: asyncio.TimerHandle | None = None
        self._gone = Counter[str]()       # counts of rooms closed, kept so counters never go down
        self._mux_ns = 0

    def get(self, name: str) -> RoomHls | None:
        """The room's HLS, or None if it has none here."""
        got = self.rooms.get(name)
        return got[0] if got else None

    def open(self, name: str, index: int, record: bool = False) -> None:
        """Start writing LL-HLS for the room in core slot `index` (and
        recording its segments for the replay if `record`)."""
        if name in self.rooms:
            return
        recorder = None
        if record and self.record_root is not None:
            recorder = replay.Recorder(self.record_root, name)
        room = RoomHls(name, recorder=recorder)
        self.rooms[name] = (room, Tap(self.core, index, room))

    def close(self, name: str) -> None:
        """Stop a room's HLS (the room is being removed)."""
        got = self.rooms.pop(name, None)
        if got is None:
            return
        room, tap = got
        tap.close()
        if room.recorder is not None:
            room.recorder.close()
        self.server.forget(room)
        for t in room.tracks:
            self._gone["parts:" + t.name] += t.parts_made
        for reason, n in room.drops.items():
            self._gone["drop:" + reason] += n

    def describe(self) -> dict:
        """/hls.json: where a page finds a room's LL-HLS (`base` + NAME +
        "/index.m3u8"); `base` is null on a wildcard address, and the page
        uses the host it came from."""
        host, port = self.server.address
        shown = None if host in ("0.0.0.0", "::", "") else (f"[{host}]" if ":" in host else host)
        return {"port": port, "path": "/rooms/", "base": f"http://{shown}:{port}/rooms/" if shown else None}

    @property
    def taps(self) -> int:
        """Listener slots the taps hold (the core counts them as listeners)."""
        return len(self.rooms)

    async def start(self, host: str, port: int) -> None:
        """Bind the port and start draining the taps."""
        await self.server.start(host, port)
        self._timer = asyncio.get_running_loop().call_later(DRAIN_S, self._drain)

    def _drain(self) -> None:
        t0 = time.thread_time_ns()
        for name, (_room, tap) in list(self.rooms.items()):
            try:
                tap.drain()
            except Exception:     # one room's trouble must not stop the others' HLS
                log.exception("room %r: HLS could not take its packets; closing its HLS", name)
                self.close(name)
        now = time.monotonic()
        for room, _ in self.rooms.values():
            if room.recorder is not None and not room.recorder.ended and room.last_packet \
                    and now - room.last_packet > ROOM_END_S:
                room.recorder.end()
        if self.record_root is not None and now - self._expired_at > EXPIRE_EVERY_S:
            self._expired_at = now
            replay.expire(self.record_root, self.record_retention)
        self._mux_ns += time.thread_time_ns() - t0
        self._timer = asyncio.get_running_loop().call_later(DRAIN_S, self._drain)

    def stats(self) -> HlsStats:
        """Counters for the metrics collector, summed over rooms present and gone."""
        s = HlsStats(self.server.counters, len(self.rooms), mux_seconds=self._mux_ns / 1e9)
        for key, n in self._gone.items():
            kind, _, name = key.partition(":")
            (s.parts if kind == "parts" else s.dropped)[name] += n
        for room, _ in self.rooms.values():
            for t in room.tracks:
                s.parts[t.name] += t.parts_made
            for reason in DROPS:
                s.dropped[reason] += room.drops[reason]
        return s

    def close_all(self) -> None:
        """Stop the timer, the port and every room's tap."""
        if self._timer is not None:
            self._timer.cancel()
        self.server.close()
        for name in list(self.rooms):
            self.close(name)
