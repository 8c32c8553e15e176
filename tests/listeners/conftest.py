"""Helpers for the listeners' tests: a relay with its QUIC port, a publisher, a metric read, a raw UDP join."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import time

from relay.client.publish import ffmpeg_command
from relay.testing.loadgen import free_port
from relay.wire.protocol import Accept, Challenge, Join, decode, encode
from tests.conftest import TONE_HZ, RunningRelay, need, start_relay


QUIC_NODE = """quic = "127.0.0.1:{port}"
keepalive_interval = 1.0
session_timeout = 4.0
"""


def quic_relay(tmp_path, auth: str = "open", workers: int = 2, extra: str = "",
               extra_room: str = "") -> tuple[RunningRelay, str, str]:
    """A relay with its QUIC port; returns it, the QUIC address and the
    certificate hash the node publishes at /quic.json."""
    relay = start_relay(tmp_path, auth=auth, extra_room=extra_room,
                        extra_node=QUIC_NODE.format(port=free_port()) + f"workers = {workers}\n{extra}")
    status, body = relay.get("/quic.json")
    assert status == 200, body
    info = json.loads(body)
    assert re.fullmatch(r"[0-9a-f]{64}", info["cert_sha256"])
    assert info["webtransport"] == f"https://{info['quic']}/relay"
    return relay, info["quic"], info["cert_sha256"]


def listen_quic(relay: RunningRelay, server: str, cert: str, *extra: str) -> list[str]:
    return relay.relay_cmd("listen", "--quic", "--server", server, "--cert-hash", cert,
                           "--room", relay.room, *extra)


def publish(relay: RunningRelay, seconds: float) -> subprocess.Popen:
    need("ffmpeg")
    return subprocess.Popen(ffmpeg_command(f"sine=frequency={TONE_HZ}:sample_rate=48000", relay.ingest,
                                           lavfi=True, duration=seconds),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not exported"
    return float(m.group(1))


def wait_metric(relay: RunningRelay, name: str, ok, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = metric(relay.get("/metrics")[1], name)
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def udp_join(sock: socket.socket, room: str) -> Accept:
    sock.send(encode(Join(room, "")))
    challenge = decode(sock.recv(2048))
    assert isinstance(challenge, Challenge)
    sock.send(encode(Join(room, "", challenge.cookie)))
    while True:
        msg = sock.recv(2048)
        if msg[0] == 0x0B:
            acc = decode(msg)
            assert isinstance(acc, Accept)
            return acc


def wait_state(page, ok, timeout: float) -> dict:
    """The page's window.relayListener once `ok` says so, or as it is when
    `timeout` seconds have passed (any browser driver with evaluate())."""
    deadline = time.monotonic() + timeout
    while True:
        st = json.loads(page.evaluate("JSON.stringify(window.relayListener || null)") or "null")
        if (st and ok(st)) or time.monotonic() > deadline:
            return st
        time.sleep(0.25)
