"""The cluster directory, on Redis: which nodes are alive, what they can
take, and which rooms they carry. It is never in the packet path and never
in a join's way: a node writes its own record once a second and reads the
others' into a local table, and join routing reads only that table.

Layout (every key under `relay:`):

    relay:node:ID    hash: udp, quic, webtransport, cert, tier, capacity,
                     listeners, load, draining, rooms (JSON list), and sig
                     (the record's tag, records.py); expires TTL_MS after
                     the last heartbeat (Redis's own clock, so the nodes'
                     clocks need not agree), so a dead node vanishes by
                     itself
    relay:nodes      sorted set of node ids, scored by wall-clock time a
                     minute past their last heartbeat: only the index to
                     read the hashes through, trimmed by whoever sees an
                     old member

A record is believed only if every field is one a node would write and,
with a cluster secret, its tag verifies (records.py): anything else in
Redis is ignored, counted in `Directory.rejected` and named once in the
log, so whoever can write to Redis cannot send joiners to an address of
their own, nor stop a node's heartbeat or its picks with a malformed one.

A node whose hash has expired is dead: every read replaces the table, so
it leaves each peer's routing at the next heartbeat, within TTL_MS +
HEARTBEAT_S (one second) of its last heartbeat.

Behind Redis Sentinel (a redis+sentinel:// URL, relay/wire/config.py
says its form) every connection asks the sentinels where the master is
now: when the master dies and they promote a replica, the heartbeats that
fail meanwhile are the outage below, and the first one after the
promotion registers the node on the new master.

Redis being down or unreachable costs nothing but freshness: the node
keeps serving and admitting by its own limits, routes with the table it
last read (entries older than STALE_S are dropped), says once that the
directory is unreachable, and registers again as soon as a heartbeat gets
through.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from typing import Any, Callable

import redis.asyncio as redis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from relay.cluster.records import FIELDS, MAX_NODE_ID, TAG, Invalid, Peer, Record, Unsigned, check, encode, tag
from relay.wire.directory_url import SENTINEL_SCHEME, sentinel_url, shown_url

__all__ = ["Directory", "Peer"]

log = logging.getLogger("relay.directory")

HEARTBEAT_S = 0.25
# a record outlives two missed heartbeats (a loop stalled for half a
# second), and a dead node leaves its peers' routing within a second
TTL_MS = 750
INDEX_S = 60              # the index's score: long past any record's expiry
STALE_S = 10.0            # with Redis unreachable, a peer not read again for this long is forgotten
# a heartbeat is never held up for long by a Redis (or a sentinel) that
# does not answer: the next one tries again a quarter of a second later
TIMEOUTS: dict[str, Any] = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
# bytes in Redis that are not UTF-8 come out as U+FFFD, which no check
# passes: they cost the record they are in, never the read of the others
DECODE: dict[str, Any] = {"decode_responses": True, "encoding_errors": "replace"}
PREFIX = "relay:"
MAX_NODES = 1024          # ids read from the index at most: a flood of fake ones cannot stall a heartbeat
MAX_WARNED = 256          # refused node ids named in the log, at most


class Directory:
    """This node's side of the directory: its heartbeat and its view of the
    others. `describe` returns this node's record each heartbeat: a
    records.Record, whose key signs it and checks the peers' records (a
    plain dict is written unsigned, as without a cluster secret)."""

    def __init__(self, url: str, node_id: str, describe: Callable[[], dict[str, Any]]) -> None:
        self.url, self.node_id, self.describe = url, node_id, describe
        self.peers: dict[str, Peer] = {}
        self._rng = random.Random()
        self.reachable = False
        self.failures = 0         # heartbeats that did not get through
        # records read and refused, by reason: "invalid" (a field no node
        # would write) or "signature" (no tag, or one this cluster's key did
        # not make); counted at every read, so a forged record adds four a second
        self.rejected: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._checked_own = False
        self._said_bug = False
        self.shown = shown_url(url)      # for the log: never the password
        self._sentinel: Sentinel | None = None
        self._master: tuple[str, int] | None = None
        if url.startswith(SENTINEL_SCHEME):
            where = sentinel_url(url)
            self._sentinel = Sentinel(list(where.sentinels), sentinel_kwargs=TIMEOUTS, **TIMEOUTS)
            self._client = self._sentinel.master_for(where.service, db=where.db, username=where.username,
                                                     password=where.password, **DECODE)
        else:
            self._client = redis.Redis.from_url(url, **TIMEOUTS, **DECODE)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        """Stop the heartbeat; the record expires by itself."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def close(self, leave: bool = True) -> None:
        """Stop the heartbeat; with `leave`, remove our record at once (a
        clean shutdown), else it expires by itself."""
        self.stop()
        if leave:
            try:
                await self._client.delete(PREFIX + "node:" + self.node_id)
                await self._client.zrem(PREFIX + "nodes", self.node_id)
            except (RedisError, OSError):
                pass
        await self._client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    async def _run(self) -> None:
        while True:
            try:
                await self.beat()
                if not self.reachable:
                    log.warning("directory %s: registered as %s", self.shown, self.node_id)
                self.reachable = True
                self._followed()
            except (RedisError, OSError) as e:
                self.failures += 1
                if self.reachable or self.failures == 1:
                    log.warning("directory %s unreachable (%s): serving on, routing with what was last read",
                                self.shown, e)
                self.reachable = False
            except Exception:
                # a mistake of ours must not stop the heartbeat for good (the
                # node would vanish from everyone's routing): say it once, go on
                self.failures += 1
                if not self._said_bug:
                    self._said_bug = True
                    log.exception("directory %s: a heartbeat failed", self.shown)
            self._forget_stale(time.monotonic())
            await asyncio.sleep(HEARTBEAT_S)

    def _followed(self) -> None:
        """Behind Sentinel: say when the master the heartbeats reach has
        moved (a failover), once per move."""
        if self._sentinel is None:
            return
        master = getattr(self._client.connection_pool, "master_address", None)
        if master is not None and master != self._master:
            if self._master is not None:
                log.warning("directory %s: the master moved from %s:%s to %s:%s",
                            self.shown, *self._master, *master)
            self._master = master

    async def beat(self) -> None:
        """Write our record and read everyone's, in two round trips."""
        mine = self.describe()
        key = mine.key if isinstance(mine, Record) else None
        record: dict[Any, Any] = encode(mine)
        if key is not None:
            record[TAG] = tag(key, self.node_id, record)
        self._check_own(record, key)
        name = PREFIX + "node:" + self.node_id
        wall = time.time()
        async with self._client.pipeline(transaction=True) as p:
            p.delete(name)            # the hash holds this record's fields and nothing else
            p.hset(name, mapping=record)
            p.pexpire(name, TTL_MS)
            p.zadd(PREFIX + "nodes", {self.node_id: wall + INDEX_S})
            p.zremrangebyscore(PREFIX + "nodes", "-inf", wall)
            p.zrangebyscore(PREFIX + "nodes", wall, "+inf", start=0, num=MAX_NODES)
            *_, ids = await p.execute()
        others = []
        for i in ids:
            if i == self.node_id:
                continue
            if len(i.encode()) > MAX_NODE_ID:     # no node has such an id: not worth a read
                self._refuse(i, "invalid", "node id: too long")
            else:
                others.append(i)
        names = (*FIELDS, TAG)
        async with self._client.pipeline(transaction=False) as p:
            for i in others:
                p.hmget(PREFIX + "node:" + i, names)
            # an error in one reply (a key of another type than a hash) is
            # that record's, not a failure of the read
            records = await p.execute(raise_on_error=False)
        now = time.monotonic()
        # a member whose record has expired is dead: it is not carried over
        peers = {}
        for i, values in zip(others, records, strict=True):
            if isinstance(values, Exception):
                self._refuse(i, "invalid", "not a hash")
                continue
            if all(v is None for v in values):
                continue
            try:
                peers[i] = check(i, dict(zip(names, values, strict=True)), key, now)
            except Invalid as e:
                self._refuse(i, "invalid", str(e))
            except Unsigned as e:
                self._refuse(i, "signature", str(e))
        self.peers = peers

    def _refuse(self, node_id: str, reason: str, why: str) -> None:
        """Count a record that is not believed; name it in the log once."""
        self.rejected[reason] += 1
        if node_id not in self._warned and len(self._warned) < MAX_WARNED:
            self._warned.add(node_id)
            log.warning("directory: ignoring the record of node %r: %s", node_id[:MAX_NODE_ID], why)

    def _check_own(self, record: dict[str, str], key: bytes | None) -> None:
        """Say once, at the first heartbeat, what peers will make of our
        own record: unsigned without a secret, ignored if a field is wrong
        (an advertised name no peer accepts, say)."""
        if self._checked_own:
            return
        self._checked_own = True
        if key is None:
            log.warning("directory %s: no cluster secret (auth = \"open\"): this node's record goes "
                        "unsigned and peers' records are believed without a signature; anyone who can "
                        "write to Redis can send joiners anywhere", self.shown)
        try:
            check(self.node_id, record, key, 0.0)
        except (Invalid, Unsigned) as e:
            log.error("directory: peers will ignore this node's record: %s", e)

    def _forget_stale(self, now: float) -> None:
        for i in [i for i, p in self.peers.items() if now - p.seen > STALE_S]:
            del self.peers[i]

    def pick(self, room: str, tier: str = "", exclude: str = "") -> Peer | None:
        """A live peer for a new listener of `room`: not draining, with
        spare capacity, of `tier` if given, preferring those that already
        carry the room; among them one at random, weighted by spare room.
        The pick is counted against that peer here at once: a storm sends
        thousands of joiners between two heartbeats, and they must spread
        over the cluster rather than all go to the peer that looked emptiest
        a second ago."""
        fits = self.live(room, tier, exclude)
        if not fits:
            return None
        peer = self._rng.choices(fits, weights=[p.spare for p in fits])[0]
        peer.listeners += 1
        return peer

    def live(self, room: str, tier: str = "", exclude: str = "") -> list[Peer]:
        """The peers pick() chooses among: live, not draining, with spare
        capacity, of `tier` if given, and only those carrying `room` if any
        do. Nothing is counted against them."""
        now = time.monotonic()
        fits = [p for p in self.peers.values()
                if not p.draining and p.spare > 0 and now - p.seen <= STALE_S
                and (not tier or p.tier == tier) and p.udp != exclude]
        return [p for p in fits if room in p.rooms] or fits
