"""Load generation on loopback: a crowd of real UDP listeners that speak the
control protocol, counted in C by relay._crowd. Used by `relay demo`, the
large loopback tests and bench/.

Every loop here is bounded in count and time and stops by itself.
"""
from __future__ import annotations

import os
import random
import resource
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field

from relay.testing._crowd import Crowd
from relay.wire.protocol import (Accept, Challenge, Join, Keepalive, Leave, ProtocolError, Reason,
                            Reject, decode, encode)


def raise_fd_limit(needed: int) -> None:
    """Lift the open-files limit to `needed`: the soft limit up to the hard
    one, and the hard one too when we are root (up to fs.nr_open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed > hard and os.geteuid() == 0:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                ceiling = int(f.read())
            top = min(needed, ceiling)
            resource.setrlimit(resource.RLIMIT_NOFILE, (top, top))
            return
        except (OSError, ValueError):
            pass  # no CAP_SYS_RESOURCE here: stay within the hard limit
    want = min(hard, max(soft, needed))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# under pytest-xdist, each worker takes ports from a range of its own below
# the kernel's ephemeral range (32768 and up): two workers never hand out
# the same port, and no client's ephemeral source port takes one meanwhile
WORKER_PORTS, WORKER_BASE = 3000, 20000


_next_port: list[int] = []     # where this worker's next search starts


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A loopback port that was free a moment ago (for tests and benches)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit():
        # handed out in turn through the worker's range, never the same
        # port twice in a row: a test asks for several before it binds any
        lo = WORKER_BASE + int(worker[2:]) * WORKER_PORTS
        if not _next_port:
            _next_port.append(random.randrange(WORKER_PORTS))
        for _ in range(WORKER_PORTS):
            port = lo + _next_port[0] % WORKER_PORTS
            _next_port[0] += 1
            with socket.socket(socket.AF_INET, kind) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def member_address(i: int) -> str:
    """A distinct loopback address per member (127.1.0.1, 127.1.0.2, ...),
    so the crowd looks like many hosts to per-address limits."""
    return f"127.{1 + i // 62500}.{i // 250 % 250}.{1 + i % 250}"


@dataclass
class JoinResult:
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    seconds: float = 0.0
    redirects: int = 0     # REJECTs followed to another node (follow=True)


# the refusals whose redirect a member follows (as relay listen does)
FOLLOWED = (Reason.NODE_FULL, Reason.ROOM_FULL, Reason.DRAINING, Reason.RATE_LIMITED)


class LoopbackCrowd:
    """`n` listener sockets connected to `server`, joined to `room`."""

    def __init__(self, n: int, server: tuple[str, int], room: str, token: str = "",
                 rcvbuf: int = 256 * 1024, first_address: int = 0, connected: bool = True,
                 follow: bool = False) -> None:
        """`connected` sockets accept datagrams from the node only; the bench
        uses unconnected ones so the same sockets can receive from its peers.
        With `follow` (unconnected only), a member refused with a redirect
        joins where it was sent, as `relay listen` does."""
        assert not (follow and connected), "a member that follows redirects must not be connected"
        self.follow = follow
        self.node_of: list[tuple[str, int]] = [server] * n   # where each member joins
        raise_fd_limit(n + 256)
        self.server, self.room, self.token = server, room, token
        self.connected = connected
        self.socks: list[socket.socket] = []
        try:
            for i in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                self.socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                s.bind((member_address(first_address + i), 0))
                if connected:
                    s.connect(server)
                s.setblocking(False)
        except OSError:
            self.close()
            raise
        self.crowd = Crowd([s.fileno() for s in self.socks])
        self.sessions: dict[int, Accept] = {}
        self._last_keepalive: float | None = None

    def retarget(self, server: tuple[str, int], room: str) -> None:
        """Point every member at another node and room (sessions are dropped)."""
        self.server, self.room = server, room
        self.node_of = [server] * len(self.socks)
        self.sessions.clear()
        if self.connected:
            for s in self.socks:
                s.connect(server)

    def _send(self, i: int, data: bytes) -> None:
        try:
            if self.connected:
                self.socks[i].send(data)
            else:
                self.socks[i].sendto(data, self.node_of[i])
        except OSError:
            pass  # a full socket buffer or ICMP error: the retry covers it

    def join(self, timeout: float = 20.0, chunk: int = 500, attempts: int = 4,
             retry_limited: bool = True) -> JoinResult:
        """Handshake every member (JOIN, cookie, JOIN, ACCEPT), `chunk` at a
        time so the node's control socket is not flooded by our own test.
        With `retry_limited`, a REJECT rate_limited is asked again on the
        next attempt instead of counted as final. `attempts` bounds the
        rounds in which some joiner got no answer at all; a round in which
        the node answered every one (it is pacing the crowd with
        rate_limited) does not count, so a busy node's pace is waited out
        until `timeout`, not given up on."""
        t0 = time.monotonic()
        res = JoinResult()
        pending = [i for i in range(len(self.socks)) if i not in self.sessions]
        deadline = t0 + timeout
        unanswered_rounds = 0
        while pending and unanswered_rounds < attempts and time.monotonic() <= deadline:
            waiting: set[int] = set()
            limited: set[int] = set()
            for start in range(0, len(pending), chunk):
                for i in pending[start:start + chunk]:
                    self._send(i, encode(Join(self.room, self.token)))
                    waiting.add(i)
                self._pump(waiting, res, time.monotonic() + 0.05, retry_limited, limited)
            self._pump(waiting, res, min(deadline, time.monotonic() + 2.0), retry_limited, limited)
            pending = sorted(waiting)
            if waiting - limited:
                unanswered_rounds += 1
        res.unanswered = len(pending)
        res.accepted = len(self.sessions)
        res.seconds = time.monotonic() - t0
        return res

    def _pump(self, waiting: set[int], res: JoinResult, until: float, retry_limited: bool = True,
              limited: set[int] | None = None) -> None:
        while waiting and time.monotonic() < until:
            self.crowd.poll(10)
            for i, data in self.crowd.take_control():
                try:
                    msg = decode(data)
                except ProtocolError:
                    continue
                if isinstance(msg, Challenge) and i in waiting:
                    self._send(i, encode(Join(self.room, self.token, msg.cookie)))
                elif isinstance(msg, Accept) and i in waiting:
                    self.sessions[i] = msg
                    waiting.discard(i)
                elif isinstance(msg, Reject) and i in waiting:
                    if self.follow and msg.redirect and msg.reason in FOLLOWED:
                        host, _, port = msg.redirect.rpartition(":")
                        self.node_of[i] = (host.strip("[]"), int(port))
                        res.redirects += 1
                        self._send(i, encode(Join(self.room, self.token)))
                        continue
                    if msg.reason == Reason.RATE_LIMITED and retry_limited:
                        if limited is not None:
                            limited.add(i)
                        continue  # stays waiting: the next attempt asks again
                    key = msg.reason.name.lower()
                    res.rejected[key] = res.rejected.get(key, 0) + 1
                    waiting.discard(i)

    def keepalive(self) -> None:
        """One KEEPALIVE from every joined member."""
        for i, acc in self.sessions.items():
            self._send(i, encode(Keepalive(acc.session_id)))

    def run(self, seconds: float, on_second=None, keepalive_s: float = 4.0) -> None:
        """Receive for `seconds`, sending keepalives; `on_second(elapsed)` is
        called about once a second (the demo's progress line)."""
        t0 = time.monotonic()
        next_tick = t0 + 1
        # keepalive time carries over between calls, so short runs keep sessions too
        if self._last_keepalive is None:
            self._last_keepalive = t0
        while (now := time.monotonic()) < t0 + seconds:
            self.crowd.poll(20)
            self.crowd.take_control()  # keepalive echoes
            if now >= self._last_keepalive + keepalive_s:
                self.keepalive()
                self._last_keepalive = now
            if now >= next_tick:
                next_tick += 1
                if on_second is not None:
                    on_second(now - t0)

    def leave(self) -> None:
        """LEAVE every session."""
        for i, acc in self.sessions.items():
            self._send(i, encode(Leave(acc.session_id)))
        self.sessions.clear()

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks = []


def scrape(admin: tuple[str, int], timeout: float = 30.0) -> dict[str, float]:
    """Fetch /metrics and return {'name{labels}': value} for every sample."""
    url = f"http://{admin[0]}:{admin[1]}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def wait_ready(admin: tuple[str, int], proc: subprocess.Popen, timeout: float = 10.0) -> bool:
    """Poll a relay's /readyz until it answers 200; False if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://{admin[0]}:{admin[1]}/readyz", timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def histogram_quantile(samples: dict[str, float], name: str, q: float) -> float | None:
    """The q-quantile of a scraped Prometheus histogram, interpolated within
    its bucket as Prometheus does. None if it has no observations."""
    buckets: list[tuple[float, float]] = []
    for key, value in samples.items():
        if key.startswith(name + "_bucket{"):
            bound = key.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), value))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_n = 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_n) / (n - prev_n) if n > prev_n else 1)
        prev_le, prev_n = le, n
    return None
