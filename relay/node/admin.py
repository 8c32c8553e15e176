"""The admin HTTP port: /metrics for Prometheus, /healthz and /readyz for
load balancers, /rooms, /quic.json and the browser listener page. It is
handed what it shows as small callables, never the node itself, and runs
on the node's event loop."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST

from relay.node import web

Response = tuple[str, str, bytes]    # status line, content type, body


@dataclass
class AdminViews:
    """What the admin port can show, each read when asked."""
    metrics: Callable[[], bytes]                  # the Prometheus exposition
    not_ready: Callable[[], str]                  # "" when ready, else why not
    rooms: Callable[[], list[dict[str, Any]]]
    quic: Callable[[str], dict[str, Any]] | None  # /quic.json, given the Host header; None: QUIC off


class AdminServer:
    """A small HTTP/1.1 server: one GET per connection."""

    def __init__(self, views: AdminViews) -> None:
        self.views = views
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        """Bind; raises OSError if the port is taken."""
        self.server = await asyncio.start_server(self._on_client, host, port)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
            status, ctype, body = self.route(parts[0] if parts else "", path, host)
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    def route(self, method: str, path: str, host: str = "") -> Response:
        """The response to one request."""
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        if path in web.PAGES:
            return "200 OK", *web.page(path)
        if path == "/quic.json":
            if self.views.quic is None:
                return "404 Not Found", "application/json", b'{"error": "QUIC is off on this node"}'
            return "200 OK", "application/json", json.dumps(self.views.quic(host)).encode()
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self.views.metrics()
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            why = self.views.not_ready()
            if why:
                return "503 Service Unavailable", "text/plain", f"{why}\n".encode()
            return "200 OK", "text/plain", b"ready\n"
        if path == "/rooms":
            return "200 OK", "application/json", json.dumps({"rooms": self.views.rooms()}).encode()
        return "404 Not Found", "text/plain", b"not found\n"
