"""Helpers for the stage's tests: tokens and `relay publish` speakers with their tones."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SECRET


ENV = dict(os.environ, RELAY_SECRET=SECRET, PYTHONUNBUFFERED="1")

STAGE = '\n[[room]]\nname = "stage"\n'

TONES = {"ann": 440.0, "bo": 660.0, "cy": 880.0}


def token(room: str, role: str = "publish", speaker: str = "", name: str = "") -> str:
    args = ["--room", room, "--role", role] + (["--speaker", speaker, "--name", name] if speaker else [])
    return subprocess.run([sys.executable, "-m", "relay", "token", *args], env=ENV, capture_output=True,
                          text=True, check=True).stdout.strip()


def speaker(relay, name: str, seconds: float, out: Path | None = None, room: str = "stage",
            tok: str | None = None) -> subprocess.Popen:
    """`relay publish` as a speaker on the stage, with its tone."""
    tok = token(room, speaker=name, name=name.title()) if tok is None else tok
    cmd = [sys.executable, "-m", "relay", "publish", "--server", f"{relay.listen[0]}:{relay.listen[1]}",
           "--room", room, "--token", tok, "--tone", str(TONES.get(name, 440.0)), "--duration", str(seconds)]
    if out is not None:
        cmd += ["--out", str(out)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
