"""The event the product exists for, by simulation: 1.3 million joins in 10
minutes (300,000 of them in the first minute) at 40 edges, 10 % of the
edges killed mid-storm, with no sockets and no sleeping, in simulated time.

    .venv/bin/python bench/cluster_sim.py            # the full event; about 2 minutes of CPU
    .venv/bin/python bench/cluster_sim.py --smoke    # 1/100 of the joins at 4 edges; seconds

What runs is the product's own code, called as the nodes call it:

  admission   each edge is a real `relay.listeners.sessions.Sessions`, and
              every JOIN that reaches an edge with its cookie is
              `Sessions.join` (per-source rate, node join rate, max_listeners,
              in its order, with its real `JoinLimiter`); only the compiled
              arena under it is replaced by a counter (`Arena` below), which
              fills to max_listeners like the arena sized by it
  redirects   a refused join's redirect is `Sessions.redirect_for` ->
              `relay.cluster.routing.redirect` -> `Directory.pick` on that
              edge's own directory table, as the node wires it
  alternates  once a second per edge, `routing.alternates` (two) as the node's
              `Neighbours.refresh` calls it; a listener's ACCEPT carries
              `Sessions.accept_message(...).alternate`
  records     each heartbeat's record is `routing.node_record` ->
              `records.encode` -> `records.tag` (signed with a cluster
              secret), and a reader believes it through `records.check`,
              as `Directory.beat` does
  clients     `relay listen`'s join logic (relay/client/listen.py) is
              asyncio over sockets, so it is restated here, with its own
              constants imported: the two-round-trip handshake, at
              most 4 hops per join() (3 redirects followed), a refusal
              without a redirect (or a 4th one) waited out with
              FULL_BACKOFF_S doubling and 0.8-1.2 jitter for FULL_PATIENCE_S,
              a dead node given up on after 5 tries of 1 s (a move: 3 of
              0.3 s), an edge noticed dead after PROBE_S of silence and
              PROBE_S more without an echo, then a move to the ACCEPT's
              alternate with one join() and no waiting

What is assumed, not measured (each a flag):

  the curve   exactly --joins joiners, --spike of them in the first 60 s:
              a steady 1,852/s (the other 1,000,000 over 540 s) plus a
              surge decaying with a 10 s time constant from ~19,000/s
              (~21,000/s at t = 0 in all); arrival times Poisson-like
              within 100 ms ticks
  first edge  uniform over the live edges (DNS round robin or anycast that
              withdraws a dead edge at once; --dns-lag keeps a dead edge
              in the answer for that long); --skew S weights the edges
              1/rank^S instead (uneven anycast catchments)
  limits      max_listeners 85,000 per edge: docs/capacity.md's 32-core edge
              (105,000 at max_load 0.7 from loopback figures) less a fifth
              for the NIC work loopback does not do; join_rate 2,000/s, the
              code's default (one core admitted ~8,500/s measured); 20/s
              per source, the default; the load gate (max_load) is not
              modelled: max_listeners stands for it
  sources     20 % of joiners behind shared (CGNAT) addresses, 500 joiners
              of this event per address; the rest one address each
  RTTs        client-edge 30 ms (a hop is 2 of them: JOIN/CHALLENGE, then
              JOIN with cookie/ACCEPT); Redis 50 ms round trip from every
              node (a heartbeat is 2 round trips, then HEARTBEAT_S of sleep);
              no loss, no server queueing
  the kill    10 % of the edges (at least one) at once at t = 300 s, their
              listeners then all in the room (nobody leaves during the event)

Writes bench/results/cluster_sim.json (--out) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.client.listen import FULL_BACKOFF_S, FULL_PATIENCE_S, PROBE_S, WAITED_FOR  # noqa: E402
from relay.cluster import routing  # noqa: E402
from relay.cluster.directory import HEARTBEAT_S, TTL_MS, Directory, Peer  # noqa: E402
from relay.cluster.records import TAG, check, encode, record_key, tag  # noqa: E402
from relay.listeners.sessions import UDP, RoomState, Session, Sessions  # noqa: E402
from relay.wire.config import NodeConfig  # noqa: E402
from relay.wire.protocol import Join, Reason, Reject  # noqa: E402
from relay.wire.protocol import decode as decode_msg  # noqa: E402
from relay.wire.protocol import encode as encode_msg  # noqa: E402
from relay.wire.tokens import Auth  # noqa: E402

RESULTS = ROOT / "bench" / "results"
ROOM = "main"
# never connected: redis-py's client is lazy, and no heartbeat task is started
DUMMY_REDIS = "redis://127.0.0.1:1/0"
SECRET = "cluster-sim-secret-of-at-least-32-bytes"
KEY = record_key(SECRET)   # what every edge signs its record with and checks the others' with
TICK_S = 0.1             # arrivals are drawn per tick
SPIKE_S = 60.0           # the spike is the first minute
FOLLOWED = (Reason.NODE_FULL, Reason.ROOM_FULL, Reason.DRAINING, Reason.RATE_LIMITED)  # listen._redirected
HOPS = 4                 # ListenClient.join: for _hop in range(4)
JOIN_TRIES = (5, 1.0)    # ListenClient.join's defaults: attempts, timeout (s)
MOVE_TRIES = (3, 0.3)    # _move_on: join(attempts=3, timeout=0.3)
RECEIVE_WAKE_S = PROBE_S / 5   # receive() wakes at least this often while it could move
FRAME_S = 0.02           # audio packets every 20 ms

# event kinds, in the heap as (time, seq, kind, a, b)
TICK, DECIDE, RETRY, BEAT, WRITE, READ, INSTALL, ALT, KILL, MOVE, SAMPLE = range(11)


class Arena:
    """What Sessions asks of the compiled core, for admission: how many
    listeners the node holds and a slot for a new one. The real arena is
    sized to max_listeners, so listener_add fails only past it, which
    Sessions.join checks first."""

    def __init__(self) -> None:
        self.listeners = 0
        self.out_seq = 0

    def listener_add(self, room: int, sockaddr: bytes, ssrc: int, seq_off: int, ts_off: int,
                     pull: bool = False, burst: int = 0) -> int:
        self.listeners += 1
        return self.listeners

    def room_listeners(self, index: int) -> int:
        return self.listeners

    def room_stats(self, index: int) -> dict[str, int]:
        return {"out_seq": self.out_seq, "listeners": self.listeners}

    def listener_remove(self, slot: int) -> None:
        self.listeners -= 1


class Edge:
    """One edge: its config, its session table (the real Sessions), its
    directory table (a real Directory never connected: the simulation
    fills `.peers` as its heartbeat would) and its alternates."""

    def __init__(self, index: int, max_listeners: int, join_rate: float, source_rate: float, seed: int) -> None:
        self.index = index
        self.addr = f"10.1.{index // 250}.{index % 250 + 1}:7000"
        self.node_id = f"edge-{index:02d}"
        self.cfg = NodeConfig(auth="jwt", secret=SECRET, max_listeners=max_listeners, join_rate=join_rate,
                              join_rate_per_source=source_rate, directory=DUMMY_REDIS, node_id=self.node_id,
                              tier="edge", advertise=self.addr, redirect="")
        self.arena = Arena()
        # tokens are not what is simulated: every joiner's would verify
        self.sessions = Sessions(self.arena, self.cfg, {ROOM: RoomState(ROOM, 0, 0)},  # type: ignore[arg-type]
                                 Auth("open"), random.Random(seed))
        self.directory = Directory(DUMMY_REDIS, self.node_id, self.describe)
        self.directory._rng = random.Random(seed)     # its picks, seeded: a run repeats exactly
        # as Node.__init__ wires them
        self.sessions.route = lambda room, transport: routing.redirect(self.directory, self.cfg, room,
                                                                       udp=transport == UDP)
        self.alternates: dict[str, str] = {}
        self.sessions.alternate = lambda room: self.alternates.get(room, self.cfg.redirect)
        self.alive = True
        self.carried = False        # subscribed to the room upstream (from its first listener on)
        self.peak = 0
        self.killed_at: float | None = None
        self.held_ips: list[str] = []     # per admitted listener: its address and its ACCEPT's alternate
        self.held_alts: list[str] = []
        self.pending: list[tuple[str, Peer]] = []   # records read, not yet installed

    def describe(self) -> Any:
        """Node._describe: this edge's record now."""
        return routing.node_record(self.cfg, None, None, [ROOM] if self.carried else [],
                                   self.arena.listeners, 0.0, self.sessions.draining)


@dataclass
class Params:
    joins: int = 1_300_000
    spike: int = 300_000
    duration: float = 600.0
    spike_tau: float = 10.0
    edges: int = 40
    kill_fraction: float = 0.1
    kill_at: float = 300.0
    max_listeners: int = 85_000
    join_rate: float = 2000.0
    source_rate: float = 20.0
    rtt: float = 0.030
    redis_rtt: float = 0.050
    shared: float = 0.2
    per_address: int = 500
    skew: float = 0.0
    dns_lag: float = 0.0
    seed: int = 1
    label: str = "full"


@dataclass(slots=True)
class Joiner:
    """One `relay listen`, as far as joining goes."""
    ip: str
    port: int
    t0: float
    edge: int
    hops: int
    backoff: float
    give_up: float
    redirects: int
    retries: int
    hop_t: float
    mover: bool
    limited: int
    alts: list[int] = field(default_factory=list)    # a mover's alternates, in its ACCEPT's order
    later: list[int] = field(default_factory=list)   # those not yet tried in this round
    waited: bool = False      # one of them refused this round for a reason worth waiting out


@dataclass
class Outcomes:
    admit_s: list[float] = field(default_factory=list)
    redirects: list[int] = field(default_factory=list)
    retries: list[int] = field(default_factory=list)
    limited: list[int] = field(default_factory=list)
    lost: dict[str, int] = field(default_factory=dict)

    def lose(self, why: str) -> None:
        self.lost[why] = self.lost.get(why, 0) + 1


def spike_shape(p: Params) -> tuple[float, float]:
    """The first minute's rate: base + surge * exp(-t / tau), with base the
    rest's steady rate and the surge making up the spike."""
    base = (p.joins - p.spike) / (p.duration - SPIKE_S)
    surge = (p.spike - base * SPIKE_S) / (p.spike_tau * (1 - math.exp(-SPIKE_S / p.spike_tau)))
    if surge < 0:
        raise SystemExit("the spike is smaller than a steady rate would give the first minute")
    return base, surge


def arrivals_per_tick(p: Params, rng: np.random.Generator) -> np.ndarray:
    """Exactly p.spike joiners in the first minute and p.joins in all,
    spread over the ticks by the curve (a multinomial draw: Poisson-like)."""
    base, surge = spike_shape(p)
    edges = np.arange(0.0, SPIKE_S + TICK_S / 2, TICK_S)
    lo, hi = edges[:-1], edges[1:]
    mass = base * TICK_S + surge * p.spike_tau * (np.exp(-lo / p.spike_tau) - np.exp(-hi / p.spike_tau))
    first = rng.multinomial(p.spike, mass / mass.sum())
    rest_ticks = int(round((p.duration - SPIKE_S) / TICK_S))
    rest = rng.multinomial(p.joins - p.spike, np.full(rest_ticks, 1.0 / rest_ticks))
    return np.concatenate([first, rest])


def pct(values: list[float] | np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def accept_fits(edge: Edge) -> bool:
    """The ACCEPT with two alternates (this simulation's address length) fits
    in the padded JOIN `relay listen` sends, so the node's reply rule does
    not strip the alternate: checked through Sessions' own reply path."""
    s = Session(("203.0.113.1", 40000), UDP, ROOM, 1, 1, b"12345678", 0.0, origin=(1, 2))
    two = "10.1.0.250:7000,10.1.0.251:7000"
    edge.alternates[ROOM] = two
    request = encode_msg(Join(ROOM, "", b"c" * 20, False, False, None))
    reply = edge.sessions._reply(edge.sessions.accept_message(s), request)
    edge.alternates.clear()
    return reply is not None and getattr(decode_msg(reply), "alternate", "") == two


def simulate(p: Params) -> dict[str, Any]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    rng = np.random.default_rng(p.seed)
    prng = random.Random(p.seed)
    edges = [Edge(i, p.max_listeners, p.join_rate, p.source_rate, p.seed * 1000 + i) for i in range(p.edges)]
    by_addr = {e.addr: e.index for e in edges}
    fits = accept_fits(edges[0])
    n_killed = max(1, round(p.kill_fraction * p.edges)) if p.kill_fraction > 0 else 0
    killed = sorted(int(i) for i in rng.choice(p.edges, n_killed, replace=False))
    weights = 1.0 / np.arange(1, p.edges + 1) ** p.skew
    rng.shuffle(weights)          # which edges the catchments favour: at random, apart from which are killed
    ticks = arrivals_per_tick(p, rng)
    n_shared_addr = max(1, math.ceil(p.joins * p.shared / p.per_address)) if p.shared > 0 else 0

    heap: list[tuple] = []
    seq = itertools.count()
    push = heapq.heappush
    rtt, half = p.rtt, p.rtt / 2
    d = p.redis_rtt
    ttl = TTL_MS / 1000
    redis: dict[int, tuple[float, Peer]] = {}     # node -> (expires at, the record as check() believes it)
    new, moved = Outcomes(), Outcomes()
    in_flight = 0
    arrived = 0
    movers = 0
    timeline: list[dict[str, Any]] = []
    dead_addrs: set[str] = set()
    dead_ids: set[str] = set()
    # how long the dead stay in the living's tables and picks
    stale: dict[str, Any] = {"last_in_a_table_s": None, "redirects_to_a_dead_edge": 0,
                             "accepts_naming_a_dead_alternate": 0}
    serial = itertools.count(1)

    def source() -> tuple[str, int]:
        port = next(serial)
        if n_shared_addr and prng.random() < p.shared:
            a = prng.randrange(n_shared_addr)
            return f"100.64.{a // 256}.{a % 256}", port
        return f"{11 + (port >> 24)}.{(port >> 16) & 255}.{(port >> 8) & 255}.{port & 255}", port

    # the nodes were up before the doors opened: heartbeats and alternates
    # have run; heartbeats at random phases, alternates likewise
    warm = -5.0
    for e in edges:
        push(heap, (warm + prng.random() * HEARTBEAT_S, next(seq), BEAT, e.index, None))
        push(heap, (warm + 2.0 + prng.random(), next(seq), ALT, e.index, None))
    for k in range(len(ticks)):
        if ticks[k]:
            push(heap, (k * TICK_S, next(seq), TICK, k, None))
    if n_killed:
        push(heap, (p.kill_at, next(seq), KILL, None, None))
    for s in range(0, int(p.duration) + 121, 10):
        push(heap, (float(s), next(seq), SAMPLE, None, None))

    def first_edges(n: int, t: float) -> np.ndarray:
        listed = np.array([e.alive or (e.killed_at is not None and t < e.killed_at + p.dns_lag) for e in edges])
        w = weights * listed
        return rng.choice(p.edges, n, p=w / w.sum())

    def hop(j: Joiner, start: float) -> None:
        """A JOIN sent at `start`: the one with its cookie reaches the edge
        1.5 RTT later."""
        j.hop_t = start
        push(heap, (start + 1.5 * rtt, next(seq), DECIDE, j, None))

    def admitted(j: Joiner, c: float) -> None:
        nonlocal in_flight
        in_flight -= 1
        out = moved if j.mover else new
        out.admit_s.append(c - j.t0)
        out.redirects.append(j.redirects)
        out.retries.append(j.retries)
        out.limited.append(j.limited)

    def lost(j: Joiner, why: str) -> None:
        nonlocal in_flight
        in_flight -= 1
        (moved if j.mover else new).lose(why)

    def decide(j: Joiner, t: float) -> None:
        e = edges[j.edge]
        if not e.alive:
            # no CHALLENGE or ACCEPT comes back: join() times out on this node;
            # a mover tries its ACCEPT's next alternate (_move_on), else
            # `relay listen` ends
            if j.mover:
                next_alternate(j, t, "alternates killed too, or redirected to a dead edge")
                return
            if j.redirects:
                lost(j, "redirected to a dead edge")
            elif j.mover:
                lost(j, "alternate killed too")
            else:
                lost(j, "first edge dead, or died mid-join")
            return
        r = e.sessions.join((j.ip, j.port), UDP, ROOM, "", j.ip, t, resume=e.arena.out_seq if j.mover else None)
        c = t + half
        if not isinstance(r, Reject):
            n = e.arena.listeners
            if n > e.peak:
                e.peak = n
            if not e.carried:
                e.carried = True
            alt = e.sessions.accept_message(r).alternate
            e.held_ips.append(j.ip)
            e.held_alts.append(alt)
            if any(a in dead_addrs for a in alt.split(",")):
                stale["accepts_naming_a_dead_alternate"] += 1
            admitted(j, c)
            return
        if r.reason == Reason.RATE_LIMITED:
            j.limited += 1
        reason = r.reason
        if r.redirect in dead_addrs:
            stale["redirects_to_a_dead_edge"] += 1
        if r.redirect and reason in FOLLOWED and r.redirect in by_addr:
            j.redirects += 1
            j.edge = by_addr[r.redirect]
            j.hops += 1
            if j.hops < HOPS:
                hop(j, c)
                return
            reason = Reason.NODE_FULL        # join(): raise JoinRefused(NODE_FULL, "")
        if j.mover:
            j.waited = j.waited or reason in WAITED_FOR
            next_alternate(j, c, f"refused: {reason.name.lower()}")
            return
        pause = j.backoff * prng.uniform(0.8, 1.2)
        if reason not in WAITED_FOR:
            lost(j, f"refused: {reason.name.lower()}")
        elif c + pause > j.give_up:
            lost(j, f"gave up after {FULL_PATIENCE_S:g} s")
        else:
            j.backoff = min(2 * j.backoff, FULL_BACKOFF_S[1])
            j.retries += 1
            j.hops = 0
            push(heap, (c + pause, next(seq), RETRY, j, None))

    def next_alternate(j: Joiner, t: float, why: str) -> None:
        """_move_on: the ACCEPT's next alternate; after the last, another
        round after a backoff if one of them was only busy (rate limited,
        full), for FULL_PATIENCE_S; else the listener gives up."""
        j.hops = 0
        if j.later:
            j.edge = j.later.pop(0)
            hop(j, t)
            return
        pause = j.backoff * prng.uniform(0.8, 1.2)
        if not j.waited or t + pause > j.give_up:
            lost(j, why if not j.waited else f"gave up after {FULL_PATIENCE_S:g} s")
            return
        j.edge, j.later, j.waited = j.alts[0], j.alts[1:], False
        j.backoff = min(2 * j.backoff, FULL_BACKOFF_S[1])
        j.retries += 1
        push(heap, (t + pause, next(seq), RETRY, j, None))

    def no_answer_at(j: Joiner, t: float) -> float:
        """When the dead edge's silence ends this join: its tries run out."""
        tries, timeout = MOVE_TRIES if j.mover else JOIN_TRIES
        return j.hop_t + tries * timeout

    t = warm
    while heap:
        t, _, kind, a, b = heapq.heappop(heap)
        if kind == DECIDE:
            if not edges[a.edge].alive and no_answer_at(a, t) > t:
                push(heap, (no_answer_at(a, t), next(seq), DECIDE, a, None))
                continue
            decide(a, t)
        elif kind == TICK:
            n = int(ticks[a])
            t0s = np.sort(rng.uniform(t, t + TICK_S, n))
            firsts = first_edges(n, t)
            for t0, first in zip(t0s.tolist(), firsts.tolist(), strict=True):
                ip, port = source()
                j = Joiner(ip, port, t0, first, 0, FULL_BACKOFF_S[0], t0 + FULL_PATIENCE_S, 0, 0, t0, False, 0)
                hop(j, t0)
            arrived += n
            in_flight += n
        elif kind == RETRY:
            hop(a, t)
        elif kind == BEAT:
            e = edges[a]
            if e.alive:
                fields: dict[str, Any] = encode(rec := e.describe())
                fields[TAG] = tag(rec.key, e.node_id, fields)
                push(heap, (t + d / 2, next(seq), WRITE, a, fields))
                push(heap, (t + 1.5 * d, next(seq), READ, a, None))
                # Directory._run: beat() (two round trips), then sleep
                push(heap, (t + 2 * d + HEARTBEAT_S, next(seq), BEAT, a, None))
        elif kind == WRITE:
            # the record lands in Redis and expires TTL_MS later by Redis's
            # clock; every reader would check it the same way, so it is
            # checked once here with the cluster's key and copied per reader
            redis[a] = (t + ttl, check(edges[a].node_id, b, KEY, 0.0))
        elif kind == READ:
            # the hashes as Redis holds them when the read reaches it: an
            # expired one is gone (Directory.beat skips it)
            edges[a].pending = [(edges[i].node_id, rec) for i, (until, rec) in redis.items()
                                if i != a and until > t]
            push(heap, (t + d / 2, next(seq), INSTALL, a, None))
        elif kind == INSTALL:
            e = edges[a]
            if e.alive:
                now = time.monotonic()   # Directory.pick ages entries by the real clock
                if dead_ids and any(i in dead_ids for i, _ in e.pending):
                    stale["last_in_a_table_s"] = t - p.kill_at
                e.directory.peers = {i: Peer(r.id, r.udp, r.quic, r.tier, r.capacity, r.listeners, r.load,
                                             r.draining, r.rooms, now, r.webtransport, r.cert)
                                     for i, r in e.pending}
        elif kind == ALT:
            e = edges[a]
            if e.alive:
                # Neighbours.refresh, once a second
                picked = routing.alternates(e.directory, e.cfg, ROOM, e.directory._rng)
                e.alternates[ROOM] = ",".join(p.udp for p in picked) or e.cfg.redirect
                push(heap, (t + 1.0, next(seq), ALT, a, None))
        elif kind == KILL:
            for i in killed:
                e = edges[i]
                e.alive, e.killed_at = False, t
                dead_addrs.add(e.addr)
                dead_ids.add(e.node_id)
                n = len(e.held_ips)
                # relay listen: the last packet came up to a frame before the
                # kill; a keepalive goes out at the first wake after PROBE_S of
                # silence, and the node is dead at the first wake PROBE_S later
                last = t - rng.uniform(0, FRAME_S, n)
                noticed = (last + PROBE_S + rng.uniform(0, RECEIVE_WAKE_S, n)
                           + PROBE_S + rng.uniform(0, RECEIVE_WAKE_S, n))
                for ip, alt, when in zip(e.held_ips, e.held_alts, noticed.tolist(), strict=True):
                    movers += 1
                    in_flight += 1
                    j = Joiner(ip, next(serial), t, -1, 0, FULL_BACKOFF_S[0], when + FULL_PATIENCE_S, 0, 0, when,
                               True, 0)
                    alts = [by_addr[a] for a in alt.split(",") if a and a != e.addr and a in by_addr]
                    if not alts:
                        lost(j, "no alternate")
                        continue
                    j.edge, j.alts, j.later = alts[0], alts, alts[1:]
                    push(heap, (when, next(seq), MOVE, j, None))
        elif kind == MOVE:
            hop(a, t)
        elif kind == SAMPLE:
            timeline.append({"t": t, "arrived": arrived, "in_flight": in_flight,
                             "listeners": sum(e.arena.listeners for e in edges if e.alive)})
        if t > p.duration and in_flight == 0:
            break

    for e in edges:
        if e.arena.listeners > e.cfg.max_listeners:
            raise AssertionError(f"{e.node_id} holds {e.arena.listeners} > max_listeners {e.cfg.max_listeners}")
    rejections: dict[str, int] = {}
    limited: dict[str, int] = {}
    for e in edges:
        for k, v in e.sessions.counters.rejections.items():
            rejections[k] = rejections.get(k, 0) + v
        for k, v in e.sessions.counters.rate_limited.items():
            limited[k] = limited.get(k, 0) + v
    peaks = [e.peak for e in edges]
    living = [e.peak for e in edges if e.alive] or [0]
    base, surge = spike_shape(p)
    new_admits = np.array(new.admit_s)
    move_admits = np.array(moved.admit_s)
    result = {
        "label": p.label,
        "params": {k: getattr(p, k) for k in Params.__dataclass_fields__},
        "curve": {"steady_per_s": round(base), "surge_peak_per_s": round(surge),
                  "peak_per_s": round(base + surge), "first_minute": int(ticks[:int(SPIKE_S / TICK_S)].sum())},
        "killed_edges": [edges[i].node_id for i in killed],
        "accept_alternate_fits": fits,
        "joins": {
            "arrived": arrived,
            "admitted": len(new.admit_s),
            "lost": dict(sorted(new.lost.items())),
            "lost_total": sum(new.lost.values()),
            "redirects_mean": float(np.mean(new.redirects)) if new.redirects else None,
            "redirects_p99": pct(new.redirects, 99),
            "redirects_max": int(max(new.redirects)) if new.redirects else None,
            "retried_share": float(np.mean(np.array(new.retries) > 0)) if new.retries else None,
            "admit_s_p50": pct(new_admits, 50),
            "admit_s_p99": pct(new_admits, 99),
            "admit_s_max": float(new_admits.max()) if len(new_admits) else None,
        },
        "edges": {
            "max_listeners": p.max_listeners,
            "peak_max": max(peaks),
            "peak_min_surviving": min(living),
            "past_limit": sum(pk > p.max_listeners for pk in peaks),
            "peaks": {e.node_id: e.peak for e in edges},
            "refusals": dict(sorted(rejections.items())),
            "rate_limited": dict(sorted(limited.items())),
        },
        "killed": {
            "listeners": movers,
            "readmitted": len(moved.admit_s),
            "lost": dict(sorted(moved.lost.items())),
            "lost_total": sum(moved.lost.values()),
            "readmit_s_p50": pct(move_admits, 50),
            "readmit_s_p99": pct(move_admits, 99),
            "readmit_s_max": float(move_admits.max()) if len(move_admits) else None,
            "redirects_mean": float(np.mean(moved.redirects)) if moved.redirects else None,
            "redirects_p99": pct(moved.redirects, 99),
        },
        "dead_edges_in_tables": stale,
        "timeline": timeline,
        "ended_at_s": t,
        "cpu_s": time.process_time() - cpu0,
        "wall_s": time.perf_counter() - wall0,
    }
    return result


def ms(v: float | None) -> str:
    return "–" if v is None else f"{v * 1000:,.0f} ms"


def table(results: list[dict[str, Any]]) -> str:
    head = "| | " + " | ".join(r["label"] for r in results) + " |"
    rows = [head, "|---|" + "---|" * len(results)]

    def row(name: str, f) -> None:
        rows.append(f"| {name} | " + " | ".join(f(r) for r in results) + " |")

    row("joins (first minute)", lambda r: f"{r['joins']['arrived']:,} ({r['curve']['first_minute']:,})")
    row("edges × max_listeners, join_rate", lambda r: f"{r['params']['edges']} × {r['params']['max_listeners']:,}, "
        f"{r['params']['join_rate']:,.0f}/s")
    row("admitted", lambda r: f"{r['joins']['admitted']:,}")
    row("redirects per join: mean, p99, max",
        lambda r: f"{r['joins']['redirects_mean']:.3f}, {r['joins']['redirects_p99']:.0f}, "
                  f"{r['joins']['redirects_max']}")
    row("joins that waited (rate_limited/full, backoff)", lambda r: f"{r['joins']['retried_share']:.2%}")
    row("time to admit p50 / p99 / max", lambda r: f"{ms(r['joins']['admit_s_p50'])} / "
        f"{ms(r['joins']['admit_s_p99'])} / {ms(r['joins']['admit_s_max'])}")
    row("joins lost", lambda r: f"{r['joins']['lost_total']:,}" + (
        " (" + ", ".join(f"{k}: {v:,}" for k, v in r["joins"]["lost"].items()) + ")" if r["joins"]["lost"] else ""))
    row("peak listeners per edge: most, fewest surviving / limit",
        lambda r: f"{r['edges']['peak_max']:,}, {r['edges']['peak_min_surviving']:,} / "
                  f"{r['edges']['max_listeners']:,}")
    row("edges past the limit", lambda r: str(r["edges"]["past_limit"]))
    row("refusals at the edges", lambda r: ", ".join(f"{k} {v:,}" for k, v in r["edges"]["refusals"].items())
        or "none")
    row("edges killed (at)", lambda r: f"{len(r['killed_edges'])} (t = {r['params']['kill_at']:g} s)")
    row("their listeners", lambda r: f"{r['killed']['listeners']:,}")
    row("re-admitted, from the kill: p50 / p99 / max",
        lambda r: f"{r['killed']['readmitted']:,}: {ms(r['killed']['readmit_s_p50'])} / "
                  f"{ms(r['killed']['readmit_s_p99'])} / {ms(r['killed']['readmit_s_max'])}")
    row("their redirects: mean, p99", lambda r: "–" if r["killed"]["redirects_mean"] is None else
        f"{r['killed']['redirects_mean']:.3f}, {r['killed']['redirects_p99']:.0f}")
    row("of them lost", lambda r: f"{r['killed']['lost_total']:,}" + (
        " (" + ", ".join(f"{k}: {v:,}" for k, v in r["killed"]["lost"].items()) + ")" if r["killed"]["lost"] else ""))
    row("CPU for the run", lambda r: f"{r['cpu_s']:.0f} s")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="1/100 of the joins at 4 edges, per-edge limits scaled by 1/10 (the same load per edge "
                         "relative to its limits as the full run)")
    ap.add_argument("--joins", type=int)
    ap.add_argument("--spike", type=int)
    ap.add_argument("--edges", type=int)
    ap.add_argument("--max-listeners", type=int)
    ap.add_argument("--join-rate", type=float)
    ap.add_argument("--source-rate", type=float)
    ap.add_argument("--kill-fraction", type=float)
    ap.add_argument("--kill-at", type=float)
    ap.add_argument("--rtt-ms", type=float, help="client-edge round trip (default 30)")
    ap.add_argument("--redis-rtt-ms", type=float, help="node-Redis round trip (default 50)")
    ap.add_argument("--shared", type=float, help="share of joiners behind shared addresses (default 0.2)")
    ap.add_argument("--per-address", type=int, help="joiners per shared address (default 500)")
    ap.add_argument("--skew", type=float, help="first edge weighted 1/rank^SKEW (default 0: uniform)")
    ap.add_argument("--also-skew", type=float, default=1.0,
                    help="a second run with this skew (default 1.0; 0 for none)")
    ap.add_argument("--dns-lag", type=float, help="seconds a killed edge stays in the first pick (default 0)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)   # the directory's "no secret" and similar notes are not news here

    p = Params()
    if args.smoke:
        p = Params(joins=13_000, spike=3_000, edges=4, max_listeners=8_500, join_rate=200.0, label="smoke")
    for name, attr, scale in (("joins", "joins", 1), ("spike", "spike", 1), ("edges", "edges", 1),
                              ("max_listeners", "max_listeners", 1), ("join_rate", "join_rate", 1),
                              ("source_rate", "source_rate", 1), ("kill_fraction", "kill_fraction", 1),
                              ("kill_at", "kill_at", 1), ("rtt_ms", "rtt", 1e-3), ("redis_rtt_ms", "redis_rtt", 1e-3),
                              ("shared", "shared", 1), ("per_address", "per_address", 1), ("skew", "skew", 1),
                              ("dns_lag", "dns_lag", 1), ("seed", "seed", 1)):
        v = getattr(args, name)
        if v is not None:
            setattr(p, attr, type(getattr(p, attr))(v * scale))
    runs = [p]
    if args.also_skew and not p.skew:
        runs.append(Params(**{**p.__dict__, "skew": args.also_skew, "label": f"{p.label}, skew {args.also_skew:g}"}))
    results = []
    for r in runs:
        print(f"{r.label}: {r.joins:,} joins at {r.edges} edges ...", file=sys.stderr, flush=True)
        results.append(simulate(r))
        print(f"  done in {results[-1]['cpu_s']:.0f} s of CPU", file=sys.stderr, flush=True)
    out = args.out or (None if args.smoke else RESULTS / "cluster_sim.json")
    doc = {"what": "bench/cluster_sim.py: the join storm by simulation through the real admission and routing code",
           "scaled": "no: every joiner simulated, every edge at its full limits" if not args.smoke else
           "smoke: 1/100 of the joins at 4 edges, per-edge limits scaled by 1/10",
           "runs": results}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    print(table(results))


if __name__ == "__main__":
    main()
