"""Ring behaviour of the compiled core: wrap, overflow, packets of any
length in a byte budget, continuity across a publisher restart, slot reuse,
bounded memory under churn, and bad RTP."""
from __future__ import annotations

import gc
import os
import socket

import pytest

from relay._core import Core, Ingest, allocation_balance, listener_bytes, room_history
from relay.wire.addr import to_sockaddr
from tests.rtp import SRC_A, SRC_FOREIGN, header, rtp

DEST = to_sockaddr(("127.0.0.1", 9), socket.AF_INET)
MS = 1_000_000


def _core(depth: int = 8, **kw) -> Core:
    core = Core(16, rooms=2, depth=depth, **kw)
    core.room_open(0)
    core.room_allow(0, SRC_A)
    return core


def test_ring_keeps_last_depth_packets_and_counts_overflow() -> None:
    core = _core(depth=8)
    slot = core.listener_add(0, DEST, 0xABCD, 0, 0)
    for k in range(20):
        assert core.feed(0, rtp(100 + k, 960 * k, 7, bytes([k]) * 10), SRC_A, k * 20 * MS) == Ingest.INGEST_OK
    ring = core.ring(slot)
    assert [p[12] for p in ring] == list(range(12, 20))
    assert core.pending(slot) == 8
    assert core.listener_stats(slot)["drop_overflow"] == 12
    assert core.counters()["drop_overflow"] == 12


def _sent_and_received(core: Core, packets: list[bytes]) -> list[bytes]:
    """Feed the packets to room 0 for one listener on a real socket, flush
    after each, and return what the socket received."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(1)
    try:
        core.listener_add(0, to_sockaddr(rx.getsockname(), socket.AF_INET), 0xFEED, 0, 0)
        got = []
        for k, pkt in enumerate(packets):
            assert core.feed(0, pkt, SRC_A, k * 20 * MS) == Ingest.INGEST_OK
            assert core.flush(tx.fileno()) == 0
            got.append(rx.recv(65536))
        return got
    finally:
        rx.close()
        tx.close()


def test_every_opus_packet_size_passes_with_the_default_ring() -> None:
    # Opus frames carry at most 1,275 bytes (RFC 6716 3.4); packets of
    # several frames more: 60 ms at 510 kbit/s is 3,825 bytes. The old
    # fixed 480-byte slots dropped everything above ~187 kbit/s.
    core = _core()
    sizes = [1, 160, 468, 469, 1275, 2550, 3825, 200, 3825, 1]
    packets = [rtp(100 + k, 960 * k, 7, bytes([k + 1]) * n) for k, n in enumerate(sizes)]
    got = _sent_and_received(core, packets)
    assert [len(p) - 12 for p in got] == sizes
    assert [p[12:] for p in got] == [p[12:] for p in packets]
    assert core.room_stats(0)["drop_oversized"] == 0


def test_ring_holds_as_many_packets_as_its_bytes_allow() -> None:
    core = _core(depth=16)  # the default 3,840 ring bytes
    small = core.listener_add(0, DEST, 1, 0, 0)
    # 64 kbit/s in 20 ms frames: 160-byte payloads, all 16 fit
    for k in range(40):
        core.feed(0, rtp(k, 960 * k, 7, bytes([k]) * 160), SRC_A, k * 20 * MS)
    assert [p[12] for p in core.ring(small)] == list(range(24, 40))
    # 1,000-byte payloads: three fit in 3,840 bytes, the fourth starts over at 0
    for k in range(40, 50):
        core.feed(0, rtp(k, 960 * k, 7, bytes([k]) * 1000), SRC_A, k * 20 * MS)
    assert [p[12] for p in core.ring(small)] == [47, 48, 49]
    # nothing was sent, so everything let go was an overflow drop
    assert core.pending(small) == 3
    assert core.listener_stats(small)["drop_overflow"] == 50 - 3


def test_sent_packets_make_room_quietly_and_stay_for_nacks() -> None:
    core = _core(depth=16, ring_bytes=1000)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(1)
    try:
        slot = core.listener_add(0, to_sockaddr(rx.getsockname(), socket.AF_INET), 0xFEED, 0, 0)
        for k in range(30):
            # sizes that do not divide the ring: packets wrap with a gap at the end
            core.feed(0, rtp(k, 960 * k, 7, bytes([k]) * (90 + 37 * (k % 5))), SRC_A, k * 20 * MS)
            assert core.flush(tx.fileno()) == 0
            rx.recv(2048)
        assert core.listener_stats(slot)["drop_overflow"] == 0
        held = core.ring(slot)
        assert sum(len(p) for p in held) <= 1000
        assert [p[12] for p in held] == list(range(30 - len(held), 30))
        # a NACK for the oldest held packet is answered from the ring, byte for byte
        seq = int.from_bytes(held[0][2:4], "big")
        assert core.resend(tx.fileno(), slot, seq) == 1
        assert rx.recv(2048) == held[0]
        # one packet older is gone
        assert core.resend(tx.fileno(), slot, (seq - 1) & 0xFFFF) == 0
    finally:
        rx.close()
        tx.close()


def test_a_packet_larger_than_the_ring_is_dropped_as_oversized() -> None:
    core = _core(ring_bytes=1300)
    slot = core.listener_add(0, DEST, 1, 0, 0)
    assert core.feed(0, rtp(1, 0, 7, b"x" * 1288), SRC_A, 0) == Ingest.INGEST_OK
    assert core.feed(0, rtp(2, 960, 7, b"x" * 1289), SRC_A, 20 * MS) == Ingest.INGEST_OVERSIZED
    assert core.room_stats(0)["drop_oversized"] == 1
    assert len(core.ring(slot)) == 1


def test_a_listener_costs_at_most_4_kib_at_the_default_shape() -> None:
    # the goal: 64 kbit/s, 20 ms frames, 16 packets of history
    assert 16 * (12 + 160) <= 3840
    assert listener_bytes(16, 3840) <= 4096


def test_listener_header_is_its_own_and_continuous() -> None:
    core = _core()
    a = core.listener_add(0, DEST, 0x11111111, 1000, 5000)
    b = core.listener_add(0, DEST, 0x22222222, 65530, 0xFFFFFF00)
    for k in range(10):
        core.feed(0, rtp(65533 + k, 960 * k, 7, b"x" * 50), SRC_A, k * 20 * MS)
    for slot, ssrc in ((a, 0x11111111), (b, 0x22222222)):
        hdrs = [header(p) for p in core.ring(slot)]
        assert all(h[2] == ssrc for h in hdrs)
        assert [(hdrs[i + 1][0] - hdrs[i][0]) & 0xFFFF for i in range(7)] == [1] * 7
        assert [(hdrs[i + 1][1] - hdrs[i][1]) & 0xFFFFFFFF for i in range(7)] == [960] * 7


def test_publisher_restart_keeps_numbering_continuous() -> None:
    core = _core(depth=16)
    slot = core.listener_add(0, DEST, 1, 0, 0)
    t = 0
    for k in range(5):
        t += 20 * MS
        core.feed(0, rtp(500 + k, 10_000 + 960 * k, 0xAAAA, b"a" * 40), SRC_A, t)
    t += 2000 * MS  # the publisher is gone for two seconds and comes back new
    for k in range(5):
        core.feed(0, rtp(9 + k, 77 + 960 * k, 0xBBBB, b"b" * 40), SRC_A, t)
        t += 20 * MS
    hdrs = [header(p) for p in core.ring(slot)]
    seqs = [h[0] for h in hdrs]
    assert [(seqs[i + 1] - seqs[i]) & 0xFFFF for i in range(9)] == [1] * 9
    jump = (hdrs[5][1] - hdrs[4][1]) & 0xFFFFFFFF
    assert 2000 * 48 <= jump <= 2021 * 48  # the silence, in 48 kHz ticks
    assert core.room_stats(0)["source_restarts"] == 1


def test_competing_ssrc_is_dropped_while_the_first_is_live() -> None:
    core = _core()
    slot = core.listener_add(0, DEST, 1, 0, 0)
    core.feed(0, rtp(1, 0, 0xAAAA, b"a"), SRC_A, 0)
    assert core.feed(0, rtp(50, 0, 0xBBBB, b"b"), SRC_A, 20 * MS) == Ingest.INGEST_FOREIGN
    assert core.feed(0, rtp(2, 960, 0xAAAA, b"a"), SRC_A, 20 * MS) == Ingest.INGEST_OK
    assert len(core.ring(slot)) == 2


def test_late_and_duplicate_packets_are_dropped_and_counted() -> None:
    core = _core()
    core.listener_add(0, DEST, 1, 0, 0)
    core.feed(0, rtp(10, 0, 5, b"a"), SRC_A, 0)
    core.feed(0, rtp(11, 960, 5, b"a"), SRC_A, 0)
    assert core.feed(0, rtp(11, 960, 5, b"a"), SRC_A, 0) == Ingest.INGEST_LATE
    assert core.feed(0, rtp(9, 0, 5, b"a"), SRC_A, 0) == Ingest.INGEST_LATE
    assert core.room_stats(0)["drop_late"] == 2


@pytest.mark.parametrize("packet, outcome", [
    (b"", Ingest.INGEST_MALFORMED),
    (b"\x80\x6f\x00", Ingest.INGEST_MALFORMED),
    (bytes(40), Ingest.INGEST_MALFORMED),                         # version 0
    (rtp(1, 0, 1, b""), Ingest.INGEST_MALFORMED),                  # no payload
    (rtp(1, 0, 1, b"x")[:12] + b"", Ingest.INGEST_MALFORMED),
    (bytes([0x8F]) + rtp(1, 0, 1, b"abcd")[1:], Ingest.INGEST_MALFORMED),  # 15 CSRCs claimed
    (bytes([0x90]) + rtp(1, 0, 1, b"\xbe\xde\xff\xff")[1:], Ingest.INGEST_MALFORMED),  # huge extension
    (rtp(1, 0, 1, b"abc")[:-1] + b"\x00", Ingest.INGEST_OK),
    (bytes([0xA0]) + rtp(1, 0, 1, b"ab\x00")[1:], Ingest.INGEST_MALFORMED),  # padding length 0
    (bytes([0xA0]) + rtp(1, 0, 1, b"ab\x09")[1:], Ingest.INGEST_MALFORMED),  # padding past payload
    (rtp(1, 0, 1, b"x" * 469), Ingest.INGEST_OVERSIZED),
    (rtp(1, 0, 1, b"x" * 468), Ingest.INGEST_OK),
    (bytes([0x80, 200]) + bytes(26), Ingest.INGEST_RTCP),          # a sender report
])
def test_bad_rtp_is_refused_with_a_reason(packet: bytes, outcome: Ingest) -> None:
    core = _core(ring_bytes=480)
    slot = core.listener_add(0, DEST, 1, 0, 0)
    assert core.feed(0, packet, SRC_A, 0) == outcome
    assert len(core.ring(slot)) == (1 if outcome == Ingest.INGEST_OK else 0)


def test_foreign_source_and_closed_room_are_refused() -> None:
    core = _core()
    assert core.feed(0, rtp(1, 0, 1, b"x"), SRC_FOREIGN, 0) == Ingest.INGEST_FOREIGN
    assert core.feed(1, rtp(1, 0, 1, b"x"), SRC_A, 0) == Ingest.INGEST_NO_ROOM
    assert core.room_stats(0)["drop_foreign"] == 1
    assert core.counters()["drop_no_room"] == 1


def test_slots_are_reused_and_a_full_arena_says_so() -> None:
    core = Core(3, rooms=1, depth=4)
    core.room_open(0, True)
    slots = [core.listener_add(0, DEST, i, 0, 0) for i in range(3)]
    assert sorted(slots) == [0, 1, 2]
    assert core.listener_add(0, DEST, 9, 0, 0) == -1
    core.listener_remove(slots[1])
    again = core.listener_add(0, DEST, 10, 0, 0)
    assert again == slots[1]
    assert core.listener_stats(again)["ssrc"] == 10
    core.feed(0, rtp(1, 0, 1, b"x"), SRC_A, 0)
    assert all(len(core.ring(s)) == 1 for s in (slots[0], again, slots[2]))
    with pytest.raises(ValueError):
        core.listener_remove(99)


def test_burst_on_join_gives_recent_audio_only() -> None:
    core = _core(depth=8)
    for k in range(6):
        core.feed(0, rtp(k, 960 * k, 1, bytes([k])), SRC_A, k * 20 * MS)
    fresh = core.listener_add(0, DEST, 1, 0, 0, burst=4, now_ns=120 * MS)
    assert [p[12] for p in core.ring(fresh)] == [2, 3, 4, 5]
    stale = core.listener_add(0, DEST, 2, 0, 0, burst=4, now_ns=5000 * MS)
    assert core.ring(stale) == []


def test_room_history_holds_what_a_ring_cannot_for_a_resume() -> None:
    # depth 8: a ring bursts 7 at most, the history keeps 4 depths and reads
    # the newest 3 depths of them (the oldest may be reused by the next packet)
    core = _core(depth=8)
    for k in range(40):
        core.feed(0, rtp(1000 + k, 960 * k, 1, bytes([k])), SRC_A, k * 20 * MS)
    now = 800 * MS
    got = room_history(core, 0, 1020, 100, now)
    assert [p[12] for p in got] == list(range(21, 40))
    assert all(p[8:12] == bytes(4) for p in got)                # a room packet: no SSRC yet
    assert [p[12] for p in room_history(core, 0, 1020, 5, now)] == [35, 36, 37, 38, 39]
    assert len(room_history(core, 0, 1000, 100, now)) == 24       # older than that is gone
    assert room_history(core, 0, 1039, 100, now) == []            # has everything
    assert room_history(core, 0, 1039 + 0x7000, 100, now) == []   # a point ahead of the room
    assert room_history(core, 0, 1020, 100, 5000 * MS) == []      # stale audio is never resumed


def test_pull_listener_drains_at_its_own_pace() -> None:
    core = _core(depth=4)
    pull = core.listener_add(0, b"", 1, 0, 0, pull=True)
    for k in range(6):
        core.feed(0, rtp(k, 960 * k, 1, bytes([k])), SRC_A, 0)
    assert [p[12] for p in core.pull(pull, 2)] == [2, 3]
    assert [p[12] for p in core.pull(pull)] == [4, 5]
    assert core.pull(pull) == []
    assert core.listener_stats(pull)["drop_overflow"] == 2


def test_flush_sends_each_listener_its_packets() -> None:
    rx = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        core = _core()
        slots = []
        for i, s in enumerate(rx):
            s.bind(("127.0.0.1", 0))
            s.settimeout(2)
            slots.append(core.listener_add(0, to_sockaddr(s.getsockname()), 100 + i, 0, 0))
        for k in range(3):
            core.feed(0, rtp(k, 0, 1, b"pay%d" % k), SRC_A, 0)
        assert core.flush(tx.fileno()) == 0
        for i, s in enumerate(rx):
            got = [s.recv(2048) for _ in range(3)]
            assert [header(p)[2] for p in got] == [100 + i] * 3
            assert [p[12:] for p in got] == [b"pay0", b"pay1", b"pay2"]
        assert core.counters()["packets_out"] == 9
        # a NACK for the middle packet is answered from the ring
        seq = header(core.ring(slots[0])[1])[0]
        assert core.resend(tx.fileno(), slots[0], seq) == 1
        assert rx[0].recv(2048)[12:] == b"pay1"
        assert core.resend(tx.fileno(), slots[0], (seq + 100) & 0xFFFF) == 0
    finally:
        for s in rx + [tx]:
            s.close()


def test_send_errors_are_counted_and_skipped() -> None:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    try:
        core = _core()
        # an IPv6 address on an IPv4 socket: the kernel refuses that one message
        core.listener_add(0, to_sockaddr(("::1", 9)), 1, 0, 0)
        core.listener_add(0, to_sockaddr(rx.getsockname()), 2, 0, 0)
        core.feed(0, rtp(1, 0, 1, b"x"), SRC_A, 0)
        assert core.flush(tx.fileno()) == 0
        assert rx.recv(2048)[12:] == b"x"
        assert core.counters()["drop_send_error"] == 1
    finally:
        tx.close()
        rx.close()


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_long_churn_does_not_grow_memory() -> None:
    gc.collect()  # Cores other tests left in reference cycles go now, not mid-count
    before_allocs = allocation_balance()
    core = Core(2000, rooms=1, depth=16)
    core.room_open(0, True)
    live: list[int] = []
    pkt = rtp(1, 0, 1, b"x" * 100)

    def churn(core: Core, rounds: int) -> None:
        for r in range(rounds):
            for _ in range(50):
                live.append(core.listener_add(0, DEST, r, 0, 0))
            for _ in range(50):
                core.listener_remove(live.pop(0))
            core.feed(0, pkt, SRC_A, 0)

    churn(core, 200)  # warm up: pages of the slots in use get touched
    rss = _rss_kib()
    churn(core, 4000)  # 200,000 more joins and leaves
    if not os.environ.get("RELAY_SANITIZED"):  # ASan's quarantine holds freed memory on purpose
        assert _rss_kib() - rss < 1024
    assert core.listeners == len(live)
    del core
    gc.collect()
    allocs, frees = allocation_balance()
    assert allocs - before_allocs[0] == frees - before_allocs[1]
