"""`relay listen --forward --sdp` with the publishers and players people
combine: ffmpeg publishing the README's way (its default payload type, 97)
or GStreamer (96), and ffmpeg or a GStreamer pipeline built from the SDP
(payload demux and a jitter buffer) playing it. The SDP must describe what
is forwarded, or the player decodes nothing."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import time

import pytest

from tests.conftest import need, start_relay, stop
from tests.conftest import TONE_HZ, dominant_hz


def _publisher(kind: str, ingest: tuple[str, int]) -> list[str]:
    if kind == "ffmpeg":   # the README's command, payload type left at ffmpeg's default
        return [need("ffmpeg"), "-v", "error", "-re", "-f", "lavfi", "-i", f"sine=frequency={TONE_HZ}",
                "-t", "12", "-c:a", "libopus", "-b:a", "64k", "-f", "rtp", f"rtp://{ingest[0]}:{ingest[1]}"]
    return [need("gst-launch-1.0"), "-q", "audiotestsrc", f"freq={TONE_HZ:g}", "is-live=true", "num-buffers=1200",
            "!", "audioconvert", "!", "audioresample", "!", "opusenc", "!", "rtpopuspay", "!",
            "udpsink", f"host={ingest[0]}", f"port={ingest[1]}"]


def _player(kind: str, sdp_path, out) -> list[str]:
    if kind == "ffmpeg":
        return [need("ffmpeg"), "-v", "error", "-protocol_whitelist", "file,udp,rtp", "-i", str(sdp_path),
                "-t", "4", "-c:a", "copy", str(out)]
    # a GStreamer pipeline built from the SDP: its port, payload type and
    # clock rate; rtpptdemux passes on only the payload type declared
    sdp = sdp_path.read_text()
    port, pt = re.search(r"m=audio (\d+) RTP/AVP (\d+)", sdp).groups()
    rate = re.search(rf"a=rtpmap:{pt} opus/(\d+)", sdp, re.I).group(1)
    caps = f"application/x-rtp,media=audio,clock-rate={rate},encoding-name=OPUS,payload={pt}"
    return [need("gst-launch-1.0"), "-q", "-e", "udpsrc", "address=127.0.0.1", f"port={port}", f"caps={caps}",
            "!", "rtpjitterbuffer", "latency=100", "!", "rtpptdemux", "name=d", f"d.src_{pt}", "!",
            "rtpopusdepay", "!", "opusdec", "!", "audioconvert", "!", "wavenc", "!", "filesink",
            f"location={out}"]


@pytest.mark.parametrize("publisher, player", [("ffmpeg", "ffmpeg"), ("ffmpeg", "gstreamer"),
                                               ("gstreamer", "ffmpeg")])
def test_the_sdp_describes_what_is_forwarded(tmp_path, publisher: str, player: str) -> None:
    relay = start_relay(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sdp = tmp_path / "live.sdp"
    out = tmp_path / ("heard.ogg" if player == "ffmpeg" else "heard.wav")
    pub = subprocess.Popen(_publisher(publisher, relay.ingest), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    listener = subprocess.Popen(relay.relay_cmd("listen", "--server", f"{relay.listen[0]}:{relay.listen[1]}",
                                                "--room", relay.room, "--forward", f"127.0.0.1:{port}",
                                                "--sdp", str(sdp), "--duration", "8"),
                                env=relay.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    play = None
    try:
        deadline = time.monotonic() + 10
        while not sdp.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        play = subprocess.Popen(_player(player, sdp, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        if player == "gstreamer":
            time.sleep(5)
            play.send_signal(signal.SIGINT)   # -e: end the stream so the WAV is finished
        err = play.communicate(timeout=30)[1]
        assert play.returncode == 0, err
        assert listener.communicate(timeout=30)[0] is not None and listener.returncode == 0
        assert abs(dominant_hz(out) - TONE_HZ) < 3
    finally:
        for p in (pub, listener, play):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        assert stop(relay.proc) == 0
