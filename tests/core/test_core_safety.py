"""Edges of the compiled core that are easy to get wrong: a publisher back
after days of silence, socket addresses shorter than their family needs,
and who fans out (the caller inline, or sender threads) being fixed when
the Core is built rather than guessed from a thread's state."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from relay._core import Core, Ingest
from relay.testing.model import ModelCore
from relay.wire.addr import to_sockaddr
from tests.rtp import SRC_A, header, rtp

HOUR_NS = 3600 * 1_000_000_000
DEST = to_sockaddr(("127.0.0.1", 9), socket.AF_INET)


@pytest.mark.parametrize("silence_ns", [10 * HOUR_NS, 53 * HOUR_NS, 60 * HOUR_NS, 2**62])
def test_new_publisher_after_long_silence_matches_model(silence_ns: int) -> None:
    # (now - last) * 48000 overflowed int64 after ~53 h of silence; the
    # timestamp advance must be clamped exactly as the model clamps it
    core, model = Core(4, rooms=1), ModelCore(4, rooms=1)
    for c in (core, model):
        c.room_open(0, True)
    slot = core.listener_add(0, DEST, 0x1234, 0, 0)
    mslot = model.listener_add(0, DEST, 0x1234, 0, 0)
    t0 = 1_000_000
    for c in (core, model):
        assert c.feed(0, rtp(10, 5000, 0xAAAA, b"x" * 20), SRC_A, t0) == Ingest.INGEST_OK
        assert c.feed(0, rtp(900, 77, 0xBBBB, b"y" * 20), SRC_A, t0 + silence_ns) == Ingest.INGEST_OK
    got = [header(p) for p in core.ring(slot)]
    want = [header(p) for p in model.ring(mslot)]
    assert got == want
    (_, ts0, _), (_, ts1, _) = got
    expected = 0x7FFFFFFF if silence_ns >= 12.5 * HOUR_NS else silence_ns * 48000 // 10**9
    assert (ts1 - ts0) % 2**32 == expected


def test_ipv6_source_must_be_a_whole_sockaddr_in6() -> None:
    core = Core(4, rooms=1)
    core.room_open(0, True)
    v6 = to_sockaddr(("::1", 5000), socket.AF_INET6)
    assert len(v6) == 28
    assert core.feed(0, rtp(1, 960, 1, b"z" * 10), v6) == Ingest.INGEST_OK
    # the core compares 16 address bytes at offset 8: 16 bytes are too few
    with pytest.raises(ValueError):
        core.feed(0, rtp(2, 1920, 1, b"z" * 10), v6[:16])
    with pytest.raises(ValueError):
        core.room_allow(0, v6[:24])
    with pytest.raises(ValueError):
        core.listener_add(0, v6[:20], 1, 0, 0)


def test_inline_or_threaded_is_fixed_when_built() -> None:
    assert not Core(4).threaded
    assert Core(4, shards=2).threaded
    assert Core(4, shards=1, threaded=True).threaded
    with pytest.raises(ValueError):
        Core(4, shards=2, threaded=False)
    with pytest.raises(RuntimeError):
        Core(4).run_shard(0, 1)


def test_threaded_core_never_sends_from_the_callers_thread() -> None:
    # With shard 0's sender thread stopped (as while the watchdog restarts
    # it) a threaded Core must not fall back to sending inline: that would
    # flush shard 0 from two threads at once.
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    core = Core(4, rooms=1, shards=1, threaded=True)
    core.room_open(0, True)
    core.listener_add(0, to_sockaddr(rx.getsockname()), 7, 0, 0)
    core.feed(0, rtp(1, 960, 1, b"a" * 20), SRC_A)
    assert core.flush(tx.fileno()) == 0
    assert core.counters()["packets_out"] == 0 and core.blocked == 0
    with pytest.raises(BlockingIOError):
        rx.recv(2048)
    # the restarted thread sends what was waiting
    t = threading.Thread(target=core.run_shard, args=(0, tx.fileno()))
    t.start()
    try:
        core.flush(tx.fileno())
        deadline = time.monotonic() + 5
        while core.counters()["packets_out"] == 0:
            assert time.monotonic() < deadline, "the sender thread did not send"
            time.sleep(0.005)
        rx.settimeout(2)
        assert header(rx.recv(2048))[2] == 7
    finally:
        core.stop_shards()
        t.join(5)
    assert not t.is_alive()


def test_a_held_listener_gets_nothing_and_counts_no_overflow() -> None:
    core = Core(4, rooms=1, depth=4)
    core.room_open(0, True)
    held = core.listener_add(0, b"", 1, 0, 0, pull=True)
    other = core.listener_add(0, DEST, 2, 0, 0)
    core.listener_hold(held, True)
    for k in range(10):
        core.feed(0, rtp(k, 960 * k, 9, bytes([k]) * 20), SRC_A)
    assert core.pending(held) == 0 and core.listener_stats(held)["drop_overflow"] == 0
    assert core.listener_stats(other)["drop_overflow"] == 10 - 4   # the others' rings go on as before
    assert core.room_listeners(0) == 2
    core.listener_hold(held, False)
    core.feed(0, rtp(10, 9600, 9, b"x" * 20), SRC_A)
    assert [p[12:13] for p in core.pull(held)] == [b"x"]
    # holding twice, or removing a held listener, keeps the room's list whole
    core.listener_hold(held, True)
    core.listener_hold(held, True)
    core.listener_remove(held)
    core.feed(0, rtp(11, 10560, 9, b"y" * 20), SRC_A)
    assert core.ring(other)[-1][12:13] == b"y"
