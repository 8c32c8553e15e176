"""The listener page where WebTransport is not to be had: the same /listen
URL plays the room over LL-HLS through the hls.js the node serves, and says
so. Real headless Chromium with WebTransport removed from `window`, or
replaced by one that never connects (UDP blocked)."""
from __future__ import annotations

import socket

import pytest

from relay.testing.loadgen import free_port
from relay.listeners.web import STATIC
from tests.listeners.test_page_states import page_on, state_text
from tests.listeners.conftest import wait_state


# a WebTransport that never connects, as where UDP is blocked
BLOCKED = ("window.WebTransport = class { constructor() { this.ready = Promise.reject(new Error('blocked'));"
           " this.ready.catch(() => {}); this.closed = new Promise(() => {}); } };")


@pytest.mark.parametrize("before_load", ["delete window.WebTransport;", BLOCKED], ids=["missing", "blocked"])
def test_a_browser_without_webtransport_plays_the_room_over_ll_hls(tmp_path, before_load):
    assert (STATIC / "hls.min.js").exists(), "hls.min.js is missing: scripts/bootstrap.sh fetches it"
    hls = f'hls = "127.0.0.1:{free_port(socket.SOCK_STREAM)}"\n'
    with page_on(tmp_path, before_load=before_load, extra=hls) as (relay, page):
        page.goto(relay.url(f"/listen?room={relay.room}"))
        st = wait_state(page, lambda s: s["state"] == "playing" and s["framesDecoded"] > 50, timeout=40)
        assert st["state"] == "playing", (st, state_text(page))
        assert st["transport"].startswith("LL-HLS (hls.js 1."), st
        assert st["framesDecoded"] > 50, st
        assert st["levelDb"] is not None and st["levelDb"] > -40, st       # the tone, not silence
        assert st["delaySec"] is not None and 0 < st["delaySec"] < 10, st
        assert page.evaluate("document.getElementById('transport').textContent") == st["transport"]
