"""The stage worker: one thread that runs every stage of a node, off the
event loop, and hands finished RTP back to it."""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from relay.stage.mixer import FRAME
from relay.stage.stage import FRAME_NS, Output, Stage

log = logging.getLogger("relay.stage")

MAX_CATCH_UP = 10            # ticks run at once after the worker was held up; older ones are skipped


class StageWorker:
    """The thread that runs every stage of a node: packets and joins come in
    on a queue from the event loop, ticks every 20 ms per active stage, and
    finished RTP goes back to the loop through `deliver` (called on this
    thread; it must hand over to the loop, e.g. with call_soon_threadsafe)."""

    def __init__(self, deliver: Callable[[list[Output]], None]) -> None:
        self.deliver = deliver
        self.stages: dict[str, Stage] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.skipped_ticks = 0
        self.busy_ns = 0        # this thread's CPU time on packets and ticks

    def start(self) -> None:
        """Run the worker thread."""
        self._thread = threading.Thread(target=self._run, name="relay-stage", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker thread (what is queued is dropped)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=2)
            self._thread = None

    def drop(self, name: str) -> None:
        """Forget a stage (its room went away), on the worker thread."""
        self.call(self._drop, name)

    def _drop(self, name: str) -> None:
        self.stages.pop(name, None)

    def call(self, fn: Callable[..., list[Output] | None], *args: object) -> None:
        """Run fn(*args) on the worker thread; what it returns is delivered."""
        self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            active = [st for st in self.stages.values() if ticking(st)]
            wait = None
            if active:
                wait = max(0.0, (min(st.tick_ns for st in active) - time.monotonic_ns()) / 1e9)
            try:
                items = [self._queue.get(timeout=wait)]
            except queue.Empty:
                items = []
            t0 = time.thread_time_ns()
            # everything that arrived goes into the jitter buffers before a
            # tick mixes: a packet waiting behind another is not late
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in items:
                return
            out: list[Output] = []
            for fn, args in items:
                try:
                    out += fn(*args) or []
                except Exception:   # one bad packet or join must not stop every stage
                    log.exception("stage worker: %s failed", getattr(fn, "__name__", fn))
            out += self._ticks()
            self.busy_ns += time.thread_time_ns() - t0
            if out:
                self.deliver(out)

    def _ticks(self) -> list[Output]:
        out: list[Output] = []
        now = time.monotonic_ns()
        for st in self.stages.values():
            if not ticking(st):
                continue
            behind = (now - st.tick_ns) // FRAME_NS
            if behind >= MAX_CATCH_UP:   # held up for long: skip ahead rather than mix a backlog
                st.next_t += int(behind) * FRAME
                st.tick_ns += int(behind) * FRAME_NS
                self.skipped_ticks += int(behind)
            while st.tick_ns <= now:
                t0 = time.thread_time_ns()
                try:
                    out += st.tick(now)
                except Exception:
                    log.exception("stage %r: tick failed", st.name)
                    st.tick_ns += FRAME_NS
                    st.next_t += FRAME
                st.busy_ns += time.thread_time_ns() - t0
        return out


def ticking(st: Stage) -> bool:
    """A stage ticks once it has voices and its first packet has set its
    clock: before that, tick_ns is 0 and every frame since boot would look due."""
    return bool(st.voices) and st.tick_ns > 0
