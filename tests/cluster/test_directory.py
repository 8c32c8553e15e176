"""The cluster directory on a real Redis: nodes heartbeat their
records with a short TTL; a node that is full sends joiners to a live node
with room (a storm at one node ends up spread, none admitting past its
limit); GET /join answers where to connect; with Redis down every node
keeps serving and admitting by its own limits, and registers again when
Redis returns (after an outage longer than any of its timers)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from relay.client.listen import ListenClient
from relay.testing.loadgen import LoopbackCrowd, free_port, scrape, wait_ready
from tests.conftest import SECRET, need, stop
from tests.rtp import rtp
from tests.cluster.conftest import RedisServer, listen_token

ENV = dict(os.environ, PYTHONUNBUFFERED="1")


class Node:
    def __init__(self, tmp: Path, name: str, directory: str, max_listeners: int = 20) -> None:
        self.name = name
        self.listen = ("127.0.0.1", free_port())
        self.admin = ("127.0.0.1", free_port(socket.SOCK_STREAM))
        self.ingest = ("127.0.0.1", free_port())
        cfg = tmp / f"{name}.toml"
        cfg.write_text(f'[node]\nlisten = "{self.listen[0]}:{self.listen[1]}"\n'
                       f'admin = "{self.admin[0]}:{self.admin[1]}"\nauth = "open"\n'
                       'join_rate = 100000\njoin_rate_per_source = 100000\n'
                       f'max_listeners = {max_listeners}\nmax_load = 0\nmax_machine_load = 0\ndrain_grace = 0\n'
                       f'directory = "{directory}"\nnode_id = "{name}"\n'
                       f'[[room]]\nname = "live"\ningest = "{self.ingest[0]}:{self.ingest[1]}"\n'
                       'sources = ["127.0.0.1"]\n')
        self.proc = subprocess.Popen([sys.executable, "-m", "relay", "--log-level", "warning", "serve", "-c", str(cfg)],
                                     env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert wait_ready(self.admin, self.proc), f"{name} did not start"

    @property
    def udp(self) -> str:
        return f"{self.listen[0]}:{self.listen[1]}"

    def get(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://{self.admin[0]}:{self.admin[1]}{path}", timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def listeners(self) -> int:
        return int(scrape(self.admin)['relay_listeners{room="live",transport="udp"}'])


def _registered(r: RedisServer, names: list[str], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(r.client.exists(f"relay:node:{n}") for n in names):
            return True
        time.sleep(0.1)
    return False


async def _join_many(server: str, n: int) -> list[ListenClient]:
    clients = [ListenClient(server, "live") for _ in range(n)]
    await asyncio.gather(*(c.join() for c in clients))
    return clients


def test_a_join_storm_at_one_node_spreads_over_the_cluster(tmp_path) -> None:
    r = RedisServer()
    nodes = [Node(tmp_path, n, r.url) for n in ("a", "b", "c")]
    try:
        assert _registered(r, ["a", "b", "c"])
        record = r.client.hgetall("relay:node:a")
        assert record[b"udp"].decode() == nodes[0].udp and record[b"capacity"] == b"20"
        assert 0 < r.client.pttl("relay:node:a") <= 750
        time.sleep(1.2)   # every node has read the others once

        async def storm() -> list[str]:
            clients = await _join_many(nodes[0].udp, 50)   # all at node a, which takes 20
            where = [f"{c.server[0]}:{c.server[1]}" for c in clients]
            for c in clients:
                c.close()
            return where
        where = asyncio.run(storm())
        assert where.count(nodes[0].udp) == 20
        assert where.count(nodes[1].udp) + where.count(nodes[2].udp) == 30
        assert all(where.count(n.udp) <= 20 for n in nodes)   # nobody past its limit
    finally:
        for n in nodes:
            assert stop(n.proc) == 0
        # a clean stop takes the record out at once
        assert not any(r.client.exists(f"relay:node:{n}") for n in ("a", "b", "c"))
        r.stop()


def test_join_answers_where_to_connect(tmp_path) -> None:
    r = RedisServer()
    a, b = Node(tmp_path, "a", r.url, max_listeners=2), Node(tmp_path, "b", r.url)
    try:
        assert _registered(r, ["a", "b"])
        time.sleep(1.2)
        # no QUIC here: no alternate a page could move to either
        no_quic = {"quic": "", "webtransport": "", "cert_sha256": "", "alternates": []}
        tok = f"&token={listen_token()}"
        assert a.get("/join?room=live" + tok) == (200, {"room": "live", "node": "a", "udp": a.udp, **no_quic})
        assert a.get("/join?room=nowhere")[0] == 404

        async def fill_a_and_ask() -> None:
            clients = await _join_many(a.udp, 2)               # a is full now
            await asyncio.sleep(1.2)                           # its record says so
            assert a.get("/join?room=live" + tok) == (200, {"room": "live", "node": "b", "udp": b.udp, **no_quic})
            for c in clients:
                c.close()
        asyncio.run(fill_a_and_ask())
    finally:
        for n in (a, b):
            assert stop(n.proc) == 0
        r.stop()


def test_a_dead_node_leaves_every_peers_routing_at_once(tmp_path) -> None:
    """A node killed without a goodbye: once its record has expired in Redis
    (under a second), no peer sends a joiner there. Before, peers kept
    routing to it from their own table for ten seconds."""
    r = RedisServer()
    a = Node(tmp_path, "a", r.url, max_listeners=1)
    b, c = Node(tmp_path, "b", r.url), Node(tmp_path, "c", r.url)
    holder = LoopbackCrowd(1, a.listen, "live")
    try:
        assert _registered(r, ["a", "b", "c"])
        assert holder.join().accepted == 1                 # a is full: every joiner is sent on
        deadline = time.monotonic() + 5
        while {a.get("/join?room=live")[1].get("node") for _ in range(30)} != {"b", "c"}:
            assert time.monotonic() < deadline, "a never learned of both peers"
            time.sleep(0.1)
        c.proc.send_signal(signal.SIGKILL)
        c.proc.wait()
        time.sleep(2.0)                                   # the record's TTL and a read, with room to spare
        assert not r.client.exists("relay:node:c")
        # (each pick counts against b's room until its next record: some may
        # find no room at all, none may find c)
        picks = [a.get("/join?room=live")[1].get("node") for _ in range(40)]
        assert "c" not in picks and picks.count("b") >= 15, picks
    finally:
        holder.close()
        for n in (a, b):
            assert stop(n.proc) == 0
        r.stop()


# a large live-audio cluster once stayed down most of an hour after a
# seven-minute Redis outage. 25 s outlasts every timer a node has (a peer
# unread for 10 s is forgotten; heartbeats retry every 0.25 s with no
# backoff), so a longer outage tests nothing more, at a cost in CI time
OUTAGE_PACKETS = 25 * 50


def test_with_redis_down_nodes_serve_on_and_register_again(tmp_path) -> None:
    r = RedisServer()
    a, b = Node(tmp_path, "a", r.url), Node(tmp_path, "b", r.url)
    crowd = LoopbackCrowd(10, a.listen, "live")
    pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert _registered(r, ["a", "b"])
        assert crowd.join().accepted == 10
        time.sleep(1.2)
        m = scrape(a.admin)
        assert m["relay_directory_reachable"] == 1 and m["relay_directory_peers"] == 1
        r.stop()                                      # Redis goes away mid-stream, for 25 s
        start = time.monotonic()
        for k in range(OUTAGE_PACKETS):               # 50 packets a second while it is gone
            pub.sendto(rtp(k, 960 * k, 0xD1, bytes([k & 0xFF]) * 80), a.ingest)
            if k % 200 == 199:
                crowd.keepalive()
            crowd.crowd.poll(0)
            crowd.crowd.take_control()                # the keepalives' echoes
            time.sleep(max(0.0, start + (k + 1) * 0.02 - time.monotonic()))
        crowd.crowd.poll(200)
        totals = crowd.crowd.totals()
        assert totals["heard"] == 10 and totals["lost"] == 0 and totals["received"] == 10 * OUTAGE_PACKETS, totals
        m = scrape(a.admin)
        assert m["relay_directory_reachable"] == 0 and m["relay_directory_heartbeat_failures_total"] >= 2
        # admission goes on by each node's own limits

        async def join_b() -> None:
            late = await _join_many(b.udp, 5)
            assert all(c.server == b.listen for c in late)
            for c in late:
                c.close()
        asyncio.run(join_b())
        r = RedisServer(r.port)                        # Redis is back, empty
        assert _registered(r, ["a", "b"], timeout=5)
        assert a.proc.poll() is None and b.proc.poll() is None
    finally:
        crowd.close()
        pub.close()
        for n in (a, b):
            assert stop(n.proc) == 0
        r.stop()
    log = a.proc.stdout.read()
    assert log.count("unreachable") == 1, log       # said once, not once a second
    assert "registered as a" in log


def test_an_open_node_says_once_that_its_records_are_unsigned(tmp_path) -> None:
    """Without a cluster secret there is no key to sign with: the node
    writes its record without a tag and says so once at start."""
    r = RedisServer()
    a = Node(tmp_path, "a", r.url)
    try:
        assert _registered(r, ["a"])
        assert b"sig" not in r.client.hkeys("relay:node:a")
        time.sleep(0.6)                               # a few heartbeats
    finally:
        code = stop(a.proc)
        r.stop()
    assert code == 0
    log = a.proc.stdout.read()
    assert log.count("unsigned") == 1, log


@pytest.mark.parametrize("url", ["http://x", "redis"])


def test_a_directory_that_is_not_a_redis_url_is_named(url: str) -> None:
    from relay.wire.config import ConfigError, load
    with pytest.raises(ConfigError, match="directory: expected a redis://, rediss:// or redis\\+sentinel:// URL"):
        load(f'[node]\nauth = "open"\ndirectory = "{url}"\n[[room]]\nname = "a"\ningest = "127.0.0.1:5100"\n'
             'sources = ["127.0.0.1"]\n')


def test_when_its_edge_dies_a_listener_rejoins_through_the_directory(tmp_path) -> None:
    """origin <- ffmpeg; two edges take the room from it. A `relay listen`
    on edge 1 (which names edge 2 as the alternate it learned from the
    directory; the listener also knows edge 2's /join): edge 1 is killed,
    and within a second the listener hears the room from edge 2, its
    output one stream, its loss counted."""
    from tests.cluster.conftest import Node as CascadeNode
    from tests.conftest import TONE_HZ, dominant_hz
    from relay.client.publish import ffmpeg_command
    r = RedisServer()
    origin = CascadeNode(tmp_path, "origin")
    edges = [CascadeNode(tmp_path, f"edge{i}", upstream=[origin], directory=r.url) for i in (1, 2)]
    publisher = subprocess.Popen(ffmpeg_command(f"sine=frequency={TONE_HZ}:sample_rate=48000", origin.ingest,
                                                lavfi=True, duration=20),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "followed.ogg"
    e1, e2 = edges
    try:
        need("ffmpeg")
        listener = subprocess.Popen(
            [sys.executable, "-m", "relay", "listen", "--server", f"{e1.listen[0]}:{e1.listen[1]}",
             "--via", f"http://{e2.admin[0]}:{e2.admin[1]}/join", "--room", "live", "--token", listen_token(),
             "--out", str(out), "--duration", "9"],
            env=dict(ENV, RELAY_SECRET=SECRET), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(3.5)
        e1.proc.kill()                                    # the edge dies under its listener
        _, err = listener.communicate(timeout=60)
        assert listener.returncode == 0, err
        assert f"moving to {e2.listen[0]}:{e2.listen[1]}" in err or f"says {e2.listen[0]}:{e2.listen[1]}" in err, err
        m = re.search(r"received (\d+) packets .* delivered (\d+), lost (\d+)", err)
        received, delivered, lost = map(int, m.groups())
        # counted in the origin's numbering across the move: what it missed
        # is under a second of 20 ms packets, and nothing hides it
        assert lost <= 50 and received + lost >= 9 * 50 - 30, err
        assert delivered >= received - 10, err
        assert abs(dominant_hz(out) - TONE_HZ) < 3
    finally:
        publisher.kill()
        publisher.wait()
        e1.proc.wait()
        for n in (e2, origin):
            assert stop(n.proc) == 0
        r.stop()


