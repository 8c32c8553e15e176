"""The rooms' ingest sockets on the event loop: publishers' RTP in.

A plain-RTP room's socket is drained by core.ingest() (recvmmsg in C). A
room whose publishers use SRTP, or go on a stage, or whose packets are
renumbered for an origin pair, is read here, opened (srtp.py) and fed to
the core or to the stage one packet at a time. This
module only moves bytes: who may publish is the core's source table and
rules.py's, what to send is the core's.
"""
from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from typing import Callable

from relay._core import Core
from relay.ingest.srtp import SrtpIngest
from relay.wire.addr import to_sockaddr
from relay.wire.sockets import udp_socket

SRTP_BATCH = 64          # SRTP ingest datagrams opened per wake-up, so fan-out is never starved
SRTP_BUFFER = 16384 + 1  # the largest RTP the core takes, and one byte to tell a larger one
INGEST_BUFFER = 1 << 20


class IngestPorts:
    """Every room's ingest socket on one node. `out_fd` gives the socket the
    core sends audio on, and `wait_writable` waits for it when its kernel
    buffer is full (only an inline core, one without sender threads, waits)."""

    def __init__(self, core: Core, out_fd: Callable[[], int], wait_writable: Callable[[], None]) -> None:
        self.core = core
        self._out_fd, self._wait_writable = out_fd, wait_writable
        self.sockets: dict[str, tuple[socket.socket, int]] = {}   # room -> (socket, room index)
        self.srtp: dict[str, SrtpIngest] = {}                      # rooms whose publishers use SRTP
        self._allowed: dict[str, Callable[[tuple], bool]] = {}
        # rooms whose publishers go on a stage: their datagrams (None for a
        # source that may not publish) go there instead of to the core
        self.to_stage: dict[str, Callable[[tuple, bytes | None], None]] = {}
        # rooms whose packets are rewritten before the core takes them (an
        # origin pair's numbering: relay/cluster/pair.py); None holds one back
        self.rewrite: dict[str, Callable[[bytes], bytes | None]] = {}
        self.busy_ns = 0          # loop time spent in the inline fan-out
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading every ingest socket."""
        self._loop = loop
        for room in self.sockets:
            self._read(room)

    def bind(self, room: str, index: int, addr: tuple[str, int]) -> None:
        """Bind a room's ingest socket; raises OSError and keeps what was
        bound before (a failed rebind leaves the room on its old port)."""
        sock = udp_socket(*addr, rcvbuf=INGEST_BUFFER)
        self.unbind(room)
        self.sockets[room] = (sock, index)
        if self._loop is not None:
            self._read(room)

    def unbind(self, room: str) -> None:
        """Close a room's ingest socket, if it has one."""
        entry = self.sockets.pop(room, None)
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
        if self._loop is not None and room in self.sockets:
            self._read(room)

    def srtp_drops(self) -> Counter[str]:
        """SRTP datagrams dropped, by reason, over every SRTP room."""
        total: Counter[str] = Counter()
        for srtp in self.srtp.values():
            total.update(srtp.drops)
        return total

    def _read(self, room: str) -> None:
        """(Re)start reading a room's ingest socket the way its room wants:
        straight into the core, or through SRTP."""
        assert self._loop is not None
        sock, index = self.sockets[room]
        self._loop.remove_reader(sock.fileno())
        if room in self.srtp or room in self.to_stage or room in self.rewrite:
            self._loop.add_reader(sock.fileno(), self._on_python_ingest, room, sock, index)
        else:
            self._loop.add_reader(sock.fileno(), self._on_ingest, sock.fileno(), index)

    def _on_ingest(self, fd: int, room: int) -> None:
        t0 = time.perf_counter_ns()
        self.core.ingest(fd, room, self._out_fd())
        if self.core.blocked:
            self._wait_writable()
        self.busy_ns += time.perf_counter_ns() - t0

    def _on_python_ingest(self, room: str, sock: socket.socket, index: int) -> None:
        """A room's ingest read here rather than by the core: opened with
        SRTP if the room has a key, then fed to the core, or to the room's
        stage if it has one."""
        t0 = time.perf_counter_ns()
        srtp, allowed, stage = self.srtp.get(room), self._allowed.get(room), self.to_stage.get(room)
        rewrite = self.rewrite.get(room)
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
            if plain is not None and rewrite is not None:
                plain = rewrite(plain)
            if plain is None:
                continue
            if stage is not None:
                stage(addr, plain)
            else:
                self.core.feed(index, plain, to_sockaddr(addr))
                fed = True
        if fed and not self.core.threaded and self.core.flush(self._out_fd()):
            self._wait_writable()
        self.busy_ns += time.perf_counter_ns() - t0

    def close(self) -> None:
        """Stop reading and close every ingest socket."""
        for room in list(self.sockets):
            self.unbind(room)
