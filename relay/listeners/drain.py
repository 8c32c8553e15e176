"""How a draining node lets its listeners go: the way a load balancer
expects, without handing the next node all of them at once."""
from __future__ import annotations

import asyncio
from typing import Callable

from relay.listeners.sessions import Sessions, Tell
from relay.wire.config import NodeConfig

DRAIN_STEP_S = 0.1       # one batch of listeners moved per step


async def drain_gracefully(sessions: Sessions, tell: Callable[[list[Tell]], int], cfg: NodeConfig,
                           hurry: asyncio.Event, emit: Callable[..., None]) -> int:
    """/readyz fails and new joins are refused (with the redirect) at once;
    the listeners we have keep listening for [node] drain_grace seconds, so
    the balancer can stop sending new ones; then they are moved at [node]
    drain_rate per second, in batches every 0.1 s, so the node they go to is
    not hit by all of them at once. `hurry` (a second signal) moves the rest
    at once. `tell` sends each ended session its REJECT. Returns the
    listeners told."""
    sessions.draining = True
    emit("draining", f"draining: not ready; serving {len(sessions.table)} listeners "
         f"{cfg.drain_grace:g} s more, then moving them at {cfg.drain_rate:g}/s",
         listeners=len(sessions.table), grace_s=cfg.drain_grace)
    try:
        await asyncio.wait_for(hurry.wait(), cfg.drain_grace)
    except asyncio.TimeoutError:
        pass
    batch = max(1, int(cfg.drain_rate * DRAIN_STEP_S))
    told = 0
    while sessions.table:
        told += tell(sessions.drain(None if hurry.is_set() else batch))
        if sessions.table:
            await asyncio.sleep(DRAIN_STEP_S)
    emit("drained", f"drained: told {told} listeners to move", told=told)
    return told
