"""Cascade: a room this node takes from other nodes instead of from
publishers. The node joins an upstream node as one listener with the
`relay` role (the same challenge and cookie handshake, NACKs for repair)
and feeds what it hears into its own room, whose listeners, edges below
it included, then get it from this node's rings. Trees of any depth are
built from this one step.

A subscription exists only while the room has listeners here: the first
one starts it, and it ends `upstream_linger` seconds after the last one
left, so a million listeners cost the origin one stream per edge and room.

An upstream that sends nothing at all (not an audio packet, not a
keepalive echo) for DEAD_AFTER_S is taken for dead, and the next node in
the room's list is joined. The room's numbering is spliced across the
switch by the core, as across a publisher restart, so listeners here see
one continuous stream with a gap of about DEAD_AFTER_S.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable

from relay._core import Core
from relay.client.listen import JoinRefused, ListenClient, Unreachable
from relay.wire.addr import to_sockaddr
from relay.wire.protocol import Speakers
from relay.wire.tokens import mint

log = logging.getLogger("relay.upstream")

# silence from an upstream after which it is dead (it echoes our keepalives,
# sent three times as often, even when its room is quiet)
DEAD_AFTER_S = 0.5
# a join to an upstream that does not answer is given up this soon
JOIN_ATTEMPTS, JOIN_TIMEOUT_S = 2, 0.25
# after every node in the list failed, wait this long before going round again
RETRY_S = 1.0


class Upstream:
    """One room's subscription to the nodes above it."""

    def __init__(self, room: str, index: int, nodes: list[tuple[str, int]], core: Core,
                 token: Callable[[], str], sent: Callable[[], None]) -> None:
        self.room, self.index, self.nodes, self.core = room, index, nodes, core
        self.token = token        # a fresh relay token for each join
        self.sent = sent          # after feeding: an inline core sends now
        self.current: tuple[str, int] | None = None   # the node we hear from now
        self.joins = 0            # upstream joins that succeeded
        self.client: ListenClient | None = None       # the session upstream, while there is one
        self._task: asyncio.Task | None = None
        self._unwanted_since: float | None = None

    @property
    def speakers(self) -> Speakers | None:
        """Who is on the room's stage, as the upstream node last said (a
        stage room's SPEAKERS reach every node below it this way)."""
        return self.client.speakers if self.client is not None and self.current is not None else None

    @property
    def switches(self) -> int:
        """Joins after the first: moves to another upstream (a dead or
        draining one, or a new subscription after the room was left)."""
        return max(0, self.joins - 1)

    def want(self, listeners: int, now: float, linger: float) -> None:
        """Called on every housekeeping tick with the room's listeners here:
        subscribe when there are some, leave once there were none for
        `linger` seconds."""
        if listeners > 0:
            self._unwanted_since = None
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._run())
        elif self._task is not None:
            if self._unwanted_since is None:
                self._unwanted_since = now
            elif now - self._unwanted_since >= linger:
                self.stop()

    def stop(self) -> None:
        """Leave the upstream (the LEAVE is sent as the task ends)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._unwanted_since = None
        self.current = None

    async def _run(self) -> None:
        while True:
            for node in self.nodes:
                await self._hear(node)
            await asyncio.sleep(RETRY_S)

    async def _hear(self, node: tuple[str, int]) -> None:
        """Join `node` and feed the room from it until it dies or refuses."""
        source = to_sockaddr(node)
        where = f"{node[0]}:{node[1]}"

        def feed(pkt: bytes) -> None:
            self.core.feed(self.index, pkt, source)
            self.sent()

        client = self.client = ListenClient(where, self.room, self.token(), sink=feed)
        try:
            await client.join(attempts=JOIN_ATTEMPTS, timeout=JOIN_TIMEOUT_S)
            # the new upstream's stream replaces the old at once: the core
            # splices its numbering onto the room's
            self.core.room_release(self.index)
            self.joins += 1
            self.current = node
            log.warning("room %r: taking it from %s", self.room, where,
                        extra={"fields": {"event": "upstream", "room": self.room, "node": where}})
            await client.receive(dead_after=DEAD_AFTER_S)
        except (JoinRefused, TimeoutError, Unreachable, OSError) as e:
            log.warning("room %r: upstream %s: %s", self.room, where, e,
                        extra={"fields": {"event": "upstream_lost", "room": self.room, "node": where}})
        finally:
            self.current = self.client = None
            with contextlib.suppress(OSError):
                client.close()


def relay_token(secret: str, room: str) -> str:
    """The token a node presents upstream: role `relay`, an hour long (a
    fresh one is minted for every join). Without a secret (auth = "open")
    it presents none."""
    return mint(secret, room, role="relay", ttl_s=3600) if secret else ""


