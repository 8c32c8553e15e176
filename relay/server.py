"""`relay serve`: the uvloop front end around the core.

Sockets are the node's own non-blocking sockets, watched with
loop.add_reader/add_writer: each room's ingest socket feeds core.ingest()
(recvmmsg in C, GIL released), the listener socket carries control messages
and RTCP in and audio out. With one worker the loop thread also fans out and
sends, waiting for writability when the kernel's buffer fills; with more,
sender threads (one per shard of listeners, docs/multicore.md) do that in C.
The admin HTTP port serves /metrics, /healthz, /readyz and /rooms on the
same loop.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
import time
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay import __version__, web
from relay._core import Core
from relay.addr import to_sockaddr
from relay.config import NodeConfig, RoomConfig
from relay.metrics import registry_for
from relay.protocol import MAGIC
from relay.quic_endpoint import QuicEndpoint
from relay.sessions import RoomState, Sessions
from relay.tokens import Auth

log = logging.getLogger("relay.server")

CONTROL_BATCH = 256      # control datagrams handled per wake-up, so fan-out is never starved
SOCKET_BUFFER = 8 << 20


def _udp_socket(host: str, port: int, sndbuf: int = 0, rcvbuf: int = 0) -> socket.socket:
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


def _machine_cpu() -> tuple[int, int] | None:
    """(available, total) jiffies over all CPUs, from /proc/stat. Available
    is idle, iowait and niced time: niced work yields to the relay (at nice
    19 the scheduler gives it about 1.5 % against a nice-0 thread), so it is
    headroom, not load."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[1] + fields[3] + fields[4], sum(fields[:8])


class Node:
    """One relay node: rooms, the core, sessions and their sockets."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        # the arena and the room table are sized once; a reload works within them
        self.core = Core(cfg.max_listeners, rooms=cfg.max_rooms, depth=cfg.ring_depth,
                         slot_bytes=cfg.slot_bytes, shards=cfg.workers)
        self.threads: list[threading.Thread | None] = [None] * cfg.workers
        self.shard_restarts = 0
        self._stopping = False
        # duty cycle of the fan-out: busy time of the busiest sender (or of
        # the loop's inline fan-out) per second of wall time
        self.duty = 0.0
        self._inline_busy_ns = 0
        self._busy_seen: list[int] = []
        self._busy_at = time.monotonic_ns()
        self._cpu_seen: tuple[int, int] | None = None
        self._loop_cpu_seen = 0
        self.loop_duty = 0.0
        self.machine_busy = 0.0
        self.rooms: dict[str, RoomState] = {}
        self.sessions = Sessions(self.core, cfg, self.rooms, Auth(cfg.auth, cfg.secret))
        self.loop_lag = 0.0
        self.started = time.monotonic()
        self.listen_sock: socket.socket | None = None
        self.ingest: dict[str, socket.socket] = {}
        self.admin_server: asyncio.AbstractServer | None = None
        self.quic: QuicEndpoint | None = QuicEndpoint(self) if cfg.quic else None
        self._free_rooms = list(range(cfg.max_rooms - 1, -1, -1))
        self._out_fd = -1
        self._writing = False
        self._tasks: list[asyncio.Task] = []
        for r in cfg.rooms:
            self._open_room(r)

    def _open_room(self, r: RoomConfig) -> RoomState:
        index = self._free_rooms.pop()
        self.core.room_open(index, r.any_source)
        state = RoomState(r.name, index, r.max_listeners)
        self.rooms[r.name] = state
        self._allow_sources(state, r)
        return state

    def _allow_sources(self, state: RoomState, r: RoomConfig) -> None:
        self.core.room_clear_sources(state.index)
        for host, port in r.sources:
            self.core.room_allow(state.index, to_sockaddr((host, port)), any_port=(port == 0))

    def _bind_ingest(self, r: RoomConfig) -> None:
        sock = _udp_socket(*r.ingest, rcvbuf=1 << 20)
        self.ingest[r.name] = sock
        if self._out_fd >= 0:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._on_ingest, sock.fileno(),
                                                  self.rooms[r.name].index)

    def _unbind_ingest(self, name: str) -> None:
        sock = self.ingest.pop(name, None)
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    @property
    def listen_addr(self) -> tuple:
        assert self.listen_sock is not None
        return self.listen_sock.getsockname()

    async def start(self) -> None:
        """Bind every socket and start serving. Raises OSError if a port is taken."""
        loop = asyncio.get_running_loop()
        try:
            self.listen_sock = _udp_socket(*self.cfg.listen, sndbuf=SOCKET_BUFFER, rcvbuf=SOCKET_BUFFER)
            for r in self.cfg.rooms:
                self._bind_ingest(r)
            if self.cfg.admin:
                self.admin_server = await asyncio.start_server(self._on_admin, *self.cfg.admin)
            if self.quic is not None:
                await self.quic.start()
        except OSError:
            self.close()
            raise
        self._out_fd = self.listen_sock.fileno()
        loop.add_reader(self._out_fd, self._on_listener_socket)
        for name, sock in self.ingest.items():
            loop.add_reader(sock.fileno(), self._on_ingest, sock.fileno(), self.rooms[name].index)
        if self.cfg.workers > 1:
            for k in range(self.cfg.workers):
                self._start_shard(k)
        self._tasks = [asyncio.create_task(self._housekeeping())]
        log.info("relay %s listening on %s, rooms: %s, auth: %s", __version__,
                 self.listen_sock.getsockname()[:2],
                 ", ".join(f"{r.name}<-{r.ingest[0]}:{r.ingest[1]}" for r in self.cfg.rooms),
                 self.cfg.auth)

    def reload(self, new: NodeConfig) -> list[str]:
        """Apply a new config without dropping listeners of rooms that stay:
        rooms are added, removed (their listeners told UNKNOWN_ROOM) or
        changed in place; limits, rates and tokens take effect for the next
        join. What the running node cannot change (arena size, ring shape,
        ports) is kept and reported. Returns what changed, one line each."""
        notes: list[str] = []
        for key in ("listen", "admin", "ring_depth", "slot_bytes", "max_rooms", "workers",
                    "quic", "quic_cert", "quic_key"):
            if getattr(new, key) != getattr(self.cfg, key):
                notes.append(f"{key} needs a restart; kept {getattr(self.cfg, key)!r}")
                setattr(new, key, getattr(self.cfg, key))
        if new.max_listeners > self.core.capacity:
            notes.append(f"max_listeners above the arena ({self.core.capacity}) needs a restart")
            new.max_listeners = self.core.capacity
        if len(new.rooms) > len(self.rooms) + len(self._free_rooms):
            notes.append("more rooms than max_rooms: reload refused")
            return notes
        old_rooms = {r.name: r for r in self.cfg.rooms}
        new_rooms = {r.name: r for r in new.rooms}
        sock = self.listen_sock
        for name in old_rooms.keys() - new_rooms.keys():
            for addr, msg in self.sessions.end_room(name):
                if sock is not None:
                    try:
                        sock.sendto(msg, addr)
                    except OSError:
                        pass
            if self.quic is not None:
                self.quic.end_room(name)
            self._unbind_ingest(name)
            state = self.rooms.pop(name)
            self.core.room_close(state.index)
            self._free_rooms.append(state.index)
            notes.append(f"room {name!r} removed")
        for name, r in new_rooms.items():
            old = old_rooms.get(name)
            if old is None:
                self._open_room(r)
                try:
                    self._bind_ingest(r)
                except OSError as e:
                    notes.append(f"room {name!r}: cannot bind ingest: {e.strerror}")
                    continue
                notes.append(f"room {name!r} added")
                continue
            state = self.rooms[name]
            if (old.sources, old.any_source) != (r.sources, r.any_source):
                if old.any_source != r.any_source:
                    notes.append(f"room {name!r}: switching '*' sources needs a restart")
                self._allow_sources(state, r)
                notes.append(f"room {name!r}: sources now {r.sources}")
            if old.ingest != r.ingest:
                self._unbind_ingest(name)
                try:
                    self._bind_ingest(r)
                except OSError as e:
                    notes.append(f"room {name!r}: cannot bind ingest: {e.strerror}")
                notes.append(f"room {name!r}: ingest now {r.ingest[0]}:{r.ingest[1]}")
            state.max_listeners = r.max_listeners
        self.sessions.reconfigure(new, Auth(new.auth, new.secret))
        self.cfg = new
        return notes

    # ------------------------------------------------------------ data path

    def _on_ingest(self, fd: int, room: int) -> None:
        t0 = time.perf_counter_ns()
        self.core.ingest(fd, room, self._out_fd)
        if self.core.blocked:
            self._wait_writable()
        self._inline_busy_ns += time.perf_counter_ns() - t0

    def _wait_writable(self) -> None:
        if not self._writing:
            self._writing = True
            asyncio.get_running_loop().add_writer(self._out_fd, self._on_writable)

    def _on_writable(self) -> None:
        t0 = time.perf_counter_ns()
        done = self.core.flush(self._out_fd) == 0
        self._inline_busy_ns += time.perf_counter_ns() - t0
        if done:
            self._writing = False
            asyncio.get_running_loop().remove_writer(self._out_fd)

    def _on_listener_socket(self) -> None:
        sock = self.listen_sock
        assert sock is not None
        now = time.time()
        fd = self._out_fd
        joins = self.sessions.counters.joins
        for _ in range(CONTROL_BATCH):
            try:
                data, addr = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue  # e.g. a queued ICMP error; the socket stays usable
            if not data:
                continue
            if data[0] == MAGIC:
                reply = self.sessions.on_control(data, addr, now)
                if reply is not None:
                    try:
                        sock.sendto(reply, addr)
                    except OSError:
                        pass  # the reply is best effort, like the datagram it answers
            elif 128 <= data[0] <= 191:
                self.sessions.on_rtcp(data, addr, now, fd)
            else:
                self.sessions.counters.control_malformed += 1
        # a join queues a burst of recent audio; sender threads are woken by
        # the core itself, only the inline fan-out needs sending here
        if self.cfg.workers == 1 and self.sessions.counters.joins != joins and self.core.flush(fd):
            self._wait_writable()

    # ---------------------------------------------------------- housekeeping

    def _start_shard(self, k: int) -> None:
        # the thread spends its life in C without the GIL: sendmmsg for its
        # own slice of the listeners, on the shared listener socket
        t = threading.Thread(target=self.core.run_shard, args=(k, self._out_fd),
                             name=f"relay-shard-{k}", daemon=True)
        self.threads[k] = t
        t.start()

    def _check_shards(self) -> None:
        """Restart a sender thread that ended without being asked to: its
        listeners keep their slots and rings, so they only see a short gap."""
        if self._stopping or self.cfg.workers < 2:
            return
        for k, t in enumerate(self.threads):
            if t is not None and not t.is_alive():
                t.join()
                self.shard_restarts += 1
                log.error("sender thread %d stopped; restarting it (%d restarts so far)",
                          k, self.shard_restarts)
                self._start_shard(k)

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        interval = 0.25
        while True:
            t0 = loop.time()
            await asyncio.sleep(interval)
            self.loop_lag = max(0.0, loop.time() - t0 - interval)
            self.sessions.expire(time.time())
            if self.quic is not None:
                self.quic.keepalive(time.monotonic())
            self._check_shards()
            self._measure_duty()

    def _measure_duty(self) -> None:
        """Update the load measures and tell admission: joins stop before the
        node runs out of CPU, not after. The load is the larger of the
        busiest sender's duty cycle and the whole machine's busy fraction,
        so work that shares the cores (receivers on the same box, the loop
        thread, other processes) counts too."""
        now = time.monotonic_ns()
        busy = self.core.busy_ns() if self.cfg.workers > 1 else [self._inline_busy_ns]
        cpu = _machine_cpu()
        if self._busy_seen and now > self._busy_at:
            self.duty = max(b - a for a, b in zip(self._busy_seen, busy, strict=True)) / (now - self._busy_at)
            machine = 0.0
            if cpu and self._cpu_seen and cpu[1] > self._cpu_seen[1]:
                machine = 1 - (cpu[0] - self._cpu_seen[0]) / (cpu[1] - self._cpu_seen[1])
            self.machine_busy = machine
            self.sessions.note_load(max(self.duty, machine), self.core.listeners)
            # this runs on the loop thread, so its thread CPU time is the loop's
            self.loop_duty = (time.thread_time_ns() - self._loop_cpu_seen) / (now - self._busy_at)
            if self.quic is not None:
                self.quic.note_load(self.loop_duty, now - self._busy_at)
        self._busy_seen, self._busy_at, self._cpu_seen = busy, now, cpu
        self._loop_cpu_seen = time.thread_time_ns()

    # ----------------------------------------------------------------- admin

    async def _on_admin(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            host = ""
            for _ in range(100):
                header = await asyncio.wait_for(reader.readline(), 5)
                if header in (b"\r\n", b"\n", b""):
                    break
                name, _, value = header.decode("latin-1").partition(":")
                if name.strip().lower() == "host":
                    host = value.strip()
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            status, ctype, body = self._admin_route(parts[0] if parts else "", path, host)
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    def _admin_route(self, method: str, path: str, host: str = "") -> tuple[str, str, bytes]:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        if path in web.PAGES:
            return "200 OK", *web.page(path)
        if path == "/quic.json":
            if self.quic is None:
                return "404 Not Found", "application/json", b'{"error": "QUIC is off on this node"}'
            return "200 OK", "application/json", json.dumps(self.quic.describe(host)).encode()
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(registry_for(self))
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            if self.sessions.draining:
                return "503 Service Unavailable", "text/plain", b"draining\n"
            if self.core.listeners >= self.cfg.max_listeners:
                return "503 Service Unavailable", "text/plain", b"full\n"
            return "200 OK", "text/plain", b"ready\n"
        if path == "/rooms":
            now = time.monotonic_ns()
            rooms = []
            for r in self.rooms.values():
                st = self.core.room_stats(r.index)
                rooms.append({"name": r.name, "listeners": st["listeners"],
                              "packets_in": st["packets_in"],
                              "publisher_silent_s": (now - st["last_rx_ns"]) / 1e9
                              if st["have_stream"] else None})
            return "200 OK", "application/json", json.dumps({"rooms": rooms}).encode()
        return "404 Not Found", "text/plain", b"not found\n"

    # -------------------------------------------------------------- shutdown

    def drain(self) -> int:
        """Stop admitting and tell every listener to go (REJECT DRAINING,
        with the redirect if configured). Returns listeners told."""
        sock = self.listen_sock
        told = 0
        for addr, msg in self.sessions.drain():
            try:
                if sock is not None:
                    sock.sendto(msg, addr)
                    told += 1
            except OSError:
                pass
        if self.quic is not None:
            told += self.quic.drain()
        return told

    def _on_sighup(self, reload_config: Callable[[], NodeConfig]) -> None:
        try:
            new = reload_config()
        except Exception as e:  # a bad file must not take the node down
            log.error("reload refused, keeping the running config: %s", e)
            return
        notes = self.reload(new)
        log.warning("config reloaded%s", "".join(f"; {n}" for n in notes) or ": no changes")

    def close(self) -> None:
        """Release every socket and task."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        self.core.stop_shards()
        for th in self.threads:
            if th is not None:
                th.join(timeout=5)
        if loop is not None:
            if self.listen_sock is not None:
                loop.remove_reader(self.listen_sock.fileno())
                loop.remove_writer(self.listen_sock.fileno())
            for s in self.ingest.values():
                loop.remove_reader(s.fileno())
        if self.admin_server is not None:
            self.admin_server.close()
        if self.quic is not None:
            self.quic.close()
        for s in list(self.ingest.values()) + ([self.listen_sock] if self.listen_sock else []):
            s.close()
        self.ingest = {}
        self.listen_sock = None

    async def run_until_signalled(self, reload_config: Callable[[], NodeConfig] | None = None) -> None:
        """Serve until SIGTERM/SIGINT, then drain and exit. SIGHUP calls
        `reload_config` and applies what it returns."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if reload_config is not None:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup, reload_config)
        await stop.wait()
        told = self.drain()
        log.info("draining: told %d listeners to move", told)
        # let the kernel take the last datagrams before the socket goes
        await asyncio.sleep(0.1)
        self.close()
