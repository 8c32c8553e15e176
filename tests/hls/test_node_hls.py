"""A node writes LL-HLS for its room: ffmpeg, a real HLS client, plays the
multivariant playlist (each rendition alone: test_speech.py), and the node
counts what it made."""
from __future__ import annotations

import subprocess

from relay.testing.loadgen import scrape
from tests.conftest import TONE_HZ, dominant_hz, need


def test_ffmpeg_plays_the_rooms_tone_from_the_node_and_the_node_counts_it(hls_relay, tone, tmp_path):
    # ffmpeg's HLS reader takes whole segments, not parts
    hls_relay.wait_parts("aac", 2, tag="#EXTINF")
    out = tmp_path / "heard.wav"
    subprocess.run([need("ffmpeg"), "-v", "error", "-y", "-t", "3", "-i", hls_relay.base() + "/index.m3u8",
                    "-ac", "1", "-ar", "48000", str(out)], check=True, timeout=60)
    assert abs(dominant_hz(out) - TONE_HZ) < 5
    m = scrape(hls_relay.relay.admin)
    assert m['relay_hls_parts_total{rendition="opus"}'] >= 10
    assert m['relay_hls_parts_total{rendition="aac"}'] >= 10
    assert m['relay_hls_requests_total{kind="multivariant"}'] >= 1
    assert m['relay_hls_requests_total{kind="segment"}'] >= 2
    assert m["relay_hls_rooms"] == 1
    assert m["relay_hls_mux_cpu_seconds_total"] > 0
