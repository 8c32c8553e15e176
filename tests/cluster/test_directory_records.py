"""Directory records that no node of the cluster wrote: someone with write
access to Redis forges them. A record is believed only if every field is
one a node would write and, in a cluster with a secret, its tag verifies;
otherwise it is never picked, GET /join never hands it to a browser, and
the node keeps answering and heartbeating. The tags are computed here from
the documented encoding, not with the relay's own code."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import pytest

from relay.client.listen import ListenClient
from relay.cluster import routing
from relay.cluster.directory import Directory, Peer
from relay.wire.addr import parse_hostport
from relay.wire.config import from_dict
from relay.testing.loadgen import LoopbackCrowd, scrape
from tests.cluster.conftest import Node, RedisServer, listen_token
from tests.conftest import SECRET, stop

ORDER = ("udp", "quic", "webtransport", "cert", "tier", "capacity", "listeners", "load", "draining", "rooms",
         "parents")

# a plausible record of a node that is not in the cluster: a browser sent
# here would connect to the attacker's WebTransport server and pin its
# certificate, and hear the attacker's audio
ATTACKER = {"udp": "10.66.66.66:7000", "quic": "10.66.66.66:7443",
            "webtransport": "https://10.66.66.66:7443/relay", "cert": "ab" * 32, "tier": "edge",
            "capacity": "100000", "listeners": "0", "load": "0.0", "draining": "0", "rooms": '["live"]',
            "parents": '[]'}


def sign(secret: str, node_id: str, fields: dict[str, str]) -> str:
    """The tag as docs/protocol.md describes it: HMAC-SHA256, keyed with
    HMAC-SHA256(secret, "relay directory v1"), over the JSON array of the
    context, the node id and every field in order."""
    key = hmac.new(secret.encode(), b"relay directory v1", hashlib.sha256).digest()
    canonical = json.dumps(["relay directory v1", node_id, *(fields.get(k, "") for k in ORDER)],
                           separators=(",", ":"))
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def forge(r: RedisServer, node_id: str, fields: dict[str, str], tag: str | None) -> None:
    """Write a record that never expires, and list it where nodes look."""
    key = f"relay:node:{node_id}"
    r.client.delete(key)
    r.client.hset(key, mapping=dict(fields, **({"sig": tag} if tag is not None else {})))
    r.client.zadd("relay:nodes", {node_id: time.time() + 3600})


TOKEN: list[str] = []


def get_join(node: Node) -> dict:
    """GET /join; a dropped connection or an error status fails the test."""
    if not TOKEN:
        TOKEN.append(listen_token())     # minted once: a subprocess per request would outlast the holder
    with urllib.request.urlopen(f"http://{node.admin[0]}:{node.admin[1]}/join?room=live&token={TOKEN[0]}",
                                timeout=10) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def _registered(r: RedisServer, names: list[str], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(r.client.exists(f"relay:node:{n}") for n in names):
            return True
        time.sleep(0.1)
    return False


def _full_node_and_a_peer(tmp_path: Path, cleanup: ExitStack, codes: list[int]) -> tuple[RedisServer, Node, Node]:
    """A Redis; node a holds one listener and takes no more, so it sends
    every joiner to the directory's pick; node b (with QUIC, so its record
    carries a WebTransport URL and a certificate hash) is the one real
    peer. `cleanup` stops each (the nodes' exit codes into `codes`)."""
    r = RedisServer()
    cleanup.callback(r.stop)
    a = Node(tmp_path, "a", directory=r.url, max_listeners=1)
    cleanup.callback(lambda: codes.append(stop(a.proc)))
    b = Node(tmp_path, "b", directory=r.url, quic=True)
    cleanup.callback(lambda: codes.append(stop(b.proc)))
    holder = LoopbackCrowd(1, a.listen, "live", token=listen_token())
    cleanup.callback(holder.close)
    assert holder.join().accepted == 1
    assert _registered(r, ["a", "b"])
    return r, a, b


def _routes_only_to_b(a: Node, b: Node, r: RedisServer, forged: list[str]) -> None:
    """Every /join at a names b (or nobody), never a forged record; a's
    view holds b alone; a UDP joiner refused by a is sent to b; a and b go
    on heartbeating."""
    deadline = time.monotonic() + 10
    while scrape(a.admin)["relay_directory_peers"] < 1:
        assert time.monotonic() < deadline, "a never read b's record"
        time.sleep(0.1)
    time.sleep(1.0)                               # several reads with the forged records in place
    answers = [get_join(a) for _ in range(60)]
    assert {x["node"] for x in answers} == {"b"}, answers
    assert all(x["udp"] == f"{b.listen[0]}:{b.listen[1]}" for x in answers)
    assert all(x["webtransport"].startswith("https://127.0.0.1:") and len(x["cert_sha256"]) == 64
               for x in answers), answers[0]
    assert not any("10.66.66.66" in json.dumps(x) for x in answers)
    assert scrape(a.admin)["relay_directory_peers"] == 1

    async def join_at_a() -> tuple[str, int]:
        c = ListenClient(f"{a.listen[0]}:{a.listen[1]}", "live", token=listen_token())
        await c.join(timeout=0.5)
        c.close()
        return c.server
    assert asyncio.run(join_at_a()) == b.listen
    for n in ("a", "b"):                          # their heartbeats go on
        assert r.client.pttl(f"relay:node:{n}") > 0, n
    for f in forged:
        assert r.client.exists(f"relay:node:{f}")  # still there: ignored, not trusted


def test_records_with_fields_no_node_writes_are_ignored(tmp_path) -> None:
    """Signed with the cluster's own key, so only the field checks stand
    between them and the routing table. Before, a 400-digit capacity made
    every pick raise OverflowError (refused joiners got no redirect, /join
    dropped its connection), and a room list nested 100,000 deep raised
    RecursionError out of the heartbeat, which then stopped for good (as
    bytes that are not UTF-8 did)."""
    bad = {"huge": dict(ATTACKER, capacity="9" * 400),
           "nested": dict(ATTACKER, rooms="[" * 100_000),
           "portless": dict(ATTACKER, udp="10.66.66.66:99999"),
           "elsewhere": dict(ATTACKER, webtransport="https://evil.example:443/relay")}
    codes: list[int] = []
    with ExitStack() as cleanup:                  # whatever started is stopped, however the test ends
        r, a, b = _full_node_and_a_peer(tmp_path, cleanup, codes)
        for node_id, fields in bad.items():
            forge(r, node_id, fields, sign(SECRET, node_id, fields))
        # bytes that are not UTF-8, in a field and in an id: before, the
        # read raised UnicodeDecodeError and the heartbeat stopped for good
        r.client.hset("relay:node:latin1", mapping=dict(ATTACKER, rooms=b'["caf\xe9"]', sig="0" * 64))
        r.client.zadd("relay:nodes", {"latin1": time.time() + 3600, b"\xff\xfe": time.time() + 3600})
        _routes_only_to_b(a, b, r, [*bad, "latin1"])
    assert codes == [0, 0]


def test_records_not_signed_with_the_cluster_key_are_ignored(tmp_path) -> None:
    """Plausible records naming the attacker's addresses and certificate:
    unsigned, with a made-up tag, and signed with another secret. Before,
    /join handed browsers the attacker's WebTransport URL and certificate
    hash, and refused UDP joiners were sent to the attacker."""
    codes: list[int] = []
    with ExitStack() as cleanup:
        r, a, b = _full_node_and_a_peer(tmp_path, cleanup, codes)
        forge(r, "unsigned", ATTACKER, None)
        forge(r, "madeup", ATTACKER, "0" * 64)
        forge(r, "otherkey", ATTACKER, sign("another-secret-0123456789abcdef012345", "otherkey", ATTACKER))
        # a real node's tag on another id: the id is signed too
        forge(r, "copied", ATTACKER, sign(SECRET, "a", ATTACKER))
        _routes_only_to_b(a, b, r, ["unsigned", "madeup", "otherkey", "copied"])
        # and the operator sees the refusals
        assert scrape(a.admin)['relay_directory_records_rejected_total{reason="signature"}'] >= 4
    assert codes == [0, 0]
    log = a.proc.stdout.read()
    # named once each in the log, not once a heartbeat
    assert log.count("'otherkey'") == 1 and log.count("'unsigned'") == 1, log


# ---------------------------------------------------------------- each field, in process

MINE = {"udp": "127.0.0.1:7000", "quic": "", "webtransport": "", "cert": "", "tier": "edge",
        "capacity": 10, "listeners": 0, "load": 0.0, "draining": False, "rooms": ["live"], "parents": []}


def _read(url: str, secret: str) -> object:
    """One heartbeat of an in-process directory: its view and its counts."""
    from relay.cluster.directory import Directory
    from relay.cluster.records import Record, record_key

    async def once() -> Directory:
        d = Directory(url, "me", lambda: Record(MINE, record_key(secret)))
        await d.beat()
        await d.close(leave=False)          # its record stays for the test to read
        return d
    return asyncio.run(once())


BAD_FIELDS = [
    ("capacity", "9" * 400), ("capacity", "-1"), ("capacity", "0"), ("capacity", "1e6"), ("capacity", " 5"),
    ("capacity", "10000001"), ("listeners", "99999999999"), ("listeners", "x"),
    ("load", "nan"), ("load", "inf"), ("load", "-0.5"), ("load", "1e308"), ("load", "1001"),
    ("tier", "core"), ("tier", ""), ("draining", "yes"),
    ("udp", "10.66.66.66"), ("udp", "10.66.66.66:0"), ("udp", "10.66.66.66:65536"), ("udp", "bad host:1"),
    ("udp", ""), ("quic", "10.66.66.66:70000"),
    ("webtransport", "http://10.66.66.66:7443/relay"), ("webtransport", "https://10.66.66.67:7443/relay"),
    ("webtransport", "https://10.66.66.66:7444/relay"), ("webtransport", "https://u:p@10.66.66.66:7443/relay"),
    ("webtransport", "https://10.66.66.66:7443/relay?x=1"), ("webtransport", "javascript:alert(1)"),
    ("cert", "ab" * 31), ("cert", "zz" * 32), ("cert", "AB" * 32 + "00"),
    ("rooms", "[" * 100_000), ("rooms", '"live"'), ("rooms", "[1]"), ("rooms", json.dumps(["x" * 65])),
    ("rooms", json.dumps(["r"] * 100_001)), ("rooms", '["\\ud800"]'), ("rooms", "{"),
    ("parents", '"127.0.0.1:7000"'), ("parents", '["127.0.0.1:0"]'), ("parents", '["bad host:1"]'),
    ("parents", json.dumps([f"127.0.0.1:{7000 + i}" for i in range(9)])), ("parents", "[" * 10_000),
]


@pytest.fixture(scope="module")
def redis_server():
    r = RedisServer()
    yield r
    r.stop()


@pytest.mark.parametrize("name,value", BAD_FIELDS, ids=[f"{n}={v[:12]!r}" for n, v in BAD_FIELDS])
def test_each_field_is_checked(redis_server: RedisServer, name: str, value: str) -> None:
    r = redis_server
    r.client.flushall()
    good, bad = dict(ATTACKER), dict(ATTACKER, **{name: value})
    forge(r, "good", good, sign(SECRET, "good", good))     # the control: the same record, well formed
    forge(r, "bad", bad, sign(SECRET, "bad", bad))
    d = _read(r.url, SECRET)
    assert set(d.peers) == {"good"}                           # type: ignore[attr-defined]
    assert d.rejected == {"invalid": 1}, d.rejected          # type: ignore[attr-defined]


def test_tags_are_checked_and_refusals_counted(redis_server: RedisServer) -> None:
    r = redis_server
    r.client.flushall()
    forge(r, "good", ATTACKER, sign(SECRET, "good", ATTACKER))
    forge(r, "unsigned", ATTACKER, None)
    forge(r, "madeup", ATTACKER, "0" * 64)
    forge(r, "otherkey", ATTACKER, sign("x" * 32, "otherkey", ATTACKER))
    forge(r, "changed", dict(ATTACKER, capacity="99999"), sign(SECRET, "changed", ATTACKER))
    forge(r, "x" * 200, ATTACKER, sign(SECRET, "x" * 200, ATTACKER))   # an id no node has
    d = _read(r.url, SECRET)
    assert set(d.peers) == {"good"}                           # type: ignore[attr-defined]
    assert d.rejected == {"signature": 4, "invalid": 1}, d.rejected   # type: ignore[attr-defined]
    # this node's own record is signed with the same key
    mine = {k.decode(): v.decode() for k, v in r.client.hgetall("relay:node:me").items()}
    assert mine.get("sig") == sign(SECRET, "me", mine) and mine["capacity"] == "10", mine


def test_bytes_that_are_not_utf8_cost_only_their_record(redis_server: RedisServer) -> None:
    r = redis_server
    r.client.flushall()
    forge(r, "good", ATTACKER, sign(SECRET, "good", ATTACKER))
    r.client.hset("relay:node:latin1", mapping=dict(ATTACKER, udp=b"h\xe9:1", sig="0" * 64))
    r.client.zadd("relay:nodes", {"latin1": time.time() + 3600, b"\xff": time.time() + 3600})
    d = _read(r.url, "")
    assert set(d.peers) == {"good"}                           # type: ignore[attr-defined]
    assert d.rejected == {"invalid": 1}                       # type: ignore[attr-defined]


def test_a_key_of_another_type_costs_only_itself(redis_server: RedisServer) -> None:
    """A string where a record's hash should be: before, the read of every
    record failed on it (WRONGTYPE), as if Redis were unreachable."""
    r = redis_server
    r.client.flushall()
    forge(r, "good", ATTACKER, sign(SECRET, "good", ATTACKER))
    r.client.set("relay:node:string", "x")
    r.client.zadd("relay:nodes", {"string": time.time() + 3600})
    d = _read(r.url, SECRET)
    assert set(d.peers) == {"good"}                           # type: ignore[attr-defined]
    assert d.rejected == {"invalid": 1}                       # type: ignore[attr-defined]


def test_without_a_secret_records_are_taken_unsigned(redis_server: RedisServer) -> None:
    r = redis_server
    r.client.flushall()
    forge(r, "plain", ATTACKER, None)
    forge(r, "huge", dict(ATTACKER, capacity="9" * 400), None)
    d = _read(r.url, "")
    assert set(d.peers) == {"plain"}                          # type: ignore[attr-defined]
    assert d.rejected == {"invalid": 1}                       # type: ignore[attr-defined]
    assert "sig" not in {k.decode() for k in r.client.hkeys("relay:node:me")}


def test_a_flooded_index_costs_a_bounded_read(redis_server: RedisServer) -> None:
    """Fake ids in the index cost a heartbeat at most 1,024 record reads,
    however many there are."""
    r = redis_server
    r.client.flushall()
    r.client.zadd("relay:nodes", {f"fake{i}": time.time() + 3600 for i in range(3000)})
    r.client.config_resetstat()
    d = _read(r.url, SECRET)
    stats = r.client.info("commandstats")
    reads = sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("hmget", "hgetall"))
    assert reads <= 1024, reads
    assert d.peers == {}                                      # type: ignore[attr-defined]


def _peer(i: str, tier: str, rooms: list[str], parents: tuple[str, ...] = (), spare: int = 100) -> Peer:
    return Peer(i, f"127.0.0.{len(i)}:{7000 + sum(map(ord, i)) % 1000}", "", tier, spare, 0, 0.0, False, rooms,
                time.monotonic(), parents=parents)


def test_parents_from_the_directory_are_the_tier_above_with_disjoint_ancestry() -> None:
    d = Directory("redis://127.0.0.1:1", "me", dict)
    origin_a, origin_b = _peer("oa", "origin", ["live"]), _peer("ob", "origin", ["live"])
    other_origin = _peer("oc", "origin", ["else"])
    mids = [_peer("m1", "mid", ["live"], (origin_a.udp,)), _peer("m22", "mid", ["live"], (origin_a.udp,)),
            _peer("m333", "mid", ["live"], (origin_b.udp,))]
    d.peers = {p.id: p for p in (origin_a, origin_b, other_origin, *mids)}
    edge = from_dict({"node": {"auth": "open", "directory": "redis://x", "tier": "edge"},
                      "room": [{"name": "live", "upstream": "directory"}]})
    mid = replace(edge, tier="mid")
    by_addr = {parse_hostport(p.udp): p for p in d.peers.values()}
    for seed in range(20):
        got = [by_addr[a] for a in routing.parents(d, edge, "live", random.Random(seed))]
        # an edge takes the mids; its second shares no parent with its first
        assert sorted(p.id for p in got) == sorted(p.id for p in mids), seed
        assert set(got[0].parents).isdisjoint(got[1].parents), (seed, [p.id for p in got])
        # a mid takes the origins that carry the room: one of each
        assert sorted(by_addr[a].id for a in routing.parents(d, mid, "live", random.Random(seed))) == ["oa", "ob"]
    # with no mid alive, an edge goes to the origins
    d.peers = {p.id: p for p in (origin_a, origin_b)}
    assert len(routing.parents(d, edge, "live", random.Random(1))) == 2

