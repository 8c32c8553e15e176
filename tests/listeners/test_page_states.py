"""What the web listener page says about itself must be true: no stale
error once it plays, no green "playing" while the browser holds the audio
back for a click, a room that needs a token says so (not "bad_token"), and
the Transport row names what the browser really has. Real headless
Chromium against a real node, read over the DevTools protocol."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests import browser
from tests.conftest import RunningRelay, stop
from tests.listeners.conftest import publish, quic_relay
from tests.listeners.conftest import wait_state


def state_text(page: browser.Browser) -> str:
    return str(page.evaluate("document.getElementById('state').textContent"))


@contextmanager
def page_on(tmp_path, autoplay: bool = True, publisher: bool = True, before_load: str = "",
            **relay_kw) -> Iterator[tuple[RunningRelay, browser.Browser]]:
    """A node with QUIC (and a tone published to its room) and a Chromium
    page; `before_load` runs in every document the page opens, before its
    own scripts."""
    if not browser.available():
        pytest.fail("chromium is not installed; run `make test`, which installs it")
    relay, _server, _cert = quic_relay(tmp_path, **relay_kw)
    tone = publish(relay, 30) if publisher else None
    page = browser.Browser(autoplay=autoplay)
    try:
        if before_load:
            # Chromium runs such scripts only in a session with the Page domain on
            page.call("Page.enable", session=True)
            page.call("Page.addScriptToEvaluateOnNewDocument", session=True, source=before_load)
        yield relay, page
    finally:
        page.close()
        if tone is not None:
            tone.kill()
            tone.wait()
        assert stop(relay.proc) == 0


def test_a_page_that_plays_again_shows_no_old_error(tmp_path) -> None:
    from relay.testing.loadgen import LoopbackCrowd
    with page_on(tmp_path, extra="max_listeners = 1\n") as (relay, page):
        crowd = LoopbackCrowd(1, relay.listen, relay.room)
        try:
            assert crowd.join().accepted == 1    # the node's one place is taken
            page.goto(relay.url(f"/listen?room={relay.room}"))
            st = wait_state(page, lambda s: s["state"] == "rejected", timeout=15)
            assert st["error"].startswith("node_full, retrying in "), st
            crowd.leave()
            st = wait_state(page, lambda s: s["state"] == "playing", timeout=30)
            assert st["state"] == "playing", st
            assert st["error"] == "" and state_text(page) == "playing", (st, state_text(page))
        finally:
            crowd.close()


def test_a_page_the_browser_keeps_silent_asks_for_a_click_not_playing(tmp_path) -> None:
    with page_on(tmp_path, autoplay=False) as (relay, page):
        page.goto(relay.url(f"/listen?room={relay.room}"))
        st = wait_state(page, lambda s: s["framesDecoded"] > 10, timeout=20)
        assert st["audio"] == "suspended", st
        assert st["state"] == "click-to-play", st
        assert state_text(page).startswith("click to play"), state_text(page)
        assert page.evaluate("document.getElementById('state').className") != "playing"
        page.click("play")
        st = wait_state(page, lambda s: s["state"] == "playing", timeout=15)
        assert st["state"] == "playing" and st["audio"] == "running", st
        assert state_text(page) == "playing"


def test_a_page_without_a_token_for_a_room_that_needs_one_says_so(tmp_path) -> None:
    with page_on(tmp_path, publisher=False, auth="jwt") as (relay, page):
        page.goto(relay.url(f"/listen?room={relay.room}"))
        st = wait_state(page, lambda s: s["state"] == "rejected", timeout=15)
        assert st["state"] == "rejected", st
        assert state_text(page) == "rejected: this room needs a token (add &token=… to the address)", st
        # a token that is there but wrong is another matter: the node's word for it
        page.goto(relay.url(f"/listen?room={relay.room}&token=forged"))
        st = wait_state(page, lambda s: s["state"] == "rejected", timeout=15)
        assert state_text(page) == "rejected: bad_token", st


def test_the_transport_row_names_what_the_page_uses(tmp_path) -> None:
    with page_on(tmp_path) as (relay, page):
        page.goto(relay.url(f"/listen?room={relay.room}"))
        st = wait_state(page, lambda s: s["state"] == "playing", timeout=20)
        assert st["state"] == "playing", st
        assert page.evaluate("document.getElementById('transport').textContent") == "WebTransport (HTTP/3)"
    (tmp_path / "without").mkdir()
    with page_on(tmp_path / "without", publisher=False, before_load="delete window.WebTransport;") as (relay, page):
        page.goto(relay.url(f"/listen?room={relay.room}"))
        st = wait_state(page, lambda s: s["state"] == "error", timeout=15)
        assert page.evaluate("typeof WebTransport") == "undefined"
        assert st["error"] == "this browser lacks WebTransport", st
        assert page.evaluate("document.getElementById('transport').textContent") == \
            "none: this browser lacks WebTransport"

