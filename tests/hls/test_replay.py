"""Replays: a recorded room's segments kept on disk become a VOD playlist
when the room ends, with discontinuities where the stream restarted, and
go after their retention."""
from __future__ import annotations

import os
import subprocess
import time

from relay.hls import replay
from relay.hls.room import RoomHls
from tests.conftest import TONE_HZ, dominant_hz, need, stop
from tests.hls.conftest import publish, start_hls_relay
from tests.hls.synth import tone_packets


def test_the_journal_makes_a_vod_with_discontinuities_at_restarts_and_sessions(tmp_path):
    rec = replay.Recorder(tmp_path, "town hall/1", now=1_700_000_000)
    room = RoomHls("town hall/1", aac=False, clock=lambda: 1_700_000_000.0, recorder=rec)
    packets = tone_packets(250)
    for p in packets[:100]:                        # 2 s
        room.feed(p)
    for p in tone_packets(100, first_seq=5000, first_ts=10**9):    # a new stream, far away
        room.feed(p)
    text = replay.playlist(tmp_path, "town hall/1", "opus")
    assert text is not None and "#EXT-X-PLAYLIST-TYPE:EVENT" in text and "#EXT-X-ENDLIST" not in text
    assert text.count("#EXT-X-DISCONTINUITY\n") == 1 and text.count("#EXTINF") == 4
    rec.close()                                    # the room ended
    text = replay.playlist(tmp_path, "town hall/1", "opus")
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in text and text.rstrip().endswith("#EXT-X-ENDLIST")
    # the node restarted: a new session, a new timeline
    rec2 = replay.Recorder(tmp_path, "town hall/1", now=1_700_000_100)
    room2 = RoomHls("town hall/1", aac=False, clock=lambda: 1_700_000_100.0, recorder=rec2)
    for p in packets[:60]:
        room2.feed(p)
    text = replay.playlist(tmp_path, "town hall/1", "opus")
    assert text.count("#EXT-X-DISCONTINUITY\n") == 2 and text.count("#EXTINF") == 5
    assert text.count("#EXT-X-MAP:") == 3 and "#EXT-X-ENDLIST" not in text   # one per timeline
    assert (tmp_path / "town%20hall%2F1").is_dir(), "a room name is one directory, whatever it holds"
    assert replay.replay_file(tmp_path, "town hall/1", "opus", "1700000000", "../journal") is None


def test_recordings_past_their_retention_are_deleted_whole(tmp_path):
    old = replay.Recorder(tmp_path, "r", now=1_000)
    old.close()
    os.utime(old.dir / "journal", (1_000, 1_000))
    new = replay.Recorder(tmp_path, "r", now=time.time())
    new.close()
    assert replay.expire(tmp_path, retention_s=3600) == 1
    assert [s.name for s in replay.sessions(tmp_path, "r")] == [new.dir.name]


def test_a_recorded_room_replays_after_the_node_restarts(tmp_path):
    node = f'record_dir = "{tmp_path / "replays"}"\n'
    r = start_hls_relay(tmp_path, extra_node=node, extra_room="record = true\n")
    p = publish(r.relay, "sine=frequency=660:sample_rate=48000", duration=4)
    r.wait_parts("opus", 3, tag="#EXTINF", timeout=20)
    p.wait(20)
    assert stop(r.relay.proc) == 0           # the node stops: the room's recording ends
    (tmp_path / "again").mkdir()
    r = start_hls_relay(tmp_path / "again", extra_node=node, extra_room="record = true\n")
    try:
        status, headers, body = r.request("/rooms/live/opus/replay.m3u8")
        text = body.decode()
        assert status == 200 and "#EXT-X-PLAYLIST-TYPE:VOD" in text and "#EXT-X-ENDLIST" in text, text
        assert r.request("/rooms/live/replay.m3u8")[0] == 200
        out = tmp_path / "replay.wav"
        subprocess.run([need("ffmpeg"), "-v", "error", "-y", "-i", r.base("opus") + "/replay.m3u8",
                        "-ac", "1", "-ar", "48000", str(out)], check=True, timeout=60)
        assert abs(dominant_hz(out) - TONE_HZ) < 5
        assert r.request("/rooms/live/opus/replay/1/s1.m4s")[0] == 404
    finally:
        assert stop(r.relay.proc) == 0
