"""What an edge's death costs the `relay listen` processes on it: they
notice, move to the alternate their ACCEPT named, resume, and count what
they missed in the origin's numbering.

    .venv/bin/python bench/listener_move.py [--runs 3] [--listeners 4] [--out FILE]

An origin on loopback feeds two edges; edge 1 names edge 2 as its
alternate ([node] redirect). `--listeners` real `relay listen` processes
join edge 1, a 50 packets/s stream runs for 9 s, edge 1 is killed with
SIGKILL after 3 s (a little later in each run, so the kill lands at
different points of a 20 ms frame). Twice: with edge 2 already carrying
the room (a listener of its own), and with edge 2 idle (it subscribes
when the first mover arrives). Prints, per case, the packets each listener
missed and its longest silence: median and worst over every listener of
every run.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from procs import Interrupted, exit_code, spawn, stop_on_signals  # noqa: E402
from relay.client.publish import encode_tone  # noqa: E402
from relay.testing.loadgen import LoopbackCrowd  # noqa: E402
from tests.cluster.conftest import ENV, Node, listen_token  # noqa: E402
from tests.conftest import stop  # noqa: E402
from tests.rtp import rtp  # noqa: E402

PACKETS, KILL_AT = 450, 150      # 9 s at 50 packets a second; the edge dies after 3 s


def one_run(run: int, listeners: int, carried: bool) -> list[tuple[int, float]]:
    """Packets missed by each listener of one run, and its longest silence."""
    tmp = Path(tempfile.mkdtemp(prefix="relay-move-"))
    origin = Node(tmp, "origin")
    e2 = Node(tmp, "edge2", upstream=[origin])
    e1 = Node(tmp, "edge1", upstream=[origin], extra_node=f'redirect = "{e2.listen[0]}:{e2.listen[1]}"\n')
    keep = LoopbackCrowd(1, e2.listen, "live", token=listen_token()) if carried else None
    procs: list[subprocess.Popen] = []
    pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if keep is not None:
            keep.join()
        procs = [spawn([sys.executable, "-m", "relay", "listen", "--server",
                        f"{e1.listen[0]}:{e1.listen[1]}", "--room", "live", "--token", listen_token(),
                        "--duration", "8"], env=ENV, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True) for _ in range(listeners)]
        frames = encode_tone(440, 1.0)
        start = time.monotonic()
        for k in range(PACKETS):
            pub.sendto(rtp(k, 960 * k, 0xC0DE, frames[k % len(frames)]), origin.ingest)
            if k == KILL_AT + 7 * run:
                e1.proc.send_signal(signal.SIGKILL)
            time.sleep(max(0.0, start + (k + 1) * 0.02 - time.monotonic()))
        missed = []
        for p in procs:
            err = p.communicate(timeout=30)[1]
            m = re.search(r"received \d+ packets .* lost (\d+),.* longest silence ([\d.]+) s", err)
            if m is None:
                raise RuntimeError(f"a listener did not finish: {err[-400:]}")
            missed.append((int(m.group(1)), float(m.group(2))))
        return missed
    finally:
        pub.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
        if keep is not None:
            keep.close()
        if e1.proc.poll() is None:
            e1.proc.kill()
        e1.proc.wait()
        for node in (e2, origin):
            stop(node.proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--listeners", type=int, default=4)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    result = {}
    for carried in (True, False):
        rows = [r for run in range(args.runs) for r in one_run(run, args.listeners, carried)]
        missed, silent = [r[0] for r in rows], [r[1] for r in rows]
        case = "alternate carries the room" if carried else "alternate idle"
        result[case] = {"missed": missed, "p50": statistics.median(missed), "max": max(missed),
                        "silence_s": silent, "silence_s_p50": statistics.median(silent),
                        "silence_s_max": max(silent)}
        print(f"{case}: packets missed per listener p50 {statistics.median(missed):g}, max {max(missed)}; "
              f"longest silence p50 {statistics.median(silent):.2f} s, max {max(silent):.2f} s "
              f"({args.runs} runs x {args.listeners} listeners)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    # peers in process groups of their own, stopped on SIGINT/SIGTERM too
    stop_on_signals()
    try:
        main()
    except Interrupted as e:
        sys.exit(exit_code(e))
