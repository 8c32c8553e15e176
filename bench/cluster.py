"""A tree of nodes on this machine, measured: origin -> 2 mids -> 4 edges,
each a `relay serve` process on loopback, a real Redis as the directory,
and a crowd spread over the edges.

    .venv/bin/python bench/cluster.py            # about two minutes
    .venv/bin/python bench/cluster.py --smoke    # seconds; fewer listeners

Reports, into bench/results/cluster.json:
  origin_cost     CPU the origin, the mids and the edges use per second as
                  the crowd grows (the origin's must stay flat: it feeds two
                  mids whatever the crowd)
  storm           joins arriving at one edge within about a second: how many
                  were admitted, redirects per admitted listener, time to
                  first audio p50/p99 (redirects included), listeners per
                  edge against its limit
  failover        a mid killed under its edges: each listener's audio gap
                  (packets it did not get in the seconds around the kill,
                  at 50 a second) and whether its numbering stayed one stream
  redis_outage    Redis stopped for a while mid-stream: packets lost
Every load loop here is bounded in count and time. The machine is shared:
read the figures as this machine's, not as limits.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from procs import Interrupted, cpu_seconds, exit_code, spawn, stop_on_signals, terminate, terminate_all  # noqa: E402
from relay.testing.loadgen import LoopbackCrowd, free_port, scrape, wait_ready  # noqa: E402

PY = sys.executable
RESULTS = Path(__file__).resolve().parent / "results"


class Redis:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port(socket.SOCK_STREAM)
        self.proc = spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                           "--save", "", "--appendonly", "no"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        terminate(self.proc)


class Node:
    def __init__(self, tmp: Path, name: str, redis_url: str, tier: str, upstream: list["Node"] | None = None,
                 max_listeners: int = 100_000, wait: bool = True) -> None:
        self.name = name
        self.listen = ("127.0.0.1", free_port())
        self.admin = ("127.0.0.1", free_port(socket.SOCK_STREAM))
        self.ingest = ("127.0.0.1", free_port())
        room = (f'upstream = [{", ".join(chr(34) + f"{u.listen[0]}:{u.listen[1]}" + chr(34) for u in upstream)}]'
                if upstream else f'ingest = "{self.ingest[0]}:{self.ingest[1]}"\nsources = ["127.0.0.1"]')
        cfg = tmp / f"{name}.toml"
        cfg.write_text(f'[node]\nlisten = "{self.listen[0]}:{self.listen[1]}"\n'
                       f'admin = "{self.admin[0]}:{self.admin[1]}"\nauth = "open"\nworkers = 1\n'
                       f'max_listeners = {max_listeners}\njoin_rate = 100000\njoin_rate_per_source = 100000\n'
                       'max_load = 0\nmax_machine_load = 0\ndrain_grace = 0\n'
                       f'directory = "{redis_url}"\nnode_id = "{name}"\ntier = "{tier}"\n'
                       f'[[room]]\nname = "live"\n{room}\n')
        self.proc = spawn([PY, "-m", "relay", "--log-level", "error", "serve", "-c", str(cfg)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait:
            self.ready()

    def ready(self) -> None:
        """Wait until the node serves its admin port."""
        if not wait_ready(self.admin, self.proc, timeout=20):
            raise RuntimeError(f"{self.name} did not start")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def listeners(self) -> int:
        return int(scrape(self.admin).get('relay_listeners{room="live",transport="udp"}', 0))


class Tree:
    """origin -> mids -> edges, each edge taking the room from its own mid
    first and the other mid second."""

    def __init__(self, tmp: Path, redis: Redis, edges: int = 4, edge_limit: int = 100_000) -> None:
        url = f"redis://127.0.0.1:{redis.port}/0"
        # started together (each start is a second of Python imports), then waited for
        self.origin = Node(tmp, "origin", url, "origin", wait=False)
        self.mids = [Node(tmp, f"mid{i}", url, "mid", [self.origin], wait=False) for i in range(2)]
        self.edges = [Node(tmp, f"edge{i}", url, "edge", [self.mids[i % 2], self.mids[1 - i % 2]],
                           max_listeners=edge_limit, wait=False) for i in range(edges)]
        for n in self.nodes:
            n.ready()
        self.publisher = spawn([PY, "-m", "relay", "publish", "--to",
                                f"{self.origin.ingest[0]}:{self.origin.ingest[1]}", "--duration", "600"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.5)   # every node has heartbeated and read the others

    @property
    def nodes(self) -> list[Node]:
        return [self.origin, *self.mids, *self.edges]

    def close(self) -> None:
        terminate_all([self.publisher, *(n.proc for n in self.nodes)])


def origin_cost(tmp: Path, redis: Redis, crowds: list[int], seconds: float) -> list[dict]:
    """CPU per second of each tier while a crowd of each size listens,
    spread evenly over the edges."""
    tree = Tree(tmp / "cost", redis)
    out = []
    try:
        for n in crowds:
            per = n // len(tree.edges)
            crowd = [LoopbackCrowd(per, e.listen, "live", first_address=k * per) for k, e in enumerate(tree.edges)]
            try:
                joined = sum(c.join(timeout=30).accepted for c in crowd)
                time.sleep(1.0)   # the edges have subscribed
                before = [n_.cpu() for n_ in tree.nodes]
                t0 = time.monotonic()
                run(crowd, seconds)
                elapsed = time.monotonic() - t0
                used = [(b - a) / elapsed for a, b in zip(before, [n_.cpu() for n_ in tree.nodes], strict=True)]
                origin_listeners = tree.origin.listeners()
                out.append({"listeners": joined, "origin_cpu": round(used[0], 4),
                            "mid_cpu": round(sum(used[1:3]) / 2, 4),
                            "edge_cpu": round(sum(used[3:]) / len(tree.edges), 4),
                            "origin_sessions": origin_listeners,
                            "lost": sum(c.crowd.totals()["lost"] for c in crowd)})
                print(f"  {joined:6d} listeners: origin {used[0]:.3f} cores ({origin_listeners} sessions), "
                      f"mid {out[-1]['mid_cpu']:.3f}, edge {out[-1]['edge_cpu']:.3f}", flush=True)
            finally:
                for c in crowd:
                    c.leave()
                    c.close()
            time.sleep(1.0)
    finally:
        tree.close()
    return out


def storm(tmp: Path, redis: Redis, joins: int, edge_limit: int, listen_s: float = 3.0) -> dict:
    """`joins` listeners all try the first edge within about a second; the
    edges take `edge_limit` each and send the rest on."""
    tree = Tree(tmp / "storm", redis, edge_limit=edge_limit)
    crowd = LoopbackCrowd(joins, tree.edges[0].listen, "live", connected=False, follow=True)
    try:
        t0 = time.monotonic_ns()
        res = crowd.join(timeout=20, attempts=3, retry_limited=True)
        end = time.monotonic() + listen_s
        while time.monotonic() < end:
            crowd.run(0.1)
        firsts = sorted((crowd.crowd.member(i)["first_rx_ns"] - t0) / 1e9
                        for i in crowd.sessions if crowd.crowd.member(i)["first_rx_ns"])
        per_edge = [e.listeners() for e in tree.edges]
        result = {"joins": joins, "edge_limit": edge_limit, "accepted": res.accepted, "rejected": res.rejected,
                  "unanswered": res.unanswered, "join_seconds": round(res.seconds, 3),
                  "redirects": res.redirects,
                  "redirects_per_admitted": round(res.redirects / max(1, res.accepted), 3),
                  "first_audio_p50_s": round(firsts[len(firsts) // 2], 3) if firsts else None,
                  "first_audio_p99_s": round(firsts[int(len(firsts) * 0.99)], 3) if firsts else None,
                  "listeners_per_edge": per_edge,
                  "past_limit": sum(max(0, n - edge_limit) for n in per_edge)}
        print(f"  storm: {res.accepted}/{joins} admitted, {result['redirects_per_admitted']} redirects each, "
              f"first audio p50 {result['first_audio_p50_s']} s p99 {result['first_audio_p99_s']} s, "
              f"per edge {per_edge}", flush=True)
        return result
    finally:
        crowd.close()
        tree.close()


def listening(tree: Tree, per_edge: int, seconds: float) -> list[LoopbackCrowd]:
    """`per_edge` listeners joined on every edge, heard for `seconds`."""
    crowds = [LoopbackCrowd(per_edge, e.listen, "live", first_address=k * per_edge)
              for k, e in enumerate(tree.edges)]
    for c in crowds:
        c.join(timeout=30)
    run(crowds, seconds)
    return crowds


def run(crowds: list[LoopbackCrowd], seconds: float) -> None:
    """Receive on every crowd, in turns, for `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for c in crowds:
            c.run(0.05)


def failover(tmp: Path, redis: Redis, per_edge: int, window_s: float = 4.0) -> dict:
    """A mid dies: the edges under it move to the other mid."""
    tree = Tree(tmp / "failover", redis)
    crowds: list[LoopbackCrowd] = []
    try:
        crowds = listening(tree, per_edge, window_s)
        before = [[c.crowd.member(i)["received"] for i in range(per_edge)] for c in crowds]
        lost_before = sum(c.crowd.totals()["lost"] for c in crowds)
        t0 = time.monotonic()
        tree.mids[0].proc.send_signal(signal.SIGKILL)
        run(crowds, window_s)
        elapsed = time.monotonic() - t0
        gaps = []
        for k, c in enumerate(crowds):
            for i in range(per_edge):
                got = c.crowd.member(i)["received"] - before[k][i]
                gaps.append(max(0.0, (elapsed * 50 - got) / 50))
        under_dead = [g for k, c in enumerate(crowds) for g in gaps[k * per_edge:(k + 1) * per_edge] if k % 2 == 0]
        result = {"listeners": per_edge * len(crowds), "window_s": round(elapsed, 2),
                  "gap_s_mean_under_dead_mid": round(statistics.mean(under_dead), 3),
                  "gap_s_max": round(max(gaps), 3),
                  "numbering_gaps": sum(c.crowd.totals()["lost"] for c in crowds) - lost_before,
                  "switches": [scrape(e.admin).get('relay_upstream_switches_total{room="live"}', 0)
                               for e in tree.edges]}
        print(f"  failover: gap mean {result['gap_s_mean_under_dead_mid']} s, max {result['gap_s_max']} s, "
              f"sequence gaps {result['numbering_gaps']}", flush=True)
        return result
    finally:
        for c in crowds:
            c.close()
        tree.close()


def redis_outage(tmp: Path, redis: Redis, per_edge: int, seconds: float) -> dict:
    tree = Tree(tmp / "outage", redis)
    crowds: list[LoopbackCrowd] = []
    try:
        crowds = listening(tree, per_edge, 2.0)
        before = sum(c.crowd.totals()["received"] for c in crowds)
        lost0 = sum(c.crowd.totals()["lost"] for c in crowds)
        redis.stop()
        run(crowds, seconds)
        got = sum(c.crowd.totals()["received"] for c in crowds) - before
        result = {"outage_s": seconds, "listeners": per_edge * len(crowds), "received": got,
                  "lost": sum(c.crowd.totals()["lost"] for c in crowds) - lost0,
                  "nodes_alive": sum(n.proc.poll() is None for n in tree.nodes)}
        print(f"  redis outage {seconds:g} s: {got} packets received, {result['lost']} lost, "
              f"{result['nodes_alive']}/{len(tree.nodes)} nodes up", flush=True)
        return result
    finally:
        for c in crowds:
            c.close()
        tree.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="seconds, few listeners")
    ap.add_argument("--out", help="where to write the JSON (default bench/results/cluster.json, "
                                  "or cluster-smoke.json with --smoke)")
    args = ap.parse_args()
    crowds, seconds, storm_n, limit, per_edge, outage, window = (
        ([40], 2.0, 120, 40, 10, 3.0, 2.0) if args.smoke else ([200, 800, 2000], 5.0, 1600, 500, 100, 10.0, 4.0))
    tmp = Path(tempfile.mkdtemp(prefix="relay-cluster-"))
    for sub in ("cost", "storm", "failover", "outage"):
        (tmp / sub).mkdir()
    result: dict = {"machine": f"{os.cpu_count()} cores", "command": " ".join(["bench/cluster.py", *sys.argv[1:]])}
    redis = Redis()
    try:
        print("origin cost as the crowd grows:", flush=True)
        result["origin_cost"] = origin_cost(tmp, redis, crowds, seconds)
        result["storm"] = storm(tmp, redis, storm_n, limit, listen_s=1.5 * window)
        result["failover"] = failover(tmp, redis, per_edge, window_s=window)
        result["redis_outage"] = redis_outage(tmp, redis, per_edge, outage)
    finally:
        if redis.proc.poll() is None:
            redis.stop()
    out = Path(args.out) if args.out else RESULTS / ("cluster-smoke.json" if args.smoke else "cluster.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    # peers in process groups of their own, stopped on SIGINT/SIGTERM too
    stop_on_signals()
    try:
        main()
    except Interrupted as e:
        sys.exit(exit_code(e))
