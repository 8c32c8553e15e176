"""`relay serve`: the uvloop front end around the core.

Sockets are the node's own non-blocking sockets, watched with
loop.add_reader/add_writer: each room's ingest socket feeds core.ingest()
(recvmmsg, fan-out and sendmmsg in C, GIL released), the listener socket
carries control messages and RTCP in and audio out. When the kernel's send
buffer fills, the core stops and we wait for writability instead of
blocking the loop. The admin HTTP port serves /metrics, /healthz, /readyz
and /rooms on the same loop.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay import __version__
from relay._core import Core
from relay.addr import to_sockaddr
from relay.config import NodeConfig
from relay.metrics import registry_for
from relay.protocol import MAGIC
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


class Node:
    """One relay node: rooms, the core, sessions and their sockets."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.core = Core(cfg.max_listeners, rooms=max(1, len(cfg.rooms)),
                         depth=cfg.ring_depth, slot_bytes=cfg.slot_bytes)
        self.rooms = {r.name: RoomState(r.name, i, r.max_listeners) for i, r in enumerate(cfg.rooms)}
        self.sessions = Sessions(self.core, cfg, self.rooms, Auth(cfg.auth, cfg.secret))
        self.loop_lag = 0.0
        self.started = time.monotonic()
        self.listen_sock: socket.socket | None = None
        self.ingest_socks: list[socket.socket] = []
        self.admin_server: asyncio.AbstractServer | None = None
        self._out_fd = -1
        self._writing = False
        self._tasks: list[asyncio.Task] = []
        self._stopped = asyncio.Event()
        for i, r in enumerate(cfg.rooms):
            self.core.room_open(i, r.any_source)
            for host, port in r.sources:
                self.core.room_allow(i, to_sockaddr((host, port)), any_port=(port == 0))

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
                self.ingest_socks.append(_udp_socket(*r.ingest, rcvbuf=1 << 20))
            if self.cfg.admin:
                self.admin_server = await asyncio.start_server(self._on_admin, *self.cfg.admin)
        except OSError:
            self.close()
            raise
        self._out_fd = self.listen_sock.fileno()
        loop.add_reader(self._out_fd, self._on_listener_socket)
        for i, sock in enumerate(self.ingest_socks):
            loop.add_reader(sock.fileno(), self._on_ingest, sock.fileno(), i)
        self._tasks = [asyncio.create_task(self._housekeeping())]
        log.info("relay %s listening on %s, rooms: %s, auth: %s", __version__,
                 self.listen_sock.getsockname()[:2],
                 ", ".join(f"{r.name}<-{r.ingest[0]}:{r.ingest[1]}" for r in self.cfg.rooms),
                 self.cfg.auth)

    # ------------------------------------------------------------ data path

    def _on_ingest(self, fd: int, room: int) -> None:
        self.core.ingest(fd, room, self._out_fd)
        if self.core.blocked:
            self._wait_writable()

    def _wait_writable(self) -> None:
        if not self._writing:
            self._writing = True
            asyncio.get_running_loop().add_writer(self._out_fd, self._on_writable)

    def _on_writable(self) -> None:
        if self.core.flush(self._out_fd) == 0:
            self._writing = False
            asyncio.get_running_loop().remove_writer(self._out_fd)

    def _on_listener_socket(self) -> None:
        sock = self.listen_sock
        assert sock is not None
        now = time.time()
        fd = self._out_fd
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
        # joins may have queued a burst of recent audio
        if self.core.flush(fd):
            self._wait_writable()

    # ---------------------------------------------------------- housekeeping

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        interval = 0.25
        while True:
            t0 = loop.time()
            await asyncio.sleep(interval)
            self.loop_lag = max(0.0, loop.time() - t0 - interval)
            self.sessions.expire(time.time())

    # ----------------------------------------------------------------- admin

    async def _on_admin(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            status, ctype, body = self._admin_route(parts[0] if parts else "", path)
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    def _admin_route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
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
        return told

    def close(self) -> None:
        """Release every socket and task."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for t in self._tasks:
            t.cancel()
        if loop is not None:
            if self.listen_sock is not None:
                loop.remove_reader(self.listen_sock.fileno())
                loop.remove_writer(self.listen_sock.fileno())
            for s in self.ingest_socks:
                loop.remove_reader(s.fileno())
        if self.admin_server is not None:
            self.admin_server.close()
        for s in self.ingest_socks + ([self.listen_sock] if self.listen_sock else []):
            s.close()
        self.ingest_socks = []
        self.listen_sock = None
        self._stopped.set()

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain and exit."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        told = self.drain()
        log.info("draining: told %d listeners to move", told)
        # let the kernel take the last datagrams before the socket goes
        await asyncio.sleep(0.1)
        self.close()
