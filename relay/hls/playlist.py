"""Playlists (RFC 8216bis): a rendition's live media playlist, whole or as a
delta update (_HLS_skip), and the room's multivariant playlist.

Pure functions of a Track's state; the server caches what they return by
the track's version, so a thousand clients asking for the same part's
playlist cost one rendering."""
from __future__ import annotations

import math
from datetime import datetime, timezone

from relay.hls.track import PART_SEGMENTS, Track

VERSION = 9                 # EXT-X-SKIP needs 9; EXT-X-PART and blocking reload, 6
SKIP_SEGMENTS_S = 6.0       # CAN-SKIP-UNTIL: six target durations, the least the spec allows
HOLD_BACK_PARTS = 3         # PART-HOLD-BACK: three part targets, as the spec recommends


def _date(wall: float) -> str:
    return datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _part_uri(msn: int, index: int) -> str:
    return f"s{msn}.{index}.m4s"


def media(track: Track, skip: bool = False) -> str:
    """The live media playlist of `track`; with `skip`, segments older than
    CAN-SKIP-UNTIL from the end are replaced by one EXT-X-SKIP tag."""
    target = 1   # whole segments are one second; EXTINF rounds to at most this
    part_target = math.ceil(track.part_target * 1000) / 1000
    lines = ["#EXTM3U", f"#EXT-X-VERSION:{VERSION}", f"#EXT-X-TARGETDURATION:{target}",
             f"#EXT-X-PART-INF:PART-TARGET={part_target:.3f}",
             f"#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK={HOLD_BACK_PARTS * part_target:.3f},"
             f"CAN-SKIP-UNTIL={SKIP_SEGMENTS_S:.1f}"]
    segs = track.segments
    first = segs[0].msn if segs else track.first_msn
    lines.append(f"#EXT-X-MEDIA-SEQUENCE:{first}")
    lines.append('#EXT-X-MAP:URI="init.mp4"')
    shown = segs
    if skip and segs:
        # skippable: whole segments that end more than CAN-SKIP-UNTIL before the playlist's end
        total = sum(s.duration for s in segs)
        skipped, acc = 0, 0.0
        for s in segs:
            if not s.done or total - (acc + s.duration) < SKIP_SEGMENTS_S:
                break
            acc += s.duration
            skipped += 1
        if skipped:
            lines.append(f"#EXT-X-SKIP:SKIPPED-SEGMENTS={skipped}")
            shown = segs[skipped:]
    with_parts = {s.msn for s in segs[-PART_SEGMENTS:]}
    for s in shown:
        lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_date(s.wall)}")
        if s.msn in with_parts:
            for p in s.parts:
                lines.append(f'#EXT-X-PART:DURATION={p.duration:.5f},URI="{_part_uri(p.msn, p.index)}",'
                             "INDEPENDENT=YES")
        if s.done:
            lines.append(f"#EXTINF:{s.duration:.5f},")
            lines.append(f"s{s.msn}.m4s")
    if segs:
        msn, index = track.next_position()
        lines.append(f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="{_part_uri(msn, index)}"')
    return "\n".join(lines) + "\n"


def multivariant(tracks: list[Track]) -> str:
    """The room's multivariant playlist: one variant per rendition, with
    its CODECS (RFC 6381: "mp4a.40.2" AAC-LC, "opus" Opus in MP4), AAC
    first for players that take the first they can play."""
    lines = ["#EXTM3U", "#EXT-X-VERSION:6", "#EXT-X-INDEPENDENT-SEGMENTS"]
    for t in tracks:
        lines.append(f'#EXT-X-STREAM-INF:BANDWIDTH={t.bandwidth},AVERAGE-BANDWIDTH={t.bandwidth},'
                     f'CODECS="{t.codecs}"')
        lines.append(f"{t.name}/index.m3u8")
    return "\n".join(lines) + "\n"
