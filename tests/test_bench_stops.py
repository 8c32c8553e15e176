"""A bench that is stopped stops what it started: bench/run.py, sent
SIGTERM or SIGINT while its peers run, leaves no process behind (each peer
runs in a process group of its own, which the bench kills on the way out),
and exits with the signal's code."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _session(sid: int) -> dict[int, str]:
    """The live processes of a session, pid -> command line (zombies are dead)."""
    found = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found[int(d)] = cmd
    return found


def _wait_for(ok, timeout: float) -> bool:
    """Poll `ok` until it holds or `timeout` passes (a bound, not a measure)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return True
        time.sleep(0.1)
    return ok()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_bench_stopped_leaves_no_peer_behind(sig: signal.Signals, tmp_path: Path) -> None:
    # a session of its own, so that everything the bench starts, in whatever
    # process group, can be found afterwards (and cleaned up if the test fails)
    bench = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--counts", "20", "--seconds", "30", "--repeats", "5",
         "--impls", "relay,limit", "--no-callgrind", "--no-storm", "--name", f"stop-test-{sig.name}"],
        cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # a relay peer (with its own threads) is up before the signal
        assert _wait_for(lambda: any("relay" in c and " serve " in c for c in _session(bench.pid).values()), 15), \
            "the bench never started its relay peer"
        bench.send_signal(sig)
        out, _ = bench.communicate(timeout=20)
        left = {p: c for p, c in _session(bench.pid).items() if p != bench.pid}
        assert left == {}, f"still running after the bench stopped: {left}\n{out[-2000:]}"
        assert bench.returncode == 128 + sig, out[-2000:]
        assert "Traceback" not in out, out[-3000:]
    finally:
        for pid in _session(bench.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        (ROOT / "bench" / "results" / f"stop-test-{sig.name}.json").unlink(missing_ok=True)
