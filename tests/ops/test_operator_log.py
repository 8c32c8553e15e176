"""The log an operator reads: joins and leaves, refusals and drops by
reason, publishers starting, stopping and being replaced, reloads; one JSON
object per line with --log-format json; and a join storm adds a handful of
lines, not one per join."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time

from relay.testing.loadgen import LoopbackCrowd, free_port, wait_ready
from tests.rtp import rtp


def _start(tmp_path, extra: str = "") -> tuple[subprocess.Popen, dict]:
    ports = {"listen": free_port(), "admin": free_port(__import__("socket").SOCK_STREAM), "ingest": free_port()}
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'[node]\nlisten = "127.0.0.1:{ports["listen"]}"\nadmin = "127.0.0.1:{ports["admin"]}"\n'
                   f'auth = "open"\nmax_load = 0\nmax_machine_load = 0\nlog_interval = 0.5\ndrain_grace = 0\n{extra}'
                   f'[[room]]\nname = "hall"\ningest = "127.0.0.1:{ports["ingest"]}"\nsources = ["127.0.0.1"]\n')
    proc = subprocess.Popen([sys.executable, "-m", "relay", "--log-format", "json", "serve", "-c", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert wait_ready(("127.0.0.1", ports["admin"]), proc)
    return proc, ports


def _events(proc: subprocess.Popen) -> list[dict]:
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=15)[1]
    lines = [line for line in err.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]    # every line is one JSON object
    return records


def test_the_log_tells_an_operator_what_happened(tmp_path) -> None:
    proc, ports = _start(tmp_path, "max_listeners = 15\n")
    crowd = LoopbackCrowd(20, ("127.0.0.1", ports["listen"]), "hall")
    pub = __import__("socket").socket(__import__("socket").AF_INET, __import__("socket").SOCK_DGRAM)
    try:
        assert crowd.join(attempts=1).accepted == 15
        for k in range(60):                                     # a publisher for 1.2 s ...
            pub.sendto(rtp(k, 960 * k, 0xA, bytes(40)), ("127.0.0.1", ports["ingest"]))
            time.sleep(0.02)
        bye = struct.pack("!BBHI", 0x80, 201, 1, 0xA) + struct.pack("!BBHI", 0x81, 203, 1, 0xA)
        pub.sendto(bye, ("127.0.0.1", ports["ingest"]))         # ... that says BYE ...
        for k in range(60):                                     # ... replaced by another
            pub.sendto(rtp(5000 + k, 960 * k, 0xB, bytes(40)), ("127.0.0.1", ports["ingest"]))
            time.sleep(0.02) if k else time.sleep(0.3)
        crowd.leave()
        time.sleep(3.0)                                         # silence: the publisher stopped
    finally:
        crowd.close()
        pub.close()
    records = _events(proc)
    events = [r.get("event") for r in records]
    listeners = [r for r in records if r.get("event") == "listeners"]
    assert sum(r["joined"] for r in listeners) == 15 and sum(r["left"] for r in listeners) == 15, listeners
    refused = [r for r in records if r.get("event") == "refused"]
    assert sum(r["reasons"].get("node_full", 0) for r in refused) == 5, refused
    assert events.index("publisher_started") < events.index("publisher_replaced") < events.index("publisher_stopped")
    assert all(r["room"] == "hall" for r in records if r.get("event", "").startswith("publisher"))
    assert "draining" in events
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)


def test_a_join_storm_adds_a_few_lines_not_one_per_join(tmp_path) -> None:
    proc, ports = _start(tmp_path, "max_listeners = 100\njoin_rate = 100000\n")
    crowd = LoopbackCrowd(2000, ("127.0.0.1", ports["listen"]), "hall")
    try:
        res = crowd.join(attempts=1)
        assert res.accepted == 100 and res.rejected == {"node_full": 1900}
        time.sleep(1.2)
    finally:
        crowd.close()
    records = _events(proc)
    assert len(records) <= 15, [r["msg"] for r in records]
    refused = [r for r in records if r.get("event") == "refused"]
    assert sum(r["reasons"]["node_full"] for r in refused) == 1900


def test_packets_too_large_for_the_rings_are_explained_once(tmp_path) -> None:
    """A publisher whose packets are larger than [node] ring_bytes is heard
    by nobody; the log says so with the size and the fix, once per log
    interval in which it happened (0.5 s here) with that interval's count,
    never once a packet."""
    proc, ports = _start(tmp_path, "ring_bytes = 1300\n")
    pub = __import__("socket").socket(__import__("socket").AF_INET, __import__("socket").SOCK_DGRAM)
    try:
        for k in range(50):                                     # 1 s of 1,400-byte packets
            pub.sendto(rtp(k, 960 * k, 0xA, bytes(1388)), ("127.0.0.1", ports["ingest"]))
            time.sleep(0.02)
        time.sleep(0.6)
    finally:
        pub.close()
    records = _events(proc)
    oversized = [r for r in records if r.get("event") == "oversized"]
    assert 1 <= len(oversized) <= 5, [r["msg"] for r in records]
    assert sum(r["dropped"] for r in oversized) == 50
    line = oversized[0]
    assert line["room"] == "hall" and line["size"] == 1400 and line["ring_bytes"] == 1300
    assert "raise [node] ring_bytes (now 1300, at most 16384)" in line["msg"]
