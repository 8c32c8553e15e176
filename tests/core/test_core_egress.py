"""The core's egress under pressure, and what it allocates per packet (nothing)."""
from __future__ import annotations

import os
import socket
import struct
import sys

from relay._core import Core, allocation_balance
from relay.wire.addr import to_sockaddr
from tests.rtp import SRC_A, header, rtp


def _abstract_unix(name: str) -> tuple[str, bytes]:
    """A 14-byte abstract AF_UNIX name and its raw 16-byte sockaddr."""
    path = ("\0" + name).ljust(14, "\0")
    assert len(path) == 14
    return path, struct.pack("=H", socket.AF_UNIX) + path.encode()


def test_full_socket_makes_flush_wait_and_resume_in_order() -> None:
    # AF_UNIX datagram queues are short (net.unix.max_dgram_qlen), so a
    # receiver that does not read makes sendmmsg fail with EAGAIN: the same
    # path a full UDP send buffer takes.
    path, raw = _abstract_unix(os.urandom(4).hex()[:8])
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    rx.setblocking(False)
    try:
        core = Core(4, rooms=1, depth=256, ring_bytes=16384)  # all 200 packets fit
        core.room_open(0, True)
        slot = core.listener_add(0, raw, 42, 0, 0)
        n = 200
        for k in range(n):
            core.feed(0, rtp(k, 960 * k, 1, struct.pack("!H", k) + b"x" * 50), SRC_A)
        assert core.flush(tx.fileno()) == 1
        assert core.blocked == 1
        assert core.counters()["would_block"] >= 1
        got = []
        for _ in range(1000):
            while True:
                try:
                    got.append(rx.recv(2048))
                except BlockingIOError:
                    break
            if core.flush(tx.fileno()) == 0 and core.pending(slot) == 0:
                break
        while True:
            try:
                got.append(rx.recv(2048))
            except BlockingIOError:
                break
        assert core.blocked == 0
        assert [struct.unpack_from("!H", p, 12)[0] for p in got] == list(range(n))
        assert len({header(p)[2] for p in got}) == 1
        assert core.listener_stats(slot)["drop_overflow"] == 0
    finally:
        rx.close()
        tx.close()


def test_ingest_creates_no_python_objects_or_allocations_per_packet() -> None:
    pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ingest = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ingest.bind(("127.0.0.1", 0))
    ingest.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    ingest.setblocking(False)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sinks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(20)]
    try:
        core = Core(64, rooms=1, depth=16)
        core.room_open(0)
        core.room_allow(0, to_sockaddr(("127.0.0.1", 0)))
        for i, s in enumerate(sinks):
            s.bind(("127.0.0.1", 0))
            core.listener_add(0, to_sockaddr(s.getsockname()), i, 0, 0)
        packets = [rtp(k, 960 * k, 7, bytes(100)) for k in range(2000)]
        fd_in, fd_out = ingest.fileno(), out.fileno()

        def run(batch: list[bytes]) -> None:
            for p in batch:
                pub.sendto(p, ingest.getsockname())
                core.ingest(fd_in, 0, fd_out)

        run(packets[:100])  # warm up
        blocks, allocs = sys.getallocatedblocks(), allocation_balance()
        run(packets[100:])
        assert sys.getallocatedblocks() - blocks < 50  # noise from the interpreter, not 1,900 packets
        assert allocation_balance() == allocs
        assert core.counters()["packets_out"] == 2000 * 20
    finally:
        for s in [pub, ingest, out] + sinks:
            s.close()


def test_a_room_message_goes_to_its_udp_listeners_only() -> None:
    """Core.room_send: one datagram to every sendmmsg listener of a room,
    none to its pull (QUIC) listeners or to other rooms' listeners."""
    core = Core(8, rooms=3)
    core.room_open(0)
    core.room_open(1)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
    for k in socks:
        k.bind(("127.0.0.1", 0))
        k.setblocking(False)
    for k, room in zip(socks, (0, 0, 0, 1), strict=True):
        core.listener_add(room, to_sockaddr(k.getsockname()), 1, 0, 0)
    core.listener_add(0, b"", 2, 0, 0, pull=True)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    assert core.room_send(0, out.fileno(), b"\x0bwho is speaking") == (3, 0)
    got = []
    for k in socks:
        try:
            got.append(k.recv(64))
        except BlockingIOError:
            got.append(None)
    assert got == [b"\x0bwho is speaking"] * 3 + [None]
    for k in (*socks, out):
        k.close()
    try:
        core.room_send(2, 0, b"x")   # never opened
    except ValueError as e:
        assert "not open" in str(e)
    else:
        raise AssertionError("a closed room took a message")
