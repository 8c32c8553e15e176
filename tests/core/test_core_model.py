"""The compiled core against the slow Python model, byte for byte, over
hypothesis-generated packets and join/leave sequences."""
from __future__ import annotations

import socket
import struct

from hypothesis import HealthCheck, given, settings, strategies as st

from relay._core import Core
from relay.wire.addr import to_sockaddr
from relay.testing.model import ModelCore
from tests.rtp import SRC_A, SRC_B, SRC_FOREIGN, rtp

DEPTH = 8
# small enough that the byte budget, not only the depth, decides how many
# packets a ring holds, and that packets wrap to the start
RING = 300
ROOMS = 4

payloads = st.binary(min_size=0, max_size=RING + 16)
valid_packet = st.builds(
    lambda ssrc, seq, ts, pay, pt, m, cc, ext, pad: rtp(seq, ts, ssrc, pay, pt, m, cc, ext, pad),
    st.sampled_from([0x1111, 0x2222]),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFFFFFF),
    payloads,
    st.sampled_from([111, 96, 72, 0x7F]),
    st.booleans(),
    st.integers(0, 2),
    st.one_of(st.none(), st.integers(0, 3)),
    st.integers(0, 4),
)
garbage = st.binary(min_size=0, max_size=64)

feed = st.tuples(st.just("feed"), st.integers(0, ROOMS - 1),
                 st.one_of(valid_packet, valid_packet, valid_packet, garbage),
                 st.sampled_from([SRC_A, SRC_A, SRC_A, SRC_B, SRC_FOREIGN]),
                 st.integers(0, 400_000_000))
# a stream in order, so most packets reach the rings rather than being late
stream = st.tuples(st.just("stream"), st.integers(0, ROOMS - 1), st.integers(1, 2 * DEPTH + 3),
                   st.integers(0, 30_000_000), st.integers(1, 140))
# an RTCP BYE (alone, or after a receiver report in a compound packet)
# naming one of the SSRCs in play, from one of the sources
bye = st.tuples(st.just("bye"), st.integers(0, ROOMS - 1), st.sampled_from([0x1111, 0x2222]), st.booleans(),
                st.sampled_from([SRC_A, SRC_B, SRC_FOREIGN]))
release = st.tuples(st.just("release"), st.integers(0, ROOMS - 1))
join = st.tuples(st.just("join"), st.integers(0, ROOMS - 1), st.booleans(), st.integers(0, DEPTH + 2))
leave = st.tuples(st.just("leave"), st.integers(0, 1000))
flush = st.tuples(st.just("flush"))
# the same stream from two parents, each copy missing some packets and
# running a little ahead of or behind the other
copies = st.tuples(st.just("copies"), st.integers(0, ROOMS - 1), st.integers(1, 2 * DEPTH + 3),
                   st.lists(st.booleans(), min_size=8, max_size=8), st.lists(st.booleans(), min_size=8, max_size=8),
                   st.integers(-3, 3))
ops = st.lists(st.one_of(feed, stream, stream, copies, join, join, leave, flush, bye, release), max_size=60)
# room 0: the default rule (a new SSRC after 150 ms of silence); room 1: a
# plain-RTP room that keeps its stream until a BYE or the operator (pinned
# to the live source); room 2: open to any source; room 3: an upstream room
# merging copies from two parents
RULES = [dict(), dict(takeover_s=-1, pin_source=True), dict(takeover_s=0.05, pin_source=True),
         dict(takeover_s=0.15, merge=True)]


def _receiver() -> tuple[socket.socket, bytes]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    return rx, to_sockaddr(rx.getsockname(), socket.AF_INET)


def _drain(rx: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(rx.recv(4096))
        except BlockingIOError:
            return got


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_core_matches_model(ops) -> None:
    core = Core(12, rooms=ROOMS, depth=DEPTH, ring_bytes=RING)
    model = ModelCore(12, rooms=ROOMS, depth=DEPTH, ring_bytes=RING)
    for room in range(ROOMS):
        any_source = room == 2
        core.room_open(room, any_source)
        model.room_open(room, any_source)
        core.room_rules(room, **RULES[room])
        model.room_rules(room, **RULES[room])
        core.room_allow(room, SRC_A)
        model.room_allow(room, SRC_A)
        core.room_allow(room, SRC_B, any_port=False)
        model.room_allow(room, SRC_B, any_port=False)
    rx, dest = _receiver()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    now = 10**12
    seqs = {r: 1000 * r for r in range(ROOMS)}
    n_join = 0
    try:
        for op in ops:
            if op[0] == "feed":
                _, room, pkt, src, dt = op
                now += dt
                assert core.feed(room, pkt, src, now) == model.feed(room, pkt, src, now)
            elif op[0] == "stream":
                _, room, count, dt, size = op
                for k in range(count):
                    now += dt
                    seqs[room] += 1
                    # sizes vary packet to packet, as a VBR encoder's do
                    pkt = rtp(seqs[room], seqs[room] * 960, 0x1111,
                              bytes([seqs[room] & 0xFF]) * (1 + (size * (k + 1)) % 140))
                    assert core.feed(room, pkt, SRC_A, now) == model.feed(room, pkt, SRC_A, now)
            elif op[0] == "copies":
                _, room, count, miss_a, miss_b, lag = op
                first = seqs[room] + 1
                seqs[room] += count
                order = [(k, SRC_A) for k in range(count) if not miss_a[k % 8]]
                order += [(k + lag, SRC_B) for k in range(count) if not miss_b[(k + 3) % 8]]
                for key, src in sorted(order, key=lambda e: e[0]):
                    k = key if src is SRC_A else key - lag
                    now += 1_000_000
                    pkt = rtp(first + k, (first + k) * 960, 0x1111, bytes([k & 0xFF]) * 20)
                    assert core.feed(room, pkt, src, now) == model.feed(room, pkt, src, now)
            elif op[0] == "bye":
                _, room, ssrc, compound, src = op
                pkt = struct.pack("!BBHI", 0x81, 203, 1, ssrc)
                if compound:
                    pkt = struct.pack("!BBHI", 0x80, 201, 1, 0x7777) + pkt
                assert core.feed(room, pkt, src, now) == model.feed(room, pkt, src, now)
            elif op[0] == "release":
                core.room_release(op[1])
                model.room_release(op[1])
            elif op[0] == "join":
                _, room, pull, burst = op
                n_join += 1
                args = (room, dest, 0xA0000000 + n_join, (n_join * 7919) & 0xFFFF, n_join * 104729)
                a = core.listener_add(*args, pull=pull, burst=burst, now_ns=now)
                b = model.listener_add(*args, pull=pull, burst=burst, now_ns=now)
                assert a == b
            elif op[0] == "leave":
                if model.listeners:
                    slot = sorted(model.listeners)[op[1] % len(model.listeners)]
                    core.listener_remove(slot)
                    model.listener_remove(slot)
            else:
                assert core.flush(tx.fileno()) == 0
                sent = model.mark_sent()
                assert sorted(_drain(rx)) == sorted(p for _, p in sent)
            for slot in model.listeners:
                assert core.ring(slot) == model.ring(slot)
                assert core.pending(slot) == model.pending(slot)
        for room in range(ROOMS):
            stats = core.room_stats(room)
            drops = model.rooms[room].drops
            assert stats["drop_foreign"] == drops.get("INGEST_FOREIGN", 0)
            assert stats["drop_malformed"] == drops.get("INGEST_MALFORMED", 0)
            assert stats["drop_oversized"] == drops.get("INGEST_OVERSIZED", 0)
            assert stats["drop_late"] == drops.get("INGEST_LATE", 0)
            assert stats["released"] == model.rooms[room].released
            assert stats["duplicates"] == model.rooms[room].duplicates
            assert stats["gap_fills"] == model.rooms[room].gap_fills
    finally:
        rx.close()
        tx.close()


ipv4 = st.binary(min_size=4, max_size=4)
ipv6 = st.binary(min_size=16, max_size=16)
mac = st.binary(min_size=6, max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.booleans(), mac, mac, ipv4, ipv6, ipv4, ipv6, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.binary(min_size=0, max_size=1900))
def test_xdp_frames_match_the_model(v6, dst_mac, src_mac, src4, src6, dst4, dst6, sport, dport, payload):
    """The AF_XDP egress's header writer (core/xsk.h) builds the frames the
    model builds from the RFCs: addresses, lengths and both checksums."""
    from relay._core import xdp_frame
    from relay.listeners.xdp import pack_path
    from relay.testing.model import xdp_frame as model_frame
    src, dst = (src6, dst6) if v6 else (src4, dst4)
    family = socket.AF_INET6 if v6 else socket.AF_INET
    sockaddr = to_sockaddr((socket.inet_ntop(family, dst), dport))
    path = pack_path(dst_mac, src_mac, socket.inet_ntop(family, src), sport, 1500)
    assert xdp_frame(path, sockaddr, payload) == model_frame(dst_mac, src_mac, src, sport, sockaddr, payload)
