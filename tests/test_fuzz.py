"""A short coverage-guided fuzz run of every untrusted-bytes parser, so the
harness cannot rot; `make fuzz` runs them for longer."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_parsers.py"


@pytest.mark.parametrize("target", ["control", "rtcp", "token", "rtp", "stream"])
def test_fuzz_target_runs_clean(target: str, tmp_path) -> None:
    p = subprocess.run([sys.executable, str(HARNESS), target, "-runs=20000", "-seed=1",
                        f"-artifact_prefix={tmp_path}/"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Done 20000 runs" in p.stderr
