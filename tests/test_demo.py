"""The README's first command, small: `relay demo` brings up a relay, a
publisher and a crowd on the embedded default config and reports success."""
from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_and_hears_the_tone(tmp_path) -> None:
    out = tmp_path / "demo.ogg"
    p = subprocess.run([sys.executable, "-m", "relay", "demo", "--listeners", "200", "--seconds", "3",
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "| listeners joined                  | 200 of 200" in p.stdout
    assert "| loss (sequence gaps at listeners) | 0.000%" in p.stdout
    hz = float(re.search(r"tone of (\d+) Hz", p.stdout).group(1))  # from zero crossings
    assert abs(hz - 440) <= 5
    assert out.stat().st_size > 10_000
