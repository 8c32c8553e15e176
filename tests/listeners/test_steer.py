"""The listener port's eBPF steering (relay/listeners/steer.py) in the real
kernel: datagrams from an address in the sessions map land on the
sessions' socket, everyone else's on the strangers' one, and an address
taken out of the map goes back to the strangers'.

Without the program SO_REUSEPORT spreads sources over the two sockets by a
hash of the 4-tuple, so one source could land on the right socket by luck:
with four sessions and four strangers, all eight sorted right by luck is one
chance in 256. Needs root or CAP_BPF; skipped, with the kernel's reason,
where the program cannot be loaded.
"""
from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import pytest

from relay.listeners.steer import Steering

SOURCES = 4                  # sessions, and as many strangers
PER_SOURCE = 3               # datagrams each
DEADLINE_S = 2.0


def group(family: int, host: str) -> tuple[socket.socket, socket.socket]:
    """The port's two sockets, as ListenerPort.bind makes them: strangers'
    bound first (the group's index 0), sessions' second."""
    socks = []
    port = 0
    for _ in range(2):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)   # IPv4 sources arrive v4-mapped
        s.bind((host, port))
        s.setblocking(False)
        port = s.getsockname()[1]
        socks.append(s)
    return socks[0], socks[1]


@pytest.fixture(params=[(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::ffff:127.0.0.1")],
                ids=["ipv4", "mapped"])
def port(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket, Steering]]:
    """Strangers' socket, sessions' socket and the attached program."""
    strangers, sessions = group(*request.param)
    steering = Steering.attach(sessions, 64)
    if isinstance(steering, str):
        strangers.close()
        sessions.close()
        pytest.skip(f"the kernel refuses the steering program: {steering}")
    yield strangers, sessions, steering
    steering.close()
    strangers.close()
    sessions.close()


def arrivals(sock: socket.socket, want: int) -> list[tuple]:
    """Source addresses of what `sock` receives, until `want` arrived or the deadline."""
    got: list[tuple] = []
    end = time.monotonic() + DEADLINE_S
    while len(got) < want and time.monotonic() < end:
        select.select([sock], [], [], 0.05)
        for _ in range(want):
            try:
                got.append(sock.recvfrom(64)[1])
            except BlockingIOError:
                break
    return got


def ip4(addr: tuple) -> tuple[str, int]:
    """An address as an IPv4 (host, port), v4-mapped or not."""
    return addr[0].removeprefix("::ffff:"), addr[1]


def send_all(clients: list[socket.socket], to: tuple) -> None:
    """PER_SOURCE datagrams from each client."""
    for c in clients:
        for i in range(PER_SOURCE):
            c.sendto(bytes([0x0B, 1, 5, 0, i]) + bytes(11), to)


def test_sessions_datagrams_land_on_the_sessions_socket(
        port: tuple[socket.socket, socket.socket, Steering]) -> None:
    strangers, sessions, steering = port
    to = ("127.0.0.1", sessions.getsockname()[1])
    known = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(SOURCES)]
    unknown = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(SOURCES)]
    for i, c in enumerate(known + unknown):
        c.bind((f"127.0.{i}.9", 0))      # a host each, so the reuseport hash differs
    for c in known:
        # the listener socket's own view of the address: v4-mapped on a dual-stack port
        host, p = c.getsockname()
        steering.session((host if strangers.family == socket.AF_INET else "::ffff:" + host, p), True)
    send_all(known + unknown, to)
    n = SOURCES * PER_SOURCE
    on_sessions, on_strangers = arrivals(sessions, n), arrivals(strangers, n)
    assert sorted(ip4(a) for a in on_sessions) == sorted(c.getsockname() for c in known for _ in range(PER_SOURCE))
    assert sorted(ip4(a) for a in on_strangers) == sorted(c.getsockname() for c in unknown for _ in range(PER_SOURCE))
    assert steering.errors == 0

    # a session that ends: its address is a stranger's again
    for c in known:
        host, p = c.getsockname()
        steering.session((host if strangers.family == socket.AF_INET else "::ffff:" + host, p), False)
    send_all(known, to)
    assert sorted(ip4(a) for a in arrivals(strangers, n)) == sorted(
        c.getsockname() for c in known for _ in range(PER_SOURCE))
    # all of them were counted on the strangers' socket above: none can be on
    # the sessions' (read without waiting, so absence costs no deadline)
    with pytest.raises(BlockingIOError):
        sessions.recvfrom(64)
    assert steering.errors == 0
    for c in known + unknown:
        c.close()
