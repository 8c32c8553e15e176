"""The flood bench (`make bench-flood`): the breaking point of one edge
under unknown traffic at its listener port.

A real `relay serve` (JWT auth, one room fed by a publisher thread here) is
pinned to one core; bench/flood.c, pinned to the other, sends unknown
traffic at it (JOINs with bad tokens and no cookie, JOINs with forged
cookies, KEEPALIVEs for no session, garbage) from SOURCES loopback
addresses, at rates that rise step by step up to as fast as it can send.
Meanwhile five established listeners keep their sessions with KEEPALIVEs
and count their audio, and a fresh listener joins every half second
(bench/flood_legit.py). A step is broken when a legitimate session expires,
a legitimate join takes over 1 s, or legitimate audio loses a packet; the
breaking point is the lowest broken step's rate. Each step also gives the
node's CPU per million unknown datagrams and what the kernel dropped at
the port.

    .venv/bin/python bench/flood.py [--sources 10,1000,10000] [--rates ...] [--seconds 8] [--label before]

Writes bench/results/flood.json (one entry per label, so a before and an
after sit side by side) and its own section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from flood_legit import Legit, Published, publisher  # noqa: E402
from procs import cpu_seconds, group_socket_inodes, spawn, stop_on_signals, terminate, udp_drops  # noqa: E402
from receivers import build  # noqa: E402
from results_md import write_sections  # noqa: E402

from relay.testing.loadgen import free_port, scrape, wait_ready  # noqa: E402
from relay.wire.tokens import mint  # noqa: E402

RESULTS = HERE / "results" / "flood.json"
BUILD = HERE / "build"
SECRET = "flood-bench-secret-of-at-least-32-bytes"
RATES = (5_000, 20_000, 50_000, 100_000, 0)   # datagrams/s; 0: as fast as one core sends
JOIN_GOAL_S = 1.0
NODE_CORE, FLOOD_CORE = 0, 1

CONFIG = """
[node]
listen = "127.0.0.1:{listen}"
admin = "127.0.0.1:{admin}"
auth = "jwt"
secret_env = "FLOOD_SECRET"
workers = 1
keepalive_interval = 1
session_timeout = 3
[[room]]
name = "town"
ingest = "127.0.0.1:{ingest}"
sources = ["127.0.0.1"]
"""


class Node:
    """A `relay serve` pinned to NODE_CORE, with its ports."""

    def __init__(self, tmp: Path) -> None:
        self.listen, self.admin, self.ingest = free_port(), free_port(socket.SOCK_STREAM), free_port()
        cfg = tmp / "node.toml"
        cfg.write_text(CONFIG.format(listen=self.listen, admin=self.admin, ingest=self.ingest))
        env = dict(os.environ, FLOOD_SECRET=SECRET)
        log = BUILD / "flood-node.log"
        BUILD.mkdir(exist_ok=True)
        self.proc = spawn([sys.executable, "-m", "relay", "serve", "--config", str(cfg)], cores={NODE_CORE},
                          env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        if not wait_ready(("127.0.0.1", self.admin), self.proc, timeout=30):
            terminate(self.proc)
            raise SystemExit(f"the node did not start: see {log}")

    def drops(self) -> int:
        """Datagrams the kernel dropped at the node's sockets so far."""
        return udp_drops(group_socket_inodes([self.proc.pid]))

    def timeouts(self) -> float:
        return scrape(("127.0.0.1", self.admin)).get("relay_timeouts_total", 0.0)

    def close(self) -> None:
        terminate(self.proc)


def run_step(node: Node, legit: Legit, flood: str, rate: int, sources: int, seconds: float) -> dict:
    """One flood step; its figures and whether it broke the goal."""
    cpu0, drops0, timeouts0 = cpu_seconds(node.proc.pid), node.drops(), node.timeouts()
    flooder = spawn([flood, "127.0.0.1", str(node.listen), str(rate), str(sources), str(seconds)],
                    cores={FLOOD_CORE}, stdout=subprocess.PIPE, text=True)
    tally = legit.step(seconds + 0.5)
    out, _ = flooder.communicate(timeout=30)
    sent = int(out.split()[1]) if out.startswith("sent") else 0
    cpu = cpu_seconds(node.proc.pid) - cpu0
    step = {"rate_asked": rate, "sources": sources, "sent": sent, "sent_per_s": round(sent / seconds),
            "node_cpu_s": round(cpu, 2), "node_cores": round(cpu / seconds, 2),
            "cpu_s_per_million": round(cpu / sent * 1e6, 2) if sent else None,
            "kernel_drops": node.drops() - drops0,
            "node_timeouts": int(node.timeouts() - timeouts0), **tally.summary()}
    why = []
    if step["expired"] or step["node_timeouts"]:
        why.append("a legitimate session expired")
    if tally.failed_joins or (step["join_p99_s"] or 0) > JOIN_GOAL_S:
        why.append("a legitimate join took over 1 s")
    if step["lost"]:
        why.append("legitimate audio lost packets")
    step["broken"] = why
    return step


def ramp(flood: str, sources: int, rates: tuple[int, ...], seconds: float, tmp: Path) -> dict:
    """Steps of rising rate against a fresh node until one breaks."""
    node = Node(tmp)
    stop = threading.Event()
    published = Published()
    pub = publisher(node.ingest, stop, published)
    legit = Legit(("127.0.0.1", node.listen), "town", mint(SECRET, "town"), published)
    steps: list[dict] = []
    try:
        time.sleep(0.5)
        if not legit.join_all():
            raise SystemExit("the legitimate listeners could not join before the flood")
        legit.step(2.0)   # settle: audio flowing, keepalives answered
        for rate in rates:
            step = run_step(node, legit, flood, rate, sources, seconds)
            steps.append(step)
            verdict = "BROKEN: " + "; ".join(step["broken"]) if step["broken"] else "ok"
            print(f"  sources {sources:>5} rate {rate or 'max':>7}: sent {step['sent_per_s']:>8}/s, "
                  f"node {step['node_cores']:.2f} cores, {step['cpu_s_per_million']} CPU-s/M, kernel drops "
                  f"{step['kernel_drops']}, expired {step['expired']}+{step['node_timeouts']}, "
                  f"lost {step['lost']}/{step['audio'] + step['lost']}, joins p99 {step['join_p99_s']} s "
                  f"(failed {step['failed_joins']}) {verdict}",
                  flush=True)
            if step["broken"]:
                break
            legit.step(1.0)   # the queue drains before the next step
    finally:
        stop.set()
        pub.join(2)
        legit.close()
        node.close()
    broken = next((s for s in steps if s["broken"]), None)
    held = [s for s in steps if not s["broken"]]
    return {"sources": sources, "steps": steps,
            "breaking_point_per_s": broken["sent_per_s"] if broken else None,
            "held_per_s": max((s["sent_per_s"] for s in held), default=0),
            "broke_because": broken["broken"] if broken else []}


def markdown(results: dict) -> str:
    """The flood section of bench/RESULTS.md, every label's ramps."""
    lines = ["## Flood: unknown traffic at the listener port (`make bench-flood`)", "",
             "Node (`relay serve`, JWT, one room, 5 established listeners + a fresh join every 0.5 s) on core "
             f"{NODE_CORE}; bench/flood.c on core {FLOOD_CORE} (raw socket, JOIN no cookie / JOIN forged cookie / "
             "KEEPALIVE no session / garbage in turn). Broken: a legitimate session expires, a join takes "
             "over 1 s, or audio loses a packet. CPU per million: node CPU-seconds per million datagrams sent.", ""]
    for label, run in results.items():
        lines += [f"### {label}", "", f"`{run['command']}` ({run['when']}, commit {run['commit']})", "",
                  "| sources | rate asked | sent/s | node cores | CPU-s per M | kernel drops | expired | "
                  "audio lost | join p50 / p99 / max s | failed joins | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in run["ramps"]:
            for s in r["steps"]:
                lines.append(
                    f"| {s['sources']} | {s['rate_asked'] or 'max'} | {s['sent_per_s']:,} | {s['node_cores']} | "
                    f"{s['cpu_s_per_million']} | {s['kernel_drops']:,} | {s['expired'] + s['node_timeouts']} | "
                    f"{s['lost']}/{s['audio'] + s['lost']} | {s['join_p50_s']} / {s['join_p99_s']} / "
                    f"{s['join_max_s']} | {s['failed_joins']} | {'; '.join(s['broken']) or 'held'} |")
        lines.append("")
        for r in run["ramps"]:
            bp = r["breaking_point_per_s"]
            lines.append(f"- {r['sources']} sources: " + (f"broke at {bp:,}/s ({'; '.join(r['broke_because'])})"
                         if bp else f"held at every step, up to {r['held_per_s']:,}/s (the most sent)"))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", default="10,1000,10000", help="comma-separated source-address counts")
    ap.add_argument("--rates", default=",".join(map(str, RATES)), help="datagrams/s per step; 0 = max")
    ap.add_argument("--seconds", type=float, default=8.0, help="each step's length")
    ap.add_argument("--label", default="after", help="the entry of flood.json this run replaces")
    args = ap.parse_args()
    stop_on_signals()
    # the bench's publisher and listeners share the flooder's core: the node has its own
    os.sched_setaffinity(0, {FLOOD_CORE})
    flood = build("flood")
    rates = tuple(int(r) for r in args.rates.split(","))
    ramps = []
    with tempfile.TemporaryDirectory(prefix="flood-") as d:
        for n in (int(x) for x in args.sources.split(",")):
            ramps.append(ramp(flood, n, rates, args.seconds, Path(d)))
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.label] = {"command": "bench/flood.py " + " ".join(sys.argv[1:]), "commit": commit,
                           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "ramps": ramps}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    write_sections(markdown(results), ("## Flood",))
    print(f"wrote {RESULTS} and bench/RESULTS.md")


if __name__ == "__main__":
    main()
