"""The admin HTTP port: /metrics for Prometheus, /healthz and /readyz for
load balancers, /rooms, /quic.json and the browser listener page. It is
handed what it shows as small callables, never the node itself, and runs
on the node's event loop.

It answers one request per connection: GETs, and one POST that changes
state, /rooms/NAME/release (let the next publisher stream take the room),
taken only from this machine's loopback since the port has no other
authentication; and a host's /stage/ API (hosting.py), authenticated by
the host's token. It is bounded against clients that
misbehave: a request head over 16 KiB is answered 431, a head not complete
within 5 s is dropped, and at most 256 connections are open at once (a new
one evicts the oldest that has not finished sending its head), so slow or
oversized clients cost a bounded amount of memory and no traceback. It
never builds a URL from the request's Host header."""
from __future__ import annotations

import asyncio
import html
import ipaddress
import json
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, cast

from prometheus_client import CONTENT_TYPE_LATEST

from relay.listeners import web

Response = tuple[str, str, bytes]    # status line, content type, body

MAX_HEAD = 16 * 1024      # request line and headers
HEAD_DEADLINE_S = 5.0
LINGER_S = 1.0             # an oversized head's sender is read and ignored this long after the 431
MAX_CONNECTIONS = 256


@dataclass
class AdminViews:
    """What the admin port can show, each read when asked."""
    metrics: Callable[[], bytes]                  # the Prometheus exposition
    not_ready: Callable[[], str]                  # "" when ready, else why not
    rooms: Callable[[], list[dict[str, Any]]]
    quic: Callable[[], dict[str, Any]] | None     # /quic.json; None: QUIC off
    index: Callable[[], list[tuple[str, str]]] = lambda: []   # (link, what it is) for /
    release: Callable[[str], bool] = lambda room: False      # POST /rooms/NAME/release; False: no such room
    join: Callable[[str], dict[str, Any] | None] = lambda room: None   # GET /join?room=NAME; None: no such room
    # GET /join's token check: "" if `token` admits a listener of `room`, else why not
    admits: Callable[[str, str], str] = lambda room, token: ""
    hls: Callable[[], dict[str, Any]] | None = None   # /hls.json: where the page finds LL-HLS; None: HLS off
    # /stage/ROOM[/ACTION]: a host's API (hosting.py): (method, path, query, bearer token) -> response
    host: Callable[[str, str, str, str], "Response"] | None = None


class _Request(asyncio.Protocol):
    """One connection: read the request head (bounded in size and time),
    answer, close. A plain protocol rather than asyncio streams, so a
    connection costs one small object and a timer, not a reader, a writer
    and a task."""

    def __init__(self, server: "AdminServer") -> None:
        self.server = server
        self.head: bytearray | None = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)   # uvloop's does not subclass asyncio's
        self.timer = asyncio.get_running_loop().call_later(HEAD_DEADLINE_S, self.transport.abort)
        self.server.opened(self)

    def data_received(self, data: bytes) -> None:
        if self.head is None:
            return   # answered already; a client that keeps sending is ignored
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0 and len(self.head) <= MAX_HEAD:
            return
        if end < 0 or end > MAX_HEAD:
            self.answer("431 Request Header Fields Too Large", "text/plain",
                        f"request head over {MAX_HEAD} bytes\n".encode(), linger=True)
            return
        parts = bytes(self.head[:self.head.find(b"\r\n")]).decode("latin-1").split()
        path = parts[1] if len(parts) >= 2 else ""
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        local = bool(peer) and _is_loopback(peer[0])
        # /join is asked by pages served from other nodes (a listener moving
        # on): it says only where to connect, so any origin may read it
        cors = path.partition("?")[0] == "/join"
        head = bytes(self.head[:end])
        self.answer(*self.server.route(parts[0] if parts else "", path, local,
                                       from_page=_from_a_page(head), bearer=_bearer(head)), cors=cors)

    def answer(self, status: str, ctype: str, body: bytes, cors: bool = False, linger: bool = False) -> None:
        """Write the response and close. With `linger` (a client still
        sending), only the writing side closes at once and what it still
        sends is read and dropped for up to LINGER_S: closing with unread
        data would reset the connection, and the client could lose the
        answer before reading it."""
        self.head = None
        self.server.answered(self)
        assert self.transport is not None
        allow = "Access-Control-Allow-Origin: *\r\n" if cors else ""
        self.transport.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                             f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n{allow}"
                             "Connection: close\r\n\r\n".encode() + body)
        if linger and self.transport.can_write_eof():
            self.transport.write_eof()
            if self.timer is not None:
                self.timer.cancel()
            self.timer = asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()   # after what was written has gone

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.server.answered(self)


def _bearer(head: bytes) -> str:
    """The request's `Authorization: Bearer` token, or ""."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip().decode("latin-1")
    return ""


def _from_a_page(head: bytes) -> bool:
    """Did a web page make this request? Browsers say so with an Origin
    header on every POST, or with Sec-Fetch-Site; curl and scripts send
    neither. A page (any site open in a browser on the node's machine)
    must not change the node's state through the operator's port."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"origin" or (name == b"sec-fetch-site" and value.strip().lower() != b"none"):
            return True
    return False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


# what a listener's browser or client asks for; the rest (rooms, metrics,
# health, release) is the operator's
PUBLIC_PATHS = {"/join", "/quic.json", "/hls.json", *web.PAGES}


class AdminServer:
    """A small HTTP/1.1 server: one GET per connection. `surface`: "all"
    (one port for operators and listeners, the default), or "operator" or
    "public" for a node that keeps the two on ports of their own ([node]
    public): each then answers 404 for the other's paths."""

    def __init__(self, views: AdminViews, surface: str = "all") -> None:
        self.views = views
        self.surface = surface
        self.server: asyncio.AbstractServer | None = None
        # connections still sending their request head, oldest first
        self._reading: dict[_Request, None] = {}

    async def start(self, host: str, port: int) -> None:
        """Bind; raises OSError if the port is taken."""
        self.server = await asyncio.get_running_loop().create_server(lambda: _Request(self), host, port)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def opened(self, request: _Request) -> None:
        if len(self._reading) >= MAX_CONNECTIONS:
            oldest = next(iter(self._reading))
            del self._reading[oldest]
            if oldest.transport is not None:
                oldest.transport.abort()
        self._reading[request] = None

    def answered(self, request: _Request) -> None:
        self._reading.pop(request, None)

    def route(self, method: str, target: str, local: bool = False, from_page: bool = False,
              bearer: str = "") -> Response:
        """The response to one request (`target`: path and query); `local`:
        it came over loopback; `from_page`: a browser page made it (it
        carries an Origin); `bearer`: its Authorization token."""
        path, _, query = target.partition("?")
        public = path in PUBLIC_PATHS or path.startswith("/stage/")
        if self.surface != "all" and public != (self.surface == "public"):
            return ("404 Not Found", "text/plain",
                    f"not on this port: it is the node's {self.surface} port\n".encode())
        if path.startswith("/stage/"):
            if self.views.host is None:
                return "404 Not Found", "application/json", b'{"error": "this node has no stages"}'
            return self.views.host(method, path, query, bearer)
        if method == "POST" and path.startswith("/rooms/") and path.endswith("/release"):
            if not local:
                return "403 Forbidden", "text/plain", b"releasing a room is only taken from this machine\n"
            if from_page:
                return ("403 Forbidden", "text/plain",
                        b"releasing a room is not taken from a web page (the request carries an Origin): "
                        b"use curl or relay's own tools on this machine\n")
            room = urllib.parse.unquote(path[len("/rooms/"):-len("/release")])
            if not self.views.release(room):
                return "404 Not Found", "text/plain", f"no room {room!r}\n".encode()
            return "200 OK", "text/plain", f"room {room!r} released: the next publisher stream takes it\n".encode()
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"only GET (and POST /rooms/NAME/release)\n"
        if path == "/":
            items = "".join(f'<li><a href="{html.escape(link)}">{html.escape(link)}</a> {html.escape(what)}</li>'
                            for link, what in self.views.index())
            return "200 OK", "text/html; charset=utf-8", (
                f"<!doctype html><meta charset=utf-8><title>relay</title><h1>relay</h1><ul>{items}</ul>").encode()
        if path in web.PAGES:
            got = web.page(path)
            if got is None:
                return "404 Not Found", "text/plain", f"{path} is not installed here (scripts/bootstrap.sh)\n".encode()
            return "200 OK", *got
        if path == "/hls.json":
            if self.views.hls is None:
                return "404 Not Found", "application/json", b'{"error": "LL-HLS is off on this node"}'
            return "200 OK", "application/json", json.dumps(self.views.hls()).encode()
        if path == "/quic.json":
            if self.views.quic is None:
                return "404 Not Found", "application/json", b'{"error": "QUIC is off on this node"}'
            return "200 OK", "application/json", json.dumps(self.views.quic()).encode()
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self.views.metrics()
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            why = self.views.not_ready()
            if why:
                return "503 Service Unavailable", "text/plain", f"{why}\n".encode()
            return "200 OK", "text/plain", b"ready\n"
        if path == "/join":
            asked = urllib.parse.parse_qs(query)
            room = asked.get("room", [""])[0]
            # the token first, for every room name: a joiner without one
            # learns neither where to go nor which rooms exist
            why = self.views.admits(room, asked.get("token", [""])[0])
            if why:
                return "401 Unauthorized", "application/json", json.dumps({"error": why}).encode()
            where = self.views.join(room)
            if where is None:
                return "404 Not Found", "application/json", json.dumps({"error": f"no room {room!r}"}).encode()
            if not where["udp"]:
                return "503 Service Unavailable", "application/json", json.dumps(
                    {"error": "no node has room for another listener", "room": room}).encode()
            return "200 OK", "application/json", json.dumps(where).encode()
        if path == "/rooms":
            return "200 OK", "application/json", json.dumps({"rooms": self.views.rooms()}).encode()
        return "404 Not Found", "text/plain", b"not found\n"
