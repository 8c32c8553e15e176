"""QUIC listeners beside UDP listeners: what one listener-packet costs the
node on each transport, in one run on this machine.

    .venv/bin/python bench/quic.py            # make bench-quic
    .venv/bin/python bench/quic.py --smoke    # seconds; what the test suite runs

Live, over loopback: one `relay serve --workers 1` with its QUIC port, a
`relay publish` tone at 50 packets/s, and in turn N UDP listeners (the C
crowd of relay.testing.loadgen, in this process) and N QUIC listeners
(bench/peers/quic_light_crowd.py, in other processes at nice 19: aioquic
joins, then each reads and ACKs in C, so thousands fit beside the node on
two cores; their loss counts the crowd's own starvation too).
The QUIC listeners are served by the core's QUIC path (docs/quic-fast-path.md); at the first
count, also by the QUIC library alone (`quic_fast_path = false`), as before. For each: the
relay's CPU-seconds (/proc/PID/stat) over a fixed window and the packets it
counted out, so "per core-second" is delivered packets per CPU-second of
the relay, and listeners per core is that over 50 packets/s. The relay's
CPU includes its kernel time (the datagram sends) and, for QUIC, the
listeners' ACKs it processes.

callgrind: user-space instructions per delivered datagram of the node's
own work, QUIC (bench/cg_quic.py: aioquic connections in memory, only the
node side counted) beside UDP (bench/cg_workload.py), same listeners and
packets.

Writes bench/results/quic.json and the QUIC section of bench/RESULTS.md.
Reports; never fails on a timing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from relay.testing.loadgen import LoopbackCrowd, free_port, scrape, wait_ready  # noqa: E402
from procs import cpu_seconds, terminate  # noqa: E402

PY = sys.executable
RATE = 50   # packets per second: 20 ms Opus frames


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
        self.proc = subprocess.Popen([PY, "-m", "relay", "--log-level", "error", "serve", "-c", str(cfg)],
                                     stdout=subprocess.DEVNULL)
        if not wait_ready(self.admin, self.proc, timeout=15):
            raise RuntimeError("relay did not start")
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin[1]}/quic.json", timeout=10) as r:
            self.cert = json.load(r)["cert_sha256"]
        self.publisher = subprocess.Popen([PY, "-m", "relay", "publish", "--to", f"127.0.0.1:{self.ingest}",
                                           "--bitrate", "32000"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def metric(self, name: str) -> float:
        return scrape(self.admin).get(name, 0.0)

    def wait_listeners(self, transport: str, n: int, timeout: float) -> float:
        """Until n listeners are in, or their count stops growing for 3 s."""
        deadline = time.monotonic() + timeout
        key = f'relay_listeners{{room="b",transport="{transport}"}}'
        got, since = -1.0, time.monotonic()
        while time.monotonic() < deadline:
            now_got = self.metric(key)
            if now_got != got:
                got, since = now_got, time.monotonic()
            if got >= n or (got > 0 and time.monotonic() - since > 3):
                break
            time.sleep(0.2)
        return got

    def window(self, counter: str, seconds: float) -> dict:
        c0, cpu0, t0 = self.metric(counter), cpu_seconds(self.proc.pid), time.monotonic()
        time.sleep(seconds)
        c1, cpu1, t1 = self.metric(counter), cpu_seconds(self.proc.pid), time.monotonic()
        cpu = max(1e-9, cpu1 - cpu0)
        return {"delivered_per_s": (c1 - c0) / (t1 - t0), "cpu_cores": cpu / (t1 - t0),
                "per_core_s": (c1 - c0) / cpu, "listeners_per_core": (c1 - c0) / cpu / RATE}

    def close(self) -> None:
        terminate(self.publisher)
        terminate(self.proc)


def udp_run(node: Node, n: int, seconds: float) -> dict:
    crowd = LoopbackCrowd(n, ("127.0.0.1", node.listen), "b", rcvbuf=1 << 16)
    try:
        joined = crowd.join(timeout=60).accepted
        crowd.run(1.0)
        res = node.window("relay_packets_out_total", seconds)
        res.update(transport="udp", listeners=n, joined=joined)
        crowd.leave()
        return res
    finally:
        crowd.close()


JOIN_RATE = 200     # QUIC joins per second in a live run: each costs the node a handshake


def quic_crowd(node: Node, n: int, life: float, per_process: int = 200, nice: bool = False,
               stagger: float = 0.01) -> list[subprocess.Popen]:
    """n QUIC listeners in processes of per_process, each staggering its
    joins `stagger` seconds apart, leaving after `life` seconds. `nice`: at
    nice 19, so the node's load measure sees the crowd's CPU as yielding to
    it, as if the listeners were elsewhere."""
    prefix = ["nice", "-n", "19"] if nice else []
    return [subprocess.Popen([*prefix, PY, str(HERE / "peers" / "quic_light_crowd.py"), f"127.0.0.1:{node.quic}",
                              node.cert, "b", str(min(per_process, n - k)), str(life), str(stagger)],
                             stdout=subprocess.PIPE, text=True)
            for k in range(0, n, per_process)]


def crowd_totals(procs: list[subprocess.Popen], timeout: float) -> dict:
    totals = {"received": 0, "lost": 0, "joined": 0, "undecodable": 0}
    for p in procs:
        out = p.communicate(timeout=timeout)[0]
        for k, v in json.loads(out.strip().splitlines()[-1]).items():
            if k in totals:
                totals[k] += v
    return totals


def quic_run(node: Node, n: int, seconds: float, per_process: int = 200, label: str = "quic",
             nice: bool = True) -> dict:
    processes = (n + per_process - 1) // per_process
    stagger = processes / JOIN_RATE
    join_s = min(per_process, n) * stagger + 5
    life = join_s + seconds + 15   # the crowd outlives the window, however the joins went
    # at nice 19, as if the listeners were elsewhere: on two cores the crowd
    # costs more than the node, and would otherwise take its CPU (not in the
    # smoke run, a test that must pass beside a busy neighbour at nice 0)
    procs = quic_crowd(node, n, life, per_process, nice=nice, stagger=stagger)
    try:
        joined = node.wait_listeners("quic", n, join_s + 10)
        time.sleep(1.0)
        res = node.window('relay_quic_datagrams_sent_total{transport="quic"}', seconds)
        res["acks_per_s"] = node.window("relay_quic_acks_total", 1.0)["delivered_per_s"]
        totals = crowd_totals(procs, life + 30)
        res.update(transport=label, listeners=n, joined_at_window=joined, **totals,
                   loss_ratio=totals["lost"] / max(1, totals["received"] + totals["lost"]))
        return res
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


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
        procs = quic_crowd(node, storm, seconds, per_process=100, nice=True)
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
            if p.poll() is None:
                p.kill()
                p.wait()
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
            r = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={f}", *extra,
                                PY, str(HERE / script), *args, str(listeners), str(p)],
                               env=dict(os.environ, PYTHONHASHSEED="0"), capture_output=True, text=True,
                               timeout=1800)
            line = [x for x in r.stderr.splitlines() if "Collected" in x]
            if not line:
                return out
            totals.append(int(line[-1].split(":")[-1].strip()))
        out[kind] = (totals[1] - totals[0]) / (listeners * packets)
    return out


def markdown(q: dict) -> str:
    """The QUIC section of bench/RESULTS.md."""
    lines = ["## QUIC listeners beside UDP (`bench/quic.py`)", "",
             f"One relay, `--workers 1`, {RATE} packets/s in; {q['repeats']} runs per point, medians. "
             "Per core-second = packets the relay sent per CPU-second it used (its kernel time "
             "included; for QUIC also the listeners' ACKs it reads).", "",
             "| listeners | transport | sent/s | relay CPU cores | per core-second | listeners per core "
             "| vs UDP | client-side loss |", "|---|---|---|---|---|---|---|---|"]
    for n, v in sorted(q["medians"].items(), key=lambda x: int(x[0])):
        udp = v.get("udp", {}).get("per_core_s")
        for t in ("udp", "quic", "quic-library"):
            if t in v:
                x = v[t]
                ratio = f"{x['per_core_s'] / udp:.3f}x" if udp else "-"
                loss = f"{100 * x['loss_ratio']:.2f} %" if "loss_ratio" in x else "-"
                lines.append(f"| {n} | {t} | {x['delivered_per_s']:,.0f} | {x['cpu_cores']:.2f} | "
                             f"{x['per_core_s']:,.0f} | {x['listeners_per_core']:,.0f} | {ratio} | {loss} |")
    st = q.get("storm")
    if st:
        lines += ["", f"QUIC join storm: {st['storm_quic']} QUIC joins within about a second while "
                      f"{st['existing_udp']} UDP listeners streamed, `max_load = {st['max_load']}`: "
                      f"{st['admitted']:.0f} admitted, {st['refused_node_full']:.0f} refused `node_full`, "
                      f"{st['refused_for_load']:.0f} of them for load (loop duty then {st['loop_duty_after']:.2f}, "
                      f"machine CPU busy {st['machine_busy_after']:.2f}; the crowd runs at nice 19 on the same "
                      f"two cores); the admitted lost {st['admitted_lost']} of "
                      f"{st['admitted_received'] + st['admitted_lost']}, the UDP listeners lost "
                      f"{st['existing_lost']} of {st['existing_received'] + st['existing_lost']}."]
    cg = q.get("callgrind") or {}
    if cg.get("quic") and cg.get("udp"):
        lines += ["", f"User-space instructions per delivered datagram, node side only (callgrind, "
                      f"{cg['listeners']} listeners x {cg['packets']} packets): QUIC {cg['quic']:,.0f}, "
                      f"UDP {cg['udp']:,.0f} ({cg['quic'] / cg['udp']:.0f}x)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", help="also write the results JSON here")
    args = ap.parse_args()
    if args.smoke:
        counts, seconds, repeats, cg = [10], 1.0, 1, None
    else:
        counts, seconds, repeats, cg = [200, 1000, 2000], 5.0, 2, (20, 100)
    result: dict = {"repeats": repeats, "runs": [], "medians": {}}
    for n in counts:
        for r in range(repeats):
            runs = []
            node = Node(n)
            try:
                runs += [udp_run(node, n, seconds), quic_run(node, n, seconds, nice=not args.smoke)]
            finally:
                node.close()
            if n == counts[0]:
                # the same listeners served by the QUIC library alone, as before the QUIC path
                node = Node(n, fast=False)
                try:
                    runs.append(quic_run(node, n, seconds, label="quic-library", nice=not args.smoke))
                finally:
                    node.close()
            for res in runs:
                result["runs"].append(res)
                print(f"{n:>5} {res['transport']:<12} run {r + 1}: {res['delivered_per_s']:>8,.0f}/s "
                      f"{res['cpu_cores']:.2f} cores {res['per_core_s']:>9,.0f} per core-s "
                      f"lost {res.get('loss_ratio', 0):.4f}", flush=True)
        med = {}
        for t in ("udp", "quic", "quic-library"):
            rs = [x for x in result["runs"] if x["transport"] == t and x["listeners"] == n]
            if not rs:
                continue
            keys = ["delivered_per_s", "cpu_cores", "per_core_s", "listeners_per_core"]
            keys += ["loss_ratio"] if t != "udp" else []
            med[t] = {k: statistics.median(x[k] for x in rs) for k in keys}
        result["medians"][str(n)] = med
    if not args.smoke:
        result["storm"] = quic_storm(200, 300, 0.8, 10.0)
        print(f"storm: {result['storm']}", flush=True)
    if cg:
        result["callgrind"] = callgrind(*cg)
        print(f"callgrind: {result['callgrind']}", flush=True)
    md = markdown(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if not args.smoke:
        out = HERE / "results"
        (out / "quic.json").write_text(json.dumps(result, indent=2) + "\n")
        results_md = HERE / "RESULTS.md"
        if results_md.exists():
            text = results_md.read_text()
            head = text.split("## QUIC listeners beside UDP")[0].rstrip("\n")
            results_md.write_text(head + "\n\n" + md)
    print(md)


if __name__ == "__main__":
    main()
