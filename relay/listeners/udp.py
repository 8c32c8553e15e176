"""The UDP adapter: the node's own non-blocking sockets on the event loop.

Each room's ingest socket is drained by core.ingest() (recvmmsg in C), or,
for a room whose publishers use SRTP or go on a stage, read here, opened
(srtp.py) and fed to the core or the stage one packet at a time. The listener socket carries control
messages, RTCP and speakers' SRTP in, and replies, resends and (from the
core, with sendmmsg) audio out. This module only moves bytes:
what to answer is the session policy's, what to send is the core's. With an
inline core the loop thread also waits for the socket to drain when the
kernel's buffer fills.
"""
from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from typing import Callable, Iterable

from relay._core import Core
from relay.listeners.sessions import Resend, Send, Sessions
from relay.ingest.srtp import SrtpIngest
from relay.wire.addr import to_sockaddr
from relay.wire.protocol import MAGIC, MAX_CONTROL

CONTROL_BATCH = 256      # control datagrams handled per wake-up, so fan-out is never starved
SRTP_BATCH = 64          # SRTP ingest datagrams opened per wake-up, likewise
SRTP_BUFFER = 16384 + 1  # the largest RTP the core takes, and one byte to tell a larger one
SOCKET_BUFFER = 8 << 20
# every control message fits (a longer datagram is not one of ours), RTCP
# compound packets from listeners are far smaller, and so is a speaker's
# SRTP (a 20 ms Opus frame is at most 1,275 bytes)
CONTROL_BUFFER = max(MAX_CONTROL, 4096) + 1


def udp_socket(host: str, port: int, sndbuf: int = 0, rcvbuf: int = 0) -> socket.socket:
    """A bound non-blocking UDP socket; raises OSError (e.g. port taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        for opt, size in ((socket.SO_SNDBUF, sndbuf), (socket.SO_RCVBUF, rcvbuf)):
            if size:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class UdpPorts:
    """The listener socket and the rooms' ingest sockets of one node."""

    def __init__(self, core: Core, sessions: Sessions) -> None:
        self.core, self.sessions = core, sessions
        self.listen_sock: socket.socket | None = None
        self.ingest: dict[str, tuple[socket.socket, int]] = {}    # room -> (socket, room index)
        self.srtp: dict[str, SrtpIngest] = {}                      # rooms whose publishers use SRTP
        self._allowed: dict[str, Callable[[tuple], bool]] = {}
        # rooms whose publishers go on a stage: their datagrams (None for a
        # source that may not publish) go there instead of to the core
        self.to_stage: dict[str, Callable[[tuple, bytes | None], None]] = {}
        self.busy_ns = 0          # loop time spent in the inline fan-out
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = False

    @property
    def out_fd(self) -> int:
        """The listener socket's fd: where the core sends audio."""
        return self.listen_sock.fileno() if self.listen_sock is not None else -1

    def bind_listener(self, addr: tuple[str, int]) -> None:
        """Bind the listener socket (before start())."""
        self.listen_sock = udp_socket(*addr, sndbuf=SOCKET_BUFFER, rcvbuf=SOCKET_BUFFER)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading the listener socket and every ingest socket."""
        self._loop = loop
        loop.add_reader(self.out_fd, self._on_listener_socket)
        for room in self.ingest:
            self._read_ingest(room)

    # ---------------------------------------------------------------- ingest

    def bind_ingest(self, room: str, index: int, addr: tuple[str, int]) -> None:
        """Bind a room's ingest socket; raises OSError and keeps what was
        bound before (a failed rebind leaves the room on its old port)."""
        sock = udp_socket(*addr, rcvbuf=1 << 20)
        self.unbind_ingest(room)
        self.ingest[room] = (sock, index)
        if self._loop is not None:
            self._read_ingest(room)

    def unbind_ingest(self, room: str) -> None:
        entry = self.ingest.pop(room, None)
        if entry is not None:
            if self._loop is not None:
                self._loop.remove_reader(entry[0].fileno())
            entry[0].close()

    def use_srtp(self, room: str, key: bytes, allowed: Callable[[tuple], bool]) -> None:
        """Take the room's packets only when they authenticate with `key`
        (empty: plain RTP again); `allowed` says whether a source address may
        publish at all, checked before any cryptography is spent on it."""
        if key and (room not in self.srtp or self.srtp[room].key != key):
            self.srtp[room] = SrtpIngest(key)
        elif not key:
            self.srtp.pop(room, None)
        self._allowed[room] = allowed
        if self._loop is not None and room in self.ingest:
            self._read_ingest(room)

    def srtp_drops(self) -> Counter[str]:
        """SRTP datagrams dropped, by reason, over every SRTP room."""
        total: Counter[str] = Counter()
        for srtp in self.srtp.values():
            total.update(srtp.drops)
        return total

    def _read_ingest(self, room: str) -> None:
        """(Re)start reading a room's ingest socket the way its room wants:
        straight into the core, or through SRTP."""
        assert self._loop is not None
        sock, index = self.ingest[room]
        self._loop.remove_reader(sock.fileno())
        if room in self.srtp or room in self.to_stage:
            self._loop.add_reader(sock.fileno(), self._on_python_ingest, room, sock, index)
        else:
            self._loop.add_reader(sock.fileno(), self._on_ingest, sock.fileno(), index)

    def _on_ingest(self, fd: int, room: int) -> None:
        t0 = time.perf_counter_ns()
        self.core.ingest(fd, room, self.out_fd)
        if self.core.blocked:
            self._wait_writable()
        self.busy_ns += time.perf_counter_ns() - t0

    def _on_python_ingest(self, room: str, sock: socket.socket, index: int) -> None:
        """A room's ingest read here rather than by the core: opened with
        SRTP if the room has a key, then fed to the core, or to the room's
        stage if it has one."""
        t0 = time.perf_counter_ns()
        srtp, allowed, stage = self.srtp.get(room), self._allowed.get(room), self.to_stage.get(room)
        fed = False
        for _ in range(SRTP_BATCH):
            try:
                data, addr = sock.recvfrom(SRTP_BUFFER)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            if allowed is None:
                break
            if not allowed(addr):
                # counted as foreign (by the core, or the stage), without a key ever being tried
                if stage is not None:
                    stage(addr, None)
                else:
                    self.core.feed(index, data, to_sockaddr(addr))
                continue
            plain = srtp.open(data) if srtp is not None else data
            if plain is None:
                continue
            if stage is not None:
                stage(addr, plain)
            else:
                self.core.feed(index, plain, to_sockaddr(addr))
                fed = True
        if fed and not self.core.threaded and self.core.flush(self.out_fd):
            self._wait_writable()
        self.busy_ns += time.perf_counter_ns() - t0

    def flush_inline(self) -> None:
        """Send what an inline core has queued (after a packet was fed to it
        from Python), waiting for the socket if it is full."""
        if self.core.flush(self.out_fd):
            self._wait_writable()

    def _wait_writable(self) -> None:
        if not self._writing and self._loop is not None:
            self._writing = True
            self._loop.add_writer(self.out_fd, self._on_writable)

    def _on_writable(self) -> None:
        t0 = time.perf_counter_ns()
        done = self.core.flush(self.out_fd) == 0
        self.busy_ns += time.perf_counter_ns() - t0
        if done and self._loop is not None:
            self._writing = False
            self._loop.remove_writer(self.out_fd)

    # --------------------------------------------------------------- control

    def _on_listener_socket(self) -> None:
        sock = self.listen_sock
        assert sock is not None
        now = time.monotonic()
        joins = self.sessions.counters.joins
        for _ in range(CONTROL_BATCH):
            try:
                data, addr = sock.recvfrom(CONTROL_BUFFER)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # e.g. a queued ICMP error; the socket stays usable
            if not data:
                continue
            if data[0] == MAGIC:
                reply = self.sessions.on_control(data, addr, now)
                if reply is not None:
                    self.send([Send(addr, reply)])
            elif 128 <= data[0] <= 191 and len(data) > 1 and 192 <= data[1] <= 223:
                # RTCP, told from RTP by its packet type (RFC 5761)
                resend = self.sessions.on_rtcp(data, addr, now)
                if resend is not None:
                    self._resend(resend)
            elif 128 <= data[0] <= 191 and self.sessions.stages is not None:
                self.sessions.stages.on_rtp(data, addr)   # a speaker's audio (or counted and dropped)
            else:
                self.sessions.counters.control_malformed += 1
        # a join queues a burst of recent audio; sender threads are woken by
        # the core itself, only the inline fan-out needs sending here
        if not self.core.threaded and self.sessions.counters.joins != joins and self.core.flush(self.out_fd):
            self._wait_writable()

    def _resend(self, r: Resend) -> None:
        for seq in r.seqs:
            self.core.resend(self.out_fd, r.slot, seq)

    def send(self, sends: Iterable[Send]) -> int:
        """Send control datagrams (best effort, like the datagrams they
        answer); returns how many the kernel took."""
        sock = self.listen_sock
        sent = 0
        if sock is None:
            return 0
        for addr, data in sends:
            try:
                sock.sendto(data, addr)
                sent += 1
            except OSError:
                pass
        return sent

    def close(self) -> None:
        """Stop reading and close every socket."""
        loop = self._loop
        if loop is not None and self.listen_sock is not None:
            loop.remove_reader(self.out_fd)
            loop.remove_writer(self.out_fd)
        for room in list(self.ingest):
            self.unbind_ingest(room)
        if self.listen_sock is not None:
            self.listen_sock.close()
            self.listen_sock = None
