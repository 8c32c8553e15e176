"""The listener web page, served by the admin port: static files shipped in
relay/static, read once. The page itself (listen.js) does the listening:
WebTransport to the node's QUIC port, WebCodecs to decode, Web Audio to play."""
from __future__ import annotations

from functools import cache
from pathlib import Path

STATIC = Path(__file__).with_name("static")

PAGES = {
    "/listen": ("listen.html", "text/html; charset=utf-8"),
    "/listen.js": ("listen.js", "text/javascript; charset=utf-8"),
}


@cache
def page(path: str) -> tuple[str, bytes]:
    """(content type, body) of one of PAGES."""
    name, ctype = PAGES[path]
    return ctype, (STATIC / name).read_bytes()
