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


def speechlike_wav(path: Path, seconds: float = 3.0, rate: int = 48000) -> np.ndarray:
    """A voice-like test signal, written as a 16-bit mono WAV at `path` and
    returned: a fundamental gliding between 110 and 240 Hz with its first
    eight harmonics, cut into syllables by a 4 Hz envelope. Unlike a tone it
    never repeats, so a correlation with what a listener heard finds one lag."""
    import wave
    t = np.arange(int(seconds * rate)) / rate
    f0 = 175 + 65 * np.sin(2 * np.pi * 0.7 * t) * np.sin(2 * np.pi * 0.23 * t + 1)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 9))
    x = x * np.clip(np.sin(2 * np.pi * 4 * t) + 0.3, 0, None)
    pcm = (x / np.abs(x).max() * 0.5 * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return pcm.astype(float)


def best_correlation(source: np.ndarray, heard: np.ndarray, max_lag: int = 48000) -> float:
    """The normalized correlation of `heard` with `source` at the lag that
    fits best (up to `max_lag` samples late): 1.0 is the same waveform."""
    n = min(len(source), len(heard) - max_lag)
    if n <= 0:
        return 0.0
    a = source[:n] - source[:n].mean()
    spectrum = np.fft.irfft(np.fft.rfft(heard, 2 * len(heard)) * np.conj(np.fft.rfft(a, 2 * len(heard))))
    lag = int(np.argmax(spectrum[:max_lag]))
    b = heard[lag:lag + n] - heard[lag:lag + n].mean()
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))
