"""Attacks by a listener on a live node (loopback, bounded in count and
time): whatever one session sends, the other listeners lose nothing, and
nothing keeps audio flowing to an address without the session's secret."""
from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time

from relay.testing.loadgen import LoopbackCrowd, free_port, scrape
from relay.wire.rtcp import RTCP_RTPFB, build_receiver_report
from tests.conftest import start_relay, stop
from tests.listeners.conftest import udp_join


def _huge_nack(media_ssrc: int, size: int = 2048) -> bytes:
    """One generic NACK of `size` bytes naming every sequence number it can
    (17 per FCI): thousands of resends asked for in one datagram."""
    fcis = (size - 12) // 4
    body = b"".join(struct.pack("!HH", (17 * i) & 0xFFFF, 0xFFFF) for i in range(fcis))
    return struct.pack("!BBHII", 0x81, RTCP_RTPFB, 2 + fcis, 0x5EED, media_ssrc) + body


def _publisher(relay, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(relay.relay_cmd("publish", "--to", f"{relay.ingest[0]}:{relay.ingest[1]}",
                                            "--duration", str(seconds)), env=relay.env, stderr=subprocess.DEVNULL)


def test_a_nack_flood_from_one_listener_costs_the_others_nothing(tmp_path) -> None:
    relay = start_relay(tmp_path, extra_node="workers = 1")
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.connect(relay.listen)
    attacker.settimeout(5)
    crowd = LoopbackCrowd(20, relay.listen, relay.room)
    pub = _publisher(relay, 8)
    stop_flood = threading.Event()
    sent = {2048: 0, 500: 0}

    def flood() -> None:
        # NACKs of 2 KB and of 500 bytes (about 8,600 and 2,100 sequence
        # numbers each), 2,000 a second in all, for at most 4 s
        nacks = {n: _huge_nack(acc.ssrc, n) for n in sent}
        deadline = time.monotonic() + 4
        while not stop_flood.is_set() and time.monotonic() < deadline:
            for _ in range(20):
                for n, nack in nacks.items():
                    try:
                        attacker.send(nack)
                        sent[n] += 1
                    except OSError:
                        pass
            time.sleep(0.02)

    try:
        acc = udp_join(attacker, relay.room)
        assert crowd.join().accepted == 20
        crowd.run(1.0)
        before = crowd.crowd.totals()
        t = threading.Thread(target=flood)
        t.start()
        crowd.run(3.0)
        stop_flood.set()
        t.join()
        after = crowd.crowd.totals()
        m = scrape(relay.admin)
        assert sum(sent.values()) >= 4000
        assert after["heard"] == 20
        assert after["received"] - before["received"] >= 20 * 120
        assert after["lost"] == before["lost"] == 0, after
        # only the sender's own budget was spent (a burst of resends, then
        # 16 a second); every other NACK was refused before it was read:
        # over budget, or (2 KB) longer than any listener's RTCP
        assert m["relay_resends_total"] <= 32 + 16 * 6
        refused = m["relay_nacks_rate_limited_total"] + m["relay_control_malformed_total"]
        assert refused >= sum(sent.values()) - 100, (refused, sent)
    finally:
        stop_flood.set()
        pub.kill()
        pub.wait()
        crowd.close()
        attacker.close()
        assert stop(relay.proc) == 0


def test_a_forged_receiver_report_does_not_keep_a_departed_listener(tmp_path) -> None:
    relay = start_relay(tmp_path, extra_node="keepalive_interval = 0.5\nsession_timeout = 1.5")
    victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    victim.connect(relay.listen)
    victim.settimeout(5)
    pub = _publisher(relay, 8)
    try:
        udp_join(victim, relay.room)
        victim.recv(4096)   # audio flows
        # the listener is gone (no KEEPALIVE any more); someone who can send
        # from its address keeps sending 8-byte receiver reports
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            victim.send(build_receiver_report(0x1234))
            time.sleep(0.25)
        m = scrape(relay.admin)
        assert m["relay_timeouts_total"] == 1
        # nothing arrives any more (after what was queued before the timeout)
        victim.setblocking(False)
        while True:
            try:
                victim.recv(4096)
            except BlockingIOError:
                break
        victim.settimeout(0.3)
        audio = 0
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            try:
                if victim.recv(4096)[0] >> 6 == 2:
                    audio += 1
            except socket.timeout:
                pass
        assert audio == 0
    finally:
        pub.kill()
        pub.wait()
        victim.close()
        assert stop(relay.proc) == 0


def test_a_flood_of_bad_tokens_does_not_starve_legitimate_joins(tmp_path) -> None:
    # 400 addresses, each with a valid cookie and a forged token, arrive at
    # once with 10 real listeners; the node-wide join budget (20 a second)
    # is spent only on joins whose token checks out
    relay = start_relay(tmp_path, auth="jwt", extra_node="join_rate = 20")
    token = subprocess.run(relay.relay_cmd("token", "--room", relay.room), env=relay.env,
                           capture_output=True, text=True, check=True).stdout.strip()
    bad = LoopbackCrowd(400, relay.listen, relay.room, token="forged", first_address=1000)
    good = LoopbackCrowd(10, relay.listen, relay.room, token=token, first_address=2000)
    results = {}
    try:
        t = threading.Thread(target=lambda: results.update(bad=bad.join(attempts=1, chunk=400,
                                                                        retry_limited=False)))
        t.start()
        time.sleep(0.02)
        results["good"] = good.join(attempts=1, retry_limited=False)
        t.join()
        assert results["good"].accepted == 10, (results["good"], results["bad"])
        assert results["bad"].rejected.get("bad_token", 0) >= 300, results["bad"]
    finally:
        bad.close()
        good.close()
        assert stop(relay.proc) == 0


async def _open_quietly(server: str, n: int, seconds: float) -> int:
    """Open `n` QUIC connections that never JOIN; hold them `seconds`.
    Returns how many handshakes completed."""
    import asyncio
    import ssl
    from contextlib import AsyncExitStack

    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration

    from relay.wire.protocol import ALPN_QUIC, MAX_DATAGRAM_FRAME

    host, port = server.rsplit(":", 1)
    async with AsyncExitStack() as stack:
        async def one() -> bool:
            conf = QuicConfiguration(is_client=True, alpn_protocols=[ALPN_QUIC], verify_mode=ssl.CERT_NONE,
                                     max_datagram_frame_size=MAX_DATAGRAM_FRAME, idle_timeout=30)
            try:
                await asyncio.wait_for(stack.enter_async_context(connect(host, int(port), configuration=conf)), 2)
                return True
            except (asyncio.TimeoutError, ConnectionError):
                return False
        done = await asyncio.gather(*(one() for _ in range(n)))
        await asyncio.sleep(seconds)
        return sum(done)


def test_quic_connections_that_never_join_are_capped_and_closed(tmp_path) -> None:
    import asyncio
    import logging

    from tests.listeners.conftest import metric

    logging.getLogger("quic").setLevel(logging.CRITICAL)
    port = free_port()
    # the idle timeout (session_timeout) is longer than the JOIN deadline (5 s)
    relay = start_relay(tmp_path, extra_node=f'quic = "127.0.0.1:{port}"\nsession_timeout = 10\n'
                        "quic_max_pending = 20\nquic_max_pending_per_source = 1000\n")
    server = f"127.0.0.1:{port}"
    crowd = LoopbackCrowd(5, relay.listen, relay.room)
    pub = _publisher(relay, 15)
    try:
        assert crowd.join().accepted == 5
        before = crowd.crowd.totals()
        opened = asyncio.run(_open_quietly(server, 60, 1.0))
        text = relay.get("/metrics")[1]
        # quic_max_pending = 20 in this relay's config: the rest were dropped unanswered
        assert opened == 20, opened
        assert metric(text, "relay_quic_connections_refused_total") >= 40
        # held open without a JOIN past the deadline: the node closed them
        opened_late = asyncio.run(_open_quietly(server, 20, 6.5))
        assert opened_late == 20
        assert metric(relay.get("/metrics")[1], "relay_quic_join_deadline_total") >= 20
        crowd.run(0.5)
        after = crowd.crowd.totals()
        assert after["lost"] == before["lost"] == 0 and after["received"] > before["received"]
    finally:
        pub.kill()
        pub.wait()
        crowd.close()
        assert stop(relay.proc) == 0


def test_forgetting_a_closed_quic_connection_touches_only_its_own_ids() -> None:
    import asyncio
    from types import SimpleNamespace

    from aioquic.asyncio.server import QuicServer
    from aioquic.quic.configuration import QuicConfiguration

    from relay.listeners.quic.server import QuicServer as RelayQuicServer

    class NoWalk(dict):
        def items(self):  # what aioquic's own _connection_terminated does, per closed connection
            raise AssertionError("walked every connection id to forget one connection")

    def fake(i: int) -> SimpleNamespace:
        cids = [SimpleNamespace(cid=f"h{i}-{k}".encode()) for k in range(3)]
        return SimpleNamespace(_quic=SimpleNamespace(_host_cids=cids, original_destination_connection_id=b"o%d" % i,
                                                     _retry_source_connection_id=b"r%d" % i))

    async def scenario() -> None:
        server = RelayQuicServer(SimpleNamespace(), configuration=QuicConfiguration(is_client=False))
        server._protocols = NoWalk()
        protos = [fake(i) for i in range(2000)]
        for p in protos:
            for cid in [c.cid for c in p._quic._host_cids] + [p._quic._retry_source_connection_id]:
                server._protocols[cid] = p
        for p in protos:
            server._connection_terminated(p)
        assert len(server._protocols) == 0
        # aioquic's own way fails this test
        server._protocols[b"x"] = protos[0]
        try:
            QuicServer._connection_terminated(server, protos[0])
        except AssertionError:
            return
        raise AssertionError("the stock implementation did not walk the table")

    asyncio.run(scenario())


def test_one_source_holds_a_bounded_number_of_unjoined_quic_connections() -> None:
    from types import SimpleNamespace

    from relay.listeners.quic.endpoint import QuicEndpoint

    endpoint = QuicEndpoint.__new__(QuicEndpoint)
    endpoint.sessions = SimpleNamespace(cfg=SimpleNamespace(quic_max_pending=100, quic_max_pending_per_source=3))
    endpoint.counters = SimpleNamespace(refused_connections=0)
    endpoint.pending, endpoint._pending_by_source = {}, __import__("collections").Counter()
    for i in range(3):
        assert endpoint.may_open(("2001:db8::1", 5000 + i))
        endpoint.opened(object(), ("2001:db8::%x" % (i + 1), 5000 + i))   # one /64
    assert not endpoint.may_open(("2001:db8::99", 6000))
    assert endpoint.may_open(("2001:db8:0:1::1", 6000))                   # another /64
    assert endpoint.counters.refused_connections == 1
