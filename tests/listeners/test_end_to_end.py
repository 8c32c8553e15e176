"""The whole path with real peers: ffmpeg publishes RTP/Opus into a running
`relay serve`, `relay listen` processes save what they hear, ffmpeg decodes
it, and the tone is checked by its frequency."""
from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from relay.client.publish import ffmpeg_command
from tests.conftest import need, start_relay, stop
from tests.conftest import TONE_HZ, dominant_hz


@pytest.mark.parametrize("workers", [1, 2])


def test_listeners_get_tone_from_ffmpeg(tmp_path, workers: int) -> None:
    relay = start_relay(tmp_path, auth="jwt", extra_node=f"workers = {workers}")
    need("ffmpeg")
    publisher = subprocess.Popen(ffmpeg_command(f"sine=frequency={TONE_HZ}:sample_rate=48000",
                                                relay.ingest, lavfi=True, duration=12),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    listeners = []
    try:
        token = subprocess.run(relay.relay_cmd("token", "--room", relay.room), env=relay.env,
                               capture_output=True, text=True, check=True).stdout.strip()
        for i in range(3):
            out = tmp_path / f"listener{i}.ogg"
            listeners.append((out, subprocess.Popen(
                relay.relay_cmd("listen", "--server", f"{relay.listen[0]}:{relay.listen[1]}",
                                "--room", relay.room, "--token", token, "--out", str(out),
                                "--duration", "5"),
                env=relay.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        for out, p in listeners:
            text = p.communicate(timeout=30)[0]
            assert p.returncode == 0, text
            assert "received" in text
            hz = dominant_hz(out)
            assert abs(hz - TONE_HZ) < 3, f"{out.name}: heard {hz:.1f} Hz, sent {TONE_HZ} Hz"
        status, metrics = relay.get("/metrics")
        assert status == 200
        assert "relay_joins_total 3.0" in metrics
        # a listener without a valid token is refused with the reason
        bad = subprocess.run(relay.relay_cmd("listen", "--server", f"{relay.listen[0]}:{relay.listen[1]}",
                                             "--room", relay.room, "--token", "forged", "--duration", "1"),
                             env=relay.env, capture_output=True, text=True, timeout=30)
        assert bad.returncode == 3 and "bad_token" in bad.stderr
    finally:
        publisher.kill()
        publisher.wait()
        for _, p in listeners:
            if p.poll() is None:
                p.kill()
        assert stop(relay.proc) == 0


def test_publisher_restart_keeps_listener_stream_continuous(tmp_path) -> None:
    """ffmpeg stops and a new ffmpeg (new SSRC, new numbering) starts: the
    listener's sequence numbers stay continuous and it decodes both."""
    relay = start_relay(tmp_path)
    out = tmp_path / "restart.ogg"
    listener = subprocess.Popen(
        relay.relay_cmd("listen", "--server", f"{relay.listen[0]}:{relay.listen[1]}", "--room",
                        relay.room, "--out", str(out), "--duration", "7"),
        env=relay.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(2):
            subprocess.run(ffmpeg_command(f"sine=frequency={TONE_HZ}", relay.ingest, lavfi=True,
                                          duration=2.5), check=True, timeout=30,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)
        text = listener.communicate(timeout=30)[0]
        assert listener.returncode == 0, text
        assert "lost 0" in text, text
        status, metrics = relay.get("/metrics")
        assert "relay_source_restarts_total 1.0" in metrics
        assert abs(dominant_hz(out) - TONE_HZ) < 3
    finally:
        if listener.poll() is None:
            listener.kill()
        assert stop(relay.proc) == 0


def test_publish_a_file_and_listen_live_through_an_sdp(tmp_path) -> None:
    """`relay publish --file` (ffmpeg underneath) into a room, and `relay
    listen --forward --sdp` handing the stream to a player: here ffmpeg
    itself opens the SDP, records, and the tone is checked."""
    import socket as socketlib
    relay = start_relay(tmp_path)
    wav = tmp_path / "tone.wav"
    subprocess.run([need("ffmpeg"), "-v", "error", "-f", "lavfi", "-i", f"sine=frequency={TONE_HZ}",
                    "-t", "8", str(wav)], check=True, timeout=60)
    with socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sdp = tmp_path / "live.sdp"
    recorded = tmp_path / "recorded.ogg"
    publisher = subprocess.Popen(relay.relay_cmd("publish", "--to", f"{relay.ingest[0]}:{relay.ingest[1]}",
                                                 "--file", str(wav)), env=relay.env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    listener = subprocess.Popen(relay.relay_cmd("listen", "--server", f"{relay.listen[0]}:{relay.listen[1]}",
                                                "--room", relay.room, "--forward", f"127.0.0.1:{port}",
                                                "--sdp", str(sdp), "--duration", "6"),
                                env=relay.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    player = None
    try:
        deadline = time.monotonic() + 10
        while not sdp.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "opus/48000/2" in sdp.read_text()
        player = subprocess.Popen([need("ffmpeg"), "-v", "error", "-protocol_whitelist", "file,udp,rtp",
                                   "-i", str(sdp), "-t", "4", "-c:a", "copy", str(recorded)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, err = player.communicate(timeout=30)
        assert player.returncode == 0, err
        text = listener.communicate(timeout=30)[0]
        assert listener.returncode == 0, text
        assert abs(dominant_hz(recorded) - TONE_HZ) < 3
    finally:
        for p in (publisher, listener, player):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        assert stop(relay.proc) == 0


@pytest.mark.parametrize("bitrate, frame_ms, packet_bytes", [("256k", 20, 652), ("510k", 60, 3837)])


def test_high_bitrate_publishers_are_heard(tmp_path, bitrate: str, frame_ms: int, packet_bytes: int) -> None:
    """ffmpeg at constant bitrates far above the old 187 kbit/s limit: 256
    kbit/s in 20 ms frames, and Opus's maximum, 510 kbit/s, in 60 ms frames
    (3,825-byte packets, the largest a 60 ms packet can be). Every packet
    reaches the listener, which decodes the tone."""
    relay = start_relay(tmp_path)
    out = tmp_path / "heard.ogg"
    cmd = [need("ffmpeg"), "-hide_banner", "-loglevel", "error", "-nostdin", "-re", "-f", "lavfi",
           "-i", f"sine=frequency={TONE_HZ}:sample_rate=48000", "-t", "8", "-ac", "2", "-c:a", "libopus",
           "-b:a", bitrate, "-vbr", "off", "-frame_duration", str(frame_ms), "-application", "audio",
           "-f", "rtp", "-sdp_file", str(tmp_path / "ffmpeg.sdp"),
           f"rtp://{relay.ingest[0]}:{relay.ingest[1]}?pkt_size=8192"]
    publisher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    listener = subprocess.Popen(
        relay.relay_cmd("listen", "--server", f"{relay.listen[0]}:{relay.listen[1]}", "--room", relay.room,
                        "--out", str(out), "--duration", "5"),
        env=relay.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text = listener.communicate(timeout=30)[0]
        assert listener.returncode == 0, text
        status, body = relay.get("/rooms")
        room = json.loads(body)["rooms"][0]
        assert room["drops_in"]["oversized"] == 0, room
        received, nbytes = map(int, re.search(r"received (\d+) packets \((\d+) bytes\)", text).groups())
        assert received >= 4000 / frame_ms, text
        assert nbytes == received * packet_bytes, text  # constant bitrate: every packet whole
        assert abs(dominant_hz(out) - TONE_HZ) < 3
    finally:
        for p in (publisher, listener):
            if p.poll() is None:
                p.kill()
                p.wait()
        assert stop(relay.proc) == 0
