"""The host's page runs a stage, driven by the test as a host would click
it, and the listeners' pages follow each change: a listener in Chromium
raises its hand, the host invites it and its page becomes the speaker's
page (the same token), the host mutes the CLI speaker and every page shows
it, removes the invited speaker, and ends the room for everyone. Firefox
ESR is the listener that stays in the audience."""
from __future__ import annotations

import json
import time

import pytest

from tests import browser, firefox
from tests.conftest import speechlike_wav, stop
from tests.listeners.conftest import quic_relay, wait_state
from tests.stage.conftest import STAGE, speaker, token


def host_state(page, ok, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = json.loads(page.evaluate("JSON.stringify(window.relayHost || null)") or "null")
        if (st and st["stage"] and ok(st["stage"])) or time.monotonic() > deadline:
            return st
        time.sleep(0.25)


def click(page, section: str, who: str, action: str) -> None:
    """Click `action` on the row of `section` (on-stage, hands) that names `who`."""
    done = page.evaluate(f"""(() => {{
        const li = [...document.querySelectorAll("#{section} li")].find((l) => l.textContent.includes({who!r}));
        const b = li && li.querySelector('button[data-action="{action}"]');
        if (b) b.click();
        return Boolean(b);
    }})()""")
    assert done, f"no {action} button for {who} in #{section}"


def test_the_hosts_page_runs_the_stage_and_every_page_follows(tmp_path) -> None:
    if not firefox.available():
        pytest.fail("firefox-esr is not installed; run `make test`, which installs it")
    speech = tmp_path / "speech.wav"
    speechlike_wav(speech, 20.0)
    relay, _server, _cert = quic_relay(tmp_path, auth="jwt", extra_room=STAGE)
    ann = speaker(relay, "ann", 40)
    pages = []
    try:
        lis = browser.Browser(microphone=str(speech))
        pages.append(lis)
        lis.goto(relay.url(f"/listen?room=stage&token={token('stage', 'listen', 'lis1', 'Lis')}"))
        fox = firefox.Firefox()
        pages.append(fox)
        fox.goto(relay.url(f"/listen?room=stage&token={token('stage', 'listen', 'fox1', 'Fox')}"))
        for page in (lis, fox):
            st = wait_state(page, lambda s: [x["name"] for x in s["speakers"]] == ["Ann"], timeout=30)
            assert [x["name"] for x in st["speakers"]] == ["Ann"], st
        hosting = browser.Browser()
        pages.append(hosting)
        hosting.goto(relay.url(f"/host?room=stage&token={token('stage', 'host', 'hostess', 'Hostess')}"))

        # a raised hand reaches the host's page
        lis.evaluate("document.getElementById('hand').click()")
        hs = host_state(hosting, lambda s: s["hands"])
        assert [h["name"] for h in hs["stage"]["hands"]] == ["Lis"], hs

        # the host mutes Ann: both listeners' pages show it
        click(hosting, "on-stage", "Ann", "mute")
        for page in (lis, fox):
            st = wait_state(page, lambda s: s["speakers"] and s["speakers"][0]["muted"], timeout=10)
            assert st["speakers"][0]["muted"], st

        # the host invites Lis: its page becomes the speaker's and goes on stage
        click(hosting, "hands", "Lis", "invite")
        deadline = time.monotonic() + 20
        while True:
            sp = json.loads(lis.evaluate("JSON.stringify(window.relaySpeaker || null)") or "null")
            if sp and sp["state"] == "sending" and sp["sent"] > 50:
                break
            assert time.monotonic() < deadline, (sp, lis.evaluate("location.pathname"))
            time.sleep(0.25)
        assert lis.evaluate("location.pathname") == "/speak"
        hs = host_state(hosting, lambda s: any(x["name"] == "Lis" for x in s["speakers"]))
        assert sorted(x["name"] for x in hs["stage"]["speakers"]) == ["Ann", "Lis"], hs
        st = wait_state(fox, lambda s: len(s["speakers"]) == 2, timeout=10)
        assert sorted(x["name"] for x in st["speakers"]) == ["Ann", "Lis"], st

        # the host removes Lis: its page says so
        click(hosting, "on-stage", "Lis", "remove")
        st = wait_state(lis, lambda s: s["state"] == "ended", timeout=10)
        assert st["state"] == "ended" and "removed" in st["error"], st
        hs = host_state(hosting, lambda s: "lis1" in s["removed"])
        assert "lis1" in hs["stage"]["removed"], hs

        # the end, for everyone
        hosting.evaluate("document.getElementById('end').click()")
        st = wait_state(fox, lambda s: s["state"] == "ended", timeout=10)
        assert st["state"] == "ended" and "room_ended" in st["error"], st
        assert host_state(hosting, lambda s: s["ended"])["state"] == "ended"
    finally:
        for page in pages:
            page.close()
        ann.kill()
        ann.wait()
        stop(relay.proc)
