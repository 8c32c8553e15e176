"""The core with several sender threads: the same packets as the Python
model reach every listener, whichever shard holds it; a stopped sender
is restarted by the node's watchdog and its listeners keep listening."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import defaultdict

from hypothesis import HealthCheck, given, settings, strategies as st

from relay._core import Core
from relay.wire.addr import to_sockaddr
from relay.testing.model import ModelCore
from tests.rtp import SRC_A, rtp

SHARDS = 3
DEPTH = 64


def _wait_settled(core: Core, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not core.settled():
        assert time.monotonic() < deadline, "shards did not settle"
        time.sleep(0.001)


ops = st.lists(st.one_of(
    st.tuples(st.just("feed"), st.integers(1, 5)),
    st.tuples(st.just("join"), st.integers(0, 4)),
    st.tuples(st.just("leave"), st.integers(0, 100)),
), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_sharded_core_delivers_what_the_model_sends(ops) -> None:
    core = Core(30, rooms=1, depth=DEPTH, ring_bytes=200, shards=SHARDS)
    model = ModelCore(30, rooms=1, depth=DEPTH, ring_bytes=200)
    core.room_open(0, True)
    model.room_open(0, True)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(0.5)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dest = to_sockaddr(rx.getsockname())
    threads = [threading.Thread(target=core.run_shard, args=(k, tx.fileno())) for k in range(SHARDS)]
    for t in threads:
        t.start()
    seq, n_join = 0, 0
    expected: dict[int, list[bytes]] = defaultdict(list)
    try:
        for op in ops:
            if op[0] == "feed":
                for _ in range(op[1]):
                    seq += 1
                    pkt = rtp(seq, seq * 960, 0x77, seq.to_bytes(2, "big") * 10)
                    now = time.monotonic_ns()
                    assert core.feed(0, pkt, SRC_A, now) == model.feed(0, pkt, SRC_A, now)
            elif op[0] == "join":
                n_join += 1
                args = (0, dest, 0xB0000000 + n_join, n_join * 31, n_join * 7)
                now = time.monotonic_ns()
                # slot numbers differ between the sharded arena and the model;
                # listeners are matched by their SSRC instead
                assert core.listener_add(*args, burst=op[1], now_ns=now) >= 0
                assert model.listener_add(*args, burst=op[1], now_ns=now) >= 0
            elif model.listeners:
                victim = sorted(model.listeners)[op[1] % len(model.listeners)]
                ssrc = model.listeners[victim].ssrc
                _wait_settled(core)
                core_slot = next(s for s in range(30) if _ssrc(core, s) == ssrc)
                core.listener_remove(core_slot)
                model.listener_remove(victim)
            _wait_settled(core)
            for slot, p in model.mark_sent():
                expected[model.listeners[slot].ssrc].append(p)
        got: dict[int, list[bytes]] = defaultdict(list)
        for _ in range(sum(len(v) for v in expected.values())):
            p = rx.recv(2048)
            got[int.from_bytes(p[8:12], "big")].append(p)
        assert got == expected
        assert sum(core.shard_listeners()) == len(model.listeners)
    finally:
        core.stop_shards()
        for t in threads:
            t.join(5)
        rx.close()
        tx.close()


def _ssrc(core: Core, slot: int) -> int | None:
    try:
        return core.listener_stats(slot)["ssrc"]
    except ValueError:
        return None


def test_listeners_are_spread_over_shards_and_stay() -> None:
    core = Core(100, rooms=1, shards=4)
    core.room_open(0, True)
    dest = to_sockaddr(("127.0.0.1", 9))
    slots = [core.listener_add(0, dest, i, 0, 0) for i in range(40)]
    assert core.shard_listeners() == [10, 10, 10, 10]
    shard = {s: core.shard_of(s) for s in slots}
    for s in slots[:10]:
        core.listener_remove(s)
    assert all(core.shard_of(s) == shard[s] for s in slots[10:])
    assert sum(core.shard_listeners()) == 30


def test_stopped_sender_is_restarted_and_its_listeners_keep_listening(tmp_path) -> None:
    from relay.wire.config import load
    from relay.testing.loadgen import LoopbackCrowd
    from relay.node import Node
    from tests.conftest import free_port

    ingest = free_port()
    cfg = load(f'[node]\nlisten = "127.0.0.1:{free_port()}"\nadmin = ""\nauth = "open"\nworkers = 2\n'
               f'[[room]]\nname = "r"\ningest = "127.0.0.1:{ingest}"\nsources = ["127.0.0.1"]\n')

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        node = Node(cfg)
        await node.start()
        crowd = LoopbackCrowd(40, node.listen_addr, "r")
        pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stop = asyncio.Event()

        async def publish() -> None:
            k = 0
            while not stop.is_set():
                k += 1
                pub.sendto(rtp(k, k * 960, 5, bytes(80)), ("127.0.0.1", ingest))
                await asyncio.sleep(0.02)

        task = asyncio.create_task(publish())
        try:
            assert (await loop.run_in_executor(None, crowd.join)).accepted == 40
            assert node.core.shard_listeners() == [20, 20]
            await loop.run_in_executor(None, crowd.run, 1.0)
            node.core.stop_shard(0)
            await asyncio.sleep(1.0)
            assert node.shard_restarts == 1
            assert node.threads[0].is_alive() and node.core.shard_running(0)
            before = [crowd.crowd.member(i)["received"] for i in range(40)]
            await loop.run_in_executor(None, crowd.run, 1.5)
            after = [crowd.crowd.member(i)["received"] for i in range(40)]
            assert all(a - b >= 50 for a, b in zip(after, before, strict=True)), list(zip(before, after, strict=True))
            assert node.core.counters()["drop_shard_lag"] == 0
        finally:
            stop.set()
            await task
            crowd.close()
            pub.close()
            node.close()

    asyncio.run(scenario())
