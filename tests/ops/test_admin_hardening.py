"""The admin port against clients that misbehave (loopback, bounded in
count and time): an oversized request head is answered 431, thousands of
slow connections cost bounded memory while the port keeps answering, and
no URL is ever built from the Host header."""
from __future__ import annotations

import json
import resource
import socket

from relay.testing.loadgen import free_port, raise_fd_limit, scrape
from tests.conftest import start_relay, stop


def _request(addr: tuple, head: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(head)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_an_oversized_request_head_is_answered_431(tmp_path) -> None:
    relay = start_relay(tmp_path)
    try:
        huge = b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * (70 * 1024) + b"\r\n\r\n"
        assert _request(relay.admin, huge).startswith(b"HTTP/1.1 431 ")
        long_line = b"GET /" + b"a" * (70 * 1024) + b" HTTP/1.1\r\n\r\n"
        assert _request(relay.admin, long_line).startswith(b"HTTP/1.1 431 ")
        assert relay.get("/healthz") == (200, "ok\n")
    finally:
        assert stop(relay.proc) == 0
    assert "Traceback" not in relay.proc.stdout.read()


def test_slow_connections_cost_bounded_memory_and_do_not_block_the_port(tmp_path) -> None:
    raise_fd_limit(11000)    # before the relay starts: it inherits the limit, as under systemd
    # as many as this machine lets both processes open, well past the 256 the node holds
    count = min(10000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200)
    assert count > 1000, "too few open files allowed here to test the connection cap"
    relay = start_relay(tmp_path)
    slow: list[socket.socket] = []
    try:
        before = scrape(relay.admin)
        for _ in range(count):
            s = socket.create_connection(relay.admin, timeout=5)
            s.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")   # and never finish
            slow.append(s)
        # a well-behaved client is still answered while they hang on
        assert relay.get("/healthz") == (200, "ok\n")
        after = scrape(relay.admin)
        # the node holds at most 256 of them (a new one evicts the oldest)
        assert after["relay_process_open_fds"] - before["relay_process_open_fds"] <= 256 + 8, (before, after)
        growth = after["relay_process_resident_memory_bytes"] - before["relay_process_resident_memory_bytes"]
        assert growth < 16 * 2**20, growth
    finally:
        for s in slow:
            s.close()
        assert stop(relay.proc) == 0


def test_quic_json_never_reflects_the_host_header(tmp_path) -> None:
    port = free_port()
    relay = start_relay(tmp_path, extra_node=f'quic = "0.0.0.0:{port}"')
    try:
        for host in (b"evil.example", b"[", b"[::1"):
            raw = _request(relay.admin, b"GET /quic.json HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]
            info = json.loads(raw.split(b"\r\n\r\n", 1)[1])
            assert b"evil" not in raw and info["webtransport"] is None and info["quic"] is None
            assert info["port"] == port and info["path"] == "/relay"
    finally:
        assert stop(relay.proc) == 0
    assert "Traceback" not in relay.proc.stdout.read()


def test_listeners_http_on_a_port_of_its_own_and_join_wants_a_token(tmp_path) -> None:
    """[node] public: /join and the page there, /rooms and /metrics only on
    the admin port (each 404 on the other). /join answers only a joiner
    with a listen token for the room, and refuses the same way whether the
    room exists or not (it listed rooms to anyone)."""
    from tests.conftest import SECRET
    from relay.wire.tokens import mint
    public = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    relay = start_relay(tmp_path, auth="jwt", extra_node=f'public = "{public[0]}:{public[1]}"')

    def get(addr: tuple, path: str) -> tuple[int, bytes]:
        head, _, body = _request(addr, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()).partition(b"\r\n\r\n")
        return int(head.split()[1]), body
    try:
        assert get(public, "/listen")[0] == 200 and get(public, "/listen.js")[0] == 200
        assert get(public, "/rooms")[0] == 404 and get(public, "/metrics")[0] == 404
        assert get(relay.admin, "/rooms")[0] == 200 and get(relay.admin, "/metrics")[0] == 200
        assert get(relay.admin, "/join?room=" + relay.room)[0] == 404
        refused = [get(public, f"/join?room={room}{tok}") for room, tok in
                   ((relay.room, ""), ("nosuchroom", ""), (relay.room, f"&token={mint(SECRET, 'other')}"),
                    (relay.room, "&token=garbage"))]
        assert [status for status, _ in refused] == [401] * 4, refused
        assert all(b"token" in body for _, body in refused)
        status, body = get(public, f"/join?room={relay.room}&token={mint(SECRET, relay.room)}")
        assert status == 200 and json.loads(body)["room"] == relay.room
    finally:
        assert stop(relay.proc) == 0
