"""Cascade: a room this node takes from other nodes instead of from
publishers. The node joins an upstream node as one listener with the
`relay` role (the same challenge and cookie handshake, NACKs for repair)
and feeds what it hears into its own room, whose listeners, edges below
it included, then get it from this node's rings. Trees of any depth are
built from this one step.

Where the room's list names two or more nodes, the node subscribes to two
of them at once (`[node] upstream_pair`, on by default). Every parent
sends the room in the origin's numbering under one SSRC, so the two
streams are copies: the core takes each sequence number once, from
whichever copy brings it first, and a copy that fills a hole in the other
fills it in the room (core/rtp.pxi, `merge`). A parent that dies then
costs nothing: the other copy was already carrying every packet. Two
parents that are not copies of one stream (a mixed stage on an origin
pair) are never merged: the node follows one and splices the other in
when it goes quiet (follow.py).

A subscription exists only while the room has listeners here: the first
one starts it, and it ends `upstream_linger` seconds after the last one
left, so a million listeners cost the origin one stream (two with the
pair) per edge and room.

An upstream that sends nothing at all (not an audio packet, not a
keepalive echo) for DEAD_AFTER_S is taken for dead, and that link joins
the next node in the room's list that the other link is not using. Its
first packets there are the recent ones the new parent bursts on a join,
which fill what the switch missed.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable

from relay._core import Core, Ingest
from relay.client.listen import JoinRefused, ListenClient, Unreachable
from relay.cluster.follow import Merge
from relay.wire.addr import to_sockaddr
from relay.wire.protocol import Reason, Speakers
from relay.wire.tokens import mint

log = logging.getLogger("relay.upstream")

# silence from an upstream after which it is dead (it echoes our keepalives,
# sent three times as often, even when its room is quiet)
DEAD_AFTER_S = 0.5
# a join to an upstream that does not answer is given up this soon
JOIN_ATTEMPTS, JOIN_TIMEOUT_S = 2, 0.25
# after every node in the list failed, wait this long before going round again
RETRY_S = 1.0
# a pause between two packets the room took from upstream this long or
# longer is a gap (two 20 ms frames: one late packet is not), observed into
# these buckets (relay_upstream_gap_seconds)
GAP_MIN_S = 0.04
GAP_BOUNDS = (0.04, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, float("inf"))


@dataclass
class UpstreamState:
    """A room taken from upstream, as the collector reads it."""
    connected: bool
    switches: int           # moves to another parent
    splices: int            # switches of a followed parent that went quiet (follow.py)
    disagreements: int      # times its parents were found sending two streams
    following: str = ""     # the parent it follows while its parents disagree ("" while merging)


class Link:
    """One subscription of a room to one parent at a time."""

    def __init__(self) -> None:
        self.node: tuple[str, int] | None = None      # the parent we hear from now
        self.last: tuple[str, int] | None = None      # the parent this link heard from before
        self.client: ListenClient | None = None
        self.switches = 0                             # moves to another parent than the last


class Upstream:
    """One room's subscription to the nodes above it: one link, or two to
    different parents whose copies the core merges."""

    def __init__(self, room: str, index: int, nodes: list[tuple[str, int]], core: Core,
                 token: Callable[[], str], sent: Callable[[], None], pair: bool = True,
                 tap: Callable[[bytes], None] | None = None, always: bool = False,
                 from_directory: bool = False) -> None:
        self.room, self.index, self.nodes, self.core = room, index, nodes, core
        self.token = token        # a fresh relay token for each join
        self.sent = sent          # after feeding: an inline core sends now
        self.pair = pair
        self.tap = tap            # sees every packet heard, before the core (an origin pair's matching)
        self.always = always      # subscribed with no listeners here too (an origin pair's partner)
        # `nodes` comes from the directory, refreshed by the node each second
        # (routing.parents): two links even while it names fewer than two
        self.from_directory = from_directory
        self.links: list[Link] = [Link(), Link()]
        self.merge = Merge(room, self._parent_name)   # what two links feed the room
        self.joins = 0            # upstream joins that succeeded
        self.failures = 0         # links ended by an unexpected error (logged with its traceback)
        self.gap_counts = [0] * len(GAP_BOUNDS)
        self.gap_sum = 0.0
        self._taken_at: float | None = None   # when the room last took a packet from upstream
        self._tasks: list[asyncio.Task] = []
        self._unwanted_since: float | None = None
        # the oldest resume point of listeners that moved here before the
        # room had a parent: the links ask their parents for what follows it
        self._resume_from: int | None = None
        # the room's host ended it at the origin: not subscribed again, and
        # the node ends its own sessions of it (relay/ops/hosting.py)
        self.ended = False

    @property
    def current(self) -> tuple[str, int] | None:
        """A parent we hear the room from now (None: none)."""
        return next((link.node for link in self.links if link.node is not None), None)

    @property
    def speakers(self) -> Speakers | None:
        """Who is on the room's stage, as an upstream node last said (a
        stage room's SPEAKERS reach every node below it this way)."""
        for link in self.links:
            if link.client is not None and link.node is not None and link.client.speakers is not None:
                return link.client.speakers
        return None

    @property
    def switches(self) -> int:
        """Moves of a link to another parent than the one it heard before
        (a dead or draining parent); a new subscription to the same parent
        after the room was left is not a move."""
        return sum(link.switches for link in self.links)

    def state(self) -> UpstreamState:
        """What the metrics say of this room's subscription."""
        m = self.merge
        following = "" if m.merging or m.followed is None or m.disagreements == 0 else self._parent_name(m.followed)
        return UpstreamState(self.current is not None, self.switches, m.splices, m.disagreements, following)

    def _parent_name(self, k: int) -> str:
        node = self.links[k].node or self.links[k].last
        return f"{node[0]}:{node[1]}" if node is not None else f"link {k} (no parent)"

    def _took(self, now: float) -> None:
        """The room took a packet (a first copy): a pause before it is a gap."""
        if self._taken_at is not None and now - self._taken_at >= GAP_MIN_S:
            gap = now - self._taken_at
            self.gap_counts[next(i for i, bound in enumerate(GAP_BOUNDS) if gap <= bound)] += 1
            self.gap_sum += gap
        self._taken_at = now
        self._resume_from = None

    def resume(self, point: int) -> None:
        """A listener moved here with a resume point (the origin's
        numbering, the room's on every node). While the room has no parent
        yet (an idle alternate), the links join with the oldest such point:
        the parent sends its history after it, and the room passes it on to
        the movers, who then miss only what the parent's history no longer
        holds. Subscribes at once rather than at the next tick."""
        if self.current is not None:
            return
        if self._resume_from is None or ((point - self._resume_from) & 0xFFFF) >= 0x8000:
            self._resume_from = point
        self.want(1, time.monotonic(), 0.0)

    def want(self, listeners: int, now: float, linger: float) -> None:
        """Called on every housekeeping tick with the room's listeners here:
        subscribe when there are some, leave once there were none for
        `linger` seconds."""
        if self.ended:
            self.stop()
        elif listeners > 0 or self.always:
            self._unwanted_since = None
            if not self._tasks:
                loop = asyncio.get_running_loop()
                links = 2 if self.pair and (len(self.nodes) >= 2 or self.from_directory) else 1
                self._tasks = [loop.create_task(self._run(k, links)) for k in range(links)]
        elif self._tasks:
            if self._unwanted_since is None:
                self._unwanted_since = now
            elif now - self._unwanted_since >= linger:
                self.stop()

    def stop(self) -> None:
        """Leave the upstreams (the LEAVEs are sent as the tasks end)."""
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self._unwanted_since = None
        for link in self.links:
            link.node = None
        self._taken_at = None

    async def _run(self, first: int, links: int) -> None:
        """Keep link `first` (of `links`) on a parent: the list in order
        from its own first choice, never the node the other link is on."""
        link = self.links[first]
        while True:
            nodes = self.nodes[first:] + self.nodes[:first] if first < len(self.nodes) else list(self.nodes)
            for node in nodes:
                if any(other is not link and other.node == node for other in self.links):
                    continue
                await self._hear(first, node, links == 2)
            await asyncio.sleep(RETRY_S)

    async def _hear(self, k: int, node: tuple[str, int], merged: bool) -> None:
        """Join `node` on link `k` and feed the room from it until it dies
        or refuses; with `merged`, through the two links' Merge."""
        link = self.links[k]
        source = to_sockaddr(node)
        where = f"{node[0]}:{node[1]}"

        def feed(pkt: bytes) -> None:
            if self.tap is not None:
                self.tap(pkt)
            now = time.monotonic()
            for p in (self.merge.packet(k, pkt, now) if merged else (pkt,)):
                if self.core.feed(self.index, p, source) == Ingest.INGEST_OK:
                    self._took(now)
            self.sent()

        client = link.client = ListenClient(where, self.room, self.token(), sink=feed)
        client.relay = True
        client.resume_after(self._resume_from)
        try:
            self.merge.reset(k)      # what this link heard before was another parent's
            await client.join(attempts=JOIN_ATTEMPTS, timeout=JOIN_TIMEOUT_S)
            self.joins += 1
            if link.last is not None and link.last != node:
                link.switches += 1
            link.node = link.last = node
            log.warning("room %r: taking it from %s", self.room, where,
                        extra={"fields": {"event": "upstream", "room": self.room, "node": where}})
            await client.receive(dead_after=DEAD_AFTER_S)
            self.ended |= client.stats.ended == Reason.ROOM_ENDED
        except JoinRefused as e:
            self.ended |= e.reason == Reason.ROOM_ENDED
            log.warning("room %r: upstream %s: %s", self.room, where, e,
                        extra={"fields": {"event": "upstream_lost", "room": self.room, "node": where}})
        except (TimeoutError, Unreachable, OSError) as e:
            log.warning("room %r: upstream %s: %s", self.room, where, e,
                        extra={"fields": {"event": "upstream_lost", "room": self.room, "node": where}})
        except Exception:
            # a mistake of ours must not end this link for good (the room
            # would stay cut off): say it, and the link tries again
            self.failures += 1
            log.exception("room %r: upstream %s: the link failed; trying again", self.room, where)
        finally:
            link.node = link.client = None
            with contextlib.suppress(OSError):
                client.close()


def relay_token(secret: str, room: str, node_id: str = "") -> str:
    """The token a node presents upstream: role `relay`, an hour long (a
    fresh one is minted for every join), its subject the node's id. Without
    a secret (auth = "open") it presents none."""
    return mint(secret, room, role="relay", ttl_s=3600, speaker=node_id) if secret else ""


