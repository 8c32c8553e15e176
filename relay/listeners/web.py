"""The listener web page, served by the admin port: static files shipped in
relay/listeners/static, read once. The page itself (listen.js) does the
listening: WebTransport to the node's QUIC port, WebCodecs to decode, Web
Audio to play; where WebTransport is missing or fails, the node's LL-HLS
(relay/hls) in an audio element, natively (Safari) or through hls.js,
which scripts/bootstrap.sh fetches at a pinned version (HLSJS_VERSION) and
the node serves itself, so the page never loads code from a third party.
The speaker's page (/speak, speak.js beside listen.js) sends its microphone
to the room's stage and plays the stage without its own voice; stage.js
raises hands and reacts on both; the host's page (/host) runs the stage
through the node's /stage/ API."""
from __future__ import annotations

from functools import cache
from pathlib import Path

STATIC = Path(__file__).with_name("static")

PAGES = {
    "/listen": ("listen.html", "text/html; charset=utf-8"),
    "/listen.js": ("listen.js", "text/javascript; charset=utf-8"),
    "/hls.min.js": ("hls.min.js", "text/javascript; charset=utf-8"),
    "/speak": ("speak.html", "text/html; charset=utf-8"),
    "/speak.js": ("speak.js", "text/javascript; charset=utf-8"),
    "/relay.css": ("relay.css", "text/css; charset=utf-8"),
    "/stage.js": ("stage.js", "text/javascript; charset=utf-8"),
    "/host": ("host.html", "text/html; charset=utf-8"),
    "/host.js": ("host.js", "text/javascript; charset=utf-8"),
}


@cache
def page(path: str) -> tuple[str, bytes] | None:
    """(content type, body) of one of PAGES, or None if its file is not
    installed (hls.min.js before scripts/bootstrap.sh has run)."""
    name, ctype = PAGES[path]
    try:
        return ctype, (STATIC / name).read_bytes()
    except FileNotFoundError:
        return None
