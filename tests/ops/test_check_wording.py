"""`relay check` says what its figures count, and its --help says what its
exit status means (scripts and CI read it)."""
from __future__ import annotations

import re
import subprocess
import sys


def _relay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=30)


def test_the_open_files_figure_has_its_unit() -> None:
    p = _relay("check")
    line = next(x for x in p.stdout.splitlines() if " open files " in x)
    assert re.search(r"the node may hold about \d+ files open at once", line), line


def test_check_help_says_it_exits_1_when_something_should_change() -> None:
    text = " ".join(_relay("check", "--help").stdout.split())
    assert "exit status: 0 when nothing needs changing, 1 when something should change" in text, text
