"""AF_XDP egress against the kernel's sendmmsg limit, on a real data path.

A namespace and a veth pair (relay/testing/veth.py); on the peer an XDP
program counts every frame and drops it (bench/xdp_count.py), the same
cheap receiver for every contender. In the same run and on the same veth,
interleaved, each repeat:

  limit     bench/limit.c: recv + sendmmsg of the same bytes, nothing else
  sendmmsg  the relay's core with its sendmmsg egress (bench/xdp_sender.py)
  xdp       the same with egress = "xdp" (AF_XDP, copy mode: veth has no
            zero-copy; the bench records what the kernel says to it)

The sender runs pinned to core 0, the ingest feeder (this process) on the
others. Figure: frames counted at the peer per CPU-second of the sending
process (user + system, all its threads) over a window after a warm-up,
with the ingest rate set to offer more than one core can send; its ratio
to the limit of the same repeat; median and worst over repeats. The CPU
counted is the sender process's plus its core's ksoftirqd's: on a veth
the peer's receive runs on the sending core, in softirq (charged to the
sender here: no IRQ time accounting) or in ksoftirqd, which the process's
time alone leaves out (the limit was seen at 0.66 of its core by process
time while the core was full). The core's whole busy time is recorded
too, but other people's processes on a shared machine land in it. Loss
is what the sender says it sent minus what the peer counted, over the run
(slightly negative: the peer also counts the odd IPv6 ND frame).

    make bench-xdp      (root)
    python bench/xdp.py --listeners 1000,10000,50000 --repeats 3 --seconds 3
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
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from procs import cpu_seconds, spawn  # noqa: E402
from receivers import build  # noqa: E402
from results_md import write_sections  # noqa: E402

from relay._core import Core, XdpEgress  # noqa: E402
from relay.testing.veth import Veth, can_make, veth_pair  # noqa: E402
from tests.rtp import rtp  # noqa: E402

OWNED = ("## AF_XDP egress",)
KINDS = ("limit", "sendmmsg", "xdp")
OFFERED = 3_000_000          # listener-packets a second offered: more than one core sends here
PORT0 = 10000
SENDER_CORE = {0}


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    return f"{model}, {os.cpu_count()} cores, Linux {platform.release()}"


class Peer:
    """The counting XDP program on the peer, asked for its count over a pipe."""

    def __init__(self, v: Veth) -> None:
        self.proc = v.run(sys.executable, str(HERE / "xdp_count.py"), v.peer, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        word, self.mode = self.proc.stdout.readline().split()
        assert word == "ready"

    def count(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("c\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(5)


def core_busy_s(cpu: int) -> float:
    """Seconds CPU `cpu` has been busy (user, system, interrupts, softirq,
    steal): the sender's core, including the veth receive work the kernel
    runs there in softirq or ksoftirqd, which process CPU time leaves out."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    raise OSError(f"no cpu{cpu} in /proc/stat")


def ksoftirqd(cpu: int) -> int:
    """The pid of CPU `cpu`'s softirq thread."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == f"ksoftirqd/{cpu}":
                    return int(d.name)
            except OSError:
                continue
    raise OSError(f"no ksoftirqd/{cpu}")


def feeder(port: int, rate: float, stop: threading.Event) -> None:
    """172-byte RTP packets (64 kbit/s Opus-sized) to the sender's ingest, paced."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    t0, n = time.monotonic(), 0
    while not stop.is_set():
        due = t0 + n / rate
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, 0.05))
            continue
        s.sendto(rtp(n & 0xFFFF, 960 * n, 0xABCD, bytes(160)), ("127.0.0.1", port))
        n += 1
    s.close()


def one_run(kind: str, n: int, v: Veth, peer: Peer, limit_bin: str, dests: Path, a: argparse.Namespace,
            port: int) -> dict:
    """One contender at one size: frames per CPU-second of the sender, and loss."""
    if kind == "limit":
        cmd = [limit_bin, str(port), str(dests), str(a.warmup + a.seconds + 30)]
        env = dict(os.environ, LIMIT_FROM=v.local4)
    else:
        cmd = [sys.executable, str(HERE / "xdp_sender.py"), "--ingest", str(port), "--to", v.peer4,
               "--from", v.local4, "--port0", str(PORT0), "--listeners", str(n), "--egress", kind,
               "--iface", v.local, "--seconds", str(a.warmup + a.seconds + 60)]
        env = dict(os.environ)
    proc = spawn(cmd, cores=SENDER_CORE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    if kind != "limit" and proc.stdout.readline().strip() != "ready":
        proc.wait(10)
        raise RuntimeError(f"{kind}: the sender did not start (exit {proc.returncode})")
    time.sleep(0.3)
    stop = threading.Event()
    before = peer.count()
    feed = threading.Thread(target=feeder, args=(port, OFFERED / n, stop), daemon=True)
    feed.start()
    time.sleep(a.warmup)
    core = min(SENDER_CORE)
    soft = ksoftirqd(core)
    c0, t0, b0, w0 = peer.count(), cpu_seconds(proc.pid) + cpu_seconds(soft), core_busy_s(core), time.monotonic()
    if kind in a.profile:
        perf_data = f"/tmp/relay-xdp-{kind}-{n}.perf"
        subprocess.run(["perf", "record", "-q", "-C", str(core), "-o", perf_data, "--", "sleep", str(a.seconds)],
                       check=True, capture_output=True)
    else:
        time.sleep(a.seconds)
    c1, t1, b1, w1 = peer.count(), cpu_seconds(proc.pid) + cpu_seconds(soft), core_busy_s(core), time.monotonic()
    stop.set()
    feed.join()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=30)[0]
    time.sleep(0.2)
    received = peer.count() - before
    xdp = None
    if kind == "limit":
        sent = int(out.split()[-1])
    else:
        report = json.loads(out.strip().splitlines()[-1])
        sent, xdp = report["sent"], report["xdp"]
    cpu, busy = t1 - t0, b1 - b0
    return {"kind": kind, "listeners": n, "delivered_per_s": (c1 - c0) / (w1 - w0),
            "core_busy": busy / (w1 - w0), "sender_cores": cpu / (w1 - w0),
            "per_core_s": (c1 - c0) / cpu if cpu > 0 else 0.0,
            "per_busy_core_s": (c1 - c0) / busy if busy > 0 else 0.0,
            "sent": sent, "received": received, "loss": 1 - received / sent if sent else 0.0,
            "xdp_counters": xdp}


def profile(kind: str, n: int, top: int = 25) -> list[str]:
    """The sender core's hottest symbols during the window (perf, kernel and user)."""
    out = subprocess.run(["perf", "report", "-q", "-i", f"/tmp/relay-xdp-{kind}-{n}.perf", "--no-children",
                          "--sort", "symbol", "--percent-limit", "0.7"], capture_output=True, text=True).stdout
    return [" ".join(line.split()) for line in out.splitlines() if line.strip() and "%" in line][:top]


def zerocopy_refusal(v: Veth) -> str:
    """What the kernel says to an AF_XDP zero-copy bind on our veth end."""
    core = Core(1)
    err, step = XdpEgress(core).open(0, socket.if_nametoindex(v.local), 0, zerocopy=True)
    return "accepted" if not err else f"{step}: {os.strerror(err)}"


def summarise(runs: list[dict], sizes: list[int]) -> dict:
    out: dict = {}
    for n in sizes:
        per = {k: [r for r in runs if r["listeners"] == n and r["kind"] == k] for k in KINDS}
        row: dict = {}
        for k in KINDS:
            vals = [r["per_core_s"] for r in per[k]]
            ratios = [r["per_core_s"] / lim["per_core_s"] for r, lim in zip(per[k], per["limit"], strict=True)]
            row[k] = {"per_core_s_median": statistics.median(vals), "per_core_s_worst": min(vals),
                      "ratio_median": statistics.median(ratios), "ratio_worst": min(ratios),
                      "ratio_best": max(ratios), "loss_worst": max(r["loss"] for r in per[k])}
        out[str(n)] = row
    return out


def markdown(result: dict) -> str:
    lines = ["## AF_XDP egress against the sendmmsg limit (veth, counting XDP receiver)", "",
             f"`{result['command']}` on {result['machine']}; receiver: XDP count-and-drop, "
             f"{result['receiver_mode']} mode; AF_XDP zero-copy on veth: {result['zerocopy']}. "
             "Listener-packets counted at the peer per CPU-second of the sending side: the sender "
             "process (pinned to one core) plus that core's ksoftirqd, where the veth's receive runs "
             "when it is not run in the sender's own context (the same XDP drop for every contender; "
             "the feeder runs on the other core); ratio to the C sendmmsg loop of the same "
             "repeat, median (worst-best) "
             f"over {result['repeats']} repeats.", "",
             "| listeners | limit /core-s | relay sendmmsg /core-s | ratio | relay AF_XDP /core-s | ratio | "
             "worst loss (sendmmsg / AF_XDP) |", "|---|---|---|---|---|---|---|"]
    for n, row in result["summary"].items():
        s, x, lim = row["sendmmsg"], row["xdp"], row["limit"]
        lines.append(f"| {int(n):,} | {lim['per_core_s_median']:,.0f} | {s['per_core_s_median']:,.0f} | "
                     f"{s['ratio_median']:.2f}× ({s['ratio_worst']:.2f}–{s['ratio_best']:.2f}) | "
                     f"{x['per_core_s_median']:,.0f} | {x['ratio_median']:.2f}× "
                     f"({x['ratio_worst']:.2f}–{x['ratio_best']:.2f}) | "
                     f"{max(0.0, s['loss_worst']):.2%} / {max(0.0, x['loss_worst']):.2%} |")
    for kind, p in result.get("profiles", {}).items():
        lines += ["", f"perf, the sender's core, {kind} at {p['listeners']:,} listeners (symbols over 0.7 %):",
                  "", "```", *p["top"], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listeners", default="1000,10000,50000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--out", default=str(HERE / "results" / "xdp.json"))
    ap.add_argument("--no-md", action="store_true", help="do not rewrite bench/RESULTS.md")
    ap.add_argument("--profile", default="", help="kinds to profile with perf in the last repeat, e.g. xdp,limit")
    a = ap.parse_args()
    why = can_make()
    if why:
        print(f"bench-xdp: {why}", file=sys.stderr)
        return 2
    sizes = [int(x) for x in a.listeners.split(",")]
    others = set(range(os.cpu_count() or 1)) - SENDER_CORE
    if others:
        os.sched_setaffinity(0, others)
    limit_bin = build("limit")
    profiled = tuple(k for k in a.profile.split(",") if k)
    runs: list[dict] = []
    with veth_pair("b", queues=1, subnet=9) as v:
        peer_mac = subprocess.run(["ip", "-n", v.netns, "-br", "link", "show", v.peer], check=True,
                                  capture_output=True, text=True).stdout.split()[2]
        # the peer drops everything, ARP too: both egresses use this entry
        subprocess.run(["ip", "neigh", "replace", v.peer4, "lladdr", peer_mac, "dev", v.local, "nud", "permanent"],
                       check=True)
        peer = Peer(v)
        zc = zerocopy_refusal(v)
        try:
            for n in sizes:
                dests = Path(f"/tmp/relay-xdp-dests-{n}")
                dests.write_text("".join(f"{v.peer4} {PORT0 + i}\n" for i in range(n)))
                for rep in range(a.repeats):
                    for k, kind in enumerate(KINDS):
                        a.profile = profiled if rep == a.repeats - 1 and n == max(sizes) else ()
                        r = one_run(kind, n, v, peer, limit_bin, dests, a, 25000 + 10 * rep + k)
                        runs.append(r)
                        print(f"{n:>6} run {rep + 1} {kind:>8}: {r['per_core_s']:>10,.0f} /core-s "
                              f"(sender {r['sender_cores']:.2f} cores, its core {r['core_busy']:.2f} busy, "
                              f"{r['delivered_per_s']:,.0f}/s), "
                              f"loss {r['loss']:.3%}", flush=True)
                dests.unlink()
        finally:
            peer.close()
    result = {"name": "xdp", "machine": machine(),
              "command": " ".join(["bench/xdp.py"] + sys.argv[1:]), "repeats": a.repeats,
              "receiver_mode": peer.mode, "zerocopy": zc, "runs": runs, "summary": summarise(runs, sizes),
              "profiles": {k: {"listeners": max(sizes), "top": profile(k, max(sizes))} for k in profiled}}
    Path(a.out).parent.mkdir(exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    print(md)
    if not a.no_md:
        write_sections(md, OWNED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
