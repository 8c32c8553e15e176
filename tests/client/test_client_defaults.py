"""The clients' defaults must not lock a room or turn listeners away: a
publisher stopped by SIGTERM or SIGHUP (a service manager, a closed
terminal, `kill`) says BYE as it does on Ctrl-C, so the next publisher
takes the room at once; a listener or speaker stopped that way says LEAVE,
freeing its place; a bare `relay listen` refused because the node is full
waits and asks again for a while instead of giving up at once."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.testing.loadgen import LoopbackCrowd, free_port, scrape, wait_ready
from tests.conftest import RunningRelay, need, start_relay, stop

PACKETS_IN = 'relay_room_packets_in_total{room="live"}'


def wait_for(relay: RunningRelay, ok, timeout: float = 20.0) -> dict[str, float]:
    """The node's metrics once `ok(metrics)` holds, or when `timeout` runs out
    (the caller's assertion then says what was wrong)."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(relay.admin)
        if ok(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def publisher(relay: RunningRelay, *args: str) -> subprocess.Popen:
    """`relay publish` to the room's ingest port, in its own process group so
    that whatever it starts (ffmpeg) can be cleaned up with it."""
    return subprocess.Popen(relay.relay_cmd("publish", "--to", f"{relay.ingest[0]}:{relay.ingest[1]}", *args),
                            env=relay.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def end(proc: subprocess.Popen) -> str:
    """Kill what is left of `proc`'s process group; its output."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group has already gone
    out, _ = proc.communicate(timeout=10)
    return out or ""


def _the_next_publisher_takes_the_room(relay: RunningRelay, first: subprocess.Popen, sig: int) -> None:
    second = None
    try:
        m = wait_for(relay, lambda m: m.get(PACKETS_IN, 0) >= 50)
        assert m.get(PACKETS_IN, 0) >= 50, "the first publisher was not heard"
        first.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            first.wait(20)
        code, out = first.returncode, end(first)
        m = wait_for(relay, lambda m: m["relay_publisher_byes_total"] >= 1, timeout=5)
        assert m["relay_publisher_byes_total"] == 1, f"no BYE after {signal.Signals(sig).name}: {out}"
        assert code == 0 and "Traceback" not in out, (code, out)
        before = m[PACKETS_IN]
        # a new stream (another SSRC) from the same allowed address
        second = publisher(relay, "--tone", "660")
        m = wait_for(relay, lambda m: m[PACKETS_IN] >= before + 50)
        assert m[PACKETS_IN] >= before + 50, "the next publisher was not let into the room"
        assert m["relay_takeovers_refused_total"] == 0, m
        assert m["relay_source_restarts_total"] == 1, m
    finally:
        end(first)
        if second is not None:
            end(second)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_tone_publisher_stopped_by_a_signal_releases_the_room(tmp_path, sig: int) -> None:
    relay = start_relay(tmp_path)
    try:
        _the_next_publisher_takes_the_room(relay, publisher(relay, "--tone", "440"), sig)
    finally:
        assert stop(relay.proc) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_file_publisher_stopped_by_a_signal_releases_the_room(tmp_path, sig: int) -> None:
    talk = tmp_path / "talk.wav"
    subprocess.run([need("ffmpeg"), "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
                    "-t", "30", str(talk)], check=True, timeout=30)
    relay = start_relay(tmp_path)
    try:
        _the_next_publisher_takes_the_room(relay, publisher(relay, "--file", str(talk)), sig)
    finally:
        assert stop(relay.proc) == 0


def _says_leave_when_stopped(relay: RunningRelay, proc: subprocess.Popen, sig: int) -> None:
    try:
        m = wait_for(relay, lambda m: m["relay_joins_total"] >= 1)
        assert m["relay_joins_total"] == 1, end(proc)
        assert m["relay_leaves_total"] == 0, m
        time.sleep(0.5)    # past the join: the client is receiving now
        proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        code, out = proc.returncode, end(proc)
        m = wait_for(relay, lambda m: m["relay_leaves_total"] >= 1, timeout=5)
        assert m["relay_leaves_total"] == 1, f"no LEAVE after {signal.Signals(sig).name}: {out}"
        assert code == 0 and "Traceback" not in out, (code, out)
    finally:
        end(proc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_listener_stopped_by_a_signal_gives_its_place_back(tmp_path, sig: int) -> None:
    relay = start_relay(tmp_path)
    try:
        proc = subprocess.Popen(relay.relay_cmd("listen", "--server", f"{relay.listen[0]}:{relay.listen[1]}",
                                                "--room", relay.room),
                                env=relay.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        _says_leave_when_stopped(relay, proc, sig)
    finally:
        assert stop(relay.proc) == 0


def test_a_speaker_stopped_by_a_signal_leaves_the_stage(tmp_path) -> None:
    from tests.stage.conftest import STAGE, speaker
    relay = start_relay(tmp_path, auth="jwt", extra_room=STAGE)
    try:
        _says_leave_when_stopped(relay, speaker(relay, "ann", 60.0), signal.SIGTERM)
    finally:
        assert stop(relay.proc) == 0


def _lines_until(proc: subprocess.Popen, needle: str, timeout: float = 30.0) -> list[str]:
    """`proc`'s output lines up to the first one holding `needle` (all of
    them, if it ends first or `timeout` passes)."""
    import selectors
    lines: list[str] = []
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(max(0.0, deadline - time.monotonic())):
            break
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if needle in line:
            break
    sel.close()
    return lines


@pytest.mark.parametrize("quic", [False, True])
def test_a_listener_turned_away_by_a_full_node_waits_for_a_place(tmp_path, quic: bool) -> None:
    """The node admits one listener and names no other node: a second `relay
    listen` says it waits, asks again, and gets in once the first has gone."""
    if quic:
        from tests.listeners.conftest import quic_relay
        relay, server, cert = quic_relay(tmp_path, extra="max_listeners = 1\n")
        how = ["--quic", "--server", server, "--cert-hash", cert]
    else:
        relay = start_relay(tmp_path, extra_node="max_listeners = 1")
        how = ["--server", f"{relay.listen[0]}:{relay.listen[1]}"]
    first = LoopbackCrowd(1, relay.listen, relay.room)
    tone = publisher(relay, "--tone", "440", "--duration", "40")
    second = None
    try:
        assert first.join().accepted == 1
        second = subprocess.Popen(relay.relay_cmd("listen", *how, "--room", relay.room, "--duration", "8"),
                                  env=relay.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = _lines_until(second, "retrying in")
        assert lines and re.fullmatch(r"relay: node full, retrying in \d+\.\d s", lines[-1]), lines
        first.leave()
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 0, "\n".join(lines) + out
        assert "Traceback" not in out, out
        heard = re.search(r"received (\d+) packets", out)
        assert heard and int(heard.group(1)) > 0, out
        m = scrape(relay.admin)
        assert m["relay_joins_total"] == 2, m
    finally:
        first.close()
        end(tone)
        if second is not None and second.poll() is None:
            second.kill()
            second.wait()
        assert stop(relay.proc) == 0


def _relay_serve_json(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "relay", "--log-format", "json", "serve", "-c", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line with --log-format json: {line!r}")
    return out


def test_log_format_json_puts_every_line_of_serve_in_json(tmp_path) -> None:
    admin = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'[node]\nlisten = "127.0.0.1:{free_port()}"\nadmin = "{admin[0]}:{admin[1]}"\n'
                   'auth = "open"\nmax_load = 0\nmax_machine_load = 0\ndrain_grace = 0\n'
                   f'[[room]]\nname = "hall"\ningest = "127.0.0.1:{free_port()}"\nsources = ["127.0.0.1"]\n')
    proc = _relay_serve_json(cfg)
    try:
        assert wait_ready(admin, proc, timeout=20)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    started = _json_lines(out)
    assert len(started) == 1 and "serving 1 room(s)" in started[0]["msg"], out
    assert started[0]["level"] == "info" and started[0]["logger"] == "relay"
    assert _json_lines(err), "the node logged nothing (auth is open: it warns)"

    # a mistake in the config: one line, in JSON too
    cfg.write_text('[node]\nlisten = "127.0.0.1:99999"\n')
    proc = _relay_serve_json(cfg)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2 and not out.strip(), (out, err)
    said = _json_lines(err)
    assert len(said) == 1 and said[0]["level"] == "error" and "99999" in said[0]["msg"], err
