"""A short coverage-guided fuzz run of every untrusted-bytes parser, so the
harness cannot rot; `make fuzz` runs them for longer. Every input the
fuzzers once found a bug with is replayed through every target."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
HARNESS = FUZZ / "fuzz_parsers.py"
TARGETS = ["control", "rtcp", "token", "rtp", "stream", "srtp", "stage", "quic"]
REGRESSIONS = sorted(p for p in (FUZZ / "regressions").iterdir() if p.suffix != ".md")


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_runs_clean(target: str, tmp_path) -> None:
    p = subprocess.run([sys.executable, str(HARNESS), target, "-runs=20000", "-seed=1",
                        f"-artifact_prefix={tmp_path}/"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Done 20000 runs" in p.stderr


@pytest.mark.parametrize("target", TARGETS)
def test_past_findings_stay_fixed(target: str, tmp_path) -> None:
    assert REGRESSIONS, "fuzz/regressions holds no inputs"
    p = subprocess.run([sys.executable, str(HARNESS), target, f"-artifact_prefix={tmp_path}/",
                        *map(str, REGRESSIONS)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert all(f"Executed {r}" in p.stderr for r in REGRESSIONS), p.stderr[-2000:]
