"""A publisher that crashes does not lock its room: plain ffmpeg (no BYE,
its default) killed mid-stream, then a new ffmpeg from the same allowed
address takes the room once the first has been silent for the default
takeover time, and the listeners hear it. The log says which kind of stop
it was. The strict lock stays, for a room that asks for it."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from relay.testing.loadgen import LoopbackCrowd, free_port, scrape, wait_ready
from relay.wire.config import PLAIN_TAKEOVER_S
from tests.conftest import need
from tests.rtp import rtp


def _serve(tmp_path, extra_room: str = "") -> tuple[subprocess.Popen, dict[str, tuple[str, int]]]:
    ports = {"listen": ("127.0.0.1", free_port()), "admin": ("127.0.0.1", free_port(socket.SOCK_STREAM)),
             "ingest": ("127.0.0.1", free_port())}
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'[node]\nlisten = "127.0.0.1:{ports["listen"][1]}"\nadmin = "127.0.0.1:{ports["admin"][1]}"\n'
                   'auth = "open"\nmax_load = 0\nmax_machine_load = 0\ndrain_grace = 0\n'
                   f'[[room]]\nname = "live"\ningest = "127.0.0.1:{ports["ingest"][1]}"\nsources = ["127.0.0.1"]\n'
                   f'{extra_room}')
    proc = subprocess.Popen([sys.executable, "-m", "relay", "--log-format", "json", "serve", "-c", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert wait_ready(ports["admin"], proc)
    return proc, ports


def _plain_ffmpeg(to: tuple[str, int], seconds: float, hz: int) -> subprocess.Popen:
    """ffmpeg as a new user runs it: no -rtpflags send_bye, its own payload type."""
    return subprocess.Popen([need("ffmpeg"), "-hide_banner", "-loglevel", "error", "-nostdin", "-re",
                             "-f", "lavfi", "-i", f"sine=frequency={hz}:sample_rate=48000", "-t", str(seconds),
                             "-c:a", "libopus", "-b:a", "64k", "-f", "rtp", f"rtp://{to[0]}:{to[1]}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _records(proc: subprocess.Popen) -> list[dict]:
    """Stop the node; every line it logged, as the JSON objects they are."""
    proc.send_signal(signal.SIGTERM)
    try:
        err = proc.communicate(timeout=15)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return [json.loads(line) for line in err.splitlines() if line.strip()]


@pytest.fixture
def nodes():
    """Nodes a test started, stopped even when it fails half-way."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_killed_publisher_does_not_lock_its_room(tmp_path, nodes) -> None:
    proc, ports = _serve(tmp_path)
    nodes.append(proc)
    crowd = LoopbackCrowd(2, ports["listen"], "live")
    first = second = None
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert crowd.join().accepted == 2
        first = _plain_ffmpeg(ports["ingest"], 30, 440)
        deadline = time.monotonic() + 20
        while scrape(ports["admin"])['relay_room_packets_in_total{room="live"}'] < 50:
            assert time.monotonic() < deadline, "the first publisher never reached the room"
            crowd.crowd.poll(20)
        first.send_signal(signal.SIGKILL)      # a crashed encoder: no BYE
        first.wait(10)
        # a new stream at once is refused while the first may only be pausing ...
        for k in range(10):
            probe.sendto(rtp(k, 960 * k, 0xB0B, bytes(40)), ports["ingest"])
        quiet_until = time.monotonic() + PLAIN_TAKEOVER_S + 0.8   # ... and the log tells the stop once it is one
        while time.monotonic() < quiet_until:
            crowd.crowd.poll(50)
        before = scrape(ports["admin"])['relay_room_packets_in_total{room="live"}']
        heard = crowd.crowd.totals()["received"]
        second = _plain_ffmpeg(ports["ingest"], PLAIN_TAKEOVER_S + 3, 660)
        end = time.monotonic() + PLAIN_TAKEOVER_S + 15
        while second.poll() is None and time.monotonic() < end:
            crowd.crowd.poll(50)
        assert second.wait(5) == 0
        crowd.crowd.poll(300)
        m = scrape(ports["admin"])
        taken = m['relay_room_packets_in_total{room="live"}'] - before
        assert m["relay_takeovers_refused_total"] == 10
        assert taken >= 50 * 2, (taken, m['relay_drops_total{reason="foreign"}'])
        assert m["relay_source_restarts_total"] == 1
        assert crowd.crowd.totals()["received"] - heard >= 2 * 100     # and both listeners hear it
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
        crowd.close()
        probe.close()
    records = _records(proc)
    stopped = [r["msg"] for r in records if r.get("event") == "publisher_stopped"]
    assert any("without a BYE" in s and f"after {PLAIN_TAKEOVER_S:g} s of silence" in s for s in stopped), stopped
    assert [r.get("event") for r in records].count("publisher_started") == 2   # the second one took the room


def test_a_strict_room_stays_with_its_publisher_until_bye_or_release(tmp_path, nodes) -> None:
    proc, ports = _serve(tmp_path, 'takeover_after = "never"\n')
    nodes.append(proc)
    pub, other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for k in range(10):
            pub.sendto(rtp(k, 960 * k, 0xA, bytes(40)), ports["ingest"])
            time.sleep(0.02)
        time.sleep(PLAIN_TAKEOVER_S + 0.5)
        for k in range(20):
            other.sendto(rtp(k, 960 * k, 0xB, bytes(40)), ports["ingest"])
            time.sleep(0.02)
        m = scrape(ports["admin"])
        assert m['relay_room_packets_in_total{room="live"}'] == 10
        assert m["relay_takeovers_refused_total"] == 20
    finally:
        pub.close()
        other.close()
    stopped = [r["msg"] for r in _records(proc) if r.get("event") == "publisher_stopped"]
    assert any("without a BYE" in s and "release" in s for s in stopped), stopped


def test_a_bye_frees_the_room_and_the_log_says_so(tmp_path, nodes) -> None:
    proc, ports = _serve(tmp_path)
    nodes.append(proc)
    pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for k in range(10):
            pub.sendto(rtp(k, 960 * k, 0xA, bytes(40)), ports["ingest"])
            time.sleep(0.02)
        bye = b"\x80\xc9\x00\x01\x00\x00\x00\x0a" + b"\x81\xcb\x00\x01\x00\x00\x00\x0a"
        pub.sendto(bye, ports["ingest"])
        deadline = time.monotonic() + 10
        while scrape(ports["admin"])["relay_publisher_byes_total"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(2.8)       # the stop is told once the room has been quiet for 2 s
    finally:
        pub.close()
    stopped = [r["msg"] for r in _records(proc) if r.get("event") == "publisher_stopped"]
    assert len(stopped) == 1 and "BYE" in stopped[0] and "free" in stopped[0], stopped
