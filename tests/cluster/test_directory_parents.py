"""Parents from the directory (upstream = "directory"): on a real Redis, an
origin pair, two mids and an edge, none told where the others are. Each
mid takes one parent at each origin, the edge takes both mids, every
record names its parents, and killing a mid costs the edge's listeners
nothing."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import redis

from relay.client.publish import ffmpeg_command
from relay.testing.loadgen import LoopbackCrowd, free_port, scrape
from tests.cluster.conftest import Node, RedisServer, listen_token
from tests.conftest import stop

SECONDS = 10


def parents(r: redis.Redis, node: str) -> list[str]:
    return json.loads(r.hget(f"relay:node:{node}", "parents") or "[]")


def test_mids_and_edges_take_disjoint_parents_from_the_directory(tmp_path) -> None:
    server = RedisServer()
    db = redis.Redis.from_url(server.url)
    ports = (free_port(), free_port())
    origin = 'tier = "origin"\n'
    nodes: list[Node] = []
    publisher = None
    crowd = None
    victim = None
    try:
        a = Node(tmp_path, "a", listen_port=ports[0], directory=server.url, extra_node=origin,
                 extra_room=f'pair = "127.0.0.1:{ports[1]}"\npair_lead = true\n')
        b = Node(tmp_path, "b", listen_port=ports[1], directory=server.url, extra_node=origin,
                 extra_room=f'pair = "127.0.0.1:{ports[0]}"\n')
        mids = [Node(tmp_path, f"mid{i}", upstream="directory", directory=server.url, extra_node='tier = "mid"\n')
                for i in (1, 2)]
        edge = Node(tmp_path, "edge", upstream="directory", directory=server.url, extra_node='tier = "edge"\n')
        nodes = [a, b, *mids, edge]
        tee = ffmpeg_command("sine=frequency=440:sample_rate=48000", [a.ingest, b.ingest], lavfi=True,
                             duration=SECONDS)
        publisher = subprocess.Popen(tee, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        crowd = LoopbackCrowd(4, edge.listen, "live", token=listen_token())
        assert crowd.join().accepted == 4
        addr = {n: f"{n.listen[0]}:{n.listen[1]}" for n in nodes}
        deadline = time.monotonic() + 15
        while not (sorted(parents(db, "edge")) == sorted(addr[m] for m in mids)
                   and all(sorted(parents(db, f"mid{i}")) == sorted((addr[a], addr[b])) for i in (1, 2))):
            assert time.monotonic() < deadline, ({n: parents(db, n) for n in ("edge", "mid1", "mid2")}, addr)
            crowd.crowd.poll(100)
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            crowd.crowd.poll(50)
        victim = mids[0]
        victim.proc.send_signal(signal.SIGKILL)           # a mid dies mid-stream
        end = time.monotonic() + SECONDS + 10
        while publisher.poll() is None and time.monotonic() < end:
            crowd.crowd.poll(50)
        crowd.crowd.poll(300)
        totals = crowd.crowd.totals()
        assert totals["heard"] == 4 and totals["lost"] == 0, totals
        assert totals["received"] >= 4 * 50 * 4, totals
        m = scrape(edge.admin)
        assert m['relay_upstream_connected{room="live"}'] == 1
        # the dead mid leaves the edge's record: it names only live parents
        deadline = time.monotonic() + 5
        while addr[victim] in parents(db, "edge"):
            assert time.monotonic() < deadline, parents(db, "edge")
            time.sleep(0.1)
    finally:
        if publisher is not None and publisher.poll() is None:
            publisher.kill()
        if crowd is not None:
            crowd.close()
        for n in nodes:
            if n is victim:
                n.proc.wait()
            else:
                assert stop(n.proc) == 0
        server.stop()
