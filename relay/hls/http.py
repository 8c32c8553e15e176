"""The HLS port's HTTP/1.1 connections: keep-alive, HEAD, pipelined requests
answered in order, and bounds against clients that misbehave.

A connection is a plain asyncio protocol (one small object and one timer,
no task): it reads a request head of at most 8 KiB within 5 s of its first
byte (or 30 s of quiet between keep-alive requests), asks the server for
an answer, and writes it. An answer may be held (a blocking playlist
reload, a part not yet made): reading pauses until it is sent, so a client
cannot queue work behind it. A slow or silent client costs a buffer and a
timer until its deadline, never a thread, and never the audio."""
from __future__ import annotations

import asyncio
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from relay.hls.server import HlsServer

MAX_HEAD = 8 * 1024
HEAD_DEADLINE_S = 5.0
IDLE_S = 30.0

REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 503: "Service Unavailable"}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    keep_alive: bool


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    cache: str = "no-store"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def encode(self, head_only: bool, keep_alive: bool) -> bytes:
        """The response as bytes; a HEAD gets the GET's headers, no body."""
        lines = [f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Error')}",
                 f"Content-Type: {self.content_type}", f"Content-Length: {len(self.body)}",
                 f"Cache-Control: {self.cache}",
                 # a player page on any origin may read the stream
                 "Access-Control-Allow-Origin: *",
                 "Connection: " + ("keep-alive" if keep_alive else "close")]
        lines += [f"{k}: {v}" for k, v in self.headers]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        return head if head_only else head + self.body


@dataclass
class Held:
    """An answer that waits for `ready`, then is made by `answer` (or, if
    `ready` has not come within `within` seconds, by `late`)."""
    ready: asyncio.Future[None]
    answer: Callable[[], Response]
    late: Callable[[], Response]
    within: float


def parse_head(head: bytes) -> Request | None:
    """The request line and the headers that matter, or None if malformed."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:   # latin-1 decodes any byte; kept for the type checker's sake
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    method, target, version = parts
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            return None
        headers[name.strip().lower()] = value.strip()
    conn = headers.get("connection", "").lower()
    keep = "close" not in conn if version == "HTTP/1.1" else "keep-alive" in conn
    url = urllib.parse.urlsplit(target)
    try:
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True, strict_parsing=False,
                                            max_num_fields=16))
    except ValueError:
        return None
    return Request(method, urllib.parse.unquote(url.path), query, keep)


class Connection(asyncio.Protocol):
    """One client connection on the HLS port."""

    def __init__(self, server: "HlsServer") -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False           # a request is being answered (maybe held)
        self.closing = False
        self.held: Held | None = None

    # ------------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.opened(self)
        self._deadline(IDLE_S)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        if self.held is not None and not self.held.ready.done():
            self.held.ready.cancel()     # frees its place among the held at once
        self.server.closed(self)

    def data_received(self, data: bytes) -> None:
        if not self.buf and not self.busy:
            self._deadline(HEAD_DEADLINE_S)    # a request starts: its head has this long
        self.buf += data
        self._next()

    # ------------------------------------------------------------ requests

    @property
    def reading_head(self) -> bool:
        """Waiting for a request head (the state eviction picks from)."""
        return not self.busy

    def _next(self) -> None:
        while not self.busy and not self.closing:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self._finish(Response(431, b"request head too large\n"), False, False)
                return
            if end > MAX_HEAD:
                self._finish(Response(431, b"request head too large\n"), False, False)
                return
            head = bytes(self.buf[:end])
            del self.buf[:end + 4]
            req = parse_head(head)
            if req is None:
                self.server.counters.requests["malformed"] += 1
                self._finish(Response(400, b"malformed request\n"), False, False)
                return
            self.busy = True
            answer = self.server.answer(req)
            if isinstance(answer, Held):
                self._hold(req, answer)
                return
            self._finish(answer, req.method == "HEAD", req.keep_alive)

    def _hold(self, req: Request, held: Held) -> None:
        assert self.transport is not None
        self.transport.pause_reading()
        if self.timer is not None:
            self.timer.cancel()
        self.server.counters.held += 1
        loop = asyncio.get_running_loop()
        timer = loop.call_later(held.within, lambda: held.ready.cancel())

        def done(fut: asyncio.Future[None]) -> None:
            timer.cancel()
            self.server.counters.held -= 1
            self.held = None
            if self.closing:
                return
            resp = held.late() if fut.cancelled() else held.answer()
            self._finish(resp, req.method == "HEAD", req.keep_alive)
            if not self.closing and self.transport is not None:
                self.transport.resume_reading()
                self._next()
        held.ready.add_done_callback(done)
        self.held = held

    def _finish(self, resp: Response, head_only: bool, keep_alive: bool) -> None:
        if self.transport is None or self.closing:
            return
        self.server.counters.responses[resp.status] += 1
        self.transport.write(resp.encode(head_only, keep_alive))
        self.busy = False
        if not keep_alive:
            self.closing = True
            self.transport.close()
            return
        self._deadline(HEAD_DEADLINE_S if self.buf else IDLE_S)

    def _deadline(self, seconds: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _expire(self) -> None:
        if self.busy:
            return     # a held answer has its own deadline
        self.server.counters.timeouts += 1
        self.close()

    def close(self) -> None:
        """Drop the connection (a deadline passed, or it was evicted)."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
