"""A room's `hls` changed in the config file and the node told with SIGHUP:
its LL-HLS starts (or stops) without a restart."""
from __future__ import annotations

import signal
import time

from tests.conftest import stop
from tests.hls.conftest import start_hls_relay


def test_sighup_turns_a_rooms_hls_on_and_off(tmp_path):
    r = start_hls_relay(tmp_path, extra_room="hls = false\n")
    cfg = tmp_path / "relay.toml"
    try:
        assert r.request("/rooms/live/opus/index.m3u8")[0] == 404
        for text, want in (("hls = true", 200), ("hls = false", 404)):
            cfg.write_text(cfg.read_text().replace("hls = false" if want == 200 else "hls = true", text))
            r.relay.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while r.request("/rooms/live/opus/index.m3u8")[0] != want and time.monotonic() < deadline:
                time.sleep(0.1)
            assert r.request("/rooms/live/opus/index.m3u8")[0] == want, text
    finally:
        assert stop(r.relay.proc) == 0
