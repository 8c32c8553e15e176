"""Shared fixtures: a real `relay serve` process on free loopback ports."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from relay.testing.loadgen import free_port

SECRET = "test-secret-0123456789abcdef0123456789"


@dataclass


class RunningRelay:
    proc: subprocess.Popen
    listen: tuple[str, int]
    admin: tuple[str, int]
    ingest: tuple[str, int]
    room: str
    env: dict

    def url(self, path: str) -> str:
        return f"http://{self.admin[0]}:{self.admin[1]}{path}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def relay_cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "relay", *args]


def start_relay(tmp_path: Path, auth: str = "open", extra_node: str = "", sources: str = '"127.0.0.1"',
                room: str = "live", extra_room: str = "", extra_env: dict | None = None) -> RunningRelay:
    listen = ("127.0.0.1", free_port())
    admin = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    ingest = ("127.0.0.1", free_port())
    cfg = tmp_path / "relay.toml"
    # Load admission measures CPU, and these tests share a machine with
    # whatever else runs; only tests of admission itself turn it on.
    # Tests that do not test draining stop their relay at once.
    for key in ("max_load", "max_machine_load", "drain_grace"):
        if key not in extra_node:
            extra_node += f"\n{key} = 0"
    cfg.write_text(f"""
[node]
listen = "{listen[0]}:{listen[1]}"
admin = "{admin[0]}:{admin[1]}"
auth = "{auth}"
{extra_node}
[[room]]
name = "{room}"
ingest = "{ingest[0]}:{ingest[1]}"
sources = [{sources}]
{extra_room}
""")
    env = dict(os.environ, RELAY_SECRET=SECRET, PYTHONUNBUFFERED="1", **(extra_env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "relay", "--log-level", "warning", "serve",
                             "-c", str(cfg)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    r = RunningRelay(proc, listen, admin, ingest, room, env)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"relay exited: {proc.stdout.read()}")
        try:
            if r.get("/readyz")[0] == 200:
                return r
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("relay did not become ready")


def stop(proc: subprocess.Popen, timeout: float = 10) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.fixture


def relay(tmp_path):
    r = start_relay(tmp_path)
    yield r
    assert stop(r.proc) == 0, "relay did not exit cleanly on SIGTERM"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed; run `make test`, which installs it")
    return path


TONE_HZ = 660.0


def dominant_hz(path) -> float:
    pcm = subprocess.run([need("ffmpeg"), "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1",
                          "-ar", "48000", "-"], capture_output=True, check=True).stdout
    x = np.frombuffer(pcm, dtype="<i2").astype(float)
    assert len(x) > 48000, f"only {len(x) / 48000:.2f} s of audio decoded"
    x = x[len(x) // 4:]  # skip the start-up
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / 48000)[spectrum.argmax()])
