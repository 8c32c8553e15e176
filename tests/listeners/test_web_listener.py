"""The browser listener, in Debian's real headless Chromium: the admin port
serves the page, the page joins the room over WebTransport with a token,
decodes the ffmpeg tone with WebCodecs and plays it with Web Audio. Checked
through the page's own state (window.relayListener) over the DevTools
protocol; the test saves a screenshot of the page."""
from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests import browser
from tests.conftest import stop
from tests.conftest import TONE_HZ
from tests.listeners.conftest import metric, publish, quic_relay, wait_state

SCREENSHOT = Path(__file__).resolve().parents[2] / "build" / "screenshots" / "web-listener.png"


def test_web_page_decodes_a_live_room(tmp_path) -> None:
    if not browser.available():
        pytest.fail("chromium is not installed; run `make test`, which installs it")
    relay, _server, _cert = quic_relay(tmp_path, auth="jwt")
    publisher = publish(relay, 25)
    page = browser.Browser()
    try:
        import subprocess
        token = subprocess.run(relay.relay_cmd("token", "--room", relay.room), env=relay.env,
                               capture_output=True, text=True, check=True).stdout.strip()
        page.goto(relay.url(f"/listen?room={relay.room}&token={token}"))
        st = wait_state(page, lambda s: s["framesDecoded"] >= 150 and s["pitchHz"] > 0, timeout=30)
        assert st is not None, "the page did not start"
        assert st["state"] == "playing", st
        assert st["framesDecoded"] >= 150, st
        assert st["decodeErrors"] == 0, st
        assert st["lost"] == 0, st
        assert st["error"] == "", st
        # the decoded PCM is the tone ffmpeg sent (the page's zero-crossing estimate)
        assert abs(st["pitchHz"] - TONE_HZ) < 10, st
        assert st["bitrateKbps"] > 10, st
        assert st["audio"] == "running", st
        metrics = relay.get("/metrics")[1]
        assert metric(metrics, f'relay_listeners{{room="{relay.room}",transport="webtransport"}}') == 1
        assert metric(metrics, 'relay_quic_datagrams_sent_total{transport="webtransport"}') >= st["packets"]
        # Chromium's ACKs of the core's packets, read in the core (the QUIC path),
        # also those it sends beside a frame for the library: the node counts no
        # loss the page did not have
        assert metric(metrics, "relay_quic_acks_total") >= 50
        assert metric(metrics, "relay_quic_lost_total") == 0
        assert metric(metrics, 'relay_quic_dropped_total{reason="forged"}') == 0
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(str(SCREENSHOT))
        png = SCREENSHOT.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", png[16:24])
        assert (width, height) == browser.VIEW

        # a forged token: the page says so, nothing is decoded
        page.goto(relay.url(f"/listen?room={relay.room}&token=forged"))
        st = wait_state(page, lambda s: s["state"] == "rejected", timeout=15)
        assert st["state"] == "rejected" and "bad_token" in st["error"], st
        assert st["framesDecoded"] == 0

        # the node drains: a playing page is told so on its control stream
        page.goto(relay.url(f"/listen?room={relay.room}&token={token}"))
        assert wait_state(page, lambda s: s["state"] == "playing", timeout=15)["state"] == "playing"
        assert stop(relay.proc) == 0
        st = wait_state(page, lambda s: s["state"] == "ended", timeout=15)
        assert st["state"] == "ended" and "draining" in st["error"], st
    finally:
        page.close()
        publisher.kill()
        publisher.wait()
        assert stop(relay.proc) == 0   # a no-op when the test stopped it already


def test_web_page_on_a_node_without_quic_says_so(tmp_path) -> None:
    if not browser.available():
        pytest.fail("chromium is not installed; run `make test`, which installs it")
    from tests.conftest import start_relay

    relay = start_relay(tmp_path)     # no [node] quic
    page = browser.Browser()
    try:
        page.goto(relay.url(f"/listen?room={relay.room}"))
        st = wait_state(page, lambda s: s["state"] == "error", timeout=15)
        assert st["state"] == "error" and st["error"] == "QUIC is off on this node", st
    finally:
        page.close()
        assert stop(relay.proc) == 0


def test_a_closed_page_stops_counting_as_a_listener(tmp_path) -> None:
    if not browser.available():
        pytest.fail("chromium is not installed; run `make test`, which installs it")
    relay, _server, _cert = quic_relay(tmp_path)
    publisher = publish(relay, 20)
    page = browser.Browser()
    listeners = f'relay_listeners{{room="{relay.room}",transport="webtransport"}}'
    try:
        page.goto(relay.url(f"/listen?room={relay.room}"))
        assert wait_state(page, lambda s: s["state"] == "playing", timeout=15)["state"] == "playing"
        assert metric(relay.get("/metrics")[1], listeners) == 1
        page.goto("about:blank")   # the tab leaves the page: its WebTransport session closes
        deadline = time.monotonic() + 3
        while metric(relay.get("/metrics")[1], listeners) != 0:
            assert time.monotonic() < deadline, "the closed page still counts as a listener"
            time.sleep(0.1)
        assert metric(relay.get("/metrics")[1], "relay_leaves_total") == 1
    finally:
        page.close()
        publisher.kill()
        publisher.wait()
        assert stop(relay.proc) == 0


def test_the_page_asks_for_a_click_when_autoplay_is_blocked(tmp_path) -> None:
    if not browser.available():
        pytest.fail("chromium is not installed; run `make test`, which installs it")
    relay, _server, _cert = quic_relay(tmp_path)
    publisher = publish(relay, 20)
    page = browser.Browser(autoplay=False)
    try:
        page.goto(relay.url(f"/listen?room={relay.room}"))
        st = wait_state(page, lambda s: s["framesDecoded"] > 10, timeout=15)
        assert st["audio"] == "suspended", st
        assert page.evaluate("!document.getElementById('play').hidden") is True
        assert page.evaluate("document.getElementById('play').textContent") == "Click to play"
        page.click("play")
        st = wait_state(page, lambda s: s["audio"] == "running", timeout=10)
        assert st["audio"] == "running" and page.evaluate("document.getElementById('play').hidden") is True
    finally:
        page.close()
        publisher.kill()
        publisher.wait()
        assert stop(relay.proc) == 0


def test_the_page_retries_a_full_node_with_backoff(tmp_path) -> None:
    if not browser.available():
        pytest.fail("chromium is not installed; run `make test`, which installs it")
    from relay.testing.loadgen import LoopbackCrowd

    relay, _server, _cert = quic_relay(tmp_path, extra="max_listeners = 1\n")
    publisher = publish(relay, 25)
    crowd = LoopbackCrowd(1, relay.listen, relay.room)
    page = browser.Browser()
    try:
        # the node admits one listener; the crowd holds it
        assert crowd.join().accepted == 1
        page.goto(relay.url(f"/listen?room={relay.room}"))
        st = wait_state(page, lambda s: s["state"] == "rejected", timeout=15)
        assert st["error"].startswith("node_full, retrying in "), st
        crowd.leave()
        st = wait_state(page, lambda s: s["state"] == "playing", timeout=20)
        assert st["state"] == "playing" and st["retries"] == 0, st
    finally:
        page.close()
        crowd.close()
        publisher.kill()
        publisher.wait()
        assert stop(relay.proc) == 0


@contextlib.contextmanager
def _cluster_page(tmp_path, **edges: dict):
    """origin <- ffmpeg's tone; edges (name -> Node options), each with QUIC,
    take the room from it and share a Redis directory; one browser page.
    Yields the edges by name and the page."""
    if not browser.available():
        pytest.fail("chromium is not installed; run `make test`, which installs it")
    from relay.client.publish import ffmpeg_command
    from tests.cluster.conftest import Node
    from tests.cluster.conftest import RedisServer
    redis = RedisServer()
    origin = Node(tmp_path, "origin")
    nodes = {name: Node(tmp_path, name, upstream=[origin], directory=redis.url, quic=True, **kw)
             for name, kw in edges.items()}
    publisher = subprocess.Popen(ffmpeg_command(f"sine=frequency={TONE_HZ}:sample_rate=48000", origin.ingest,
                                                lavfi=True, duration=40),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    page = browser.Browser()
    try:
        yield nodes, page
    finally:
        page.close()
        publisher.kill()
        publisher.wait()
        for n in (*nodes.values(), origin):
            if n.proc.poll() is None or n.proc.returncode >= 0:   # not one the test killed
                assert stop(n.proc) == 0
        redis.stop()


def _page(node, token: str, via=None) -> str:
    url = f"http://{node.admin[0]}:{node.admin[1]}/listen?room=live&token={token}"
    return url + (f"&via=http://{via.admin[0]}:{via.admin[1]}/join" if via else "")


def _playing(page: browser.Browser, frames: int) -> dict:
    return wait_state(page, lambda s: s["state"] == "playing" and s["framesDecoded"] >= frames, timeout=30)


def test_the_page_moves_to_another_edge_when_its_edge_dies(tmp_path) -> None:
    """A page playing from edge 1, with no `via`: it learned edge 2 as an
    alternate from edge 1's /join, notices the death by a probe that goes
    unanswered, and plays on from edge 2, resuming after its last packet and
    counting what the move cost in the origin's numbering."""
    from tests.cluster.conftest import listen_token
    with _cluster_page(tmp_path, edge1={}, edge2={}) as (edges, page):
        e1, e2 = edges["edge1"], edges["edge2"]
        time.sleep(2.2)   # the edges have read each other's records, and chosen alternates
        page.goto(_page(e1, listen_token()))
        st = wait_state(page, lambda s: s["state"] == "playing" and s["framesDecoded"] >= 50
                        and [a["node"] for a in s["alternates"]] == ["edge2"], timeout=30)
        assert st["moves"] == 0 and st["lost"] == 0, st
        before = st["framesDecoded"]
        e1.proc.kill()                                   # the edge dies under the page
        e1.proc.wait()
        st = wait_state(page, lambda s: s["moves"] == 1 and s["state"] == "playing"
                        and s["framesDecoded"] >= before + 150, timeout=30)
        assert st["moves"] == 1 and st["node"] == "edge2" and st["state"] == "playing", st
        assert st["framesDecoded"] >= before + 150 and st["decodeErrors"] == 0, st
        assert abs(st["pitchHz"] - TONE_HZ) < 10, st
        # the gap is counted in the origin's numbering, at most half a second
        # of it. It may be 0: edge 2, idle until the page moved, subscribes
        # with the page's resume point and its parent's history reaches the
        # page through the room (beside a busy neighbour, all of it came)
        assert st["moveSilenceMs"] > 0 and 0 <= st["lost"] < 150, st
        m = e2.get_metrics()
        assert metric(m, 'relay_listeners{room="live",transport="webtransport"}') == 1
        assert metric(m, "relay_quic_stream_errors_total") == 0      # its probes are understood


def test_a_page_refused_by_a_full_node_goes_where_its_join_says(tmp_path) -> None:
    """A full edge in a cluster: the page asks the node's own /join and plays
    from the edge it names, pinning that edge's certificate."""
    from relay.testing.loadgen import LoopbackCrowd
    from tests.cluster.conftest import listen_token
    token = listen_token()
    with _cluster_page(tmp_path, full={"max_listeners": 1}, spare={}) as (edges, page):
        crowd = LoopbackCrowd(1, edges["full"].listen, "live", token=token)
        try:
            assert crowd.join().accepted == 1             # the one place on "full" is taken
            time.sleep(2.2)                                # and its record says so
            page.goto(_page(edges["full"], token))
            st = _playing(page, 100)
            assert st["state"] == "playing" and st["node"] == "spare" and st["moves"] == 1, st
            assert st["decodeErrors"] == 0 and abs(st["pitchHz"] - TONE_HZ) < 10, st
            assert metric(edges["spare"].get_metrics(), 'relay_listeners{room="live",transport="webtransport"}') == 1
        finally:
            crowd.close()


def test_a_page_on_a_draining_edge_moves_to_another(tmp_path) -> None:
    """SIGTERM on the page's edge: told `draining`, the page asks /join
    (here its ?via=) and plays on from the other edge."""
    from tests.cluster.conftest import listen_token
    with _cluster_page(tmp_path, edge1={}, edge2={}) as (edges, page):
        e1, e2 = edges["edge1"], edges["edge2"]
        time.sleep(1.2)
        page.goto(_page(e1, listen_token(), via=e2))
        st = _playing(page, 50)
        assert st["state"] == "playing", st
        before = st["framesDecoded"]
        assert stop(e1.proc) == 0                        # drains: tells the page, then exits
        st = wait_state(page, lambda s: s["moves"] == 1 and s["state"] == "playing"
                        and s["framesDecoded"] >= before + 100, timeout=30)
        assert st["moves"] == 1 and st["node"] == "edge2" and st["state"] == "playing", st
        assert st["decodeErrors"] == 0, st


def test_the_page_shows_who_is_speaking(tmp_path) -> None:
    """A stage room: two speakers (`relay publish --token`), their names and
    level bars on the page, from the node's periodic SPEAKERS message."""
    if not browser.available():
        pytest.fail("chromium is not installed; run `make test`, which installs it")
    from tests.stage.conftest import STAGE, speaker, token
    relay, _server, _cert = quic_relay(tmp_path, auth="jwt", extra_room=STAGE)
    speakers = [speaker(relay, name, 20.0) for name in ("ann", "bo")]
    page = browser.Browser()
    try:
        page.goto(relay.url(f"/listen?room=stage&token={token('stage', 'listen')}"))
        st = wait_state(page, lambda s: s["framesDecoded"] >= 100 and len(s["speakers"]) == 2
                        and all(x["speaking"] for x in s["speakers"]), timeout=30)
        assert st is not None and st["state"] == "playing", st
        assert sorted(s["name"] for s in st["speakers"]) == ["Ann", "Bo"], st
        # a 0.3 tone is -13.5 dBov; each bar shows it
        assert all(10 <= s["level"] <= 17 for s in st["speakers"]), st
        bars = json.loads(page.evaluate(
            "JSON.stringify([...document.querySelectorAll('#speakers li')].map(li => "
            "[li.children[0].textContent, li.children[0].className, li.children[1].firstChild.style.width]))"))
        assert sorted(b[0] for b in bars) == ["Ann", "Bo"] and all(b[1] == "speaking" for b in bars), bars
        assert all(70 <= float(b[2].rstrip("%")) <= 85 for b in bars), bars
        assert st["decodeErrors"] == 0 and st["lost"] == 0, st
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(str(SCREENSHOT.with_name("web-stage.png")))
    finally:
        page.close()
        for p in speakers:
            p.kill()
            p.wait()
        stop(relay.proc)
