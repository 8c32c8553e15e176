"""Bad and hostile clients of the HLS port: a bound on held requests with
its metric, an empty room, and slow clients that cost the audio nothing."""
from __future__ import annotations

import socket
import time

from relay.testing.loadgen import scrape
from tests.conftest import stop
from tests.hls.conftest import publish, start_hls_relay


def ask(addr, path: str) -> socket.socket:
    s = socket.create_connection(addr, timeout=10)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return s


def answer(s: socket.socket) -> bytes:
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def test_held_requests_are_bounded_and_counted_and_an_empty_room_answers_a_playlist(tmp_path):
    r = start_hls_relay(tmp_path, extra_node="hls_max_held = 5")
    try:
        status, _, body = r.request("/rooms/live/opus/index.m3u8")
        assert status == 200 and "#EXTM3U" in body.decode() and "#EXTINF" not in body.decode()
        socks = [ask(r.hls, "/rooms/live/opus/index.m3u8?_HLS_msn=7&_HLS_part=0") for _ in range(5)]
        time.sleep(0.5)     # let the node hold them before more arrive
        more = [ask(r.hls, "/rooms/live/opus/index.m3u8?_HLS_msn=7&_HLS_part=0") for _ in range(3)]
        assert all(answer(s).startswith(b"HTTP/1.1 503") for s in more)
        m = scrape(r.relay.admin)
        assert m["relay_hls_held_requests"] == 5
        assert m["relay_hls_held_refused_total"] == 3
        # a room with no audio: the held ones get its empty playlist when their wait ends
        assert all(answer(s).startswith(b"HTTP/1.1 200") for s in socks)
        assert scrape(r.relay.admin)["relay_hls_held_requests"] == 0
        for s in socks + more:
            s.close()
    finally:
        assert stop(r.relay.proc) == 0


def test_slow_clients_cost_the_audio_nothing(tmp_path):
    r = start_hls_relay(tmp_path, extra_node="hls_max_connections = 64")
    p = publish(r.relay, "sine=frequency=660:sample_rate=48000")
    slow: list[socket.socket] = []
    try:
        r.wait_parts("opus", 3)
        before = scrape(r.relay.admin)
        parts_before = before['relay_hls_parts_total{rendition="opus"}']
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            # slowloris: connections that send a head a few bytes at a time and never finish it
            for _ in range(20):
                try:
                    s = socket.create_connection(r.hls, timeout=2)
                    s.sendall(b"GET /rooms/live/")
                    slow.append(s)
                except OSError:
                    pass
            for s in slow:
                try:
                    s.send(b"x")
                except OSError:
                    pass
            time.sleep(0.5)
        # an honest client is still served
        assert r.request("/rooms/live/opus/init.mp4")[0] == 200
        after = scrape(r.relay.admin)
        assert after["relay_hls_connections_evicted_total"] > 0
        assert after["relay_hls_connections"] <= 64
        # the audio went on: parts at the real-time rate, no hole concealed,
        # nothing dropped by the core
        assert after['relay_hls_parts_total{rendition="opus"}'] - parts_before >= 4 / 0.2 * 0.8
        assert after.get('relay_hls_dropped_total{reason="concealed"}', 0) == 0
        drops = {k: v for k, v in after.items() if k.startswith("relay_drops_total")}
        assert drops == {k: v for k, v in before.items() if k.startswith("relay_drops_total")}
    finally:
        for s in slow:
            s.close()
        p.terminate()
        p.wait(10)
        assert stop(r.relay.proc) == 0
