"""Rooms with several speakers (a stage), with real clients: speakers are `relay
publish --server --token` processes, listeners `relay listen`, the node a
`relay serve` process; what they heard is decoded by ffmpeg and checked
by its spectrum."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from relay.testing.loadgen import scrape
import pytest

from relay.testing.loadgen import free_port, wait_ready
from tests.conftest import need, start_relay, stop
from tests.stage.conftest import ENV, STAGE, TONES, speaker, token


def listener(relay, seconds: float, out: Path, room: str = "stage") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "relay", "listen", "--server",
                             f"{relay.listen[0]}:{relay.listen[1]}", "--room", room, "--token",
                             token(room, "listen"), "--duration", str(seconds), "--out", str(out)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def pcm_of(path: Path) -> np.ndarray:
    """The Ogg file's audio, mono, 48 kHz."""
    raw = subprocess.run([need("ffmpeg"), "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1",
                          "-ar", "48000", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype="<i2").astype(float)


def shares(x: np.ndarray, freqs: tuple[float, ...] = tuple(TONES.values())) -> dict[float, float]:
    """Each tone's spectral peak, relative to the strongest of them."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    bins = np.fft.rfftfreq(len(x), 1 / 48000)
    peaks = {f: float(spectrum[(bins > f - 8) & (bins < f + 8)].max()) for f in freqs}
    top = max(peaks.values()) or 1.0
    return {f: p / top for f, p in peaks.items()}


def envelope(x: np.ndarray, hz: float, window: int = 960) -> np.ndarray:
    """The tone's amplitude per 20 ms window."""
    k = np.exp(-2j * np.pi * hz * np.arange(window) / 48000)
    return np.array([abs(np.dot(x[i:i + window], k)) for i in range(0, len(x) - window, window)])


def finish(*procs: subprocess.Popen, timeout: float = 30) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
    return outs


@pytest.fixture


def stage_relay(tmp_path):
    relay = start_relay(tmp_path, auth="jwt", extra_room=STAGE)
    yield relay
    stop(relay.proc)


def test_three_speakers_are_mixed_and_each_hears_the_others(stage_relay, tmp_path) -> None:
    need("ffmpeg")
    room = tmp_path / "room.ogg"
    lis = listener(stage_relay, 6.0, room)
    time.sleep(0.5)
    outs = {name: tmp_path / f"{name}.ogg" for name in TONES}
    speakers = [speaker(stage_relay, name, 6.0, outs[name]) for name in TONES]
    time.sleep(3.0)
    status, body = stage_relay.get("/rooms")
    stage = next(r for r in json.loads(body)["rooms"] if r["name"] == "stage")["stage"]
    lis_out, *speak_outs = finish(lis, *speakers)
    assert lis.returncode == 0, lis_out
    assert all(p.returncode == 0 for p in speakers), speak_outs

    # the room hears all three, in one stream (the listener's own count: no loss)
    heard = shares(pcm_of(room)[48000:])
    assert min(heard.values()) > 0.3, heard
    assert "lost 0" in lis_out, lis_out
    # each speaker hears the two others and not itself
    for name, hz in TONES.items():
        mine = shares(pcm_of(outs[name])[48000:])
        others = [mine[f] for f in TONES.values() if f != hz]
        assert mine[hz] < 0.03 and min(others) > 0.3, (name, mine)
    # who is speaking: in /rooms (names from the tokens, levels of a 0.3 tone,
    # -13.5 dBov) and on the listener's side (the periodic SPEAKERS message)
    assert stage["mode"] == "mix" and stage["max_speakers"] == 16
    assert sorted(s["name"] for s in stage["speakers"]) == ["Ann", "Bo", "Cy"], stage
    assert all(s["speaking"] and -17 <= s["level_dbov"] <= -10 for s in stage["speakers"]), stage
    assert "relay: speaking: " in lis_out and all(n in lis_out for n in ("Ann", "Bo", "Cy")), lis_out


def test_a_speaker_who_leaves_is_gone_and_the_others_go_on(stage_relay, tmp_path) -> None:
    need("ffmpeg")
    room = tmp_path / "room.ogg"
    lis = listener(stage_relay, 6.0, room)
    time.sleep(0.3)
    ann = speaker(stage_relay, "ann", 7.0)
    time.sleep(0.5)
    t_bo = time.monotonic()
    bo = speaker(stage_relay, "bo", 2.0)
    out_bo, = finish(bo)
    left = time.monotonic() - t_bo
    lis_out, _ = finish(lis, ann)
    assert bo.returncode == 0 and lis.returncode == 0, (out_bo, lis_out)
    x = pcm_of(room)
    sec = 48000
    # Bo was heard while on stage, and not once it left (its LEAVE ends it at once)
    during, after = x[int(1.8 * sec):int(2.6 * sec)], x[int((0.8 + left + 0.5) * sec):int(5.5 * sec)]
    assert shares(during)[660.0] > 0.3, shares(during)
    assert shares(after)[660.0] < 0.02, shares(after)
    # Ann's tone never stopped: no 20 ms window from 1 s to 5.5 s below half
    # its usual strength (the switches from one voice to the mix and back
    # included), and the stream has no hole
    ann_env = envelope(x[sec:int(5.5 * sec)], 440.0)
    assert ann_env.min() > 0.5 * np.median(ann_env), (ann_env.min(), np.median(ann_env))
    assert "lost 0" in lis_out, lis_out


def test_who_may_speak(tmp_path) -> None:
    relay = start_relay(tmp_path, auth="jwt", extra_room=STAGE + "max_speakers = 1\n")
    try:
        refused = {}
        # a listener's token cannot publish; a publish token cannot speak in
        # a room fed by an ingest port
        for what, room, tok in (("listen token", "stage", token("stage", "listen")),
                                ("ingest room", relay.room, token(relay.room))):
            p = speaker(relay, "ann", 1.0, room=room, tok=tok)
            refused[what] = (p.wait(timeout=30), p.stdout.read())
        assert refused["listen token"][0] == 3 and "wrong_role" in refused["listen token"][1], refused
        assert refused["ingest room"][0] == 3 and "no_stage" in refused["ingest room"][1], refused
        # max_speakers = 1: the second is refused while the first speaks
        first = speaker(relay, "ann", 4.0)
        time.sleep(1.5)
        second = speaker(relay, "bo", 1.0)
        out2, out1 = finish(second, first)
        assert second.returncode == 3 and "stage_full" in out2, out2
        assert first.returncode == 0, out1
        metrics = relay.get("/metrics")[1]
        assert 'relay_rejections_total{reason="wrong_role"} 1.0' in metrics
        assert 'relay_rejections_total{reason="stage_full"} 1.0' in metrics
    finally:
        stop(relay.proc)


def test_a_killed_speaker_times_out_and_the_mix_goes_on(tmp_path) -> None:
    need("ffmpeg")
    relay = start_relay(tmp_path, auth="jwt", extra_node="session_timeout = 2\nkeepalive_interval = 0.5",
                        extra_room=STAGE)
    try:
        room = tmp_path / "room.ogg"
        lis = listener(relay, 7.0, room)
        time.sleep(0.3)
        ann = speaker(relay, "ann", 8.0)
        bo = speaker(relay, "bo", 30.0)
        time.sleep(2.5)
        bo.send_signal(signal.SIGKILL)     # no LEAVE: the node must notice by itself
        killed = time.monotonic()
        bo.wait(timeout=10)
        on_stage = None
        while time.monotonic() - killed < 6:
            on_stage = next(r for r in json.loads(relay.get("/rooms")[1])["rooms"] if r["name"] == "stage")["stage"]
            if len(on_stage["speakers"]) == 1:
                break
            time.sleep(0.2)
        gone_after = time.monotonic() - killed
        lis_out, _ = finish(lis, ann)
        assert on_stage is not None and [s["name"] for s in on_stage["speakers"]] == ["Ann"], on_stage
        assert 1.5 < gone_after < 4.0, gone_after   # the 2 s session timeout
        x = pcm_of(room)
        sec = 48000
        # killed at about 2.8 s into the recording: Bo's tone stops within
        # the concealment's 100 ms, Ann's goes on without a hole
        assert shares(x[int(4.3 * sec):int(6.5 * sec)])[660.0] < 0.02
        ann_env = envelope(x[sec:int(6.5 * sec)], 440.0)
        assert ann_env.min() > 0.5 * np.median(ann_env), (ann_env.min(), np.median(ann_env))
        assert "lost 0" in lis_out, lis_out
    finally:
        stop(relay.proc)


def test_a_killed_speaker_relaunched_takes_its_seat_back_at_once(tmp_path) -> None:
    """A full stage (max_speakers = 1): Ann's process is killed, no LEAVE,
    and relaunched at once. Her new session replaces the stale one (the
    same `sub` holds one seat), instead of being refused stage_full until
    the dead session times out (10-13 s), and she is listed once."""
    relay = start_relay(tmp_path, auth="jwt", extra_room=STAGE + "max_speakers = 1\n")
    try:
        first = speaker(relay, "ann", 30.0)
        time.sleep(1.5)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        again = speaker(relay, "ann", 2.0)
        time.sleep(1.0)
        on_stage = next(r for r in json.loads(relay.get("/rooms")[1])["rooms"] if r["name"] == "stage")["stage"]
        out = finish(again)[0]
        assert again.returncode == 0 and "stage_full" not in out, out
        assert [s["name"] for s in on_stage["speakers"]] == ["Ann"], on_stage
        assert 'relay_speakers_replaced_total 1.0' in relay.get("/metrics")[1]
    finally:
        stop(relay.proc)


def test_a_cli_speaker_speaks_a_file_with_the_token_from_its_environment(tmp_path) -> None:
    """`relay publish --server --file talk.wav`, the token in RELAY_TOKEN:
    the listener hears the file's voice (correlation with the source), and
    the speaker says it is speaking only once the node has taken it."""
    from tests.conftest import best_correlation, speechlike_wav
    need("ffmpeg")
    relay = start_relay(tmp_path, auth="jwt", extra_room=STAGE)
    try:
        source = speechlike_wav(tmp_path / "talk.wav", 3.0)
        room = tmp_path / "room.ogg"
        lis = listener(relay, 5.0, room)
        time.sleep(0.3)
        env = dict(ENV, RELAY_TOKEN=token("stage", speaker="ann", name="Ann"))
        talk = subprocess.Popen([sys.executable, "-m", "relay", "publish", "--server",
                                 f"{relay.listen[0]}:{relay.listen[1]}", "--room", "stage", "--file",
                                 str(tmp_path / "talk.wav"), "--duration", "3.5"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        talk_out, lis_out = finish(talk, lis)
        assert talk.returncode == 0, talk_out
        assert "speaking " + str(tmp_path / "talk.wav") + " on the stage of room 'stage'" in talk_out, talk_out
        corr = best_correlation(source, pcm_of(room))
        assert corr >= 0.9, (corr, lis_out)
        # a refused speaker says why, and never that it is speaking
        env = dict(ENV, RELAY_TOKEN=token("stage", "listen"))
        refused = subprocess.run([sys.executable, "-m", "relay", "publish", "--server",
                                  f"{relay.listen[0]}:{relay.listen[1]}", "--room", "stage", "--duration", "1"],
                                 env=env, capture_output=True, text=True, timeout=30)
        assert refused.returncode == 3 and "wrong_role" in refused.stderr, refused.stderr
        assert "speaking" not in refused.stderr, refused.stderr
    finally:
        stop(relay.proc)


def test_an_edge_carries_the_origins_mix(tmp_path) -> None:
    """In a cascade the mix is made once, where the speakers are; an edge's
    listeners get the mixed stream through the edge's upstream session."""
    need("ffmpeg")
    origin = start_relay(tmp_path, auth="jwt", extra_room=STAGE)
    edge_listen, edge_admin = ("127.0.0.1", free_port()), ("127.0.0.1", free_port(socket.SOCK_STREAM))
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'[node]\nlisten = "127.0.0.1:{edge_listen[1]}"\nadmin = "127.0.0.1:{edge_admin[1]}"\n'
                   'auth = "jwt"\nmax_load = 0\nmax_machine_load = 0\ndrain_grace = 0\n'
                   f'[[room]]\nname = "stage"\nupstream = ["127.0.0.1:{origin.listen[1]}"]\n')
    edge = subprocess.Popen([sys.executable, "-m", "relay", "--log-level", "warning", "serve", "-c", str(cfg)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_ready(edge_admin, edge), "the edge did not start"

        class Edge:
            listen = edge_listen
        room = tmp_path / "edge.ogg"
        lis = listener(Edge, 6.0, room)
        time.sleep(0.3)
        speakers = [speaker(origin, name, 6.0) for name in ("ann", "bo")]
        lis_out, *_ = finish(lis, *speakers)
        assert lis.returncode == 0, lis_out
        heard = shares(pcm_of(room)[48000:], (440.0, 660.0))
        assert min(heard.values()) > 0.3, heard
        # who is speaking reaches the edge's listeners too, through the edge
        assert "relay: speaking: " in lis_out and "Ann" in lis_out and "Bo" in lis_out, lis_out
        # one mix, made at the origin: the edge's stage (it has none) mixed nothing
        with urllib.request.urlopen(f"http://127.0.0.1:{edge_admin[1]}/rooms") as r:
            assert "stage" not in json.loads(r.read())["rooms"][0]
    finally:
        stop(edge)
        stop(origin.proc)


def test_a_rooms_static_publisher_goes_on_its_stage_beside_the_speakers(tmp_path) -> None:
    """An ingest room with max_speakers: ffmpeg (an OBS-like host) publishes
    to the ingest port as before, speakers join beside it; alone it is passed
    through, with a speaker it is mixed, and the speaker hears the host."""
    need("ffmpeg")
    from relay.client.publish import ffmpeg_command
    relay = start_relay(tmp_path, auth="jwt", extra_room="max_speakers = 4\n")
    try:
        host = subprocess.Popen(ffmpeg_command("sine=frequency=330:sample_rate=48000", relay.ingest, lavfi=True,
                                               duration=9), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        room = tmp_path / "room.ogg"
        lis = listener(relay, 7.5, room, room=relay.room)
        time.sleep(1.5)
        alone = next(r for r in json.loads(relay.get("/rooms")[1])["rooms"] if r["name"] == relay.room)["stage"]
        heard_by_ann = tmp_path / "ann.ogg"
        ann = speaker(relay, "ann", 4.0, heard_by_ann, room=relay.room)
        time.sleep(2.0)
        both = next(r for r in json.loads(relay.get("/rooms")[1])["rooms"] if r["name"] == relay.room)["stage"]
        lis_out, ann_out = finish(lis, ann)
        host.wait(timeout=30)
        assert lis.returncode == 0 and ann.returncode == 0, (lis_out, ann_out)
        assert alone["mode"] == "pass" and [s["name"] for s in alone["speakers"]][0].startswith("publisher"), alone
        assert both["mode"] == "mix" and len(both["speakers"]) == 2, both
        x = pcm_of(room)
        # both in the mix (ffmpeg's sine is at 1/8 of full scale, the
        # speaker's at 0.3), and the host without a hole once its jitter
        # was measured (ffmpeg's -re pacing jitters more than the stage's
        # 3 ms margin: the stage holds it a frame or two longer)
        mixed = shares(x[int(2.5 * 48000):int(4.5 * 48000)], (330.0, 440.0))
        assert mixed[330.0] > 0.15 and mixed[440.0] == 1.0, mixed
        host_env = envelope(x[int(3.0 * 48000):int(5.0 * 48000)], 330.0)
        assert host_env.min() > 0.5 * np.median(host_env), (host_env.min(), np.median(host_env))
        ann_hears = shares(pcm_of(heard_by_ann)[48000:], (330.0, 440.0))
        assert ann_hears[330.0] == 1.0 and ann_hears[440.0] < 0.03, ann_hears
        assert "lost 0" in lis_out, lis_out
    finally:
        stop(relay.proc)


def test_a_cli_speaker_speaks_from_a_microphone(tmp_path) -> None:
    """`relay publish --mic DEVICE`: ffmpeg captures the device (here ALSA's
    null device, which every machine has) and the node takes its frames
    from the speaker; a device that cannot be opened is one line naming it,
    never a traceback."""
    need("ffmpeg")
    relay = start_relay(tmp_path, auth="jwt", extra_room=STAGE)
    try:
        env = dict(ENV, RELAY_TOKEN=token("stage", speaker="ann", name="Ann"))
        server = ["--server", f"{relay.listen[0]}:{relay.listen[1]}", "--room", "stage"]
        mic = subprocess.run([sys.executable, "-m", "relay", "publish", *server, "--mic", "null", "--duration", "2"],
                             env=env, capture_output=True, text=True, timeout=30)
        assert mic.returncode == 0 and "speaking microphone null on the stage" in mic.stderr, mic.stderr
        # one speaker is passed through: the room took about 100 of its frames
        assert scrape(relay.admin)['relay_room_packets_in_total{room="stage"}'] > 50
        bad = subprocess.run([sys.executable, "-m", "relay", "publish", *server, "--mic", "hw:97",
                              "--duration", "1"], env=env, capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and "--mic hw:97: ffmpeg could not capture from alsa device 'hw:97'" in bad.stderr
        assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    finally:
        stop(relay.proc)
