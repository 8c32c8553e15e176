"""Soak: a live room with constant join/leave churn for a long time, watching
the relay's resident memory and open fds (they must stay flat).

    .venv/bin/python bench/soak.py --minutes 10 --listeners 1000 --churn 100

Writes bench/results/soak.json: RSS and fds sampled every 10 s, joins and
leaves done, and the crowd's loss. Bounded in time; loopback only.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relay.testing.loadgen import LoopbackCrowd, free_port, scrape
from procs import Interrupted, exit_code, spawn, stop_on_signals
from relay.wire.protocol import Leave, encode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--listeners", type=int, default=1000)
    ap.add_argument("--churn", type=int, default=100, help="listeners that leave and rejoin each second")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "soak.json"))
    args = ap.parse_args()

    listen, admin, ingest = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    cfg = Path(tempfile.mkdtemp()) / "soak.toml"
    cfg.write_text(f'[node]\nlisten = "127.0.0.1:{listen}"\nadmin = "127.0.0.1:{admin}"\n'
                   f'auth = "open"\ndrain_grace = 0\njoin_rate = 100000\njoin_rate_per_source = 1000\n'
                   f'[[room]]\nname = "soak"\ningest = "127.0.0.1:{ingest}"\nsources = ["127.0.0.1"]\n')
    py = [sys.executable, "-m", "relay"]
    relay = spawn(py + ["--log-level", "warning", "serve", "-c", str(cfg)])
    pub = None
    crowd = None
    try:
        time.sleep(1.5)
        pub = spawn(py + ["publish", "--to", f"127.0.0.1:{ingest}",
                         "--duration", str(args.minutes * 60 + 30)], stderr=subprocess.DEVNULL)
        crowd = LoopbackCrowd(args.listeners, ("127.0.0.1", listen), "soak")
        crowd.join()
        samples, joins, leaves = [], 0, 0
        rng = random.Random(1)
        t0 = time.monotonic()
        next_sample = t0
        while time.monotonic() - t0 < args.minutes * 60:
            for i in rng.sample(sorted(crowd.sessions), min(args.churn, len(crowd.sessions))):
                crowd._send(i, encode(Leave(crowd.sessions.pop(i).session_id)))
                leaves += 1
            joins += crowd.join(timeout=5).accepted - (args.listeners - args.churn)
            crowd.run(1.0)
            if time.monotonic() >= next_sample:
                m = scrape(("127.0.0.1", admin))
                samples.append({"t": round(time.monotonic() - t0, 1),
                                "rss_bytes": m["relay_process_resident_memory_bytes"],
                                "open_fds": m["relay_process_open_fds"],
                                "listeners": m['relay_listeners{room="soak",transport="udp"}']})
                print(f"{samples[-1]['t']:7.0f}s rss {samples[-1]['rss_bytes'] / 2**20:7.1f} MiB "
                      f"fds {samples[-1]['open_fds']:.0f} listeners {samples[-1]['listeners']:.0f}",
                      flush=True)
                next_sample += 10
        first, last = samples[min(1, len(samples) - 1)], samples[-1]
        result = {"minutes": args.minutes, "listeners": args.listeners, "churn_per_s": args.churn,
                  "joins": joins, "leaves": leaves, "samples": samples,
                  "rss_growth_bytes": last["rss_bytes"] - first["rss_bytes"],
                  "fd_growth": last["open_fds"] - first["open_fds"],
                  "crowd": crowd.crowd.totals()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"joins {joins}, leaves {leaves}; RSS {first['rss_bytes'] / 2**20:.1f} -> "
              f"{last['rss_bytes'] / 2**20:.1f} MiB, fds {first['open_fds']:.0f} -> {last['open_fds']:.0f}"
              f" -> {args.out}")
    finally:
        if crowd is not None:
            crowd.close()
        for p in (pub, relay):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(10)
        os.unlink(cfg)


if __name__ == "__main__":
    # peers in process groups of their own, stopped on SIGINT/SIGTERM too
    stop_on_signals()
    try:
        main()
    except Interrupted as e:
        sys.exit(exit_code(e))
