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
quoted, because the machine is shared and noisy. Delivery is counted by the
kernel (UDP OutDatagrams, less the publisher's), CPU by /proc/PID/stat;
"per core" means delivered datagrams per CPU-second the implementation used.
Listener sockets never read after joining: the kernel still does the whole
delivery (in the sender's context on loopback) and drops at the full socket,
which keeps the load generator off the cores being measured.

Writes bench/results/<name>.json, bench/RESULTS.md and PNG plots. Reports;
never fails on a timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
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
from procs import cpu_seconds, rss_bytes, terminate  # noqa: E402

PY = sys.executable


def udp_out() -> int:
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("OutDatagrams")])


def build_limit() -> str:
    out = Path(tempfile.gettempdir()) / "relay-bench-limit"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(HERE / "limit.c")], check=True)
    return str(out)


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


def start_impl(kind: str, ingest: int, dests: Path, crowd: LoopbackCrowd, limit_bin: str,
               listeners: int) -> tuple[subprocess.Popen, dict]:
    extra: dict = {}
    if kind == "limit":
        proc = subprocess.Popen([limit_bin, str(ingest), str(dests)], stdout=subprocess.DEVNULL)
        time.sleep(0.3)
    elif kind == "python":
        proc = subprocess.Popen([PY, str(HERE / "peers" / "python_relay.py"), str(ingest), str(dests)])
        time.sleep(1.0)
    elif kind == "gst":
        proc = subprocess.Popen(["/usr/bin/python3", str(HERE / "peers" / "gst_relay.py"), str(ingest),
                                 str(dests)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        proc.stdout.readline()  # "ready" once every client is added
    else:
        listen, admin = free_port(), free_port(socket.SOCK_STREAM)
        cfg = Path(tempfile.mkdtemp()) / "relay.toml"
        cfg.write_text(f'[node]\nlisten = "127.0.0.1:{listen}"\nadmin = "127.0.0.1:{admin}"\n'
                       f'auth = "open"\nworkers = 1\ndrain_grace = 0\nmax_listeners = {listeners + 16}\n'
                       f'join_rate = 1000000\njoin_rate_per_source = 1000\n[[room]]\nname = "b"\n'
                       f'ingest = "127.0.0.1:{ingest}"\nsources = ["127.0.0.1"]\n'
                       # the bench drives the room past a publisher's default bound on purpose
                       'max_packet_rate = 0\nmax_bitrate = 0\n')
        proc = subprocess.Popen([PY, "-m", "relay", "--log-level", "error", "serve", "-c", str(cfg)],
                                stdout=subprocess.DEVNULL)
        if not wait_ready(("127.0.0.1", admin), proc, timeout=15):
            raise RuntimeError("relay did not start")
        extra["rss_before_join"] = rss_bytes(proc.pid)
        crowd.retarget(("127.0.0.1", listen), "b")
        joined = crowd.join(timeout=60)
        extra.update(admin=("127.0.0.1", admin), joined=joined.accepted)
    return proc, extra


def throughput_run(kind: str, listeners: int, crowd: LoopbackCrowd, dests: Path, limit_bin: str,
                   payloads: list[bytes], seconds: float) -> dict:
    ingest = free_port()
    rate = max(50, min(500, 150_000 // listeners))
    proc, extra = start_impl(kind, ingest, dests, crowd, limit_bin, listeners)
    try:
        pub = Publisher(ingest, rate, payloads)
        pub.run_for(min(1.0, seconds / 2))  # warm up: rings touched, caches warm
        before = scrape(extra["admin"]) if kind == "relay" else None
        out0, cpu0, sent0, t0 = udp_out(), cpu_seconds(proc.pid), pub.sent, time.monotonic()
        pub.run_for(seconds)
        out1, cpu1, sent1, t1 = udp_out(), cpu_seconds(proc.pid), pub.sent, time.monotonic()
        delivered = (out1 - out0) - (sent1 - sent0)
        res = {"impl": kind, "listeners": listeners, "ingest_rate": rate, "seconds": t1 - t0,
               "delivered_per_s": delivered / (t1 - t0),
               "offered_per_s": (sent1 - sent0) * listeners / (t1 - t0),
               "cpu_cores": (cpu1 - cpu0) / (t1 - t0),
               "delivered_per_core_s": delivered / max(1e-9, cpu1 - cpu0)}
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
        r = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"] + cmd,
                           env=env, capture_output=True, text=True, timeout=1800)
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
    proc = subprocess.Popen([PY, "-m", "relay", "--log-level", "error", "serve", "-c", str(cfg)],
                            stdout=subprocess.DEVNULL)
    existing = newcomers = pub = None
    try:
        time.sleep(1.5)
        existing = LoopbackCrowd(existing_n, ("127.0.0.1", listen), "s")
        newcomers = LoopbackCrowd(storm_n, ("127.0.0.1", listen), "s", first_address=existing_n)
        # a publisher of its own: this thread stalls while it answers the
        # storm's handshakes, and an in-process publisher would then burst
        pub = subprocess.Popen([PY, "-m", "relay", "publish", "--to", f"127.0.0.1:{ingest}",
                                "--duration", "60"], stderr=subprocess.DEVNULL)
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
                p.send_signal(signal.SIGTERM)
                p.wait(10)


def plots(result: dict, out_dir: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    med = result["medians"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in ("limit", "relay", "gst", "python"):
        pts = sorted((int(L), v[impl]["delivered_per_core_s"]) for L, v in med.items() if impl in v)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    ax.set_xscale("log")
    ax.set_xlabel("listeners")
    ax.set_ylabel("delivered packets per CPU-second")
    ax.set_title("Fan-out throughput per core (loopback)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=110)
    made.append("throughput.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for L, runs in sorted(result["latency_buckets"].items(), key=lambda x: int(x[0])):
        pts = sorted((float(k), v) for k, v in runs.items() if k != "+Inf")
        total = runs.get("+Inf") or (pts[-1][1] if pts else 0)
        if total:
            ax.step([p[0] * 1e3 for p in pts], [p[1] / total for p in pts], where="post", label=f"{L} listeners")
    ax.set_xscale("log")
    ax.set_xlabel("fan-out latency, ingest to last send (ms)")
    ax.set_ylabel("fraction of packets")
    ax.set_title("Fan-out latency CDF (relay, 1 core)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "latency_cdf.png", dpi=110)
    made.append("latency_cdf.png")
    plt.close(fig)

    if result.get("storm"):
        tl = result["storm"]["timeline"]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        t = [p["t"] for p in tl]
        rate = [0.0] + [(tl[i]["existing_received"] - tl[i - 1]["existing_received"]) / max(1e-3, t[i] - t[i - 1])
                        for i in range(1, len(tl))]
        ax.plot(t, rate, label="packets/s received by existing listeners")
        ax2 = ax.twinx()
        ax2.plot(t, [p["new_accepted"] for p in tl], color="tab:red", label="newcomers accepted")
        ax.set_xlabel("seconds")
        ax.set_ylabel("packets/s (existing listeners)")
        ax2.set_ylabel("newcomers accepted")
        ax.set_title("Join storm")
        # the bench's one thread answers the newcomers' handshakes during the
        # storm, so the existing crowd is read late, not served late
        ax.text(0.02, 0.04, f"existing listeners lost {result['storm']['existing_lost']} packets; the dip and "
                "spike are the bench reading them late", transform=ax.transAxes, fontsize=8)
        fig.legend(loc="center right")
        fig.tight_layout()
        fig.savefig(out_dir / "storm.png", dpi=110)
        made.append("storm.png")
        plt.close(fig)
    return made


def markdown(result: dict) -> str:
    lines = [f"# Benchmark results: {result['name']}", "",
             f"Machine: {result['machine']}. Command: `{result['command']}`. "
             f"Runs interleaved, {result['repeats']} per point, medians.", "",
             "## Throughput (delivered listener-packets)", "",
             "| listeners | impl | delivered/s | CPU cores | per core-second "
             "| vs limit (per core) | vs python | vs gst |",
             "|---|---|---|---|---|---|---|---|"]
    for L, v in sorted(result["medians"].items(), key=lambda x: int(x[0])):
        lim = v.get("limit", {}).get("delivered_per_core_s")
        pyv = v.get("python", {}).get("delivered_per_core_s")
        gst = v.get("gst", {}).get("delivered_per_core_s")
        for impl in ("limit", "relay", "gst", "python"):
            if impl not in v:
                continue
            x = v[impl]
            pc = x["delivered_per_core_s"]
            ratios = " | ".join(f"{pc / base:.2f}x" if base else "-" for base in (lim, pyv, gst))
            lines.append(f"| {L} | {impl} | {x['delivered_per_s']:,.0f} | {x['cpu_cores']:.2f} | {pc:,.0f} | "
                         f"{ratios} |")
    lines += ["", "## Relay figures", "", "| listeners | fan-out p50 | p99 | RSS per listener |", "|---|---|---|---|"]
    for L, v in sorted(result["medians"].items(), key=lambda x: int(x[0])):
        r = v.get("relay")
        if r:
            fmt = lambda s: f"{s * 1e3:.2f} ms" if s is not None else "-"  # noqa: E731
            lines.append(f"| {L} | {fmt(r.get('latency_p50_s'))} | {fmt(r.get('latency_p99_s'))} | "
                         f"{r.get('rss_per_listener_bytes', 0) / 1024:.1f} KiB |")
    cg = result.get("callgrind") or {}
    if cg:
        lines += ["", f"## User-space instructions per delivered listener-packet (callgrind, "
                      f"{cg.get('listeners')} listeners x {cg.get('packets')} packets)", "",
                  "| impl | instructions |", "|---|---|"]
        for impl in ("limit", "relay", "python"):
            if cg.get(impl) is not None:
                lines.append(f"| {impl} | {cg[impl]:.0f} |")
    st = result.get("storm")
    if st:
        lines += ["", "## Join storm", "",
                  f"{st['storm']} joins sent within {st['join_seconds']:.2f} s while {st['existing']} "
                  f"listeners streamed: {st['accepted']} accepted, rejected {st['rejected']}, "
                  f"{st['unanswered']} unanswered. Existing listeners lost **{st['existing_lost']}** packets "
                  f"(received {st['existing_received_during']}). Time to first audio for newcomers: "
                  f"p50 {st['first_audio_p50_s'] or 0:.3f} s, p99 {st['first_audio_p99_s'] or 0:.3f} s."]
    if result.get("skipped_listener_counts"):
        lines += ["", f"Not measured: {result['skipped_listener_counts']} listeners (more sockets than one "
                      "process may open here)."]
    lines += ["", "Plots: " + ", ".join(f"[{p}](results/{p})" for p in result.get("plots", [])), ""]
    quic = HERE / "results" / "quic.json"
    if quic.exists():
        # the QUIC figures come from their own, slower run (make bench-quic)
        from quic import markdown as quic_markdown
        lines += [quic_markdown(json.loads(quic.read_text()))]
    return "\n".join(lines)


def medians(result: dict, impls: list[str], listeners: int) -> dict:
    """Per implementation, the medians of its runs at this listener count
    (and, for the relay, keep its last run's latency buckets)."""
    med = {}
    for impl in impls:
        rs = [x for x in result["runs"] if x["impl"] == impl and x["listeners"] == listeners]
        med[impl] = {k: statistics.median(x[k] for x in rs) for k in ("delivered_per_s", "cpu_cores",
                                                                      "delivered_per_core_s")}
        if impl == "relay":
            for k in ("latency_p50_s", "latency_p99_s", "rss_per_listener_bytes"):
                vals = [x[k] for x in rs if x.get(k) is not None]
                med[impl][k] = statistics.median(vals) if vals else None
            result["latency_buckets"][str(listeners)] = rs[-1]["latency_buckets"]
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true")
    mode.add_argument("--smoke", action="store_true")
    ap.add_argument("--name", help="results name (default: quick, full or smoke)")
    ap.add_argument("--impls", default="limit,relay,python,gst")
    args = ap.parse_args()
    if args.full:
        name, counts, seconds, repeats = "full", [100, 1000, 10000, 50000], 6.0, 3
        cg, storm_n = (1000, 100), (1000, 10000)
    elif args.smoke:
        name, counts, seconds, repeats, cg, storm_n = "smoke", [50], 0.5, 1, None, (30, 200)
    else:
        name, counts, seconds, repeats = "quick", [100, 1000, 4000], 3.0, 2
        cg, storm_n = (500, 100), (300, 3000)
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
    limit_bin = build_limit()
    payloads = encode_tone(440.0, 2.0)
    result: dict = {"name": name, "machine": machine(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                    "repeats": repeats, "runs": [], "medians": {}, "latency_buckets": {},
                    "skipped_listener_counts": skipped}
    for L in counts:
        # unconnected: a connected socket refuses datagrams from the peers
        # (the kernel would answer them with ICMP, which costs the sender)
        crowd = LoopbackCrowd(L, ("127.0.0.1", 9), "b", rcvbuf=4096, connected=False)
        dests = Path(tempfile.mkdtemp()) / "dests.txt"
        dests.write_text("".join(f"{s.getsockname()[0]} {s.getsockname()[1]}\n" for s in crowd.socks))
        try:
            for r in range(repeats):
                for impl in impls:
                    res = throughput_run(impl, L, crowd, dests, limit_bin, payloads, seconds)
                    result["runs"].append(res)
                    print(f"{L:>6} listeners  {impl:<6} run {r + 1}: {res['delivered_per_s']:>10,.0f} "
                          f"delivered/s {res['cpu_cores']:.2f} cores  "
                          f"{res['delivered_per_core_s']:>10,.0f} per core-s", flush=True)
        finally:
            crowd.close()
        result["medians"][str(L)] = medians(result, impls, L)
    if cg:
        d = Path(tempfile.mkdtemp()) / "cgdests.txt"
        d.write_text("".join(f"127.1.{i // 250}.{1 + i % 250} 9\n" for i in range(cg[0])))
        result["callgrind"] = {"listeners": cg[0], "packets": cg[1]}
        for impl in ("limit", "relay", "python"):
            result["callgrind"][impl] = callgrind(impl, cg[0], cg[1], limit_bin, d)
            print(f"callgrind {impl}: {result['callgrind'][impl]} instructions per listener-packet", flush=True)
    result["storm"] = storm(*storm_n, payloads)
    st = result["storm"]
    print(f"storm: {st['accepted']} accepted, rejected {st['rejected']}, "
          f"existing lost {st['existing_lost']}", flush=True)
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    result["plots"] = plots(result, out_dir) if not args.smoke else []
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    if not args.smoke:
        (HERE / "RESULTS.md").write_text(md)
    print(md)


def replot(name: str) -> None:
    """Redraw the plots and RESULTS.md from a saved results file."""
    out_dir = HERE / "results"
    result = json.loads((out_dir / f"{name}.json").read_text())
    result["plots"] = plots(result, out_dir)
    (HERE / "RESULTS.md").write_text(markdown(result))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":
        replot(sys.argv[2])
    else:
        main()
