"""Stopping a client by signal as cleanly as by Ctrl-C.

A publisher that dies without its RTCP BYE keeps its room locked against
the next publisher; a listener or speaker that dies without LEAVE keeps its
place on the node until its session times out. Service managers stop with
SIGTERM, a closed terminal sends SIGHUP, and a shell's background job
ignores SIGINT, so every one of them must end the client the way Ctrl-C
does: through its `finally`, which says goodbye.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import Awaitable, Iterator
from typing import TypeVar

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def until_stopped(aw: Awaitable[T]) -> tuple[T | None, bool]:
    """Run `aw` until it ends or a stop signal arrives; a signal cancels it,
    so its cleanup (BYE, LEAVE) runs. Returns its result (None if stopped)
    and whether a signal stopped it."""
    task = asyncio.ensure_future(aw)
    loop = asyncio.get_running_loop()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        stopped = True
        task.cancel()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)
    try:
        return await task, False
    except asyncio.CancelledError:
        if not stopped:
            raise
        return None, True
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


@contextlib.contextmanager
def passed_on(child: subprocess.Popen) -> Iterator[list[int]]:
    """While in the block, a stop signal to us is passed to `child` as
    SIGINT, which ffmpeg takes as "finish cleanly" (with `-rtpflags
    send_bye` that means sending the BYE). Yields the signals received."""
    received: list[int] = []

    def forward(sig: int, _frame: object) -> None:
        received.append(sig)
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGINT)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
