"""QUIC listeners beside UDP listeners: what one listener-packet costs the
node on each transport, in one run on this machine.

    .venv/bin/python bench/quic.py            # make bench-quic
    .venv/bin/python bench/quic.py --smoke    # seconds; what the test suite runs

Live, over loopback: one `relay serve --workers 1` with its QUIC port, a
`relay publish` tone at 50 packets/s, and in turn N UDP listeners (sockets
of this process, read by bench/recv.c) and N QUIC listeners
(bench/peers/quic_c_crowd.py: aioquic joins, then bench/quic_crowd.c reads,
opens and ACKs every packet in C). The relay is pinned to the first core
this bench may use; this process, its publisher and every listener to the
others, so the crowd does not take the relay's CPU. The QUIC listeners are
served by the core's QUIC path (docs/quic-fast-path.md); at the first count,
also by the QUIC library alone (`quic_fast_path = false`). For each: the
relay's CPU-seconds (/proc/PID/stat) over a fixed window and the packets it
counted out, so "per core-second" is delivered packets per CPU-second of
the relay alone, and listeners per core is that over 50 packets/s. The
relay's CPU includes its kernel time (the datagram sends) and, for QUIC,
the listeners' ACKs it reads.

Each point says what bounded it: the relay (a full core, or less sent than
offered), or nothing (the offered rate set the pace); and whether the crowd
kept up: every listener joined, its CPU under 90 % of its cores, no
datagram dropped at its sockets, client-side loss under 0.1 % (loss or
missing joins while the relay is saturated count against the relay). A
point whose crowd did not keep up, or whose listeners lost 0.1 % or more, is
marked and gets no ratio; the relay's own counts of what it did not deliver
are recorded beside it. A crowd that times out is reported as such and the
bench goes on to the next point. The QUIC listeners join a silent room (the
publisher starts once they are in), so that on two cores the handshakes of
the last do not starve the audio of the first; each join costs the relay
and the crowd some 20-40 ms of CPU here.

callgrind: user-space instructions per delivered datagram of the node's
own work, QUIC (bench/cg_quic.py: aioquic connections in memory, only the
node side counted) beside UDP (bench/cg_workload.py), same listeners and
packets.

Writes bench/results/quic.json and the QUIC section of bench/RESULTS.md
(every other section kept). Reports; never fails on a timing. Every process
it starts has its own process group and is stopped on exit, SIGINT and
SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from relay.testing.loadgen import LoopbackCrowd, free_port, raise_fd_limit, scrape, wait_ready  # noqa: E402
from procs import (Interrupted, cpu_seconds, exit_code, group_cpu_seconds, group_socket_inodes,  # noqa: E402
                   pin_group, spawn, split_cores, stop_on_signals, terminate, udp_drops)
from receivers import MAX_CPU_SHARE, MAX_DROP_RATIO, Receivers  # noqa: E402
from quic_report import OWNED, markdown, medians  # noqa: E402
from results_md import write_sections  # noqa: E402
from run import machine  # noqa: E402

PY = sys.executable
RATE = 50   # packets per second: 20 ms Opus frames
MAX_LOSS = 0.001    # client-side loss above this: the point's crowd did not keep up
# the relay's cores and everyone else's (set in main; unpinned in the storm)
RELAY_CORES: set[int] = set()
CROWD_CORES: set[int] = set()


class Node:
    """A relay with UDP and QUIC listener ports and a publisher."""

    def __init__(self, listeners: int, max_load: float = 0.0, fast: bool = True) -> None:
        self.listen, self.quic, self.ingest = free_port(), free_port(), free_port()
        self.admin = ("127.0.0.1", free_port(socket.SOCK_STREAM))
        cfg = Path(tempfile.mkdtemp()) / "relay.toml"
        cfg.write_text(f'[node]\nlisten = "127.0.0.1:{self.listen}"\nadmin = "127.0.0.1:{self.admin[1]}"\n'
                       f'quic = "127.0.0.1:{self.quic}"\nauth = "open"\nworkers = 1\nmax_load = {max_load}\n'
                       f'drain_grace = 0\nquic_fast_path = {"true" if fast else "false"}\n'
                       'quic_max_pending = 4096\nquic_max_pending_per_source = 4096\n'
                       f'max_machine_load = {0.95 if max_load else 0}\n'
                       f'max_listeners = {listeners + 16}\njoin_rate = 1000000\njoin_rate_per_source = 100000\n'
                       f'[[room]]\nname = "b"\ningest = "127.0.0.1:{self.ingest}"\nsources = ["127.0.0.1"]\n'
                       'max_packet_rate = 0\nmax_bitrate = 0\n')
        self.publisher: subprocess.Popen | None = None
        self.proc = spawn([PY, "-m", "relay", "--log-level", "error", "serve", "-c", str(cfg)],
                          cores=RELAY_CORES, stdout=subprocess.DEVNULL)
        try:
            if not wait_ready(self.admin, self.proc, timeout=15):
                raise RuntimeError("relay did not start within 15 s")
            import urllib.request
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin[1]}/quic.json", timeout=10) as r:
                self.cert = json.load(r)["cert_sha256"]
            self.start_publisher()
        except BaseException:
            self.close()
            raise

    def start_publisher(self) -> None:
        """A `relay publish` tone into the room, if none is running."""
        if self.publisher is None:
            self.publisher = spawn([PY, "-m", "relay", "publish", "--to", f"127.0.0.1:{self.ingest}",
                                    "--bitrate", "32000"], cores=CROWD_CORES,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop_publisher(self) -> None:
        """Silence the room: joins then cost only their handshakes."""
        if self.publisher is not None:
            terminate(self.publisher)
            self.publisher = None

    def metric(self, name: str) -> float:
        return scrape(self.admin).get(name, 0.0)

    def wait_listeners(self, transport: str, n: int, timeout: float, still_s: float = 3.0) -> float:
        """Until n listeners are in, or their count stops growing for `still_s`."""
        deadline = time.monotonic() + timeout
        key = f'relay_listeners{{room="b",transport="{transport}"}}'
        got, since = -1.0, time.monotonic()
        while time.monotonic() < deadline:
            now_got = self.metric(key)
            if now_got != got:
                got, since = now_got, time.monotonic()
            if got >= n or (got > 0 and time.monotonic() - since > still_s):
                break
            time.sleep(0.2)
        return got

    def window(self, counter: str, seconds: float) -> dict:
        c0, cpu0, t0 = self.metric(counter), cpu_seconds(self.proc.pid), time.monotonic()
        time.sleep(seconds)
        c1, cpu1, t1 = self.metric(counter), cpu_seconds(self.proc.pid), time.monotonic()
        cpu = max(1e-9, cpu1 - cpu0)
        return {"seconds": t1 - t0, "delivered_per_s": (c1 - c0) / (t1 - t0), "cpu_cores": cpu / (t1 - t0),
                "per_core_s": (c1 - c0) / cpu, "listeners_per_core": (c1 - c0) / cpu / RATE}

    def close(self) -> None:
        self.stop_publisher()
        terminate(self.proc)


def bound_by(res: dict, n: int) -> str:
    """What set the pace: the relay (a full core, or less sent than offered)
    or the offered rate."""
    if res["cpu_cores"] >= 0.9 or res["delivered_per_s"] < 0.97 * n * RATE:
        return "relay"
    return "offered"


def udp_run(node: Node, n: int, seconds: float) -> dict:
    crowd = LoopbackCrowd(n, ("127.0.0.1", node.listen), "b", rcvbuf=1 << 16)
    receivers = None
    try:
        joined = crowd.join(timeout=60).accepted
        crowd.run(1.0)
        # after the handshakes, which the receivers would otherwise read
        receivers = Receivers(crowd.socks, CROWD_CORES)
        receivers.mark()
        res = node.window("relay_packets_out_total", seconds)
        res.update(receivers.since_mark(res["seconds"], res["delivered_per_s"] * res["seconds"]))
        res.update(transport="udp", listeners=n, joined=joined, bound_by=bound_by(res, n),
                   crowd_kept_up=res["receivers_kept_up"] and joined == n)
        receivers.close()
        receivers = None
        crowd.leave()
        return res
    finally:
        if receivers is not None:
            receivers.close()
        crowd.close()


def quic_crowd(node: Node, n: int, life: float, per_process: int = 200, nice: bool = False,
               stagger: float = 0.01, light: bool = False, cores: set[int] | None = None) -> list[subprocess.Popen]:
    """n QUIC listeners in processes of per_process. `light`:
    bench/peers/quic_light_crowd.py (Python reads, C ACKs; the storm's
    crowd), staggering its joins `stagger` seconds apart and leaving after
    `life` seconds; else quic_c_crowd.py (C reads and ACKs), joining as fast
    as the node answers until SIGTERM or `life` seconds. `nice`: at nice 19,
    so the node's load measure sees the crowd's CPU as yielding to it, as if
    the listeners were elsewhere."""
    prefix = ["nice", "-n", "19"] if nice else []
    script = HERE / "peers" / ("quic_light_crowd.py" if light else "quic_c_crowd.py")
    last = str(stagger) if light else "8"
    return [spawn([*prefix, PY, str(script), f"127.0.0.1:{node.quic}", node.cert, "b",
                   str(min(per_process, n - k)), str(life), last], cores=cores, stdout=subprocess.PIPE, text=True)
            for k in range(0, n, per_process)]


def crowd_totals(procs: list[subprocess.Popen], timeout: float) -> dict:
    """The crowd processes' totals, summed; those that did not finish within
    `timeout` seconds (from the first wait) are stopped and counted."""
    totals = {"received": 0, "lost": 0, "joined": 0, "undecodable": 0, "failed_joins": 0, "packets": 0,
              "acks_sent": 0, "pings_sent": 0, "crowd_timed_out": 0, "crowd_failed": 0}
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out = p.communicate(timeout=max(0.1, deadline - time.monotonic()))[0]
        except subprocess.TimeoutExpired:
            terminate(p, grace=2.0)
            totals["crowd_timed_out"] += 1
            continue
        lines = (out or "").strip().splitlines()
        try:
            row = json.loads(lines[-1])
        except (IndexError, ValueError):
            totals["crowd_failed"] += 1
            continue
        for k, v in row.items():
            if k in totals and isinstance(v, int):
                totals[k] += v
    return totals


def relay_view(node: Node) -> dict[str, float]:
    """The relay's own counters of audio it did not deliver: why a point
    lost packets, seen from the sender's side."""
    m = scrape(node.admin)
    pick = ("relay_quic_lost_total", "relay_quic_late_acked_total", "relay_quic_window_shut_total",
            'relay_drops_total{reason="overflow"}', 'relay_drops_total{reason="shard_lag"}',
            'relay_drops_total{reason="send_error"}')
    seen = {k: m.get(k, 0.0) for k in pick}
    # the listeners' ACKs the kernel dropped at the relay's full sockets
    seen["relay_socket_drops"] = float(udp_drops(group_socket_inodes([node.proc.pid])))
    return seen


def quic_run(node: Node, n: int, seconds: float, per_process: int = 500, label: str = "quic") -> dict:
    """n QUIC listeners join a silent room (the crowd on every core
    meanwhile: a handshake costs it as much as the relay), then the crowd is
    moved off the relay's core, the audio starts, and the relay is measured
    over `seconds`."""
    # handshakes here run at some 25 a second against a relay on one core:
    # a minute and a half for 2,000 before a join counts as timed out
    join_s = 60 + n / 25
    life = join_s + seconds + 30     # the crowd is stopped before: this bounds a lost one
    # the room silent while they join: on two cores, audio to the first
    # thousand and the handshakes of the next would starve each other
    node.stop_publisher()
    procs = quic_crowd(node, n, life, per_process, cores=RELAY_CORES | CROWD_CORES)
    groups = [p.pid for p in procs]
    try:
        joined = node.wait_listeners("quic", n, join_s, still_s=15)
        pin_group(groups, CROWD_CORES)
        node.start_publisher()
        time.sleep(2.0)
        inodes = group_socket_inodes(groups)
        drops0, crowd0, seen0 = udp_drops(inodes), group_cpu_seconds(groups), relay_view(node)
        res = node.window('relay_quic_datagrams_sent_total{transport="quic"}', seconds)
        crowd_cpu = (group_cpu_seconds(groups) - crowd0) / res["seconds"]
        drops = udp_drops(inodes) - drops0
        seen1 = relay_view(node)
        res["relay_counted"] = {k: seen1[k] - seen0[k] for k in seen1}
        res["acks_per_s"] = node.window("relay_quic_acks_total", 1.0)["delivered_per_s"]
        res["relay_acks_total"] = node.metric("relay_quic_acks_total")
        for p in procs:
            p.send_signal(signal.SIGTERM)     # the joiner stops its C side and prints the totals
        totals = crowd_totals(procs, 30)
        loss = totals["lost"] / max(1, totals["received"] + totals["lost"])
        res.update(transport=label, listeners=n, joined_at_window=joined, **totals, loss_ratio=loss,
                   crowd_cpu_cores=crowd_cpu, crowd_socket_drops=drops)
        res["bound_by"] = bound_by(res, n)
        # loss, or joins missing, while the relay is saturated are the relay's, not the crowd's
        relay_full = res["bound_by"] == "relay"
        crowd_ok = (crowd_cpu <= MAX_CPU_SHARE * len(CROWD_CORES) and not totals["crowd_timed_out"]
                    and not totals["crowd_failed"] and (joined >= n or relay_full)
                    and drops <= MAX_DROP_RATIO * res["delivered_per_s"] * res["seconds"])
        res["crowd_kept_up"] = crowd_ok and (loss < MAX_LOSS or relay_full)
        return res
    finally:
        for p in procs:
            terminate(p, grace=1.0)


def quic_storm(existing: int, storm: int, max_load: float, seconds: float) -> dict:
    """UDP listeners stream while `storm` QUIC joins arrive within about a
    second; QUIC admission must stop before the loop thread fills."""
    node = Node(existing + storm, max_load=max_load)
    crowd = LoopbackCrowd(existing, ("127.0.0.1", node.listen), "b", rcvbuf=1 << 16)
    procs: list[subprocess.Popen] = []
    try:
        crowd.join(timeout=60)
        crowd.run(1.0)
        full = 'relay_rejections_total{reason="node_full"}'
        before, full0 = crowd.crowd.totals(), node.metric(full)
        procs = quic_crowd(node, storm, seconds, per_process=100, nice=True, light=True)
        crowd.run(seconds / 2)
        admitted = node.metric('relay_listeners{room="b",transport="quic"}')
        duty = node.metric("relay_loop_duty_ratio")
        machine = node.metric("relay_machine_cpu_busy_ratio")
        crowd.run(seconds / 2)
        after = crowd.crowd.totals()
        totals = crowd_totals(procs, seconds + 60)
        return {"existing_udp": existing, "storm_quic": storm, "max_load": max_load,
                "admitted": admitted, "refused_node_full": node.metric(full) - full0,
                "loop_duty_after": duty, "machine_busy_after": machine,
                "refused_for_load": node.metric("relay_rejections_load_total"),
                "admitted_lost": totals["lost"], "admitted_received": totals["received"],
                "existing_lost": after["lost"] - before["lost"],
                "existing_received": after["received"] - before["received"]}
    finally:
        for p in procs:
            terminate(p, grace=1.0)
        crowd.close()
        node.close()


def callgrind(listeners: int, packets: int) -> dict:
    """Instructions per delivered datagram: P packets minus P=0, over L*P."""
    if not shutil.which("valgrind"):
        return {}
    out: dict = {"listeners": listeners, "packets": packets}
    for kind, script, extra, args in (
            ("quic", "cg_quic.py", ["--toggle-collect=ffi_call*"], []),
            ("udp", "cg_workload.py", [], ["relay"])):
        totals = []
        for p in (0, packets):
            f = Path(tempfile.mkdtemp()) / "cg.out"
            try:
                r = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={f}", *extra,
                                    PY, str(HERE / script), *args, str(listeners), str(p)],
                                   env=dict(os.environ, PYTHONHASHSEED="0"), capture_output=True, text=True,
                                   timeout=1800, process_group=0)
            except subprocess.TimeoutExpired:
                return out      # not measured; the report says so
            line = [x for x in r.stderr.splitlines() if "Collected" in x]
            if not line:
                return out
            totals.append(int(line[-1].split(":")[-1].strip()))
        out[kind] = (totals[1] - totals[0]) / (listeners * packets)
    return out


def one_point(result: dict, n: int, seconds: float, first: bool) -> None:
    """UDP then QUIC listeners on one node (and, at the first count, QUIC on
    the library alone); a run that fails is recorded and the next goes on."""
    plans = [("udp", True), ("quic", True)] + ([("quic-library", False)] if first else [])
    node: Node | None = None
    for label, fast in plans:
        try:
            if node is None or (label == "quic-library"):
                if node is not None:
                    node.close()
                node = Node(n, fast=fast)
            res = udp_run(node, n, seconds) if label == "udp" else quic_run(node, n, seconds, label=label)
            print(f"{n:>5} {label:<12}: {res['delivered_per_s']:>8,.0f}/s {res['cpu_cores']:.2f} cores "
                  f"{res['per_core_s']:>9,.0f} per core-s, bound by {res['bound_by']}, lost "
                  f"{res.get('loss_ratio', 0):.4f}, crowd kept up: {res['crowd_kept_up']}", flush=True)
        except Exception as e:  # noqa: BLE001 -- recorded; the bench goes on
            res = {"transport": label, "listeners": n, "error": f"{type(e).__name__}: {e}"}
            print(f"{n:>5} {label:<12}: failed: {res['error']}", flush=True)
            if node is not None:
                node.close()
                node = None
        result["runs"].append(res)
    if node is not None:
        node.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", help="also write the results JSON here")
    ap.add_argument("--counts", help="listener counts, comma-separated (instead of the mode's)")
    ap.add_argument("--seconds", type=float, help="measured seconds per run (instead of the mode's)")
    ap.add_argument("--repeats", type=int, help="runs per point (instead of the mode's)")
    ap.add_argument("--no-callgrind", action="store_true")
    ap.add_argument("--no-storm", action="store_true")
    args = ap.parse_args()
    stop_on_signals()
    if args.smoke:
        counts, seconds, repeats, cg = [10], 1.0, 1, None
    else:
        counts, seconds, repeats, cg = [200, 1000, 2000, 3000], 5.0, 2, (20, 100)
    counts = [int(c) for c in args.counts.split(",")] if args.counts else counts
    seconds, repeats = args.seconds or seconds, args.repeats or repeats
    cg = None if args.no_callgrind else cg
    relay_cores, crowd_cores = split_cores()
    RELAY_CORES.update(relay_cores)
    CROWD_CORES.update(crowd_cores)
    os.sched_setaffinity(0, crowd_cores)     # this process's UDP crowd stays off the relay's core too
    raise_fd_limit(max(counts) + 512)
    result: dict = {"machine": machine(), "command": " ".join(["quic.py", *sys.argv[1:]]), "repeats": repeats,
                    "runs": [], "medians": {}, "cores": {"relay": sorted(relay_cores), "crowd": sorted(crowd_cores)}}
    code = 0
    try:
        for n in counts:
            try:
                for _ in range(repeats):
                    one_point(result, n, seconds, n == counts[0])
            finally:
                result["medians"][str(n)] = medians(result["runs"], n)
        if not (args.smoke or args.no_storm):
            try:
                result["storm"] = quic_storm(200, 300, 0.8, 10.0)
            except Exception as e:  # noqa: BLE001 -- recorded; the report is still written
                result["storm"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"storm: {result['storm']}", flush=True)
        if cg:
            result["callgrind"] = callgrind(*cg)
            print(f"callgrind: {result['callgrind']}", flush=True)
    except Interrupted as e:
        result["interrupted"] = str(e)
        print(f"interrupted by {e}: stopped every process the bench started", flush=True)
        code = exit_code(e)
    md = markdown(result, RATE)
    if args.out:
        # a run for somewhere else (a test, a trial) leaves the committed results alone
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    elif not (args.smoke or code):
        (HERE / "results" / "quic.json").write_text(json.dumps(result, indent=2) + "\n")
        write_sections(md, OWNED)
    print(md)
    return code


if __name__ == "__main__":
    sys.exit(main())
