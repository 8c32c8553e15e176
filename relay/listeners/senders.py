"""The sender threads of a threaded core: one per shard, each spending its
life in Core.run_shard() in C without the GIL, sending its own slice of the
listeners on the shared listener socket; and the watchdog that restarts
one that ended without being asked to."""
from __future__ import annotations

import logging
import threading

from relay._core import Core

log = logging.getLogger("relay.senders")


class SenderThreads:
    """Starts, watches and stops the core's sender threads."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.threads: list[threading.Thread | None] = [None] * core.shards if core.threaded else []
        self.restarts = 0
        self._fd = -1
        self._stopping = False

    def start(self, fd: int) -> None:
        """One thread per shard, sending on `fd`."""
        self._fd = fd
        for k in range(len(self.threads)):
            self._start(k)

    def _start(self, k: int) -> None:
        t = threading.Thread(target=self.core.run_shard, args=(k, self._fd),
                             name=f"relay-shard-{k}", daemon=True)
        self.threads[k] = t
        t.start()

    def check(self) -> None:
        """Restart a sender thread that ended without being asked to: its
        listeners keep their slots and rings, so they only see a short gap."""
        if self._stopping:
            return
        for k, t in enumerate(self.threads):
            if t is not None and not t.is_alive():
                t.join()
                self.restarts += 1
                log.error("sender thread %d stopped; restarting it (%d restarts so far)", k, self.restarts)
                self._start(k)

    def stop(self) -> None:
        """Ask every thread to return and wait for them."""
        self._stopping = True
        self.core.stop_shards()
        for t in self.threads:
            if t is not None:
                t.join(timeout=5)
