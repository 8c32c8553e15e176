"""`relay demo`'s live progress line and its closing table count the same
listeners: the crowd and the one real `relay listen` that saves the audio."""
from __future__ import annotations

import re
import subprocess
import sys


def test_the_progress_line_and_the_table_agree(tmp_path) -> None:
    p = subprocess.run([sys.executable, "-m", "relay", "demo", "--listeners", "60", "--seconds", "3",
                        "--out", str(tmp_path / "demo.ogg")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    progress = re.findall(r"listeners hearing audio +(\d+)/(\d+)", p.stdout)
    assert progress, p.stdout
    heard, of = map(int, progress[-1])
    table = re.search(r"\| listeners that heard audio +\| (\d+)", p.stdout)
    assert table, p.stdout
    assert of == 60, progress[-1]
    assert heard == int(table.group(1)) == 60, (progress[-1], table.group(0))
