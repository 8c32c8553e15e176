"""Strangers' traffic never costs established listeners their sessions:
a flood of JOINs with bad tokens, JOINs with forged cookies,
KEEPALIVEs for no session and garbage, from 200 loopback addresses, is
sorted by the listener port's gate in C, while three listeners keep their
sessions with KEEPALIVEs that are all answered, and a newcomer still joins.

Before the gate, the node read the port one datagram at a time in Python:
the kernel dropped most of the port's datagrams, the listeners' KEEPALIVEs
with the rest, and their sessions expired. The flood here is bounded in
count and time, runs in its own process (its rate is whatever this machine
gives it), and only behaviour is asserted, never speed.
"""
from __future__ import annotations

import select
import socket
import subprocess
import sys
import time

import pytest

from relay.testing.loadgen import scrape
from relay.wire.protocol import (Accept, Challenge, Join, Keepalive, Leave, ProtocolError, Reason, Reject, decode,
                                 encode)
from relay.wire.tokens import mint
from tests.conftest import SECRET, start_relay, stop

FLOOD_SECONDS = 6.0
FLOOD_MAX = 1_500_000       # datagrams at most, whatever the rate
LISTENERS = 3
pytestmark = pytest.mark.solo   # it loads the whole machine: run alone (pyproject.toml)

# the flooder: one socket per source address, the four kinds of unknown
# datagram in turn, as fast as one Python process sends them
FLOODER = r"""
import os, socket, struct, sys, time
host, port, seconds, most = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
socks = []
for i in range(200):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((f"127.3.{i // 250}.{1 + i % 250}", 0))
    s.setblocking(False)
    socks.append(s)
room, token = b"live", b"eyJhbGciOiJIUzI1NiJ9.bad.token"
def join(cookie):
    body = bytes([0x0B, 1, 1, 0, len(room)]) + room + struct.pack("!H", len(token)) + token
    body += bytes([len(cookie)]) + cookie
    return body + bytes(128 - len(body))
kinds = [join(b""), join(os.urandom(20)), bytes([0x0B, 1, 5, 0]) + os.urandom(8) + bytes(4), os.urandom(60)]
sent, end, to = 0, time.monotonic() + seconds, (host, port)
while sent < most and time.monotonic() < end:
    for s in socks:
        for k in kinds:
            try:
                s.sendto(k, to)
            except OSError:
                pass
        sent += 4
    for s in socks:   # the node's CHALLENGEs and REJECTs: read and thrown away
        try:
            while s.recv(256):
                pass
        except OSError:
            pass
print(sent)
"""


def _join(sock: socket.socket, node: tuple, room: str, token: str, give_up: float = 5.0) -> Accept | None:
    """The handshake, retransmitted every 250 ms as a client does."""
    deadline, msg, asked = time.monotonic() + give_up, encode(Join(room, token)), 0.0
    while time.monotonic() < deadline:
        if time.monotonic() > asked + 0.25:
            sock.sendto(msg, node)
            asked = time.monotonic()
        if not select.select([sock], [], [], 0.05)[0]:
            continue
        data = sock.recv(4096)
        if data[:1] != b"\x0b":
            continue
        m = decode(data)
        if isinstance(m, Challenge):
            msg, asked = encode(Join(room, token, m.cookie)), 0.0
        elif isinstance(m, Accept):
            return m
    return None


def _answers(sock: socket.socket) -> tuple[int, int]:
    """KEEPALIVE echoes and unknown_session REJECTs waiting on `sock`."""
    echoes = ended = 0
    while select.select([sock], [], [], 0)[0]:
        data = sock.recv(4096)
        if data[:1] != b"\x0b":
            continue   # audio
        try:
            m = decode(data)
        except ProtocolError:
            continue
        if isinstance(m, Keepalive):
            echoes += 1
        elif isinstance(m, Reject) and m.reason == Reason.UNKNOWN_SESSION:
            ended += 1
    return echoes, ended


def test_flood_of_strangers_does_not_end_sessions_or_stop_joins(tmp_path) -> None:
    relay = start_relay(tmp_path, auth="jwt", extra_node="keepalive_interval = 0.5\nsession_timeout = 1.0\n")
    token = mint(SECRET, relay.room)
    socks: list[socket.socket] = []
    session: dict[socket.socket, bytes] = {}
    flooder = None
    try:
        for i in range(LISTENERS):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((f"127.2.9.{i + 1}", 0))
            socks.append(s)
            accepted = _join(s, relay.listen, relay.room, token)
            assert accepted is not None, "could not join before the flood"
            session[s] = accepted.session_id
        flooder = subprocess.Popen([sys.executable, "-c", FLOODER, *map(str, relay.listen), str(FLOOD_SECONDS),
                                    str(FLOOD_MAX)], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)   # the flood is running
        sent_keepalives = echoes = ended = 0
        newcomer_joined = False
        end = time.monotonic() + FLOOD_SECONDS - 1.0
        while time.monotonic() < end:
            for s in socks:
                s.sendto(encode(Keepalive(session[s])), relay.listen)
                sent_keepalives += 1
            time.sleep(0.4)
            for s in socks:
                e, x = _answers(s)
                echoes, ended = echoes + e, ended + x
            if not newcomer_joined:
                fresh = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                fresh.bind(("127.2.9.200", 0))
                newcomer = _join(fresh, relay.listen, relay.room, token, give_up=2.0)
                if newcomer is not None:   # it leaves at once: its session must not time out
                    fresh.sendto(encode(Leave(newcomer.session_id)), relay.listen)
                    newcomer_joined = True
                fresh.close()
        sent = int(flooder.communicate(timeout=30)[0])
        m = scrape(relay.admin)
        dropped = sum(v for k, v in m.items() if k.startswith("relay_control_gate_drops_total"))
        challenged = m.get('relay_control_gate_total{outcome="challenged"}', 0.0)
        print(f"flood {sent} datagrams, gate dropped {dropped:.0f} and challenged {challenged:.0f}; "
              f"keepalives {sent_keepalives}, echoed {echoes}")
        assert sent > 20_000, "the flood did not run"
        assert ended == 0 and m["relay_timeouts_total"] == 0, "a listener's session expired under the flood"
        assert echoes >= 0.9 * sent_keepalives, (echoes, sent_keepalives)
        assert newcomer_joined, "a newcomer could not join during the flood"
        assert dropped + challenged > sent / 4, (dropped, challenged, sent)   # sorted in C, not in Python
    finally:
        if flooder is not None and flooder.poll() is None:
            flooder.kill()
            flooder.wait()
        for s in socks:
            s.close()
        assert stop(relay.proc) == 0
