"""A headless Firefox (Debian's firefox-esr) driven over WebDriver BiDi, for
the listener page's tests: the same goto/evaluate/click/close as
tests/browser.py (Chromium over the DevTools protocol), so a test can run
against both. On a machine without a sound device (CI's) Firefox's
AudioContext stays suspended whatever the autoplay prefs say, so the page
decodes and measures its audio but says "click to play"."""
from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox") or "/usr/bin/firefox-esr"

# a page that plays without a click, no calls home, no sound on the machine
PREFS = {
    "media.autoplay.default": 0, "media.autoplay.blocking_policy": 0, "media.autoplay.block-webaudio": False,
    "media.volume_scale": "0.0",
    "browser.shell.checkDefaultBrowser": False, "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False, "app.update.enabled": False,
    "browser.startup.homepage_override.mstone": "ignore", "network.captive-portal-service.enabled": False,
    "extensions.update.enabled": False, "browser.safebrowsing.update.enabled": False,
}


class Firefox:
    """One Firefox process with one page."""

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="relay-firefox-")
        Path(self.profile, "user.js").write_text(
            "".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in PREFS.items()))
        self.proc = subprocess.Popen([FIREFOX, "--headless", "--no-remote", "--profile", self.profile,
                                      "--remote-debugging-port", "0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = self._bidi_url()
        self._stack = ExitStack()
        self.ws = self._stack.enter_context(connect(url + "/session", max_size=64 << 20, open_timeout=10))
        self._ids = itertools.count(1)
        self.call("session.new", capabilities={})
        self.context = self.call("browsingContext.getTree")["contexts"][0]["context"]

    def _bidi_url(self) -> str:
        # Firefox prints where WebDriver BiDi listens on stderr once it is up
        deadline = time.monotonic() + 60
        assert self.proc.stderr is not None
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"WebDriver BiDi listening on (ws://\S+)", line)
            if m:
                return m.group(1).rstrip("/")
        self.close()
        raise RuntimeError("firefox did not start:\n" + "".join(lines[-20:]))

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict:
        """Send one BiDi command and wait for its result."""
        msg = {"id": next(self._ids), "method": method, "params": params}
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == msg["id"]:
                if reply.get("type") == "error":
                    raise RuntimeError(f"{method}: {reply.get('error')}: {reply.get('message')}")
                return reply.get("result", {})

    def goto(self, url: str) -> None:
        self.call("browsingContext.navigate", context=self.context, url=url, wait="none")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression that yields a string, number, boolean or null."""
        r = self.call("script.evaluate", expression=expression, target={"context": self.context},
                      awaitPromise=False, resultOwnership="none")
        if r.get("type") == "exception":
            raise RuntimeError(f"page error: {r.get('exceptionDetails', {}).get('text')}")
        return r["result"].get("value")

    def click(self, element_id: str) -> None:
        """A real mouse click (a user gesture, unlike element.click()) on an element."""
        box = json.loads(self.evaluate(f"(() => {{ const r = document.getElementById({element_id!r})"
                                       ".getBoundingClientRect(); return JSON.stringify("
                                       "[r.x + r.width / 2, r.y + r.height / 2]); })()"))
        self.call("input.performActions", context=self.context, actions=[{
            "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
            "actions": [{"type": "pointerMove", "x": int(box[0]), "y": int(box[1])},
                        {"type": "pointerDown", "button": 0}, {"type": "pointerUp", "button": 0}]}])

    def close(self) -> None:
        try:
            self._stack.close()
        except Exception:
            pass  # the browser may already be gone
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def available() -> bool:
    return shutil.which("firefox-esr") is not None or shutil.which("firefox") is not None
