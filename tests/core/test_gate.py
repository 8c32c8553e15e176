"""The listener port's gate (core/gate.pxi) on its own, on real loopback
sockets: what it passes up, answers or drops for each kind of datagram from
a session's address and from a stranger, its per-source and node-wide
bounds, its table of sessions' addresses against a Python set, and its
cookies against relay.wire.cookies.CookieJar byte for byte (the Python jar
is the oracle: a cookie made by either must be accepted by the other).

Every exchange is bounded: a handful of datagrams, drained until the gate's
counters account for each of them or a deadline passes; only counts and
bytes are asserted, never time.
"""
from __future__ import annotations

import gc
import os
import random
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from relay._core import GATE_COUNTERS, ControlGate, allocation_balance
from relay.wire.addr import to_sockaddr
from relay.wire.cookies import CookieJar
from relay.wire.protocol import (Challenge, Join, Keepalive, Leave, Reason, Reject, decode, encode)

SECRET = b"gate-test-secret-0123456789abcdef"
SEED = bytes(range(16))          # fixed, so a test can aim addresses at one slot of the table
SID = bytes.fromhex("0102030405060708")
DEADLINE_S = 2.0                 # per exchange: far above loopback's microseconds, bounded all the same
# each datagram the gate sees lands in exactly one of these; a JOIN with a
# bad cookie also counts in stale_cookies, and unsent counts replies
SORTED = tuple(k for k in GATE_COUNTERS if k not in ("stale_cookies", "unsent"))


@dataclass
class Port:
    """A listener socket with its gate, and the family its addresses come in."""

    sock: socket.socket
    gate: ControlGate
    family: int

    @property
    def addr(self) -> tuple:
        """Where clients send to."""
        return self.sock.getsockname()[:2]

    def raw(self, client: socket.socket) -> bytes:
        """`client`'s address as the listener's recvmmsg writes it (and as
        relay.wire.addr makes it for the Python side)."""
        host, port = client.getsockname()[:2]
        return to_sockaddr((host, port), self.family)


def sorted_total(gate: ControlGate) -> int:
    """Datagrams the gate has sorted so far."""
    c = gate.counters()
    return sum(c[k] for k in SORTED)


def drain(port: Port, expect: int) -> list[tuple[bytes, tuple]]:
    """Drain until the gate has sorted `expect` more datagrams (loopback
    delivers them at once, but not by contract), or the deadline passes;
    what came up."""
    start = sorted_total(port.gate)
    up: list[tuple[bytes, tuple]] = []
    end = time.monotonic() + DEADLINE_S
    for _ in range(1000):
        up += port.gate.drain(port.sock.fileno(), 4)
        if sorted_total(port.gate) - start >= expect or time.monotonic() > end:
            break
        select.select([port.sock], [], [], 0.05)
    assert sorted_total(port.gate) - start == expect
    return up


def recv(client: socket.socket) -> bytes:
    """The next datagram to `client`, waiting at most the deadline."""
    ready, _, _ = select.select([client], [], [], DEADLINE_S)
    assert ready, "no reply"
    return client.recv(65536)


def join(cookie: bytes = b"", **kw: object) -> bytes:
    """A listener's JOIN, as relay listen sends it."""
    return encode(Join(room="live", token="t0k3n", cookie=cookie, **kw))  # type: ignore[arg-type]


def keepalive() -> bytes:
    """A listener's KEEPALIVE for session SID."""
    return encode(Keepalive(SID))


def make_port(family: int, host: str, capacity: int = 64) -> Port:
    """A bound, non-blocking listener socket and a gate with the test secret."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        # off, so an IPv4 client reaches the v4-mapped listener
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((host, 0))
    sock.setblocking(False)
    return Port(sock, ControlGate(capacity, SECRET, SEED, 10.0), family)


# the three ways a listener's address reaches the gate: IPv4 on an IPv4
# socket, IPv4 mapped on a dual-stack IPv6 one (what `listen = "::"` gives),
# IPv6; the client socket's family and host for each
FAMILIES = {
    "ipv4": (socket.AF_INET, "127.0.0.1", socket.AF_INET, "127.0.0.1"),
    "mapped": (socket.AF_INET6, "::ffff:127.0.0.1", socket.AF_INET, "127.0.0.1"),
    "ipv6": (socket.AF_INET6, "::1", socket.AF_INET6, "::1"),
}


@pytest.fixture(params=list(FAMILIES))
def fam(request: pytest.FixtureRequest) -> Iterator[tuple[Port, socket.socket]]:
    """A listener port and one client socket, in each family."""
    pfam, phost, cfam, chost = FAMILIES[request.param]
    port = make_port(pfam, phost)
    client = socket.socket(cfam, socket.SOCK_DGRAM)
    client.bind((chost, 0))
    client.connect(port.addr if cfam == pfam else ("127.0.0.1", port.addr[1]))
    yield port, client
    client.close()
    port.sock.close()


@pytest.fixture
def v4() -> Iterator[Port]:
    """An IPv4 listener port; its clients are made by `client4`."""
    port = make_port(socket.AF_INET, "127.0.0.1")
    yield port
    port.sock.close()


def client4(port: Port, host: str = "127.0.0.1", n: int = 1) -> list[socket.socket]:
    """`n` client sockets on `host`, connected to `port`."""
    out = []
    for _ in range(n):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.bind((host, 0))
        c.connect(port.addr)
        out.append(c)
    return out


def first_reply_is_challenge(port: Port, client: socket.socket) -> None:
    """Sends a JOIN and checks the first thing `client` receives is its
    CHALLENGE: so nothing was sent to it before (a socket's queue is FIFO)."""
    client.send(join())
    drain(port, 1)
    assert isinstance(decode(recv(client)), Challenge)


# ------------------------------------------------------------ sorting


def test_sessions_datagrams_all_come_up_unchanged(fam: tuple[Port, socket.socket]) -> None:
    port, client = fam
    port.gate.known_add(port.raw(client))
    kinds = [bytes([0x80, 111]) + os.urandom(30),              # RTP (a speaker's)
             bytes([0x81, 205]) + os.urandom(14),              # RTCP (a NACK)
             keepalive(), encode(Leave(SID)), join(), b"\x0b\x01\x02\x00" + bytes(21),
             b"x", os.urandom(300)]
    for k in kinds:
        client.send(k)
    up = drain(port, len(kinds))
    assert [d for d, _ in up] == kinds
    assert {to_sockaddr(a, port.family) for _, a in up} == {port.raw(client)}
    c = port.gate.counters()
    assert c["known"] == len(kinds) and sum(c.values()) == len(kinds)


def test_strangers_media_leave_and_node_messages_are_dropped(fam: tuple[Port, socket.socket]) -> None:
    port, client = fam
    media = [bytes([0x80, 111]) + os.urandom(30), bytes([0x81, 205]) + os.urandom(14), encode(Leave(SID))]
    junk = [b"\x0b\x01", b"x", b"\x00" * 40, b"\x0b\x01\x02\x00" + bytes(21),       # short, not ours, a CHALLENGE
            b"\x0b\x01\x03\x00" + bytes(20), b"\x0b\x01\x04\x00\x01\x00",              # ACCEPT, REJECT
            b"\x0b\x01\x01\x00\x04room" + bytes(8),                                   # a JOIN under MIN_JOIN
            b"\x0b\x01\x01\x00\x41" + bytes(200),                                     # room longer than 64
            b"\x0b\x01\x01\x00\x04room\x7f\xff" + bytes(200),                         # token past the end
            b"\x0b\x01\x05\x00" + bytes(6),                                           # a KEEPALIVE under 12
            join() + bytes(4097 - len(join()))]                                       # truncated (4097 bytes)
    for k in media + junk:
        client.send(k)
    assert drain(port, len(media) + len(junk)) == []
    c = port.gate.counters()
    assert (c["not_session"], c["malformed"]) == (len(media), len(junk))
    first_reply_is_challenge(port, client)


def test_join_without_cookie_gets_the_jars_challenge(fam: tuple[Port, socket.socket]) -> None:
    port, client = fam
    jar = CookieJar(SECRET, 10.0)
    t0 = int(time.monotonic())
    client.send(join())
    assert drain(port, 1) == []
    reply = recv(client)
    t1 = int(time.monotonic())
    cookie = decode(reply).cookie  # type: ignore[union-attr]
    issued = int.from_bytes(cookie[:4], "big")
    # the gate's clock is the policy's (time.monotonic), to the second
    assert t0 <= issued <= t1
    assert reply == encode(Challenge(jar.make(port.raw(client), issued)))
    assert jar.check(cookie, port.raw(client), time.monotonic())
    assert port.gate.counters()["challenges"] == 1


def test_join_with_the_jars_cookie_comes_up(fam: tuple[Port, socket.socket]) -> None:
    port, client = fam
    jar = CookieJar(SECRET, 10.0)
    good = join(jar.make(port.raw(client), time.monotonic()))
    client.send(good)
    up = drain(port, 1)
    assert [d for d, _ in up] == [good]
    assert to_sockaddr(up[0][1], port.family) == port.raw(client)
    assert port.gate.counters()["joins"] == 1


def test_join_with_the_gates_own_cookie_comes_up(fam: tuple[Port, socket.socket]) -> None:
    # the round trip a listener makes: JOIN, CHALLENGE, JOIN with its cookie
    port, client = fam
    client.send(join())
    drain(port, 1)
    cookie = decode(recv(client)).cookie  # type: ignore[union-attr]
    client.send(join(cookie))
    assert [d for d, _ in drain(port, 1)] == [join(cookie)]
    c = port.gate.counters()
    assert (c["challenges"], c["joins"], c["stale_cookies"]) == (1, 1, 0)


def test_bad_cookies_are_challenged_again_as_the_jar_would_refuse_them(fam: tuple[Port, socket.socket]) -> None:
    port, client = fam
    jar = CookieJar(SECRET, 10.0)
    raw, now = port.raw(client), time.monotonic()
    other = bytearray(raw)
    other[3] ^= 1                                                     # another port's
    forged = jar.make(raw, now)[:4] + os.urandom(16)
    bad = [forged, jar.make(raw, now - 30), jar.make(raw, now + 30), jar.make(bytes(other), now),
           CookieJar(b"another secret", 10.0).make(raw, now), jar.make(raw, now)[:19]]
    for cookie in bad:
        assert not jar.check(cookie, raw, now)
        client.send(join(cookie))
    assert drain(port, len(bad)) == []
    c = port.gate.counters()
    assert (c["stale_cookies"], c["challenges"]) == (len(bad), len(bad))
    for _ in bad:
        assert isinstance(decode(recv(client)), Challenge)


def test_keepalive_for_no_session_gets_reject_unknown_session(fam: tuple[Port, socket.socket]) -> None:
    port, client = fam
    client.send(keepalive())
    assert drain(port, 1) == []
    reply = recv(client)
    # what the policy answers (sessions.py): the id asked about as proof, and
    # not longer than the KEEPALIVE (no amplification)
    assert reply == encode(Reject(Reason.UNKNOWN_SESSION, proof=SID))
    assert len(reply) <= len(keepalive())
    assert port.gate.counters()["unknown_session"] == 1


def test_only_the_policy_can_answer_a_speakers_key_exchange_or_another_version(
        fam: tuple[Port, socket.socket]) -> None:
    port, client = fam
    keyx = encode(Join(room="live", token="", keyx=True))
    v2 = b"\x0b\x02\x01\x00" + bytes(124)
    for k in (keyx, v2):
        client.send(k)
    assert [d for d, _ in drain(port, 2)] == [keyx, v2]
    assert port.gate.counters()["other"] == 2


# ------------------------------------------------------------ bounds


def test_per_source_bound_drops_one_address_not_another(v4: Port) -> None:
    # one per 100 s, a burst of 3: four go through whatever the machine's speed
    v4.gate.limits(per_source=0.01, per_source_burst=3.0)
    (loud,), (quiet,) = client4(v4, "127.0.0.1"), client4(v4, "127.0.0.2")
    for _ in range(10):
        loud.send(keepalive())
    drain(v4, 10)
    c = v4.gate.counters()
    assert (c["unknown_session"], c["source_rate"]) == (4, 6)
    for _ in range(4):
        assert decode(recv(loud)) == Reject(Reason.UNKNOWN_SESSION)
    quiet.send(keepalive())
    drain(v4, 1)
    assert decode(recv(quiet)) == Reject(Reason.UNKNOWN_SESSION)
    # a session's address is never rate-bound
    v4.gate.known_add(v4.raw(loud))
    for _ in range(10):
        loud.send(keepalive())
    assert len(drain(v4, 10)) == 10
    for s in (loud, quiet):
        s.close()


def test_node_wide_reply_bound(v4: Port) -> None:
    # one reply per 100 s, node-wide, with a window of one: two replies, from any addresses
    v4.gate.limits(per_source=0, challenge_rate=0.01)
    clients = client4(v4, "127.0.0.1", 3) + client4(v4, "127.0.0.3", 2)
    for c in clients:
        c.send(join())
    drain(v4, len(clients))
    c = v4.gate.counters()
    assert (c["challenges"], c["node_rate"]) == (2, 3)
    for s in clients:
        s.close()


def test_node_wide_bound_on_what_goes_up(v4: Port) -> None:
    v4.gate.limits(per_source=0, up_rate=0.01)
    jar = CookieJar(SECRET, 10.0)
    clients = client4(v4, "127.0.0.1", 5)
    for c in clients:
        c.send(join(jar.make(v4.raw(c), time.monotonic())))
    assert len(drain(v4, len(clients))) == 2
    c = v4.gate.counters()
    assert (c["joins"], c["node_rate"]) == (2, 3)
    for s in clients:
        s.close()


# ------------------------------------------------------------ cookies, no sockets


@pytest.mark.parametrize("addr", [("127.0.0.1", 5004), ("10.1.2.3", 65535), ("::ffff:192.0.2.7", 40000, 0, 0),
                                  ("::1", 1, 0, 0), ("2001:db8::1", 443, 7, 3)])
def test_cookie_bytes_equal_the_jars(addr: tuple) -> None:
    jar = CookieJar(SECRET, 10.0)
    gate = ControlGate(8, SECRET, SEED, 10.0)
    raw = to_sockaddr(addr)
    for issued in (0, 1, 1_000_000, 2**31, 2**32 - 1):
        assert gate.cookie(raw, issued) == jar.make(raw, issued)
    # a 64-byte secret is the longest HMAC takes unhashed, and the gate's bound
    long = os.urandom(64)
    assert ControlGate(8, long, SEED).cookie(raw, 77) == CookieJar(long).make(raw, 77)


# ------------------------------------------------------------ the table of sessions' addresses


def _mix(k: int) -> int:
    """The gate's hash finaliser (murmur3's), to aim addresses at one slot."""
    m = 2**64 - 1
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & m
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & m
    return k ^ (k >> 33)


def home(raw: bytes, mask: int) -> int:
    """The slot an IPv4 sockaddr hashes to in a gate seeded with SEED."""
    low = b"\x00\x00\xff\xff" + raw[4:8]        # the last 8 of its 16 address bytes, v4-mapped
    key = int.from_bytes(low, "little") ^ int.from_bytes(SEED[:8], "little") ^ int.from_bytes(raw[2:4], "big")
    return _mix(key) & mask


def test_table_add_drop_readd(v4: Port) -> None:
    (a,), (b,) = client4(v4, "127.0.0.1"), client4(v4, "127.0.0.4")
    g = v4.gate
    for op, want in ((lambda: g.known_add(v4.raw(a)), {a}), (lambda: g.known_add(v4.raw(a)), {a}),
                     (lambda: g.known_add(v4.raw(b)), {a, b}), (lambda: g.known_drop(v4.raw(a)), {b}),
                     (lambda: g.known_drop(v4.raw(a)), {b}), (lambda: g.known_add(v4.raw(a)), {a, b}),
                     (lambda: g.known_drop(v4.raw(b)), {a}), (lambda: g.known_drop(v4.raw(a)), set())):
        op()
        assert g.known == len(want)
        for s in (a, b):
            s.send(keepalive())
        up = drain(v4, 2)
        assert {to_sockaddr(addr, socket.AF_INET) for _, addr in up} == {v4.raw(s) for s in want}
    for s in (a, b):
        s.close()


def test_table_holds_its_capacity_and_ignores_what_is_no_address() -> None:
    gate = ControlGate(300, SECRET, SEED)
    addrs = [to_sockaddr((f"10.0.{i // 250}.{i % 250}", 1000 + i)) for i in range(300)]
    for a in addrs:
        gate.known_add(a)
    assert gate.known == 300
    # neither family, or shorter than its family needs: no entry, no read past the bytes
    for junk in (b"", b"\x02\x00", b"\x02\x00\x13\x8c\x7f\x00", b"\x0a\x00" + bytes(10), b"\x01\x00" + bytes(30)):
        gate.known_add(junk)
        gate.known_drop(junk)
    assert gate.known == 300
    for a in addrs:
        gate.known_drop(a)
    assert gate.known == 0


def test_table_matches_a_set_through_collisions_and_deletions(v4: Port) -> None:
    # a gate of capacity 64 has 1024 slots: aim real clients and made-up
    # addresses at the last slots and the first (a probe run that wraps),
    # then add and drop at random and check every lookup against a set
    mask = 1023
    hot = {1021, 1022, 1023, 0, 1}
    rng = random.Random(28)
    clients: list[socket.socket] = []
    for i in range(200_000):
        host, p = f"127.77.{i % 200}.{1 + (i // 200) % 250}", 40000 + i // 50000
        if home(to_sockaddr((host, p)), mask) in hot:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.bind((host, p))
            except OSError:
                s.close()
                continue
            s.connect(v4.addr)
            clients.append(s)
            if len(clients) == 16:
                break
    made_up = [to_sockaddr((f"10.9.{i // 250}.{i % 250}", 7000)) for i in range(5000)]
    crowd = [a for a in made_up if home(a, mask) in hot][:16] + made_up[:24]
    assert len(clients) == 16 and len(crowd) == 40
    real = {v4.raw(s): s for s in clients}
    pool = list(real) + crowd
    model: set[bytes] = set()
    v4.gate.limits(per_source=0, challenge_rate=0)
    for round_ in range(6):
        for _ in range(60):
            a = rng.choice(pool)
            if rng.random() < 0.55:
                v4.gate.known_add(a)
                model.add(a)
            else:
                v4.gate.known_drop(a)
                model.discard(a)
        assert v4.gate.known == len(model), round_
        for s in clients:
            s.send(keepalive())
        up = drain(v4, len(clients))
        assert {to_sockaddr(addr, socket.AF_INET) for _, addr in up} == model & set(real), round_
    for s in clients:
        s.close()


# ------------------------------------------------------------ memory


def test_gate_memory_is_counted_and_freed() -> None:
    # the gate allocates from the core's counted arena: a gate made and
    # dropped leaves the balance as it found it, having moved it
    gc.collect()
    allocs0, frees0 = allocation_balance()
    gates = [ControlGate(c, SECRET, SEED) for c in (1, 1000, 100_000)]
    allocs1, frees1 = allocation_balance()
    assert allocs1 > allocs0 and frees1 == frees0
    del gates
    gc.collect()
    allocs2, frees2 = allocation_balance()
    assert allocs2 - allocs0 == frees2 - frees0 == allocs1 - allocs0


def test_bad_arguments_are_refused() -> None:
    # a capacity near 2^31 once doubled the table's size to 0 and looped for ever
    for capacity, secret, seed, lifetime in ((8, SECRET, b"short", 10.0), (8, bytes(65), SEED, 10.0),
                                             (2**24 + 1, SECRET, SEED, 10.0), (2**31 - 1, SECRET, SEED, 10.0),
                                             (8, SECRET, SEED, -1.0), (8, SECRET, SEED, float("nan"))):
        with pytest.raises(ValueError):
            ControlGate(capacity, secret, seed, lifetime)
    for args in ((8, None, SEED), (8, SECRET, None)):
        with pytest.raises(TypeError):
            ControlGate(*args)  # type: ignore[arg-type]
    gate = ControlGate(8, SECRET, SEED)
    with pytest.raises(TypeError):
        gate.known_add(None)  # type: ignore[arg-type]
    # the count is the table's own: a caller writing it would hide every session
    with pytest.raises(AttributeError):
        gate.known = 0  # type: ignore[misc]


def test_extreme_limits_stay_limits(v4: Port) -> None:
    # a burst window past int64 once became negative in the cast, and every
    # stranger's datagram was dropped; clamped, a huge burst lets all through
    v4.gate.limits(per_source=1.0, per_source_burst=1e12, up_rate=1e-30, challenge_rate=float("nan"))
    (client,) = client4(v4)
    for _ in range(5):
        client.send(keepalive())
    drain(v4, 5)
    c = v4.gate.counters()
    assert (c["unknown_session"], c["source_rate"]) == (5, 0)
    # a rate too small to count in nanoseconds is one arrival (and a window) in 1e18 ns, not none
    for _ in range(3):
        client.send(join(CookieJar(SECRET).make(v4.raw(client), time.monotonic())))
    assert len(drain(v4, 3)) == 2
    client.close()
