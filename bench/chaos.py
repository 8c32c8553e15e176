"""Chaos on a live tree: kill -9 one part of a running cluster at a time
and measure what its listeners hear.

    .venv/bin/python bench/chaos.py            # every event, twice; 4 to 5 minutes
    .venv/bin/python bench/chaos.py --smoke    # every event once, short windows, fewer listeners

The tree, all on loopback: an origin pair (lead and follow, each taking the
publisher's stream), 2 mids each taking the room from both origins, 3 edges
each taking it from both mids, a Redis directory (a master, a replica and
three sentinels where the directory supports Redis Sentinel), one publisher
(`relay publish --to LEAD --to FOLLOW --tone 440.3`: see TONE), a crowd of
listeners on every edge and one reference listener on each origin. Without
--smoke it first measures an origin pair fed a 440 Hz tone (the pair check).

Events, each from a healthy tree (the part killed is restarted and the tree
checked after each one, and that time recorded; a tree that does not heal
within seconds is rebuilt):
  origin_lead, origin_follow  an origin of the pair killed
  mid0, mid1                  a mid killed
  edge                        an edge killed: `relay listen` processes on it move to the
                              alternates its ACCEPT named and resume (the crowd stays)
  publisher                   the publisher killed, a second one started at once
  redis                       the Redis master killed; the sentinels promote the replica
  storm                       mid0 killed as a few hundred listeners start joining edge0

Measured per listener over a window around the kill (p50 and max over listeners):
  missing   packets the reference heard that the listener did not. A
            listener still hearing the room at the window's end: the holes
            in its sequence numbers (the origin's numbering, end to end)
            less the reference's own holes, exact. One that is not: the
            reference's packet count less its own.
  silence   its longest time without a packet after the kill. The bench
            reads the sockets every 10 ms, so up to 30 ms is no silence.
  back      from the kill until it hears again, where it stopped for
            100 ms or more; 0 where it never stopped.
The event's goal is met or not. Also per event: merge counters of the mids
and edges, the reference's own holes, and how long the tree took to be
healthy again after the killed part came back. Writes bench/results/chaos.json
(chaos-smoke.json with --smoke, or --out), prints a Markdown table and,
without --smoke, puts it into bench/RESULTS.md.

Every process it starts runs in its own process group and is stopped on
exit, on SIGINT and on SIGTERM. A step that fails is recorded as failed, with
its error, and the bench goes on. The machine is shared: read the figures as
this machine's on that day.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from relay.testing.loadgen import LoopbackCrowd, free_port, scrape  # noqa: E402
from relay.wire.tokens import mint  # noqa: E402

PY = sys.executable
RESULTS = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
SECTION = "## Chaos: parts of a live tree killed (`bench/chaos.py`)"
HOST = "127.0.0.1"
ROOM = "live"
SECRET = "chaos-bench-" + os.urandom(24).hex()
ENV = dict(os.environ, RELAY_SECRET=SECRET, PYTHONUNBUFFERED="1")
SERVICE = "chaos"            # the sentinels' name for the directory's master
# The publisher's tone. A 440 Hz tone is periodic every 5 frames of 20 ms,
# so `relay publish` repeats each Opus payload every 5th packet; the pair
# matches a payload only to the copy that arrived at about the same time,
# and the pair check below measures that it takes both tones whole. The
# tree is fed 440.3 Hz, whose payloads never recur within the run.
TONE = "440.3"

TICK_S = 0.01                # the listeners' sockets are read this often
RECEIVING_S = 0.3            # a listener that heard a packet this recently is hearing the room
INTERRUPTED_S = 0.1          # a silence this long (5 packets) is an interruption
KEEPALIVE_S = 2.0
TAKEOVER_S = 2.0             # a plain-RTP room's takeover_after, the default
MARGIN_S = 1.0               # the publisher goal: audio back within TAKEOVER_S + MARGIN_S
EDGE_SILENCE_S = 1.0         # the edge goal: its listeners silent at most this long
MOVERS = 4                   # `relay listen` processes on the edge that dies, which move
STORM_S = 1.0                # the storm's joins arrive over this long, in STORM_BATCHES
STORM_BATCHES = 10

# (key, what happens, goal)
EVENTS = [
    ("origin_lead", "origin (lead) killed", "0 packets missing"),
    ("origin_follow", "origin (follow) killed", "0 packets missing"),
    ("mid0", "mid0 killed", "0 packets missing"),
    ("mid1", "mid1 killed", "0 packets missing"),
    ("edge", "edge2 killed: its `relay listen` processes", f"≤ {EDGE_SILENCE_S:g} s silence, 0 missing"),
    ("publisher", "publisher killed, a new one started at once",
     f"audio back ≤ {TAKEOVER_S + MARGIN_S:g} s ({TAKEOVER_S:g} s takeover + {MARGIN_S:g} s)"),
    ("redis", "Redis master killed (Sentinel fails over)", "0 packets missing"),
    ("storm", "mid0 killed as a join storm hits edge0", "0 packets missing"),
]


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP: stop everything and write what was measured."""


class Failure(Exception):
    """A step of the bench that did not work (recorded, then the bench goes on)."""


# --------------------------------------------------------------------------
# processes


class Children:
    """Every process the bench starts, each in a process group of its own,
    so that a kill takes whatever it started too and the terminal's Ctrl-C
    reaches only the bench, which then stops them all."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path | None = None, pipes: bool = False) -> subprocess.Popen:
        out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            p = subprocess.Popen(args, env=ENV, start_new_session=True,
                                 stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                                 stdout=subprocess.PIPE if pipes else out,
                                 stderr=out if pipes else subprocess.STDOUT)
        finally:
            if log is not None:
                out.close()
        self.procs.append(p)
        return p

    def kill(self, p: subprocess.Popen) -> None:
        """kill -9 the process's group."""
        _signal_group(p, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)

    def stop(self, procs: list[subprocess.Popen] | None = None, grace: float = 5.0) -> None:
        """SIGTERM to each group, SIGKILL to what is left after `grace`."""
        procs = [p for p in (self.procs if procs is None else procs) if p.poll() is None]
        for p in procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        self.procs = [p for p in self.procs if p.poll() is None]


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)


def _until(ok: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ok():
                return True
        except Exception:  # noqa: BLE001 -- a server not up yet answers with any error
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


# --------------------------------------------------------------------------
# the directory


def sentinel_supported() -> bool:
    """Does this checkout's directory take a redis+sentinel:// URL?"""
    try:
        from relay.wire.directory_url import SENTINEL_SCHEME  # noqa: F401
    except ImportError:
        return False
    src = (HERE.parent / "relay" / "cluster" / "directory.py").read_text()
    return "sentinel" in src.lower()


class Directory:
    """The cluster's Redis: one redis-server, or with Sentinel a master, a
    replica and three sentinels (quorum 2, a master down after 1 s)."""

    def __init__(self, children: Children, tmp: Path, sentinel: bool) -> None:
        import redis
        self.redis = redis
        self.children, self.tmp, self.sentinel = children, tmp, sentinel
        self.servers: dict[int, subprocess.Popen] = {}
        self.sentinels: list[int] = []
        first = free_port(socket.SOCK_STREAM)
        self._server(first)
        self.first = first
        if sentinel:
            self._server(free_port(socket.SOCK_STREAM), replicaof=first)
            for _ in range(3):
                port = free_port(socket.SOCK_STREAM)
                d = tmp / f"sentinel-{port}"
                d.mkdir()
                conf = d / "sentinel.conf"
                conf.write_text(f"port {port}\nbind {HOST}\ndir {d}\n"
                                f"sentinel monitor {SERVICE} {HOST} {first} 2\n"
                                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                                f"sentinel failover-timeout {SERVICE} 3000\n"
                                f"sentinel parallel-syncs {SERVICE} 1\n")
                children.start(["redis-sentinel", str(conf)], log=d / "log")
                self.sentinels.append(port)
            if not _until(lambda: all(self.client(p).ping() for p in self.sentinels), 10):
                raise Failure("the sentinels did not start")

    def _server(self, port: int, replicaof: int | None = None) -> None:
        d = self.tmp / f"redis-{port}"
        d.mkdir(exist_ok=True)
        args = ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                "--dir", str(d)]
        if replicaof is not None:
            args += ["--replicaof", HOST, str(replicaof)]
        self.servers[port] = self.children.start(args, log=d / "log")
        if not _until(lambda: self.client(port).ping(), 10):
            raise Failure(f"redis-server on port {port} did not start")

    def client(self, port: int):
        return self.redis.Redis(host=HOST, port=port, socket_timeout=0.5, socket_connect_timeout=0.5,
                                decode_responses=True)

    @property
    def url(self) -> str:
        if self.sentinel:
            return "redis+sentinel://" + ",".join(f"{HOST}:{p}" for p in self.sentinels) + f"/{SERVICE}/0"
        return f"redis://{HOST}:{self.first}/0"

    def master(self) -> int:
        """The master's port as most sentinels name it now (0: none agree)."""
        if not self.sentinel:
            return self.first
        ports = []
        for p in self.sentinels:
            with contextlib.suppress(Exception):
                ports.append(int(self.client(p).sentinel_get_master_addr_by_name(SERVICE)[1]))
        best = max(set(ports), key=ports.count) if ports else 0
        return best if ports.count(best) >= 2 else 0

    def ready_for_failover(self) -> bool:
        """Every sentinel knows the other two and a replica in sync."""
        master = self.master()
        if not master:
            return False
        for p in self.sentinels:
            c = self.client(p)
            if int(c.sentinel_master(SERVICE)["num-other-sentinels"]) != len(self.sentinels) - 1:
                return False
            if not any(not r.get("is_sdown") and not r.get("is_disconnected")
                       and r.get("master-link-status") == "ok" for r in c.sentinel_slaves(SERVICE)):
                return False
        return True

    def kill(self, port: int) -> None:
        self.children.kill(self.servers[port])

    def restart_as_replica(self, port: int, master: int) -> None:
        """Start the killed server again: a replica of `master`, or (0) as it was."""
        self._server(port, replicaof=master or None)
        if master and not _until(lambda: self.client(port).info("replication")["master_link_status"] == "up", 10):
            raise Failure(f"redis-server {port} did not sync from the new master {master}")


# --------------------------------------------------------------------------
# the tree


class Node:
    """A `relay serve` with the one room, on fixed ports so that a restart
    takes its place in the tree again."""

    def __init__(self, children: Children, tmp: Path, name: str, tier: str, directory: str,
                 upstream: list["Node"] | None = None, pair: int = 0, lead: bool = False, port: int = 0) -> None:
        self.children, self.name, self.tier = children, name, tier
        self.listen = (HOST, port or free_port())
        self.admin = (HOST, free_port(socket.SOCK_STREAM))
        self.ingest = None if upstream else (HOST, free_port())
        if upstream:
            room = "upstream = [" + ", ".join(f'"{u.listen[0]}:{u.listen[1]}"' for u in upstream) + "]\n"
        else:
            room = f'ingest = "{HOST}:{self.ingest[1]}"\nsources = ["{HOST}"]\n'
            room += f'pair = "{HOST}:{pair}"\n' + ("pair_lead = true\n" if lead else "")
        self.cfg = tmp / f"{name}.toml"
        self.log = tmp / f"{name}.log"
        self.cfg.write_text(
            f'[node]\nlisten = "{HOST}:{self.listen[1]}"\nadmin = "{HOST}:{self.admin[1]}"\n'
            'auth = "jwt"\nsecret_env = "RELAY_SECRET"\nworkers = 1\nmax_listeners = 100000\n'
            'join_rate = 100000\njoin_rate_per_source = 100000\nmax_sessions_per_token = 0\n'
            'max_load = 0\nmax_machine_load = 0\ndrain_grace = 0\n'
            + (f'directory = "{directory}"\nnode_id = "{name}"\ntier = "{tier}"\n' if directory else "")
            + f'[[room]]\nname = "{ROOM}"\n{room}')
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = self.children.start([PY, "-m", "relay", "--log-level", "warning", "serve", "-c", str(self.cfg)],
                                        log=self.log)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None:
            self.children.kill(self.proc)

    def last_words(self) -> str:
        """The last line of its log, or its exit status."""
        lines = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        code = self.proc.poll() if self.proc is not None else None
        return (lines[-1][-200:] if lines else "no log") + f"; exit status {code}"

    def ready(self) -> bool:
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://{self.admin[0]}:{self.admin[1]}/readyz", timeout=0.5) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> dict[str, float]:
        if not self.alive():
            return {}
        try:
            return scrape(self.admin, timeout=2)
        except (OSError, ValueError):
            return {}


class Tree:
    """An origin pair, 2 mids under both origins, 3 edges under both mids,
    and the publisher sending to both origins."""

    def __init__(self, children: Children, tmp: Path, directory: str) -> None:
        self.children, self.tmp = children, tmp
        tmp.mkdir(parents=True)
        ports = (free_port(), free_port())
        self.lead = Node(children, tmp, "lead", "origin", directory, pair=ports[1], lead=True, port=ports[0])
        self.follow = Node(children, tmp, "follow", "origin", directory, pair=ports[0], port=ports[1])
        self.mids = [Node(children, tmp, f"mid{i}", "mid", directory, upstream=[self.lead, self.follow])
                     for i in range(2)]
        self.edges = [Node(children, tmp, f"edge{i}", "edge", directory, upstream=self.mids) for i in range(3)]
        self.publisher: subprocess.Popen | None = None
        self.publishers = 0
        for n in self.nodes:
            n.start()

    @property
    def nodes(self) -> list[Node]:
        return [self.lead, self.follow, *self.mids, *self.edges]

    def start_publisher(self) -> None:
        self.publishers += 1
        assert self.lead.ingest and self.follow.ingest
        self.publisher = self.children.start(
            [PY, "-m", "relay", "publish", "--to", f"{HOST}:{self.lead.ingest[1]}",
             "--to", f"{HOST}:{self.follow.ingest[1]}", "--tone", TONE, "--duration", "86400"],
            log=self.tmp / f"publisher{self.publishers}.log")

    def close(self) -> None:
        procs = [n.proc for n in self.nodes if n.proc is not None]
        if self.publisher is not None:
            procs.append(self.publisher)
        self.children.stop(procs, grace=3.0)


# --------------------------------------------------------------------------
# what the listeners hear


class Track:
    """One listener through one window: its counters at the start, and the
    gaps between its packets as the bench reads them."""

    __slots__ = ("crowd", "i", "r0", "e0", "h0", "last", "pre_gap", "post_gap", "post_end")

    def __init__(self, crowd: LoopbackCrowd, i: int) -> None:
        self.crowd, self.i = crowd, i

    def begin(self) -> None:
        m = self.crowd.crowd.member(self.i)
        self.r0, self.e0, self.h0, self.last = m["received"], m["expected"], m["lost"], m["last_rx_ns"]
        self.pre_gap = self.post_gap = 0
        self.post_end: int | None = None


class Window:
    """The listeners' arrivals around one kill."""

    def __init__(self, groups: dict[str, list[Track]], ref: Track) -> None:
        self.groups, self.ref = groups, ref
        self.tracks = [t for ts in groups.values() for t in ts] + [ref]
        self.kill_ns: int | None = None

    def begin(self) -> None:
        for t in self.tracks:
            t.begin()
        self.kill_ns = None

    def sample(self, now_ns: int) -> None:
        kill = self.kill_ns
        for t in self.tracks:
            last = t.crowd.crowd.member(t.i)["last_rx_ns"]
            if last != t.last:
                gap = last - t.last
                if kill is None or last <= kill:
                    t.pre_gap = max(t.pre_gap, gap)
                elif gap > t.post_gap:
                    t.post_gap, t.post_end = gap, last
                t.last = last

    def end(self) -> dict:
        """Each group's figures, and the reference's."""
        now = time.monotonic_ns()
        self.sample(now)
        assert self.kill_ns is not None
        ref = self._one(self.ref, now, None)
        out = {name: _summary([self._one(t, now, ref) for t in ts]) for name, ts in self.groups.items()}
        out["reference"] = {"received": ref["d_recv"], "holes": ref["holes"],
                            "silence_ms": round(ref["silence_s"] * 1000),
                            "back_s": None if ref["back_s"] is None else round(ref["back_s"], 3)}
        return out

    def _one(self, t: Track, now: int, ref: dict | None) -> dict:
        m = t.crowd.crowd.member(t.i)
        d_recv, d_exp = m["received"] - t.r0, m["expected"] - t.e0
        holes = max(0, d_exp - d_recv)
        open_gap = now - t.last
        silence = max(t.post_gap, open_gap)
        if open_gap >= INTERRUPTED_S * 1e9:
            back = None
        elif t.post_gap >= INTERRUPTED_S * 1e9:
            assert t.post_end is not None and self.kill_ns is not None
            back = (t.post_end - self.kill_ns) / 1e9
        else:
            back = 0.0
        hearing = open_gap < RECEIVING_S * 1e9
        if ref is None:
            missing, exact = 0, True
        elif hearing and abs(d_exp - ref["d_exp"]) <= 3:
            missing, exact = max(0, holes - ref["holes"]), True
        else:
            missing, exact = max(0, ref["d_recv"] - d_recv), False
        assert self.kill_ns is not None
        return {"d_recv": d_recv, "d_exp": d_exp, "holes": holes, "missing": missing, "exact": exact,
                "silence_s": silence / 1e9, "baseline_s": t.pre_gap / 1e9, "back_s": back,
                "last_s": (t.last - self.kill_ns) / 1e9}


def _pct(values: list[float]) -> dict:
    s = sorted(values)
    return {"p50": s[len(s) // 2], "max": s[-1]} if s else {"p50": None, "max": None}


def _summary(rows: list[dict]) -> dict:
    missing = _pct([r["missing"] for r in rows])
    silence = _pct([round(r["silence_s"] * 1000) for r in rows])
    backs = [r["back_s"] for r in rows]
    return {"listeners": len(rows), "missing": missing, "silence_ms": silence,
            "holes": _pct([r["holes"] for r in rows]),
            "back_s": None if any(b is None for b in backs) else round(max(backs, default=0.0), 3),
            "back_p50_s": round(statistics.median(b for b in backs if b is not None), 3)
            if any(b is not None for b in backs) else None,
            "not_back": sum(b is None for b in backs),
            # where listeners are not back: their last packet, from the kill
            "stopped_after_s": _pct([round(r["last_s"], 3) for r in rows if r["back_s"] is None]),
            "counted_by_reference": sum(not r["exact"] for r in rows),
            "baseline_silence_ms": round(max((r["baseline_s"] for r in rows), default=0.0) * 1000)}


# --------------------------------------------------------------------------
# the bench


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.children = Children()
        self.per_edge = args.listeners or (5 if args.smoke else 20)
        self.storm_joins = args.storm or (100 if args.smoke else 300)
        self.pre_s = 0.5 if args.smoke else 1.0
        self.post_s = args.after or (2.5 if args.smoke else 5.0)
        self.heal_s = 15.0 if args.smoke else 20.0
        self.redis_cap_s = 15.0 if args.smoke else 20.0
        self.token = mint(SECRET, ROOM, ttl_s=6 * 3600)
        self.directory: Directory | None = None
        self.directory_note = ""
        self.tree: Tree | None = None
        self.trees = 0
        self.edge_crowds: list[LoopbackCrowd] = []
        self.refs: dict[str, LoopbackCrowd] = {}
        self._keepalive = 0.0
        self.stopping = False
        self.restore: Callable[[], None] | None = None
        self.window_end: float | None = None

    # ---- set-up

    def setup_directory(self) -> None:
        if shutil.which("redis-server") is None:
            self.directory_note = "no redis-server: the nodes run without a directory"
            return
        sentinel = sentinel_supported() and shutil.which("redis-sentinel") is not None
        if not sentinel:
            self.directory_note = ("no Sentinel support yet" if not sentinel_supported()
                                   else "no redis-sentinel installed")
        self.directory = Directory(self.children, self.tmp, sentinel)

    def pair_check(self, seconds: float = 3.0) -> dict:
        """An origin pair alone, fed by `relay publish --to A --to B` with a
        440 Hz tone and then with TONE: packets each origin takes a second
        (of the 50 sent)."""
        d = self.tmp / "pair-check"
        d.mkdir()
        ports = (free_port(), free_port())
        lead = Node(self.children, d, "lead", "origin", "", pair=ports[1], lead=True, port=ports[0])
        follow = Node(self.children, d, "follow", "origin", "", pair=ports[0], port=ports[1])
        key = f'relay_room_packets_in_total{{room="{ROOM}"}}'
        out: dict = {}
        try:
            for n in (lead, follow):
                n.start()
            for n in (lead, follow):
                if not _until(n.ready, 20):
                    raise Failure(f"{n.name} did not start ({n.last_words()})")
            assert lead.ingest and follow.ingest
            for tone in ("440", TONE):
                pub = self.children.start([PY, "-m", "relay", "publish", "--to", f"{HOST}:{lead.ingest[1]}",
                                           "--to", f"{HOST}:{follow.ingest[1]}", "--tone", tone, "--duration", "60"],
                                          log=d / f"publisher-{tone}.log")
                time.sleep(1.5)
                before = [n.metrics().get(key, 0) for n in (lead, follow)]
                time.sleep(seconds)
                after = [n.metrics().get(key, 0) for n in (lead, follow)]
                self.children.stop([pub])      # with a BYE: the next tone takes the room at once
                out[f"{tone} Hz"] = {name: round((a - b) / seconds, 1)
                                     for name, a, b in zip(("lead", "follow"), after, before, strict=True)}
                time.sleep(0.3)
        finally:
            self.children.stop([n.proc for n in (lead, follow) if n.proc is not None], grace=3.0)
        return out

    def build(self) -> None:
        """A new tree, its publisher and its listeners (the old ones stopped)."""
        self.close_tree()
        self.trees += 1
        url = self.directory.url if self.directory is not None else ""
        tree = self.tree = Tree(self.children, self.tmp / f"tree{self.trees}", url)
        for n in tree.nodes:
            if not self.wait(n.ready, 20):
                raise Failure(f"{n.name} did not start ({n.last_words()})")
        tree.start_publisher()
        self.edge_crowds = [LoopbackCrowd(self.per_edge, e.listen, ROOM, token=self.token,
                                          first_address=k * self.per_edge) for k, e in enumerate(tree.edges)]
        self.refs = {"lead": LoopbackCrowd(1, tree.lead.listen, ROOM, token=self.token, first_address=1000),
                     "follow": LoopbackCrowd(1, tree.follow.listen, ROOM, token=self.token, first_address=1001)}
        for c in self.crowds:
            self.join(c)

    def close_tree(self) -> None:
        for c in self.crowds:
            with contextlib.suppress(OSError):
                c.leave()
            c.close()
        self.edge_crowds, self.refs = [], {}
        if self.tree is not None:
            self.tree.close()
            self.tree = None

    @property
    def crowds(self) -> list[LoopbackCrowd]:
        return [*self.edge_crowds, *self.refs.values()]

    def join(self, crowd: LoopbackCrowd) -> None:
        """(Re)join every member. A restarted node answers the old sessions'
        keepalives with REJECT unknown_session: those are read and dropped
        first, and a join refused only so is tried once more."""
        crowd.sessions.clear()
        res = None
        for _ in range(2):
            end = time.monotonic() + 0.1
            while time.monotonic() < end:
                crowd.crowd.poll(10)
                crowd.crowd.take_control()
            res = crowd.join(timeout=10)
            if res.accepted == len(crowd.socks) or set(res.rejected) != {"unknown_session"}:
                break
        assert res is not None
        if res.accepted != len(crowd.socks):
            raise Failure(f"{res.accepted} of {len(crowd.socks)} listeners joined {crowd.server} "
                          f"(refused {res.rejected}, unanswered {res.unanswered})")

    # ---- time passing

    def pump(self, seconds: float, sample: Callable[[int], None] | None = None) -> None:
        """Read every listener's socket each TICK_S for `seconds`, keeping their sessions."""
        end = time.monotonic() + seconds
        while True:
            for c in self.crowds:
                c.crowd.poll(0)
                c.crowd.take_control()
            now = time.monotonic()
            if now - self._keepalive >= KEEPALIVE_S:
                for c in self.crowds:
                    c.keepalive()
                self._keepalive = now
            if sample is not None:
                sample(time.monotonic_ns())
            if now >= end:
                return
            time.sleep(min(TICK_S, end - now))

    def wait(self, ok: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
        """Pump until `ok()` or `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ok():
                    return True
            except Exception:  # noqa: BLE001 -- not there yet
                pass
            if time.monotonic() >= deadline:
                return False
            self.pump(step)

    def align(self, ref: LoopbackCrowd, sample: Callable[[int], None] | None = None) -> None:
        """Wait for the reference's next packet and a little more, so a
        snapshot falls between two packets for every listener (loopback
        hops take well under the 8 ms waited)."""
        before = ref.crowd.member(0)["received"]
        deadline = time.monotonic() + 0.1
        while ref.crowd.member(0)["received"] == before and time.monotonic() < deadline:
            self.pump(0.002, sample)
        self.pump(0.008, sample)

    # ---- health

    def health(self) -> str | None:
        """None if every node runs, both origins hear each other, every mid
        and edge takes the room from two parents (its duplicates count
        grows) and every listener hears the room; else what is wrong."""
        tree = self.tree
        if tree is None:
            return "no tree"
        for n in tree.nodes:
            if not n.alive():
                return f"{n.name} is not running ({n.last_words()})"
        if tree.publisher is None or tree.publisher.poll() is not None:
            return "the publisher is not running"
        before = {n.name: n.metrics() for n in tree.nodes}
        self.pump(0.4)
        after = {n.name: n.metrics() for n in tree.nodes}
        for n in (tree.lead, tree.follow):
            if after[n.name].get(f'relay_upstream_connected{{room="{ROOM}"}}') != 1:
                return f"{n.name} does not hear its partner"
        for n in (*tree.mids, *tree.edges):
            grew = (after[n.name].get("relay_upstream_duplicates_total", 0)
                    - before[n.name].get("relay_upstream_duplicates_total", 0))
            if grew < 5:
                return f"{n.name} does not take the room from two parents"
        now = time.monotonic_ns()
        for c in self.crowds:
            deaf = sum(now - c.crowd.member(i)["last_rx_ns"] > RECEIVING_S * 1e9 for i in range(len(c.socks)))
            if deaf:
                return f"{deaf} listeners on {c.server[1]} hear nothing"
        return None

    def heal(self) -> str:
        """Wait for a healthy tree; rebuild it once if it does not heal.
        Returns a note ('' if nothing had to be done)."""
        why = self.health() if self.tree is not None else "no tree yet"
        if why is None:
            return ""
        deadline = time.monotonic() + self.heal_s
        while why is not None and self.tree is not None and time.monotonic() < deadline:
            self.pump(0.3)
            why = self.health()
        if why is None:
            return ""
        print(f"    tree not healthy ({why}): building a new one", flush=True)
        self.build()
        deadline = time.monotonic() + self.heal_s
        while (why := self.health()) is not None and time.monotonic() < deadline:
            self.pump(0.3)
        if why is not None:
            raise Failure(f"the tree is not healthy: {why}")
        return "tree rebuilt before this event"

    def restart(self, node: Node) -> None:
        if self.stopping:
            return
        node.start()
        if not self.wait(node.ready, 15):
            raise Failure(f"{node.name} did not come back ({node.last_words()})")

    # ---- one window

    def window(self, groups: dict[str, list[Track]], ref: str, action: Callable[[Window], dict],
               post_s: float, more: Callable[[], bool] | None = None, cap_s: float = 0.0) -> dict:
        """`pre_s` of listening, `action(window)` (the kill) and `post_s` more
        (or, with `more`, on while it says so, up to `cap_s`); the figures.
        The kill's time is when the action starts, unless it sets
        `window.kill_ns` itself."""
        w = Window(groups, Track(self.refs[ref], 0))
        before = self.counters()
        self.align(self.refs[ref])
        w.begin()
        self.pump(self.pre_s, w.sample)
        w.kill_ns = time.monotonic_ns()
        notes = action(w)
        t_kill = w.kill_ns / 1e9
        self.pump(post_s, w.sample)
        while more is not None and more() and time.monotonic() - t_kill < cap_s:
            self.pump(0.1, w.sample)
        self.align(self.refs[ref], w.sample)
        out = w.end()
        self.window_end = time.monotonic()
        out["window_s"] = round(self.window_end - t_kill + self.pre_s, 2)
        out["killed_at"] = time.strftime("%H:%M:%S", time.localtime(time.time() - (self.window_end - t_kill)))
        after = self.counters()
        out["merge"] = {what: sum(after[n][what] - before[n][what] for n in after if n in before)
                        for what in ("gap_fills", "switches")}
        out.update(notes)
        return out

    def tracks(self, crowds: list[LoopbackCrowd]) -> list[Track]:
        return [Track(c, i) for c in crowds for i in range(len(c.socks))]

    def counters(self) -> dict[str, dict[str, float]]:
        """Each running mid's and edge's merge counters: packets one
        parent's copy filled in the other's, moves to another parent."""
        assert self.tree is not None
        out = {}
        for n in (*self.tree.mids, *self.tree.edges):
            m = n.metrics()
            if m:
                out[n.name] = {"gap_fills": m.get("relay_upstream_gap_fills_total", 0),
                               "switches": m.get(f'relay_upstream_switches_total{{room="{ROOM}"}}', 0)}
        return out

    # ---- the events
    # Each sets self.restore (what puts the tree back: run after the window,
    # or after a failure, by run_event) before it kills anything.

    def ev_origin(self, which: str) -> dict:
        assert self.tree is not None
        victim = self.tree.lead if which == "lead" else self.tree.follow

        def restore() -> None:
            self.restart(victim)
            self.join(self.refs[which])
        self.restore = restore
        return self.window({"listeners": self.tracks(self.edge_crowds)}, "follow" if which == "lead" else "lead",
                           lambda _w: victim.kill() or {}, self.post_s)

    def ev_mid(self, k: int) -> dict:
        assert self.tree is not None
        victim = self.tree.mids[k]
        self.restore = lambda: self.restart(victim)
        return self.window({"listeners": self.tracks(self.edge_crowds)}, "lead",
                           lambda _w: victim.kill() or {}, self.post_s)

    def ev_edge(self) -> dict:
        """The last edge killed. Its crowd has nowhere to go (LoopbackCrowd
        does not move); MOVERS real `relay listen` processes on it move to
        the alternates their ACCEPT named, resume, and say what they missed
        (in the origin's numbering) and their longest silence."""
        assert self.tree is not None
        k = len(self.tree.edges) - 1
        victim = self.tree.edges[k]
        logs = [self.tmp / f"mover{i}-{time.monotonic_ns()}.log" for i in range(MOVERS)]
        movers = [self.children.start([PY, "-m", "relay", "listen", "--server", f"{HOST}:{victim.listen[1]}",
                                       "--room", ROOM, "--token", self.token, "--duration", "300"], log=log)
                  for log in logs]
        if not self.wait(lambda: victim.metrics().get(f'relay_listeners{{room="{ROOM}",transport="udp"}}', 0)
                         >= self.per_edge + MOVERS, 10):
            raise Failure("the movers did not join the edge within 10 s")
        # the edges' alternates are chosen once a second from the directory
        self.pump(1.5)

        def restore() -> None:
            self.restart(victim)
            self.join(self.edge_crowds[k])
        self.restore = restore
        out = self.window({"listeners": self.tracks([self.edge_crowds[k]]),
                           "other_edges": self.tracks(self.edge_crowds[:k])}, "lead",
                          lambda _w: victim.kill() or {}, self.post_s)
        for p in movers:
            _signal_group(p, signal.SIGINT)
        self.children.stop(movers, grace=5.0)
        rows = []
        for log in logs:
            text = log.read_text(errors="replace")
            m = re.search(r"lost (\d+),.* longest silence ([\d.]+) s", text)
            if m is None:
                raise Failure(f"a mover did not report: {text[-300:]}")
            rows.append((int(m.group(1)), round(float(m.group(2)) * 1000), "moving to" in text))
        out["movers"] = {"listeners": len(rows), "missing": _pct([r[0] for r in rows]),
                         "silence_ms": _pct([r[1] for r in rows]), "moved": sum(r[2] for r in rows)}
        return out

    def ev_publisher(self) -> dict:
        tree = self.tree
        assert tree is not None and tree.publisher is not None
        old = tree.publisher

        def action(_w: Window) -> dict:
            self.children.kill(old)
            tree.start_publisher()
            return {}
        return self.window({"listeners": self.tracks(self.edge_crowds)}, "lead", action, TAKEOVER_S + self.post_s)

    def ev_redis(self) -> dict:
        d = self.directory
        if d is None or not d.sentinel:
            raise NotRun(self.directory_note or "no directory")
        assert self.tree is not None
        if not self.wait(d.ready_for_failover, 30, step=0.5):
            raise Failure("the sentinels did not get ready for a failover within 30 s")
        old = d.master()
        ids = [n.name for n in self.tree.nodes]
        state: dict = {}

        def watch() -> None:
            """The sentinels' new master, and every node's record on it."""
            t0 = state["t0"]
            while not state.get("done") and time.monotonic() - t0 < self.redis_cap_s:
                port = d.master()
                if port and port != old and "switched" not in state:
                    state["switched"], state["new"] = time.monotonic(), port
                # a record copied before the kill expires 0.75 s after it:
                # one seen a second after the switch was written since
                if "switched" in state and time.monotonic() > state["switched"] + 1.0:
                    with contextlib.suppress(Exception):
                        c = d.client(state["new"])
                        if all(c.exists(f"relay:node:{i}") for i in ids):
                            state["registered"] = time.monotonic()
                            return
                time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)

        def restore() -> None:
            state["done"] = True
            if watcher.is_alive():
                watcher.join(5)
            # the killed server comes back as a replica of the new master
            # (or as it was, where there was no failover)
            d.restart_as_replica(old, state.get("new", 0))
        self.restore = restore

        def action(_w: Window) -> dict:
            d.kill(old)
            state["t0"] = time.monotonic()
            watcher.start()
            return {}
        out = self.window({"listeners": self.tracks(self.edge_crowds)}, "lead", action, self.post_s,
                          more=lambda: "registered" not in state, cap_s=self.redis_cap_s)
        t0 = state.get("t0", 0.0)
        out["directory"] = {
            "promoted_after_s": round(state["switched"] - t0, 2) if "switched" in state else None,
            "all_registered_after_s": round(state["registered"] - t0, 2) if "registered" in state else None}
        if "registered" not in state:
            out["directory"]["note"] = f"not every node on a new master within {self.redis_cap_s:g} s"
        return out

    def ev_storm(self) -> dict:
        tree = self.tree
        assert tree is not None
        victim, edge = tree.mids[0], tree.edges[0]
        result_file = self.tmp / f"storm-{time.monotonic_ns()}.json"
        child = self.children.start([PY, str(Path(__file__).resolve()), "--storm-child",
                                     f"{edge.listen[0]}:{edge.listen[1]}", str(self.storm_joins), self.token,
                                     str(result_file)], log=self.tmp / "storm.log", pipes=True)
        stdin = child.stdin
        assert stdin is not None
        timing: dict = {}

        def restore() -> None:
            if child.poll() is None:
                self.children.kill(child)
            self.restart(victim)
        self.restore = restore

        def action(w: Window) -> dict:
            # the storm's joins come in batches over STORM_S; the mid dies
            # a third of the way in
            w.kill_ns = None
            stdin.write(b"go\n")
            stdin.flush()
            if _line(child, 5.0) != "joining":
                raise Failure("the storm did not start")
            self.pump(STORM_S / 3, w.sample)
            w.kill_ns = time.monotonic_ns()
            timing["kill"] = time.monotonic()
            victim.kill()
            return {}
        if not self.wait(lambda: _line(child, 0.0) == "ready", 20):
            raise Failure("the storm's listeners were not ready within 20 s")
        out = self.window({"listeners": self.tracks(self.edge_crowds)}, "lead", action, self.post_s)
        stdin.write(b"stop\n")       # the storm's listeners report what they heard
        stdin.flush()
        if not self.wait(lambda: child.poll() is not None, 15):
            raise Failure("the storm's listeners did not report within 15 s")
        storm = json.loads(result_file.read_text())
        storm["kill_after_storm_start_s"] = round(timing["kill"] - storm.pop("join_start"), 3)
        out["storm"] = storm
        return out

    # ---- running them

    def run_event(self, key: str, title: str, goal: str) -> dict:
        """One event from a healthy tree: measured, then the tree put back
        and checked (how long that took says whether the event left
        damage past its window)."""
        rec: dict = {"event": key, "title": title, "goal": goal}
        t0 = time.monotonic()
        self.restore = None
        self.window_end = None
        try:
            if self.directory is None and key == "redis":
                raise NotRun(self.directory_note)
            t_heal = time.monotonic()
            note = self.heal()
            rec["heal_s"] = round(time.monotonic() - t_heal, 1)
            if note:
                rec["note"] = note
            if key.startswith("origin_"):
                out = self.ev_origin(key.split("_")[1])
            elif key in ("mid0", "mid1"):
                out = self.ev_mid(int(key[-1]))
            else:
                out = getattr(self, f"ev_{key}")()
            rec.update(out)
            rec["outcome"] = "met" if goal_met(key, rec) else "not met"
        except NotRun as e:
            rec["outcome"] = "not run"
            rec["error"] = str(e)
        except Exception as e:  # noqa: BLE001 -- recorded; the bench goes on
            rec["outcome"] = "failed"
            rec["error"] = f"{type(e).__name__}: {e}"
            self._log_error(key)
        if self.restore is not None and not self.stopping:
            try:
                self.restore()
            except Exception as e:  # noqa: BLE001 -- the next check rebuilds the tree if it must
                rec["restore_error"] = f"{type(e).__name__}: {e}"
                self._log_error(key + " (restore)")
        if self.window_end is not None and not self.stopping:
            # the tree healthy again (every link up, every listener hearing),
            # from the killed part's restart or the window's end
            restored = time.monotonic()
            try:
                note = self.heal()
                rec["healthy_again_s"] = round(time.monotonic() - restored, 1)
                if note:
                    rec["after_note"] = note
            except Exception as e:  # noqa: BLE001 -- the next event tries again
                rec["healthy_again_s"] = None
                rec["after_note"] = f"{type(e).__name__}: {e}"
        rec["seconds"] = round(time.monotonic() - t0, 1)
        return rec

    def _log_error(self, what: str) -> None:
        with open(self.tmp / "errors.log", "a") as f:
            f.write(f"--- {what}\n{traceback.format_exc()}\n")

    def close(self) -> None:
        self.stopping = True
        with contextlib.suppress(Exception):
            self.close_tree()
        self.children.stop(grace=3.0)


class NotRun(Exception):
    """An event this checkout or machine cannot run (recorded as not run)."""


def goal_met(key: str, rec: dict) -> bool:
    g = rec["listeners"]
    if key == "edge":
        m = rec["movers"]
        return (m["moved"] == m["listeners"] and m["silence_ms"]["max"] <= EDGE_SILENCE_S * 1000
                and m["missing"]["max"] == 0)
    if key == "publisher":
        return g["back_s"] is not None and g["back_s"] <= TAKEOVER_S + MARGIN_S
    ok = g["missing"]["max"] == 0 and g["not_back"] == 0
    if key == "storm":
        s = rec["storm"]
        ok = ok and s["accepted"] == s["joins"] and s["holes"]["max"] == 0
    return ok


def _line(child: subprocess.Popen, timeout: float) -> str | None:
    """A line from the child's stdout if one comes within `timeout`."""
    assert child.stdout is not None
    r, _, _ = select.select([child.stdout], [], [], timeout)
    if not r:
        return None
    return child.stdout.readline().decode().strip()


# --------------------------------------------------------------------------
# the storm's listeners, in a process of their own (their joins would hold
# up the bench's reading of the steady listeners' sockets)


def storm_child(server: str, n: int, token: str, out: str) -> None:
    """`n` listeners join `server` in STORM_BATCHES over STORM_S when told
    "go", listen until told "stop", and write what they heard to `out`."""
    host, _, port = server.rpartition(":")
    per = max(1, n // STORM_BATCHES)
    sizes = [per] * (n // per) + ([n % per] if n % per else [])
    crowds = [LoopbackCrowd(k, (host, int(port)), ROOM, token=token, first_address=20000 + b * per)
              for b, k in enumerate(sizes)]
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    print("joining", flush=True)
    t0 = time.monotonic()
    results, starts = [], []
    for b, c in enumerate(crowds):
        while time.monotonic() < t0 + b * STORM_S / len(crowds):
            for joined in crowds[:b]:           # their first packets are stamped as they come
                joined.crowd.poll(0)
                joined.crowd.take_control()
            time.sleep(0.005)
        starts.append(time.monotonic())
        results.append(c.join(timeout=10))
    t1 = time.monotonic()
    keepalive = time.monotonic()
    while time.monotonic() < t0 + 120:       # until the bench says stop; bounded all the same
        for c in crowds:                     # every socket read each turn, so arrivals are stamped as they come
            c.crowd.poll(0)
            c.crowd.take_control()
        if time.monotonic() - keepalive >= KEEPALIVE_S:
            for c in crowds:
                c.keepalive()
            keepalive = time.monotonic()
        r, _, _ = select.select([sys.stdin], [], [], TICK_S)
        if r and sys.stdin.readline().strip() in ("stop", ""):
            break
    members = [(c.crowd.member(i), start) for c, start in zip(crowds, starts, strict=True) for i in sorted(c.sessions)]
    firsts = [m["first_rx_ns"] / 1e9 - start for m, start in members if m["first_rx_ns"]]
    rejected: dict[str, int] = {}
    for res in results:
        for why, k in res.rejected.items():
            rejected[why] = rejected.get(why, 0) + k
    Path(out).write_text(json.dumps({
        "joins": n, "accepted": sum(r.accepted for r in results), "rejected": rejected,
        "unanswered": sum(r.unanswered for r in results), "join_start": t0, "join_s": round(t1 - t0, 3),
        "batches": len(crowds), "batch_join_s_max": round(max(r.seconds for r in results), 3),
        "heard": len(firsts), "holes": _pct([m["lost"] for m, _ in members]),
        # each batch: when it joined (from the storm's start) and its slowest first packet
        "batch_first_audio_max_s": [
            [round(start - t0, 3), round(max((c.crowd.member(i)["first_rx_ns"] / 1e9 - start
                                             for i in c.sessions if c.crowd.member(i)["first_rx_ns"]),
                                            default=-1.0), 3)]
            for c, start in zip(crowds, starts, strict=True)],
        "first_audio_s": {k: (round(v, 3) if v is not None else None) for k, v in _pct(firsts).items()}}))
    for c in crowds:
        c.leave()
        c.close()


# --------------------------------------------------------------------------
# reports


def _fmt_pair(d: dict | None, unit: str = "") -> str:
    if not d or d.get("p50") is None:
        return "-"
    return f"{d['p50']:g} / {d['max']:g}{unit}"


def _back(g: dict) -> str:
    if g["back_s"] is None:
        return f"not back ({g['not_back']} of {g['listeners']})"
    if g["back_s"] == 0:
        return "never stopped"
    return f"{g['back_p50_s']:.2f} / {g['back_s']:.2f} s"


def _note(rec: dict) -> str:
    parts = []
    if rec.get("note"):
        parts.append(rec["note"])
    if "other_edges" in rec:
        o = rec["other_edges"]
        parts.append(f"other edges' {o['listeners']}: missing {_fmt_pair(o['missing'])}, "
                     f"silence {_fmt_pair(o['silence_ms'], ' ms')}")
    if rec.get("event") == "publisher" and "reference" in rec:
        parts.append(f"a listener on the lead origin: silent {rec['reference']['silence_ms']} ms")
    if "reference" in rec and rec["reference"]["holes"]:
        parts.append(f"the origin's numbering jumped: its listener counts {rec['reference']['holes']} lost")
    if "directory" in rec:
        d = rec["directory"]
        parts.append(f"sentinels promoted the replica after {d['promoted_after_s']} s, every node on it after "
                     f"{d['all_registered_after_s']} s" if d["all_registered_after_s"] is not None
                     else d.get("note", ""))
    if "storm" in rec:
        s = rec["storm"]
        parts.append(f"storm: {s['accepted']}/{s['joins']} admitted in {s['join_s']} s, mid killed "
                     f"{s['kill_after_storm_start_s']} s into it; their holes {_fmt_pair(s['holes'])}, "
                     f"first audio {_fmt_pair(s['first_audio_s'], ' s')}")
    g = rec.get("listeners")
    if g and g["not_back"] and g["stopped_after_s"]["p50"] is not None and g["stopped_after_s"]["p50"] > 0.5:
        parts.append(f"the listeners not back stopped hearing {g['stopped_after_s']['p50']:.2f} s after the kill")
    again = rec.get("healthy_again_s")
    if rec.get("after_note") or (again is not None and again > 3):
        parts.append(f"tree healthy again {again} s after the restart" if again is not None else "")
        if rec.get("after_note"):
            parts.append(rec["after_note"])
    if rec.get("restore_error"):
        parts.append(f"restoring it failed: {rec['restore_error']}")
    if g and g.get("counted_by_reference") and rec.get("event") != "edge":
        parts.append(f"{g['counted_by_reference']} counted against the reference")
    return "; ".join(p for p in parts if p)


def table(result: dict) -> str:
    runs = result.get("runs", [])
    lines = ["| event | goal | run | listeners | missing p50 / max | silence p50 / max | back after p50 / max "
             "| outcome | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for key, title, goal in EVENTS:
        if key not in result.get("events", [key]):
            continue
        for k, run in enumerate(runs):
            rec = next((e for e in run["events"] if e["event"] == key), None)
            head = f"| {title} | {goal} |" if k == 0 else "| | |"
            if rec is None:
                lines.append(f"{head} {k + 1} | | | | | not reached | |")
                continue
            if rec["outcome"] in ("failed", "not run"):
                lines.append(f"{head} {k + 1} | | | | | {rec['outcome']} | {rec.get('error', '')} |")
                continue
            g = rec["movers"] if key == "edge" else rec["listeners"]
            outcome = rec["outcome"] if rec["outcome"] == "met" else f"**{rec['outcome']}**"
            back = f"{g['moved']} of {g['listeners']} moved" if key == "edge" else _back(g)
            lines.append(f"{head} {k + 1} | {g['listeners']} | {_fmt_pair(g['missing'])} | "
                         f"{_fmt_pair(g['silence_ms'], ' ms')} | {back} | {outcome} | {_note(rec)} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    runs = len(result["runs"])
    return "\n".join([
        SECTION, "",
        f"Machine: {result['machine']}. Command: `{result['command']}` "
        f"({runs} run{'s' if runs != 1 else ''} of each event, {result['listeners_per_edge']} listeners on each of "
        f"3 edges, a storm of {result['storm_joins']} joins, {result['pre_s']:g} s before each kill and "
        f"{result['post_s']:g} s after it ({TAKEOVER_S + result['post_s']:g} s for the publisher); "
        f"directory: {result['directory']}).", "",
        "The tree: an origin pair (lead and follow) → 2 mids, each taking the room from both origins → 3 edges, "
        "each taking it from both mids; one `relay publish --to LEAD --to FOLLOW`; a reference listener on "
        "each origin. Every event starts from a healthy tree (the killed part restarted and checked). "
        "*missing*: packets the reference heard that the listener did not (holes in the origin's numbering; "
        "for a listener not hearing the room at the end, counted against the reference). *silence*: its "
        "longest time without a packet after the kill (sockets read every 10 ms: up to 30 ms is no silence). "
        "*back after*: from the kill until it hears again. p50 / max over listeners, each run on its own row. "
        "*tree healthy again*: from the killed part's restart until every link is up and every listener "
        "hears (noted where over 3 s).",
        "", table(result), "", *pair_lines(result),
        f"The edge event's row is its {MOVERS} `relay listen` processes, which move: *missing* is what each "
        "counted lost in the origin's numbering over its whole run, *silence* its own longest gap between "
        "packets (it reads as packets come). The edge's crowd of loopback sockets does not move, and is "
        "not in the row. "
        "Not measured here yet: QUIC and WebTransport listeners (UDP only); a kill under a large crowd, "
        "two parts killed at once, a stalled (not dead) node, loss or partitions between nodes; an ffmpeg "
        "publisher in the tree; the audio itself (packets are counted and timed, not decoded).", ""])


def pair_lines(result: dict) -> list[str]:
    check = result.get("pair_check")
    if not check:
        return []
    if "error" in check:
        return [f"The pair check failed: {check['error']}", ""]
    figures = "; ".join(f"{tone}: lead {v['lead']:g}, follow {v['follow']:g}" for tone, v in check.items())
    return [f"Pair check (an origin pair alone, `relay publish --to LEAD --to FOLLOW`, packets a second each "
            f"origin takes of the 50 sent): {figures}. A 440 Hz tone repeats its Opus payload every 5th packet "
            f"(20 ms frames); the pair matches a payload only to the copy that arrived within 50 ms of it, so "
            f"both tones are taken whole (before that, 440 Hz kept 0 to 21 of the 50). The tree above is fed "
            f"a {TONE} Hz tone.", ""]


def write_results_md(result: dict) -> None:
    md = markdown(result)
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else ""
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        nxt = re.search(r"^## ", rest, flags=re.M)
        tail = rest[nxt.start():] if nxt else ""
        text = head.rstrip("\n") + "\n\n" + md + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + md
    RESULTS_MD.write_text(text)


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{model + ', ' if model else ''}{os.cpu_count()} cores, Linux {platform.release()}, "
            f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.2f} at the start")


# --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one short run: 5 listeners an edge, short windows")
    ap.add_argument("--runs", type=int, help="runs of every event (default 2; 1 with --smoke)")
    ap.add_argument("--listeners", type=int, help="listeners on each edge (default 20; 5 with --smoke)")
    ap.add_argument("--storm", type=int, help="joins in the storm (default 300; 100 with --smoke)")
    ap.add_argument("--after", type=float, help="seconds listened to after each kill (default 5; 2.5 with "
                    "--smoke; the publisher's event 2 s more)")
    ap.add_argument("--events", help="only these events, comma-separated (default: all): "
                    + ", ".join(k for k, _, _ in EVENTS))
    ap.add_argument("--out", help="where to write the JSON (default bench/results/chaos.json, "
                                  "or chaos-smoke.json with --smoke)")
    ap.add_argument("--pair-check", action=argparse.BooleanOptionalAction, default=None,
                    help="first measure an origin pair fed a 440 Hz tone (default: on, off with --smoke)")
    ap.add_argument("--storm-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.storm_child:
        server, n, token, out = args.storm_child
        storm_child(server, int(n), token, out)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="relay-chaos-"))
    bench = Bench(args, tmp)
    atexit.register(bench.children.stop, None, 1.0)

    def on_signal(signum: int, _frame) -> None:
        bench.stopping = True
        raise Interrupted(signal.Signals(signum).name)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    runs = args.runs or (1 if args.smoke else 2)
    chosen = [e for e in EVENTS if not args.events or e[0] in args.events.split(",")]
    if not chosen:
        ap.error(f"--events: none of {args.events!r} is an event")
    result: dict = {"machine": machine(), "command": " ".join(["bench/chaos.py", *sys.argv[1:]]),
                    "events": [k for k, _, _ in chosen], "smoke": args.smoke,
                    "listeners_per_edge": bench.per_edge, "storm_joins": bench.storm_joins,
                    "pre_s": bench.pre_s, "post_s": bench.post_s,
                    "goals": {k: g for k, _, g in EVENTS}, "runs": []}
    code = 0
    t0 = time.monotonic()
    try:
        if args.pair_check if args.pair_check is not None else not args.smoke:
            try:
                result["pair_check"] = bench.pair_check()
                print(f"pair check, packets a second each origin takes of 50: {result['pair_check']}", flush=True)
            except Exception as e:  # noqa: BLE001 -- recorded; the bench goes on
                result["pair_check"] = {"error": f"{type(e).__name__}: {e}"}
        try:
            bench.setup_directory()
        except Exception as e:  # noqa: BLE001 -- recorded; the tree then runs without a directory
            bench.directory = None
            bench.directory_note = f"the directory did not start ({type(e).__name__}: {e})"
            result["setup_error"] = bench.directory_note
            print(f"set-up: {bench.directory_note}", flush=True)
        d = bench.directory
        result["directory"] = ("a Redis master, a replica and 3 sentinels" if d is not None and d.sentinel
                               else f"one Redis ({bench.directory_note})" if d is not None
                               else bench.directory_note)
        try:
            bench.build()
        except Exception as e:  # noqa: BLE001 -- recorded; each event then tries a fresh tree
            result["setup_error"] = f"the first tree: {type(e).__name__}: {e}"
            print(f"set-up failed: {result['setup_error']}", flush=True)
        for r in range(runs):
            run: dict = {"run": r + 1, "events": []}
            result["runs"].append(run)
            for key, title, goal in chosen:
                rec = bench.run_event(key, title, goal)
                run["events"].append(rec)
                g = rec.get("listeners")
                what = (f"missing {_fmt_pair(g['missing'])}, silence {_fmt_pair(g['silence_ms'], ' ms')}, "
                        f"back {_back(g)}" if g else rec.get("error", ""))
                print(f"  run {r + 1} {key:14s} {rec['outcome']:8s} {what} "
                      f"({rec['seconds']} s, {rec.get('heal_s', 0)} s of it healing)", flush=True)
    except Interrupted as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        result["interrupted"] = str(e)
        print(f"interrupted by {e}: stopping every process the bench started", flush=True)
        code = 128 + int(getattr(signal, str(e)))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.close()
    result["trees_built"] = bench.trees
    result["seconds"] = round(time.monotonic() - t0, 1)
    out = Path(args.out) if args.out else RESULTS / ("chaos-smoke.json" if args.smoke else "chaos.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    print(md)
    if not args.smoke and not args.out and "interrupted" not in result:
        write_results_md(result)
    failed = any(e["outcome"] == "failed" for run in result["runs"] for e in run["events"])
    if failed or code or "setup_error" in result or bench.trees > 1:
        print(f"logs kept in {tmp}", flush=True)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out} in {result['seconds']} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
