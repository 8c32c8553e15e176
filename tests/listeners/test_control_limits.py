"""The limits of the control protocol agree end to end: the longest token
the protocol allows (2,048 bytes) is admitted by a live node, and one byte
more is refused by the protocol itself, not lost in a short buffer."""
from __future__ import annotations

import socket
import struct
import time

import jwt
import pytest

from relay.wire.protocol import (MAX_CONTROL, MAX_TOKEN, Accept, Challenge, Join, ProtocolError, decode,
                                 encode)
from relay.testing.loadgen import scrape
from tests.conftest import SECRET, start_relay, stop


def _token_of_length(room: str, n: int) -> str:
    now = int(time.time())
    for extra in range(4):
        claims = {"room": room, "role": "listen", "iat": now, "exp": now + 600, "q": "q" * extra, "pad": ""}
        base = len(jwt.encode(claims, SECRET, algorithm="HS256"))
        claims["pad"] = "x" * max(0, (n - base) * 3 // 4)
        for _ in range(8):
            token = jwt.encode(claims, SECRET, algorithm="HS256")
            if len(token) == n:
                return token
            claims["pad"] += "x" if len(token) < n else ""
            if len(token) > n:
                break
    raise AssertionError(f"could not make a token of {n} bytes")


def _join(sock: socket.socket, server: tuple, room: str, token: str) -> object:
    sock.sendto(encode(Join(room, token)), server)
    challenge = decode(sock.recv(4096))
    assert isinstance(challenge, Challenge)
    request = encode(Join(room, token, challenge.cookie))
    assert len(request) <= MAX_CONTROL
    sock.sendto(request, server)
    return decode(sock.recv(4096))


def test_longest_token_is_admitted_and_one_byte_more_is_refused(tmp_path) -> None:
    relay = start_relay(tmp_path, auth="jwt")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    try:
        token = _token_of_length(relay.room, MAX_TOKEN)
        assert isinstance(_join(sock, relay.listen, relay.room, token), Accept)
        with pytest.raises(ValueError):
            encode(Join(relay.room, token + "x"))
        # the same on the wire: a JOIN carrying 2,049 token bytes does not parse
        room = relay.room.encode()
        long_join = (bytes([0x0B, 1, 1, 0, len(room)]) + room + struct.pack("!H", MAX_TOKEN + 1)
                     + b"t" * (MAX_TOKEN + 1) + b"\x00")
        with pytest.raises(ProtocolError):
            decode(long_join)
        before = scrape(relay.admin)["relay_control_malformed_total"]
        sock.sendto(long_join, relay.listen)
        with pytest.raises(TimeoutError):
            sock.settimeout(1)
            sock.recv(4096)
        assert scrape(relay.admin)["relay_control_malformed_total"] == before + 1
    finally:
        sock.close()
        assert stop(relay.proc) == 0
