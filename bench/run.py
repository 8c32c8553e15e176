"""The relay against the kernel's limit and against peers, in one run.

    .venv/bin/python bench/run.py            # quick: 100, 1k, 4k listeners (make bench)
    .venv/bin/python bench/run.py --full     # 100, 1k, 10k, 50k (make bench-full)
    .venv/bin/python bench/run.py --smoke    # seconds; what the test suite runs
    .venv/bin/python bench/run.py --replot full   # redraw plots and RESULTS.md from results/full.json

Implementations, each fed the same real Opus stream by a separate publisher
and sending to the same listener sockets (distinct 127.x.y.z addresses):
  limit   bench/limit.c: recv + sendmmsg of the same bytes, nothing else
  relay   `relay serve --workers 1` (one core, like every peer here)
  python  bench/peers/python_relay.py: asyncio/uvloop, transport.sendto per listener
  gst     GStreamer udpsrc ! multiudpsink (C)
Runs are interleaved (limit, relay, python, gst, limit, ...) and medians
quoted with the worst run beside them, because the machine is shared and
noisy. Delivery is counted by the kernel (UDP OutDatagrams, less the
publisher's), CPU by /proc/PID/stat of the sender alone; "per core" means
delivered datagrams per CPU-second the sender used.

The sender is what is measured, so the crowd is kept off its core: the
sender is pinned to the first core this bench may use (sched_setaffinity,
its threads inherit it), and the bench (publisher, handshakes) and the
receivers, bench/recv.c (recvmmsg in batches every 20 ms, never woken by a
datagram), to the others. Each point reports the receivers' CPU and the
datagrams the kernel dropped at their sockets; a point where they did not
keep up (drops over 0.1 % of what was sent, or their core over 90 % busy)
is marked and gets no ratio. Each point also says what bounded it: the
sender (a full core) or the offered rate (the sender had room). On
loopback the kernel's delivery into a receiver's socket runs in the
sender's context, so it is in the sender's CPU, for every implementation
alike.

A point that fails (a peer that does not start, a join that times out) is
recorded with its error in the JSON and the table, and the bench goes on.
Every process it starts has its own process group and is stopped on exit,
on SIGINT and on SIGTERM.

Writes bench/results/<name>.json, its sections of bench/RESULTS.md (the
other benches' kept) and PNG plots. Reports; never fails on a timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from relay.testing.loadgen import (LoopbackCrowd, free_port, histogram_quantile, raise_fd_limit,  # noqa: E402
                           scrape, wait_ready)
from relay.client.publish import RtpPacketizer, encode_tone  # noqa: E402
from procs import (Interrupted, cpu_seconds, exit_code, rss_bytes, spawn, split_cores,  # noqa: E402
                   stop_on_signals, terminate)
from receivers import Receivers, build  # noqa: E402
from results_md import write_sections  # noqa: E402
from run_report import OWNED, markdown, medians, plots  # noqa: E402

PY = sys.executable


def udp_out() -> int:
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("OutDatagrams")])


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}"


class Publisher:
    """Real Opus packets at a fixed rate, paced against the clock."""

    def __init__(self, port: int, rate: int, payloads: list[bytes]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(("127.0.0.1", port))
        self.rate, self.payloads, self.rtp = rate, payloads, RtpPacketizer()
        self.sent = 0
        self.t0 = time.monotonic()

    def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (now := time.monotonic()) < end:
            due = int((now - self.t0) * self.rate)
            while self.sent < due:
                try:
                    self.sock.send(self.rtp.packet(self.payloads[self.sent % len(self.payloads)]))
                except OSError:
                    pass
                self.sent += 1
            time.sleep(min(0.002, max(0.0, end - time.monotonic())))


# the sender's cores and everyone else's (set in main)
SENDER_CORES: set[int] = set()
CROWD_CORES: set[int] = set()


def start_impl(kind: str, ingest: int, dests: Path, crowd: LoopbackCrowd, limit_bin: str,
               listeners: int) -> tuple[subprocess.Popen, dict]:
    """Start one sender on the sender's core; for the relay, join the crowd to it."""
    extra: dict = {}
    on = SENDER_CORES
    if kind == "limit":
        proc = spawn([limit_bin, str(ingest), str(dests)], cores=on, stdout=subprocess.DEVNULL)
        time.sleep(0.3)
    elif kind == "python":
        proc = spawn([PY, str(HERE / "peers" / "python_relay.py"), str(ingest), str(dests)], cores=on)
        time.sleep(1.0)
    elif kind == "gst":
        proc = spawn(["/usr/bin/python3", str(HERE / "peers" / "gst_relay.py"), str(ingest), str(dests)],
                     cores=on, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        # "ready" once every client is added; a peer that hangs is a timeout, not a hung bench
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        if not ready or not proc.stdout.readline():
            terminate(proc)
            raise RuntimeError("gst_relay.py timed out (not ready after 60 s)" if not ready
                               else "gst_relay.py exited before it was ready")
    else:
        listen, admin = free_port(), free_port(socket.SOCK_STREAM)
        cfg = Path(tempfile.mkdtemp()) / "relay.toml"
        cfg.write_text(f'[node]\nlisten = "127.0.0.1:{listen}"\nadmin = "127.0.0.1:{admin}"\n'
                       f'auth = "open"\nworkers = 1\ndrain_grace = 0\nmax_listeners = {listeners + 16}\n'
                       f'join_rate = 1000000\njoin_rate_per_source = 1000\n[[room]]\nname = "b"\n'
                       f'ingest = "127.0.0.1:{ingest}"\nsources = ["127.0.0.1"]\n'
                       # the bench drives the room past a publisher's default bound on purpose
                       'max_packet_rate = 0\nmax_bitrate = 0\n')
        proc = spawn([PY, "-m", "relay", "--log-level", "error", "serve", "-c", str(cfg)], cores=on,
                     stdout=subprocess.DEVNULL)
        try:
            if not wait_ready(("127.0.0.1", admin), proc, timeout=15):
                raise RuntimeError("relay did not start within 15 s")
            extra["rss_before_join"] = rss_bytes(proc.pid)
            crowd.retarget(("127.0.0.1", listen), "b")
            joined = crowd.join(timeout=60)
            if joined.accepted < listeners:
                raise RuntimeError(f"{joined.accepted} of {listeners} listeners joined "
                                   f"({joined.unanswered} unanswered, rejected {joined.rejected})")
        except BaseException:
            terminate(proc)
            raise
        extra.update(admin=("127.0.0.1", admin), joined=joined.accepted)
    return proc, extra


def bound_by(res: dict) -> str:
    """What set the pace of a run: the receivers (then no ratio), the sender
    (a full core), or the offered rate (the sender had room)."""
    if not res["receivers_kept_up"]:
        return "receivers"
    if res["cpu_cores"] >= 0.9 or res["delivered_per_s"] < 0.97 * res["offered_per_s"]:
        return "sender"
    return "offered"


def throughput_run(kind: str, listeners: int, crowd: LoopbackCrowd, dests: Path, limit_bin: str,
                   payloads: list[bytes], seconds: float) -> dict:
    ingest = free_port()
    rate = max(50, min(500, 150_000 // listeners))
    proc, extra = start_impl(kind, ingest, dests, crowd, limit_bin, listeners)
    receivers = None
    try:
        # after the relay's handshakes, which the receivers would otherwise read
        receivers = Receivers(crowd.socks, CROWD_CORES)
        pub = Publisher(ingest, rate, payloads)
        pub.run_for(min(1.0, seconds / 2))  # warm up: rings touched, caches warm
        before = scrape(extra["admin"]) if kind == "relay" else None
        receivers.mark()
        out0, cpu0, sent0, t0 = udp_out(), cpu_seconds(proc.pid), pub.sent, time.monotonic()
        pub.run_for(seconds)
        out1, cpu1, sent1, t1 = udp_out(), cpu_seconds(proc.pid), pub.sent, time.monotonic()
        delivered = (out1 - out0) - (sent1 - sent0)
        res = {"impl": kind, "listeners": listeners, "ingest_rate": rate, "seconds": t1 - t0,
               "delivered_per_s": delivered / (t1 - t0),
               "offered_per_s": (sent1 - sent0) * listeners / (t1 - t0),
               "cpu_cores": (cpu1 - cpu0) / (t1 - t0),
               "delivered_per_core_s": delivered / max(1e-9, cpu1 - cpu0),
               "sender_cores": sorted(SENDER_CORES), "receiver_cores": sorted(CROWD_CORES)}
        res.update(receivers.since_mark(t1 - t0, delivered))
        res["bound_by"] = bound_by(res)
        if kind == "relay":
            after = scrape(extra["admin"])
            counted = after["relay_packets_out_total"] - before["relay_packets_out_total"]
            res["relay_counted_per_s"] = counted / (t1 - t0)
            res["latency_p50_s"] = histogram_quantile(after, "relay_fanout_latency_seconds", 0.5)
            res["latency_p99_s"] = histogram_quantile(after, "relay_fanout_latency_seconds", 0.99)
            res["latency_buckets"] = {k.split('le="')[1].rstrip('"}'): v for k, v in after.items()
                                      if k.startswith("relay_fanout_latency_seconds_bucket")}
            res["rss_per_listener_bytes"] = (rss_bytes(proc.pid) - extra["rss_before_join"]) / max(1, extra["joined"])
            res["joined"] = extra["joined"]
        return res
    finally:
        if receivers is not None:
            receivers.close()
        terminate(proc)


def callgrind(kind: str, listeners: int, packets: int, limit_bin: str, dests: Path) -> float | None:
    """User-space instructions per delivered listener-packet (P packets minus
    a P=0 run of the same program, over listeners * P)."""
    if not shutil.which("valgrind"):
        return None
    totals = []
    for p in (0, packets):
        out = Path(tempfile.mkdtemp()) / "cg.out"
        if kind == "limit":
            cmd, env = [limit_bin, "0", str(dests)], dict(os.environ, LIMIT_PACKETS=str(p))
        else:
            cmd = [PY, str(HERE / "cg_workload.py"), kind, str(listeners), str(p)]
            env = dict(os.environ, PYTHONHASHSEED="0")
        try:
            r = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"] + cmd,
                               env=env, capture_output=True, text=True, timeout=1800, process_group=0)
        except subprocess.TimeoutExpired:
            return None     # reported as not measured; the bench goes on
        line = [x for x in r.stderr.splitlines() if "Collected" in x]
        if not line:
            return None
        totals.append(int(line[-1].split(":")[-1].strip()))
    return (totals[1] - totals[0]) / (listeners * packets)


def storm(existing_n: int, storm_n: int, payloads: list[bytes] | None = None) -> dict:
    """Existing listeners stream while storm_n joins arrive within a second."""
    ingest, listen, admin = free_port(), free_port(), free_port(socket.SOCK_STREAM)
    cfg = Path(tempfile.mkdtemp()) / "relay.toml"
    cfg.write_text(f'[node]\nlisten = "127.0.0.1:{listen}"\nadmin = "127.0.0.1:{admin}"\nauth = "open"\n'
                   'drain_grace = 0\n'
                   f'max_listeners = {existing_n + storm_n}\njoin_rate = 100000\n'
                   f'[[room]]\nname = "s"\ningest = "127.0.0.1:{ingest}"\nsources = ["127.0.0.1"]\n')
    proc = spawn([PY, "-m", "relay", "--log-level", "error", "serve", "-c", str(cfg)], cores=SENDER_CORES,
                 stdout=subprocess.DEVNULL)
    existing = newcomers = pub = None
    try:
        time.sleep(1.5)
        existing = LoopbackCrowd(existing_n, ("127.0.0.1", listen), "s")
        newcomers = LoopbackCrowd(storm_n, ("127.0.0.1", listen), "s", first_address=existing_n)
        # a publisher of its own: this thread stalls while it answers the
        # storm's handshakes, and an in-process publisher would then burst
        pub = spawn([PY, "-m", "relay", "publish", "--to", f"127.0.0.1:{ingest}", "--duration", "60"],
                    stderr=subprocess.DEVNULL)
        existing.join()
        timeline = []
        t_start = time.monotonic()

        def sample(label: str) -> None:
            existing.crowd.poll(0)
            timeline.append({"t": round(time.monotonic() - t_start, 3), "phase": label,
                             "existing_received": existing.crowd.totals()["received"],
                             "new_accepted": len(newcomers.sessions)})

        for _ in range(20):
            existing.crowd.poll(100)
            sample("before")
        before = existing.crowd.totals()
        storm_t0 = time.monotonic_ns()
        res = newcomers.join(timeout=10, attempts=1, retry_limited=False)
        sample("storm")
        for _ in range(30):
            t_next = time.monotonic() + 0.1
            while time.monotonic() < t_next:
                existing.crowd.poll(10)
                newcomers.crowd.poll(0)
            sample("after")
        after = existing.crowd.totals()
        firsts = sorted((newcomers.crowd.member(i)["first_rx_ns"] - storm_t0) / 1e9
                        for i in newcomers.sessions if newcomers.crowd.member(i)["first_rx_ns"])
        return {"existing": existing_n, "storm": storm_n, "join_seconds": res.seconds,
                "accepted": res.accepted, "rejected": res.rejected, "unanswered": res.unanswered,
                "existing_lost": after["lost"] - before["lost"],
                "existing_received_during": after["received"] - before["received"],
                "first_audio_p50_s": firsts[len(firsts) // 2] if firsts else None,
                "first_audio_p99_s": firsts[int(len(firsts) * 0.99)] if firsts else None,
                "timeline": timeline}
    finally:
        for c in (existing, newcomers):
            if c is not None:
                c.close()
        for p in (pub, proc):
            if p is not None:
                terminate(p)


def run_points(result: dict, counts: list[int], impls: list[str], repeats: int, seconds: float,
               limit_bin: str, payloads: list[bytes]) -> None:
    """Every implementation at every listener count, interleaved; a run that
    fails is recorded with its error and the next one goes on."""
    for L in counts:
        # unconnected: a connected socket refuses datagrams from the peers
        # (the kernel would answer them with ICMP, which costs the sender)
        try:
            crowd = LoopbackCrowd(L, ("127.0.0.1", 9), "b", rcvbuf=4096, connected=False)
        except OSError as e:
            # recorded for every implementation at this count; the next count goes on
            result["runs"] += [{"impl": impl, "listeners": L, "error": f"the listeners' sockets: {e}"}
                               for impl in impls]
            result["medians"][str(L)] = medians(result, impls, L)
            continue
        dests = Path(tempfile.mkdtemp()) / "dests.txt"
        dests.write_text("".join(f"{s.getsockname()[0]} {s.getsockname()[1]}\n" for s in crowd.socks))
        try:
            for r in range(repeats):
                for impl in impls:
                    try:
                        res = throughput_run(impl, L, crowd, dests, limit_bin, payloads, seconds)
                    except Exception as e:  # noqa: BLE001 -- recorded; the bench goes on
                        res = {"impl": impl, "listeners": L, "error": f"{type(e).__name__}: {e}"}
                        print(f"{L:>6} listeners  {impl:<6} run {r + 1}: failed: {res['error']}", flush=True)
                    else:
                        print(f"{L:>6} listeners  {impl:<6} run {r + 1}: {res['delivered_per_s']:>10,.0f} "
                              f"delivered/s {res['cpu_cores']:.2f} cores  "
                              f"{res['delivered_per_core_s']:>10,.0f} per core-s  bound by {res['bound_by']}; "
                              f"receivers {res['receivers_cpu_cores']:.2f} cores, "
                              f"{res['receivers_dropped']} dropped", flush=True)
                    result["runs"].append(res)
        finally:
            crowd.close()
            result["medians"][str(L)] = medians(result, impls, L)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true")
    mode.add_argument("--smoke", action="store_true")
    ap.add_argument("--name", help="results name (default: quick, full or smoke)")
    ap.add_argument("--impls", default="limit,relay,python,gst")
    ap.add_argument("--counts", help="listener counts, comma-separated (instead of the mode's)")
    ap.add_argument("--seconds", type=float, help="measured seconds per run (instead of the mode's)")
    ap.add_argument("--repeats", type=int, help="runs per point (instead of the mode's)")
    ap.add_argument("--no-callgrind", action="store_true")
    ap.add_argument("--no-storm", action="store_true")
    args = ap.parse_args()
    stop_on_signals()
    if args.full:
        name, counts, seconds, repeats = "full", [100, 1000, 10000, 50000], 6.0, 3
        cg, storm_n = (1000, 100), (1000, 10000)
    elif args.smoke:
        name, counts, seconds, repeats, cg, storm_n = "smoke", [50], 0.5, 1, None, (30, 200)
    else:
        name, counts, seconds, repeats = "quick", [100, 1000, 4000], 3.0, 2
        cg, storm_n = (500, 100), (300, 3000)
    counts = [int(c) for c in args.counts.split(",")] if args.counts else counts
    seconds, repeats = args.seconds or seconds, args.repeats or repeats
    cg = None if args.no_callgrind else cg
    name = args.name or name
    impls = [i for i in args.impls.split(",") if i]
    if "gst" in impls and not (os.path.exists("/usr/bin/python3") and subprocess.run(
            ["/usr/bin/python3", "-c", "import gi; gi.require_version('Gst', '1.0')"],
            capture_output=True).returncode == 0):
        print("bench: GStreamer's Python bindings are missing (apt-get install python3-gi "
              "gir1.2-gstreamer-1.0 gstreamer1.0-plugins-good); skipping the gst peer", file=sys.stderr)
        impls.remove("gst")
    raise_fd_limit(max(counts) + storm_n[0] + storm_n[1] + 512)
    import resource
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    skipped = [L for L in counts if L + 512 > fd_limit]
    for L in skipped:
        # the crowd lives in this one process; splitting it over processes is still to do
        print(f"bench: skipping {L} listeners: this process may open only {fd_limit} files",
              file=sys.stderr)
    counts = [L for L in counts if L not in skipped]
    sender, crowd_cores = split_cores()
    SENDER_CORES.update(sender)
    CROWD_CORES.update(crowd_cores)
    # this process (publisher, handshakes) stays off the sender's core too
    os.sched_setaffinity(0, crowd_cores)
    limit_bin = build("limit")
    payloads = encode_tone(440.0, 2.0)
    result: dict = {"name": name, "machine": machine(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                    "repeats": repeats, "runs": [], "medians": {}, "latency_buckets": {},
                    "skipped_listener_counts": skipped,
                    "cores": {"sender": sorted(sender), "crowd": sorted(crowd_cores)}}
    code = 0
    try:
        run_points(result, counts, impls, repeats, seconds, limit_bin, payloads)
        if cg:
            d = Path(tempfile.mkdtemp()) / "cgdests.txt"
            d.write_text("".join(f"127.1.{i // 250}.{1 + i % 250} 9\n" for i in range(cg[0])))
            result["callgrind"] = {"listeners": cg[0], "packets": cg[1]}
            for impl in ("limit", "relay", "python"):
                result["callgrind"][impl] = callgrind(impl, cg[0], cg[1], limit_bin, d)
                print(f"callgrind {impl}: {result['callgrind'][impl]} instructions per listener-packet",
                      flush=True)
        if not args.no_storm:
            try:
                result["storm"] = storm(*storm_n, payloads)
                st = result["storm"]
                print(f"storm: {st['accepted']} accepted, rejected {st['rejected']}, "
                      f"existing lost {st['existing_lost']}", flush=True)
            except Exception as e:  # noqa: BLE001 -- recorded; the report is still written
                result["storm"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"storm: failed: {result['storm']['error']}", flush=True)
    except Interrupted as e:
        result["interrupted"] = str(e)
        print(f"interrupted by {e}: stopped every process the bench started", flush=True)
        code = exit_code(e)
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    result["plots"] = plots(result, out_dir) if not (args.smoke or code) else []
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    if not (args.smoke or code or args.name):
        # a run under a name of its own (a test, a trial) leaves RESULTS.md alone
        write_sections(md, OWNED, top=True)
    print(md)
    return code


def replot(name: str) -> None:
    """Redraw the plots and run.py's sections of RESULTS.md from a saved results file."""
    out_dir = HERE / "results"
    result = json.loads((out_dir / f"{name}.json").read_text())
    result["plots"] = plots(result, out_dir)
    write_sections(markdown(result), OWNED, top=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":
        replot(sys.argv[2])
    else:
        sys.exit(main())
