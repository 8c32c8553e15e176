"""What an operator reads in the log: joins and leaves, refusals by reason,
drops by reason, publishers starting, stopping and being replaced, and
publishers refused for reasons only the operator can fix (packets too large
for the listeners' rings, a new stream while the live one holds the room).

Nothing here logs per join or per packet: the node's counters are compared
once per interval and each kind of change becomes at most one line, so a
join storm or a packet flood adds a few lines, never thousands. Publisher
changes are found from the rooms' counters on every housekeeping tick and
logged as they happen (one line per change of state). Lines are plain text,
or one JSON object each with `--log-format json`; the structured fields
travel in the record as `fields`.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import Any, Callable

from relay._core import Core
from relay.ops.metrics import CORE_DROPS
from relay.listeners.sessions import PULLED, UDP, Sessions
from relay.wire.config import MAX_RING_BYTES, RoomConfig

log = logging.getLogger("relay.events")

# a publisher that has sent nothing for this long has stopped
PUBLISHER_QUIET_S = 2.0


def emit(event: str, text: str, **fields: Any) -> None:
    """One log line for an event, with its fields for the JSON format."""
    log.info(text, extra={"fields": {"event": event, **fields}})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the
    event's fields when it has them."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class EventLog:
    """Turns the node's counters into a bounded number of log lines."""

    def __init__(self, core: Core, sessions: Sessions, interval_s: float,
                 room_config: Callable[[str], RoomConfig | None] = lambda name: None) -> None:
        self.core, self.sessions, self.interval_s = core, sessions, interval_s
        self.room_config = room_config
        self._at = time.monotonic()
        self._seen = self._snapshot()
        # per room: publishing now?, source restarts seen
        self._publishing: dict[str, tuple[bool, int]] = {}
        # per (room, event): the count of refused packets at the last interval
        self._said: dict[tuple[str, str], int] = {}

    def _snapshot(self) -> dict[str, Any]:
        sc = self.sessions.counters
        c = self.core.counters()
        return {"joins": sc.joins, "leaves": sc.leaves, "timeouts": sc.timeouts,
                "refused": Counter(sc.rejections), "drops": {d: c[f"drop_{d}"] for d in CORE_DROPS}}

    def tick(self, now: float, stats: dict[str, dict[str, Any]]) -> None:
        """Called on every housekeeping tick with each room's core stats."""
        self._publishers(stats)
        if now - self._at >= self.interval_s:
            self._at = now
            self._rooms_needing_the_operator(stats)
            self._summary()

    def flush(self, stats: dict[str, dict[str, Any]]) -> None:
        """The node is stopping: say what the last, unfinished interval saw."""
        self._rooms_needing_the_operator(stats)
        self._summary()

    def _publishers(self, stats: dict[str, dict[str, Any]]) -> None:
        now_ns = time.monotonic_ns()
        for name, st in stats.items():
            live = bool(st["have_stream"]) and now_ns - st["last_rx_ns"] < PUBLISHER_QUIET_S * 1e9
            was, restarts = self._publishing.get(name, (False, st["source_restarts"]))
            if live and not was:
                emit("publisher_started", f"room {name!r}: publisher started", room=name)
            elif was and not live:
                ended = bool(st["released"])
                emit("publisher_stopped", f"room {name!r}: " + self._stopped(name, ended), room=name,
                     bye=ended)
            elif live and st["source_restarts"] != restarts:
                emit("publisher_replaced", f"room {name!r}: a new publisher stream took over", room=name,
                     restarts=st["source_restarts"] - restarts)
            self._publishing[name] = (live, st["source_restarts"])
        for gone in self._publishing.keys() - stats.keys():
            del self._publishing[gone]

    def _stopped(self, name: str, ended: bool) -> str:
        """Why the publisher stopped, and whether the room is free."""
        if ended:
            return "publisher ended with a BYE (or was released); the room is free for the next stream"
        quiet = f"publisher silent {PUBLISHER_QUIET_S:g} s without a BYE (stopped, killed or cut off)"
        r = self.room_config(name)
        if r is not None and r.takeover_after is None:
            return (f"{quiet}; the room stays held: release it (POST /rooms/{name}/release on the admin port) "
                    "for another stream to take it")
        after = r.takeover_after if r is not None else None
        return quiet + (f"; another allowed stream may take the room after {after:g} s of silence"
                        if after is not None else "")

    def _rooms_needing_the_operator(self, stats: dict[str, dict[str, Any]]) -> None:
        """Say so when a room refuses what its publisher sends, for reasons
        only the operator can fix: packets too large for the rings, or a
        new publisher stream while the live one still holds the room. One
        line per room and reason per log interval in which it happened,
        with the count of that interval."""
        ring = self.core.ring_bytes
        for name, st in stats.items():
            size = st["oversized_len"]
            self._in_interval(name, "oversized", st["drop_oversized"], (
                f"{size}-byte packets (RTP header included) are larger than a listener's ring: raise "
                f"[node] ring_bytes (now {ring}, at most {MAX_RING_BYTES}) or lower the publisher's "
                f"bitrate or frame length") if size <= MAX_RING_BYTES else
                f"datagrams are larger than {MAX_RING_BYTES} bytes: that is not RTP/Opus",
                size=size, ring_bytes=ring)
            self._in_interval(name, "takeover_refused", st["takeovers_refused"], (
                "a new publisher stream (another SSRC or address) while the live one holds the room; "
                f"if the publisher restarted, release the room (POST /rooms/{name}/release on the admin "
                "port), end publishers with an RTCP BYE, or lower takeover_after"))
        for gone in {key for key in self._said if key[0] not in stats}:
            del self._said[gone]

    def _in_interval(self, room: str, event: str, count: int, what: str, **fields: Any) -> None:
        seen = self._said.get((room, event), 0)
        if count > seen:
            log.warning("room %r: %d packets refused in the last %g s: %s", room, count - seen, self.interval_s,
                        what, extra={"fields": {"event": event, "room": room, "dropped": count - seen, **fields}})
        self._said[(room, event)] = count

    def _summary(self) -> None:
        now = self._snapshot()
        was, self._seen = self._seen, now
        joined, left, timed_out = (now[k] - was[k] for k in ("joins", "leaves", "timeouts"))
        if joined or left or timed_out:
            by_transport: Counter[str] = Counter()
            for room in self.sessions.rooms:
                for t in (UDP, *PULLED):
                    by_transport[t] += self.sessions.listeners(room, t)
            emit("listeners", f"listeners: {joined} joined, {left} left, {timed_out} timed out; now "
                 f"{self.core.listeners} ({', '.join(f'{t} {n}' for t, n in by_transport.items() if n) or 'none'})",
                 joined=joined, left=left, timed_out=timed_out, listeners=self.core.listeners,
                 by_transport=dict(by_transport))
        refused = now["refused"] - was["refused"]
        if refused:
            emit("refused", "joins refused: " + ", ".join(f"{r} {n}" for r, n in refused.most_common()),
                 reasons=dict(refused))
        drops = {d: now["drops"][d] - was["drops"][d] for d in CORE_DROPS if now["drops"][d] > was["drops"][d]}
        if drops:
            emit("drops", "packets dropped: " + ", ".join(f"{d} {n}" for d, n in drops.items()), reasons=drops)
