"""Background tasks that outlive their own mistakes. The node's
housekeeping expires sessions, measures load and tells stages who speaks;
an upstream link keeps a room flowing. A bug in one step (an encoder at a
bound it did not expect, say) once ended such a task without a word, and
the node served on with sessions that never expired. Now the failure is
logged with its traceback, counted, and the task starts again."""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Awaitable, Callable

log = logging.getLogger("relay.tasks")

RESTART_AFTER_S = 1.0

# task name -> restarts since the process started (relay_task_restarts_total)
restarts: Counter[str] = Counter()


async def supervised(name: str, run: Callable[[], Awaitable[None]], pause: float = RESTART_AFTER_S) -> None:
    """Run `run()` until it returns; when it raises, log, count and run it
    again after `pause` seconds. Cancelling this cancels the task for good."""
    while True:
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            restarts[name] += 1
            log.exception("background task %r failed; starting it again in %g s", name, pause)
            await asyncio.sleep(pause)
