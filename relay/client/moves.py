"""Where a listener goes when its node dies: the alternates its ACCEPT
named, in turn and round again while they are only busy, then the `via`
URLs' GET /join. Functions of a ListenClient (relay/client/listen.py),
which calls them from listen() and receive()."""
from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from relay.wire.addr import parse_hostport

if TYPE_CHECKING:
    from relay.client.listen import ListenClient


def movable(self: ListenClient) -> bool:
    """Is there anywhere to go if this node dies?"""
    return bool(self.via) or (self._session is not None and bool(self._session.alternate))

async def move_on(self: ListenClient, why: str) -> bool:
    """Our node died: join its alternates in turn (then ask `via`),
    asking for what the room still holds after our last packet. A whole
    node's listeners move at once, and an alternate may be busy (rate
    limited, full): another round after a backoff, for `full_patience`
    seconds. False if nowhere took us."""
    # imported here: listen.py imports this module
    from relay.client.listen import FULL_BACKOFF_S, WAITED_FOR, JoinRefused, Unreachable
    if self._high is not None and self._session is not None and self._session.origin is not None:
        self._resume = self._high & 0xFFFF
    named = self._session.alternate if self._session is not None else ""
    here = f"{self.server[0]}:{self.server[1]}"
    # the ACCEPT names up to a few, in the order to try them
    alternates = [a for a in named.split(",") if a and a != here]
    give_up = time.monotonic() + self.full_patience
    backoff = FULL_BACKOFF_S[0]
    while True:
        busy = False
        for alternate in alternates:
            try:
                self.server = parse_hostport(alternate)
                self._via = f"the alternate {here} named"
                self._event(f"{why}: moving to {alternate}")
                self.stats.rejoins += 1
                await self.join(attempts=3, timeout=0.3)
                return True
            except JoinRefused as e:
                busy = busy or e.reason in WAITED_FOR
                self._event(f"{alternate}: {e}")
            except (ValueError, TimeoutError, Unreachable) as e:
                self._event(f"{alternate}: {e}")
        if self.via:
            try:
                await relocate(self, why)
                return True
            except (JoinRefused, TimeoutError, Unreachable) as e:
                self._event(str(e))
        pause = backoff * random.uniform(0.8, 1.2)
        if not busy or time.monotonic() + pause > give_up:
            return False
        self._event(f"every alternate is busy, trying again in {pause:.1f} s")
        await asyncio.sleep(pause)
        backoff = min(2 * backoff, FULL_BACKOFF_S[1])

async def relocate(self: ListenClient, why: str) -> None:
    """Ask the `via` URLs where to listen, and join there."""
    from relay.client.listen import Unreachable  # listen.py imports this module
    for url in self.via:
        try:
            where = await asyncio.to_thread(_ask_where, url)
        except (OSError, ValueError) as e:
            self._event(f"{url}: {e}")
            continue
        if where and where != f"{self.server[0]}:{self.server[1]}":
            self._event(f"{why}: {url} says {where}")
            self.server = parse_hostport(where)
            self._via = f"sent there by {url}"
            self.stats.rejoins += 1
            await self.join()
            return
    raise Unreachable(f"{why}, and no node to move to ({', '.join(self.via)})")


def _ask_where(url: str) -> str:
    """A node's GET /join answer: the UDP address to join ("" if none)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return str(json.loads(r.read()).get("udp", ""))
    except urllib.error.HTTPError as e:
        if e.code == 503:
            return ""
        raise
