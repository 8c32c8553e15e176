"""Background tasks outlive their own mistakes (relay/ops/tasks.py)."""
from __future__ import annotations

import asyncio

from relay.node import Node
from relay.testing.loadgen import free_port
from relay.wire.config import load


def node_config(port: int) -> str:
    return f"""
[node]
listen = "127.0.0.1:{port}"
admin = ""
auth = "open"
[[room]]
name = "demo"
ingest = "127.0.0.1:{free_port()}"
sources = ["127.0.0.1"]
"""


def test_a_failing_housekeeping_step_is_logged_and_housekeeping_goes_on(caplog) -> None:
    """One housekeeping step raises (as SPEAKERS at 256 voices once did):
    the failure is logged with its traceback and counted, and housekeeping
    starts again, instead of ending for good with sessions that never
    expire."""
    from relay.ops.tasks import restarts
    calls = []

    async def run() -> None:
        port = free_port()
        node = Node(load(node_config(port)))
        await node.start()
        real = node.neighbours.refresh

        def flaky(now: float, rooms) -> None:
            calls.append(now)
            if len(calls) == 1:
                raise RuntimeError("a bug in one step")
            real(now, rooms)
        node.neighbours.refresh = flaky  # type: ignore[method-assign]
        try:
            for _ in range(40):              # bounded: up to 4 s
                await asyncio.sleep(0.1)
                if len(calls) >= 3:
                    break
        finally:
            node.close()
    before = restarts["housekeeping"]
    asyncio.run(run())
    assert len(calls) >= 3, calls
    assert restarts["housekeeping"] == before + 1
    assert "background task 'housekeeping' failed" in caplog.text and "a bug in one step" in caplog.text
