"""`relay listen` against a node played by the test, which can send what an
attacker able to forge the node's address would: a REJECT that redirects
the listener without proof that it comes from the node, and an ACCEPT that
asks for keepalives as fast as possible. The client keeps its session,
clamps what it is told, and follows only a proven redirect."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

from relay.wire.protocol import (Accept, Challenge, Join, Keepalive, Leave, Reason, Reject, decode,
                                 encode)

SESSION = b"S3SS10N!"


class FakeNode:
    """Answers the handshake like a node, then sends what it is told to."""

    def __init__(self, keepalive_ms: int = 1000) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.addr = self.sock.getsockname()
        self.keepalive_ms = keepalive_ms
        self.client: tuple | None = None
        self.cookie = b"\x00\x00\x00\x01" + b"C" * 16
        self.joins = self.keepalives = 0
        self.left = False
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            msg = decode(data)
            if isinstance(msg, Join) and not msg.cookie:
                self.sock.sendto(encode(Challenge(self.cookie)), addr)
            elif isinstance(msg, Join):
                self.joins += 1
                self.client = addr
                self.sock.sendto(encode(Accept(SESSION, 77, self.keepalive_ms, 15_000)), addr)
            elif isinstance(msg, Keepalive):
                self.keepalives += 1
            elif isinstance(msg, Leave):
                self.left = True

    def send(self, msg: Reject) -> None:
        assert self.client is not None
        self.sock.sendto(encode(msg), self.client)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


def _listen(node: FakeNode, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "relay", "listen", "--server", f"127.0.0.1:{node.addr[1]}",
                             "--duration", str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_joined(node: FakeNode) -> None:
    deadline = time.monotonic() + 10
    while node.client is None:
        assert time.monotonic() < deadline, "the client never joined"
        time.sleep(0.05)


def test_a_redirect_without_proof_is_not_followed() -> None:
    node, elsewhere = FakeNode(), FakeNode()
    try:
        p = _listen(node, 3)
        _wait_joined(node)
        node.send(Reject(Reason.DRAINING, f"127.0.0.1:{elsewhere.addr[1]}"))           # forged: no proof
        node.send(Reject(Reason.UNKNOWN_SESSION))                                     # forged: no proof
        _, err = p.communicate(timeout=20)
        # it stayed for its whole duration: the fake node sends no audio, so it says so (5)
        assert p.returncode == 5, err
        assert elsewhere.joins == 0 and node.joins == 1, err
        assert "ignored a REJECT that did not carry this session's id (draining, to 127.0.0.1:" in err
        assert "Traceback" not in err
    finally:
        node.close()
        elsewhere.close()


def test_a_proven_redirect_is_followed() -> None:
    node, elsewhere = FakeNode(), FakeNode()
    try:
        p = _listen(node, 3)
        _wait_joined(node)
        node.send(Reject(Reason.DRAINING, f"127.0.0.1:{elsewhere.addr[1]}", proof=SESSION))
        _, err = p.communicate(timeout=20)
        assert p.returncode == 5, err   # no audio from either fake node
        assert elsewhere.joins == 1, err
    finally:
        node.close()
        elsewhere.close()


def test_a_keepalive_interval_of_zero_is_clamped() -> None:
    node = FakeNode(keepalive_ms=0)
    try:
        p = _listen(node, 2)
        _, err = p.communicate(timeout=20)
        assert p.returncode == 5, err   # no audio from the fake node
        # at the 100 ms floor: about 20 in 2 s, not a hundred thousand
        assert 5 <= node.keepalives <= 30, node.keepalives
        assert "using 100 ms" in err
    finally:
        node.close()
