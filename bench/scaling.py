"""Multi-core scaling: delivered listener-packets/s of one relay with 1 and
with 2 sender threads (shards), same workload, interleaved runs, medians.

    .venv/bin/python bench/scaling.py --listeners 4000 --rate 200 --seconds 6 --repeats 3

The publisher sends real Opus packets faster than one core can fan out
(listeners x rate > what one core sends), so the figure is the relay's
ceiling. Receivers are real UDP sockets on distinct loopback addresses that
joined through the control protocol and then never read: the kernel still
does the whole delivery in the sender's context and drops at the full
socket, which keeps the load generator off the CPU the relay is measured on.
Writes bench/results/scaling.json. Reports; never fails on a timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relay.testing.loadgen import LoopbackCrowd, free_port, scrape, wait_ready
from procs import Interrupted, exit_code, spawn, stop_on_signals
from relay.client.publish import RtpPacketizer, encode_tone


def run_once(workers: int, listeners: int, rate: int, seconds: float, payloads: list[bytes]) -> dict:
    listen, admin, ingest = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    cfg = Path(tempfile.mkdtemp()) / "bench.toml"
    cfg.write_text(f'[node]\nlisten = "127.0.0.1:{listen}"\nadmin = "127.0.0.1:{admin}"\n'
                   f'auth = "open"\ndrain_grace = 0\nworkers = {workers}\nmax_listeners = {listeners}\n'
                   f'join_rate = 1000000\n'
                   f'[[room]]\nname = "b"\ningest = "127.0.0.1:{ingest}"\nsources = ["127.0.0.1"]\n'
                   'max_packet_rate = 0\nmax_bitrate = 0\n')   # driven past a publisher's bound on purpose
    relay = spawn([sys.executable, "-m", "relay", "--log-level", "error", "serve", "-c", str(cfg)],
                  stdout=subprocess.DEVNULL)
    crowd = None
    try:
        if not wait_ready(("127.0.0.1", admin), relay):
            raise RuntimeError("relay did not start")
        crowd = LoopbackCrowd(listeners, ("127.0.0.1", listen), "b", rcvbuf=4096)
        joined = crowd.join().accepted
        pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        pub.connect(("127.0.0.1", ingest))
        rtp = RtpPacketizer()
        warm, t_end = 1.0, None
        start = time.monotonic()
        sent = 0
        before = after = None
        while True:
            now = time.monotonic()
            if before is None and now - start >= warm:
                before, t0 = scrape(("127.0.0.1", admin)), time.monotonic()
            if before is not None and now - t0 >= seconds:
                after, t_end = scrape(("127.0.0.1", admin)), time.monotonic()
                break
            pub.send(rtp.packet(payloads[sent % len(payloads)]))
            sent += 1
            delay = start + sent / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        elapsed = t_end - t0
        out = after["relay_packets_out_total"] - before["relay_packets_out_total"]
        cpu = after["relay_process_cpu_seconds_total"] - before["relay_process_cpu_seconds_total"]
        offered = (after["relay_packets_in_total"] - before["relay_packets_in_total"]) * joined
        return {"workers": workers, "listeners": joined, "seconds": elapsed,
                "delivered_per_s": out / elapsed, "offered_per_s": offered / elapsed,
                "relay_cpu_cores": cpu / elapsed,
                "overflow_drops": after['relay_drops_total{reason="overflow"}']}
    finally:
        if crowd is not None:
            crowd.close()
        relay.send_signal(signal.SIGTERM)
        relay.wait(10)
        os.unlink(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listeners", type=int, default=4000)
    ap.add_argument("--rate", type=int, default=200, help="ingest packets/s")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scaling.json"))
    args = ap.parse_args()
    payloads = encode_tone(440.0, 1.0)
    runs = []
    for r in range(args.repeats):
        for workers in (1, 2):  # interleaved: the machine's noise hits both alike
            res = run_once(workers, args.listeners, args.rate, args.seconds, payloads)
            runs.append(res)
            print(f"run {r + 1} workers={workers}: {res['delivered_per_s']:,.0f} delivered/s of "
                  f"{res['offered_per_s']:,.0f} offered, relay CPU {res['relay_cpu_cores']:.2f} cores",
                  flush=True)
    med = {w: statistics.median(x["delivered_per_s"] for x in runs if x["workers"] == w) for w in (1, 2)}
    result = {"listeners": args.listeners, "ingest_rate": args.rate, "runs": runs,
              "median_delivered_per_s": med, "scaling_2_over_1": med[2] / med[1],
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"median delivered/s: 1 worker {med[1]:,.0f}, 2 workers {med[2]:,.0f}; "
          f"scaling {med[2] / med[1]:.2f}x -> {args.out}")


if __name__ == "__main__":
    # peers in process groups of their own, stopped on SIGINT/SIGTERM too
    stop_on_signals()
    try:
        main()
    except Interrupted as e:
        sys.exit(exit_code(e))
