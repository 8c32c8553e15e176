"""A headless Chromium driven over the DevTools protocol, for the web
listener's test: open a page, evaluate JavaScript in it, take a screenshot."""
from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import ExitStack
from typing import Any

from websockets.sync.client import connect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# what the machine's closed network needs (no background calls home) and what
# a page playing audio needs without a user's click
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--mute-audio", "--autoplay-policy=no-user-gesture-required",
         "--remote-debugging-port=0"]
VIEW = (800, 600)   # the page's viewport, and the screenshot's size


class Browser:
    """One Chromium process with one page."""

    def __init__(self, autoplay: bool = True, microphone: str = "") -> None:
        """`autoplay=False` keeps Chromium's default policy: audio waits for
        a click. `microphone`: a WAV file the page's getUserMedia captures
        (a fake device, the permission granted without asking)."""
        self.profile = tempfile.mkdtemp(prefix="relay-chromium-")
        flags = FLAGS if autoplay else [f for f in FLAGS if not f.startswith("--autoplay-policy")]
        if microphone:
            flags = [*flags, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                     f"--use-file-for-fake-audio-capture={microphone}%noloop"]
        self.proc = subprocess.Popen([CHROMIUM, *flags, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = self._devtools_url()
        self._stack = ExitStack()
        self.ws = self._stack.enter_context(connect(url, max_size=64 << 20, open_timeout=10))
        self._ids = itertools.count(1)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Runtime.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=VIEW[0], height=VIEW[1],
                  deviceScaleFactor=1, mobile=False)

    def _devtools_url(self) -> str:
        # Chromium prints the browser's DevTools address on stderr once it is up
        deadline = time.monotonic() + 30
        assert self.proc.stderr is not None
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                return m.group(1)
        self.close()
        raise RuntimeError("chromium did not start:\n" + "".join(lines[-20:]))

    def call(self, method: str, session: bool = False, timeout: float = 30, **params: Any) -> dict:
        """Send one DevTools command and wait for its result."""
        msg: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == msg["id"]:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def goto(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        r = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def click(self, element_id: str) -> None:
        """A real mouse click (a user gesture, unlike element.click()) on an element."""
        box = self.evaluate(f"(() => {{ const r = document.getElementById({element_id!r}).getBoundingClientRect();"
                            " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1],
                      button="left", clickCount=1)

    def screenshot(self, path: str) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

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
    return os.path.exists(CHROMIUM)
