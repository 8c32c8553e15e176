"""Renditions and playlists without a node: the LL-HLS rules each playlist
keeps (RFC 8216bis), the timeline across loss, and bad packets counted."""
from __future__ import annotations

import re

import pytest

from relay.hls import playlist
from relay.hls.room import RoomHls
from relay.hls.track import PARTS_PER_SEGMENT, WINDOW_SEGMENTS
from tests.hls.synth import tone_packets

T0 = 1_700_000_000.0


def fed(packets: list[bytes], aac: bool = True) -> RoomHls:
    room = RoomHls("r", aac=aac, clock=lambda: T0)
    for p in packets:
        room.feed(p)
    return room


def attrs(line: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in re.findall(r'([A-Z-]+)=("[^"]*"|[^,]*)', line.split(":", 1)[1])}


@pytest.mark.parametrize("rendition", ["opus", "aac"])
def test_parts_and_segments_keep_the_targets_the_playlist_states(rendition):
    room = fed(tone_packets(30 * 50))          # 30 s: the window has slid
    track = room.opus if rendition == "opus" else room.aac
    assert track is not None
    text = playlist.media(track)
    lines = text.splitlines()
    part_target = float(attrs(next(x for x in lines if x.startswith("#EXT-X-PART-INF")))["PART-TARGET"])
    target = int(next(x for x in lines if x.startswith("#EXT-X-TARGETDURATION")).split(":")[1])
    parts = [float(attrs(x)["DURATION"]) for x in lines if x.startswith("#EXT-X-PART:")]
    extinf = [float(x[8:].rstrip(",")) for x in lines if x.startswith("#EXTINF:")]
    assert parts and all(p <= part_target for p in parts)
    # every part but a segment's last is at least 85% of the target
    assert all(p >= 0.85 * part_target for p in parts)
    assert extinf and all(round(d) <= target for d in extinf)
    assert len(extinf) <= WINDOW_SEGMENTS
    control = attrs(next(x for x in lines if x.startswith("#EXT-X-SERVER-CONTROL")))
    assert control["CAN-BLOCK-RELOAD"] == "YES"
    assert float(control["PART-HOLD-BACK"]) >= 2 * part_target
    assert float(control["CAN-SKIP-UNTIL"]) >= 6 * target
    msn, part = track.next_position()
    assert lines[-1] == f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="s{msn}.{part}.m4s"'
    first = int(next(x for x in lines if x.startswith("#EXT-X-MEDIA-SEQUENCE")).split(":")[1])
    assert first == track.segments[0].msn and track.segments[-1].msn - first == len(track.segments) - 1
    assert text.count("#EXT-X-PROGRAM-DATE-TIME:") == len(track.segments)


def test_a_segment_is_its_parts_end_to_end_and_numbers_start_at_the_wall_clock():
    room = fed(tone_packets(3 * 50))
    seg = room.opus.segments[0]
    assert seg.msn == int(T0) and seg.done and len(seg.parts) == PARTS_PER_SEGMENT
    assert room.opus.segment(seg.msn) == b"".join(p.data for p in seg.parts)
    assert room.opus.part(seg.msn, 2) == seg.parts[2].data
    assert room.aac is not None and room.aac.segments[0].msn == int(T0)


def test_delta_update_skips_old_segments_and_says_how_many():
    room = fed(tone_packets(20 * 50))
    full, delta = playlist.media(room.opus), playlist.media(room.opus, skip=True)
    skipped = int(re.search(r"#EXT-X-SKIP:SKIPPED-SEGMENTS=(\d+)", delta)[1])
    assert skipped > 0
    assert full.count("#EXTINF") - delta.count("#EXTINF") == skipped
    # what is left covers at least CAN-SKIP-UNTIL
    assert sum(float(x[8:].rstrip(",")) for x in delta.splitlines() if x.startswith("#EXTINF")) >= 6.0 - 1.0
    assert re.search(r"MEDIA-SEQUENCE:(\d+)", delta)[1] == re.search(r"MEDIA-SEQUENCE:(\d+)", full)[1]
    assert "#EXT-X-VERSION:9" in delta


def test_multivariant_lists_both_renditions_with_their_codecs():
    text = playlist.multivariant(fed(tone_packets(10)).tracks)
    assert 'CODECS="mp4a.40.2"' in text and 'CODECS="opus"' in text
    assert text.index("aac/index.m3u8") < text.index("opus/index.m3u8")


def test_a_room_with_no_audio_has_a_playlist_with_no_segments():
    text = playlist.media(RoomHls("r").opus)
    assert text.startswith("#EXTM3U") and "#EXTINF" not in text and "#EXT-X-PART:" not in text


def test_lost_packets_keep_the_timeline_and_late_or_garbage_ones_are_counted():
    packets = tone_packets(100)
    kept = packets[:30] + packets[35:60] + [packets[40]] + packets[60:] + [b"\x80garbage", b"\x00" * 3]
    room = fed(kept, aac=False)
    # the 5 lost 20 ms frames are filled: 100 frames = 2 s, 10 parts
    assert sum(len(s.parts) for s in room.opus.segments) == 10
    assert room.drops["late"] == 1 and room.drops["malformed"] == 2


def test_waiters_wake_when_their_part_exists():
    import asyncio

    async def run() -> list[bool]:
        room = RoomHls("r", aac=False, clock=lambda: T0)
        packets = tone_packets(50)
        for p in packets[:10]:
            room.feed(p)
        part_1 = room.opus.waiter(int(T0), 1)
        whole = room.opus.waiter(int(T0), None)
        before = [part_1.done(), whole.done()]
        for p in packets[10:20]:
            room.feed(p)
        middle = [part_1.done(), whole.done()]
        for p in packets[20:]:
            room.feed(p)
        return before + middle + [whole.done()]
    assert asyncio.run(run()) == [False, False, True, False, True]
