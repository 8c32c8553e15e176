"""What an origin's death costs a mixed stage on an origin pair: two
speakers each speak to both origins, each origin mixes them (different
bytes), an edge takes the room from both, follows one, and splices the
other in when the followed one dies.

    .venv/bin/python bench/stage_pair.py [--runs 3] [--listeners 3] [--out FILE]

Writes bench/results/stage_pair.json and its section of bench/RESULTS.md
(with --out: only that file).

Per run: origins A and B (a stage room with `pair`), an edge taking the
room from both, two `relay publish` speakers (`--server A --server B`,
440 and 660 Hz: two live voices, so both origins mix), `--listeners` real
`relay listen` processes on the edge. After 4 s one origin is killed
(SIGKILL, a little later in each run, so the kill lands at different
points of a frame): the one the edge follows, or the other. Prints per
case the packets each listener missed (the room's numbering) and its
longest silence, median and worst over every listener of every run, and
the edge's splices. The goal: at most 60 ms of audio lost when the
followed origin dies.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from procs import Interrupted, exit_code, spawn, stop_on_signals  # noqa: E402
from results_md import write_sections  # noqa: E402
from relay.testing.loadgen import free_port, scrape  # noqa: E402
from tests.cluster.conftest import ENV, Node, listen_token  # noqa: E402
from tests.conftest import stop  # noqa: E402
from tests.stage.conftest import token  # noqa: E402

SECONDS, KILL_AFTER_S = 10, 4.0
SECTION = "## Chaos: a mixed stage on an origin pair (`bench/stage_pair.py`)"


def one_run(run: int, listeners: int, followed: bool) -> tuple[list[tuple[int, float]], float]:
    """Each listener's (packets missed, longest silence) in one run, and the
    edge's splices."""
    tmp = Path(tempfile.mkdtemp(prefix="relay-stage-pair-"))
    ports = (free_port(), free_port())
    origins = [Node(tmp, name, listen_port=ports[i],
                    extra_room=f'max_speakers = 4\npair = "127.0.0.1:{ports[1 - i]}"\n')
               for i, name in enumerate(("a", "b"))]
    edge = Node(tmp, "edge", upstream=origins)
    procs: list[subprocess.Popen] = []
    victim = None
    try:
        servers = [arg for o in origins for arg in ("--server", f"{o.listen[0]}:{o.listen[1]}")]
        speakers = [spawn([sys.executable, "-m", "relay", "publish", "--room", "live", "--token",
                           token("live", speaker=name), "--tone", str(tone), "--duration", str(SECONDS + 1),
                           *servers], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    for name, tone in (("ann", 440), ("bo", 660))]
        hearers = [spawn([sys.executable, "-m", "relay", "listen", "--server", f"{edge.listen[0]}:{edge.listen[1]}",
                          "--room", "live", "--token", listen_token(), "--duration", str(SECONDS)],
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                   for _ in range(listeners)]
        procs = speakers + hearers
        start = time.monotonic()
        following = ""
        while not following and time.monotonic() - start < 10:
            time.sleep(0.2)
            following = next((k for k, v in scrape(edge.admin).items()
                              if k.startswith("relay_upstream_following{") and v == 1), "")
        if not following:
            raise RuntimeError("the edge never found which origin to follow")
        time.sleep(max(0.0, start + KILL_AFTER_S + 0.007 * run - time.monotonic()))
        chosen = next(o for o in origins if f'parent="127.0.0.1:{o.listen[1]}"' in following)
        victim = chosen if followed else next(o for o in origins if o is not chosen)
        victim.proc.send_signal(signal.SIGKILL)
        rows = []
        for p in hearers:
            err = p.communicate(timeout=SECONDS + 20)[1]
            m = re.search(r"received \d+ packets .* lost (\d+),.* longest silence ([\d.]+) s", err)
            if m is None:
                raise RuntimeError(f"a listener did not finish: {err[-400:]}")
            rows.append((int(m.group(1)), float(m.group(2))))
        splices = scrape(edge.admin)['relay_upstream_splices_total{room="live"}']
        return rows, splices
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for o in origins:
            if o is victim:
                o.proc.wait()
            else:
                stop(o.proc)
        stop(edge.proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--listeners", type=int, default=3)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    result = {}
    for followed in (True, False):
        rows, splices = [], []
        for run in range(args.runs):
            r, s = one_run(run, args.listeners, followed)
            rows += r
            splices.append(s)
        missed, silent = [r[0] for r in rows], [r[1] for r in rows]
        case = "the followed origin killed" if followed else "the other origin killed"
        result[case] = {"missed": missed, "p50": statistics.median(missed), "max": max(missed),
                        "silence_s": silent, "silence_s_p50": statistics.median(silent),
                        "silence_s_max": max(silent), "splices": splices}
        print(f"{case}: packets missed per listener p50 {statistics.median(missed):g}, max {max(missed)}; "
              f"longest silence p50 {statistics.median(silent) * 1000:.0f} ms, max {max(silent) * 1000:.0f} ms; "
              f"edge splices {splices} ({args.runs} runs x {args.listeners} listeners)", flush=True)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / "stage_pair.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.out:
        write_sections(markdown(result, args), (SECTION,))


def markdown(result: dict, args: argparse.Namespace) -> str:
    """The bench's section of bench/RESULTS.md."""
    lines = [SECTION, "", f"`.venv/bin/python bench/stage_pair.py --runs {args.runs} --listeners "
             f"{args.listeners}` ({args.runs} runs x {args.listeners} `relay listen` per case; two speakers "
             "on both origins, so both mix). Goal: at most 60 ms (3 packets) lost when the followed origin dies.",
             "", "| case | packets missed per listener, p50 / max | longest silence, p50 / max | edge splices |",
             "|---|---|---|---|"]
    for case, r in result.items():
        lines.append(f"| {case} | {r['p50']:g} / {r['max']} | {r['silence_s_p50'] * 1000:.0f} / "
                     f"{r['silence_s_max'] * 1000:.0f} ms | {', '.join(f'{s:g}' for s in r['splices'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # peers in process groups of their own, stopped on SIGINT/SIGTERM too
    stop_on_signals()
    try:
        main()
    except Interrupted as e:
        sys.exit(exit_code(e))
