"""A node writes LL-HLS for its room: ffmpeg, a real HLS client, plays both
renditions, and the node counts what it made."""
from __future__ import annotations

import subprocess

import pytest

from relay.testing.loadgen import scrape
from tests.conftest import TONE_HZ, dominant_hz, need


@pytest.mark.parametrize("rendition", [None])   # each rendition alone: test_speech.py
def test_ffmpeg_plays_the_rooms_tone_from_the_node(hls_relay, tone, tmp_path, rendition):
    # ffmpeg's HLS reader takes whole segments, not parts
    hls_relay.wait_parts("aac", 2, tag="#EXTINF")
    out = tmp_path / "heard.wav"
    subprocess.run([need("ffmpeg"), "-v", "error", "-y", "-t", "3", "-i", hls_relay.base(rendition) + "/index.m3u8",
                    "-ac", "1", "-ar", "48000", str(out)], check=True, timeout=60)
    assert abs(dominant_hz(out) - TONE_HZ) < 5


def test_metrics_count_parts_and_requests(hls_relay, tone):
    hls_relay.wait_parts("aac", 3)
    m = scrape(hls_relay.relay.admin)
    assert m['relay_hls_parts_total{rendition="opus"}'] >= 3
    assert m['relay_hls_parts_total{rendition="aac"}'] >= 3
    assert m['relay_hls_requests_total{kind="playlist"}'] >= 1
    assert m["relay_hls_rooms"] == 1
    assert m["relay_hls_mux_cpu_seconds_total"] > 0
