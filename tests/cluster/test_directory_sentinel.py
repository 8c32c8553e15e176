"""The directory behind Redis Sentinel: a master, one replica and three
sentinels on loopback, two `relay serve` nodes on the redis+sentinel://
URL. The master is killed mid-stream; the sentinels promote the replica,
both nodes register on it within seconds, and a listener hears every
packet meanwhile (the directory is never on the packet path)."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis

from relay.testing.loadgen import LoopbackCrowd, free_port, scrape
from tests.cluster.conftest import Node, listen_token
from tests.conftest import need, stop
from tests.rtp import rtp

SERVICE = "mymaster"
FAILOVER_BOUND_S = 20.0      # from the kill to both nodes' records on the promoted master


def _wait(what: str, ok, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ok():
                return
        except (redis.RedisError, OSError):
            pass
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.1)


class Redis:
    """A redis-server on loopback: the master, or a replica of `master`."""

    def __init__(self, tmp: Path, master: "Redis | None" = None) -> None:
        self.port = free_port(socket.SOCK_STREAM)
        # a replica keeps the copy it syncs in its directory: the test's, not the checkout
        args = [need("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(tmp)]
        if master is not None:
            args += ["--replicaof", "127.0.0.1", str(master.port)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            _wait("redis-server started", self.client.ping)
            if master is not None:
                _wait("the replica in sync", lambda: self.client.info("replication")["master_link_status"] == "up")
        except BaseException:
            self.stop()
            raise

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Sentinels:
    """Three sentinels watching `master` with a quorum of two, quick to call
    it down (1 s) and to fail over."""

    def __init__(self, tmp: Path, master: Redis, n: int = 3) -> None:
        self.ports = [free_port(socket.SOCK_STREAM) for _ in range(n)]
        self.procs = []
        for port in self.ports:
            conf = tmp / f"sentinel-{port}.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp}\n"
                            f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 2\n"
                            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                            f"sentinel failover-timeout {SERVICE} 3000\n"
                            f"sentinel parallel-syncs {SERVICE} 1\n")
            self.procs.append(subprocess.Popen([need("redis-sentinel"), str(conf)],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.clients = [redis.Redis(port=p, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)
                        for p in self.ports]

        def ready() -> bool:      # each knows the replica and the other sentinels: a failover can happen
            return all(int(m["num-other-sentinels"]) == n - 1 and int(m["num-slaves"]) == 1
                       for m in (c.sentinel_master(SERVICE) for c in self.clients))
        try:
            _wait("the sentinels know each other and the replica", ready, timeout=20)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.ports) + f"/{SERVICE}/0"

    def master_port(self) -> int:
        """The master as the sentinels name it now (most of them agreeing)."""
        ports = []
        for c in self.clients:
            try:
                ports.append(int(c.sentinel_get_master_addr_by_name(SERVICE)[1]))
            except (redis.RedisError, OSError, TypeError):
                pass
        return max(set(ports), key=ports.count) if ports else 0

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(10)


def test_nodes_follow_the_master_sentinel_promotes_and_listeners_lose_nothing(tmp_path: Path) -> None:
    codes: list[int] = []
    with ExitStack() as cleanup:                  # whatever started is stopped, however the test ends
        master = Redis(tmp_path)
        cleanup.callback(master.stop)
        replica = Redis(tmp_path, master)
        cleanup.callback(replica.stop)
        sentinels = Sentinels(tmp_path, master)
        cleanup.callback(sentinels.stop)
        a = Node(tmp_path, "a", directory=sentinels.url)
        cleanup.callback(lambda: codes.append(stop(a.proc)))
        b = Node(tmp_path, "b", directory=sentinels.url)
        cleanup.callback(lambda: codes.append(stop(b.proc)))
        crowd = LoopbackCrowd(1, a.listen, "live", token=listen_token())
        cleanup.callback(crowd.close)
        pub = cleanup.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        promoted = cleanup.enter_context(redis.Redis(port=replica.port, socket_timeout=0.2,
                                                     socket_connect_timeout=0.2))

        _wait("both nodes registered on the master",
              lambda: master.client.exists("relay:node:a") and master.client.exists("relay:node:b"))
        assert crowd.join().accepted == 1
        killed_at = switched_at = registered_at = None
        start = time.monotonic()
        k = 0
        while registered_at is None or time.monotonic() < registered_at + 1.0:   # 50 packets a second
            pub.sendto(rtp(k, 960 * k, 0xD1, bytes([k & 0xFF]) * 80), a.ingest)
            k += 1
            if k % 200 == 0:
                crowd.keepalive()
            crowd.crowd.poll(0)
            crowd.crowd.take_control()                 # the keepalives' echoes
            now = time.monotonic()
            if killed_at is None and k == 100:         # two seconds in, the master dies
                master.kill()
                killed_at = now
            elif killed_at is not None and k % 10 == 0:
                assert now - killed_at < FAILOVER_BOUND_S, (
                    f"after {FAILOVER_BOUND_S:g} s: sentinels name port {sentinels.master_port()} "
                    f"(replica {replica.port}); switched at {switched_at}")
                if switched_at is None and sentinels.master_port() == replica.port:
                    switched_at = now
                    # the records the replica copied before the kill go: any
                    # seen from now on were written to the promoted master
                    promoted.delete("relay:node:a", "relay:node:b")
                elif (switched_at is not None and registered_at is None
                      and promoted.exists("relay:node:a") and promoted.exists("relay:node:b")):
                    registered_at = now
            time.sleep(max(0.0, start + k * 0.02 - time.monotonic()))
        crowd.crowd.poll(200)
        print(f"master killed; sentinels switched after {switched_at - killed_at:.2f} s, "
              f"both nodes registered on the promoted master after {registered_at - killed_at:.2f} s")
        totals = crowd.crowd.totals()
        assert totals["heard"] == 1 and totals["lost"] == 0 and totals["received"] == k, totals
        assert promoted.info("replication")["role"] == "master"
        for n in (a, b):
            assert n.proc.poll() is None
            assert scrape(n.admin)["relay_directory_reachable"] == 1
    assert codes == [0, 0]
    log = a.proc.stdout.read()
    assert f"master moved from 127.0.0.1:{master.port} to 127.0.0.1:{replica.port}" in log, log
    assert log.count("unreachable") <= 1, log       # the failover is said once, not once a heartbeat


@pytest.mark.parametrize("url,says", [
    ("redis+sentinel:///mymaster", "no sentinel listed"),
    ("redis+sentinel://127.0.0.1:26379", "no master name"),
    ("redis+sentinel://127.0.0.1:263790/mymaster", "port 263790 out of range"),
    ("redis+sentinel://127.0.0.1:26379,/mymaster", "a sentinel's address is empty"),
    ("redis+sentinel://127.0.0.1/mymaster/zero", "database 'zero': expected a number"),
    ("redis+sentinel://127.0.0.1/mymaster?ssl=1", "options after '?' are not taken"),
])
def test_a_bad_sentinel_url_is_one_readable_line(tmp_path: Path, url: str, says: str) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\nauth = "open"\ndirectory = "{url}"\n[[room]]\nname = "a"\n'
                   'ingest = "127.0.0.1:5100"\nsources = ["127.0.0.1"]\n')
    out = subprocess.run([sys.executable, "-m", "relay", "serve", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relay: error: [node] directory: ") and says in lines[0], \
        out.stderr


def test_the_password_in_a_directory_url_stays_out_of_errors_and_logs(tmp_path: Path) -> None:
    from relay.wire.config import ConfigError, load
    with pytest.raises(ConfigError) as e:
        load('[node]\nauth = "open"\ndirectory = "http://u:hunter2@x/0"\n[[room]]\nname = "a"\n'
             'ingest = "127.0.0.1:5100"\nsources = ["127.0.0.1"]\n')
    assert "hunter2" not in str(e.value) and "u:***@x" in str(e.value)
    from relay.cluster.directory import Directory
    for url in ("redis+sentinel://:hunter2@127.0.0.1:1/m", "redis://user:hunter2@127.0.0.1:1/0"):
        assert "hunter2" not in Directory(url, "a", dict).shown    # what its log lines name
