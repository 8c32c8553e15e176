"""The listener socket on the event loop: control messages, RTCP and
speakers' SRTP in; replies, resends and (from the core, with sendmmsg)
audio out.

This module only moves bytes: what to answer is the session policy's
(sessions.py), what to send is the core's. The socket is drained by the
core's ControlGate (core/gate.pxi) in recvmmsg batches: sessions' datagrams
come up here always; strangers' are answered with a CHALLENGE or dropped
in C, and only what the policy alone can answer comes up, under a bound,
so a flood of them cannot starve a session's KEEPALIVEs. Where
the kernel allows it the port is two sockets, and an eBPF program steers
sessions' datagrams to their own (steer.py): a flood then cannot even fill
the queue they wait in. With an inline core (no sender
threads) the loop thread also waits for the socket to drain when the
kernel's buffer fills, for its own sends and for the ingest ports'.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Iterable

from relay._core import ControlGate, Core
from relay.listeners.sessions import Resend, Send, Sessions
from relay.listeners.steer import Steering
from relay.wire.addr import to_sockaddr
from relay.wire.protocol import MAGIC
from relay.wire.sockets import SOCKET_BUFFER, udp_socket

log = logging.getLogger("relay.listeners")

# recvmmsg batches of 64 read per wake-up: 4,096 datagrams, then the loop
# serves everything else (fan-out, timers) before reading on
GATE_ROUNDS = 64
# CHALLENGEs the gate sends a second, node-wide: a cookie costs it about a
# microsecond, so this bounds the reply traffic, not the CPU
CHALLENGE_RATE = 200_000.0


def gate_limits(join_rate: float, join_rate_per_source: float) -> dict[str, float]:
    """Strangers' bounds in the gate, from the join limits: a source may
    send three datagrams per join it may make (JOIN, JOIN+cookie and a
    retransmission); the policy hears four times the joins the node admits
    (so a storm's joiners are told rate_limited, not met with silence), and
    two thousand a second besides (speakers' key exchanges, KEEPALIVEs of
    sessions that ended, which are answered so their listeners rejoin)."""
    per_source = 3 * join_rate_per_source if join_rate_per_source > 0 else 0.0
    return {"per_source": per_source, "per_source_burst": max(per_source, 10.0),
            "up_rate": 4 * join_rate + 2000 if join_rate > 0 else 0.0, "challenge_rate": CHALLENGE_RATE}


class ListenerPort:
    """The listener socket of one node."""

    def __init__(self, core: Core, sessions: Sessions) -> None:
        self.core, self.sessions = core, sessions
        self.listen_sock: socket.socket | None = None
        # strangers' half of the port, when steering works (else None: one socket)
        self.stranger_sock: socket.socket | None = None
        self.steering: Steering | None = None
        self.steering_off = ""    # why the port is one socket, if it is
        self.busy_ns = 0          # loop time spent in the inline fan-out
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = False
        cfg = sessions.cfg
        self.gate_capacity = cfg.max_listeners + cfg.speaker_slots + 64
        self.gate = ControlGate(self.gate_capacity, sessions.cookies.secret, os.urandom(16),
                                sessions.cookies.lifetime_s)
        self.configure(cfg.join_rate, cfg.join_rate_per_source)
        sessions.on_address = self._on_address

    def configure(self, join_rate: float, join_rate_per_source: float) -> None:
        """The gate's bounds for strangers (at start and on a reload)."""
        self.gate.limits(**gate_limits(join_rate, join_rate_per_source))

    def _on_address(self, addr: tuple, live: bool) -> None:
        # the session table tells the gate whose datagrams always come up,
        # and the kernel which socket they go to
        if self.steering is not None:
            self.steering.session(addr, live)
        raw = to_sockaddr(addr)
        if live:
            self.gate.known_add(raw)
        else:
            self.gate.known_drop(raw)

    def gate_counters(self) -> dict[str, int]:
        """What the gate passed up, answered and dropped (the metrics' view)."""
        return self.gate.counters()

    @property
    def out_fd(self) -> int:
        """The listener socket's fd: where the core sends audio."""
        return self.listen_sock.fileno() if self.listen_sock is not None else -1

    def bind(self, addr: tuple[str, int]) -> None:
        """Bind the listener port (before start()): the strangers' socket and
        the sessions' one, steered apart, where the kernel lets us; one
        socket otherwise."""
        # a plain bind first: a port someone holds fails here, as it always
        # did, rather than join their reuseport group
        probe = udp_socket(*addr)
        port = probe.getsockname()[1]
        probe.close()
        strangers = udp_socket(addr[0], port, rcvbuf=SOCKET_BUFFER, reuseport=True)   # bound first: index 0
        self.listen_sock = udp_socket(addr[0], port, sndbuf=SOCKET_BUFFER, rcvbuf=SOCKET_BUFFER, reuseport=True)
        steering = Steering.attach(self.listen_sock, self.gate_capacity)
        if isinstance(steering, str):
            self.steering_off = steering
            strangers.close()
            log.info("listener port: one socket for sessions and strangers: %s", steering)
        else:
            self.steering, self.stranger_sock = steering, strangers

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start reading the listener socket."""
        self._loop = loop
        loop.add_reader(self.out_fd, self._on_listener_socket)
        if self.stranger_sock is not None:
            loop.add_reader(self.stranger_sock.fileno(), self._on_listener_socket)

    def flush_inline(self) -> None:
        """Send what an inline core has queued (after a packet was fed to it
        from Python), waiting for the socket if it is full."""
        if self.core.flush(self.out_fd):
            self.wait_writable()

    def wait_writable(self) -> None:
        """Send the rest of the core's queue when the socket drains."""
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
        assert self.listen_sock is not None
        now = time.monotonic()
        joins = self.sessions.counters.joins
        got = self.gate.drain(self.out_fd, GATE_ROUNDS)
        if self.stranger_sock is not None:
            # sessions' socket first, whole; then strangers', as far as the budget goes
            got += self.gate.drain(self.stranger_sock.fileno(), GATE_ROUNDS)
        for data, addr in got:
            if not data:
                continue
            if data[0] == MAGIC:
                reply = self.sessions.on_control(data, addr, now)
                if self.sessions.outbox:
                    self.send(self.sessions.outbox)
                    self.sessions.outbox.clear()
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
            self.wait_writable()

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
        """Stop reading and close the socket."""
        loop = self._loop
        if loop is not None and self.listen_sock is not None:
            loop.remove_reader(self.out_fd)
            loop.remove_writer(self.out_fd)
        if self.listen_sock is not None:
            self.listen_sock.close()
            self.listen_sock = None
        if self.stranger_sock is not None:
            if loop is not None:
                loop.remove_reader(self.stranger_sock.fileno())
            self.stranger_sock.close()
            self.stranger_sock = None
        if self.steering is not None:
            self.steering.close()
            self.steering = None
