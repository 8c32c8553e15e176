"""The box writer, read back by ffprobe and checked against ISO BMFF's rules."""
from __future__ import annotations

import json
import struct
import subprocess

import pytest

from relay.hls import fmp4
from relay.hls.aac import AAC_TRACK
from relay.hls.room import OPUS_TRACK, RoomHls
from tests.conftest import need
from tests.hls.synth import tone_packets


def probe(path) -> dict:
    out = subprocess.run([need("ffprobe"), "-v", "error", "-print_format", "json", "-show_streams",
                          "-show_format", "-count_packets", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("rendition,codec", [("opus", "opus"), ("aac", "aac")])
def test_ffprobe_reads_init_plus_segments_as_the_right_codec_and_length(tmp_path, rendition, codec):
    room = RoomHls("r", clock=lambda: 1_700_000_000.0)
    for p in tone_packets(250):    # 5 s
        room.feed(p)
    track = room.opus if rendition == "opus" else room.aac
    assert track is not None
    done = [s for s in track.segments if s.done]
    path = tmp_path / f"{rendition}.mp4"
    path.write_bytes(track.init + b"".join(s.data for s in done))
    info = probe(path)
    (stream,) = info["streams"]
    assert stream["codec_name"] == codec
    assert int(stream["sample_rate"]) == 48000 and stream["channels"] == 2
    assert float(info["format"]["duration"]) == pytest.approx(sum(s.duration for s in done), abs=0.03)
    frame = 960 if codec == "opus" else 1024
    assert int(stream["nb_read_packets"]) == round(sum(s.duration for s in done) * 48000 / frame)


def test_a_fragments_data_offset_points_at_its_first_sample():
    samples = [(b"\x01" * 7, 960), (b"\x02" * 3, 960)]
    frag = fmp4.fragment(5, 123456789012, samples)
    (moof_kind, moof), (mdat_kind, mdat) = fmp4.boxes(frag)
    assert (moof_kind, mdat_kind) == (b"moof", b"mdat")
    assert mdat == b"\x01" * 7 + b"\x02" * 3
    kinds = dict(fmp4.boxes(moof))
    assert struct.unpack(">I", kinds[b"mfhd"][4:])[0] == 5
    traf = dict(fmp4.boxes(kinds[b"traf"]))
    tfdt = traf[b"tfdt"]
    assert tfdt[0] == 1 and struct.unpack(">Q", tfdt[4:])[0] == 123456789012
    trun = traf[b"trun"]
    count, offset = struct.unpack(">Ii", trun[4:12])
    assert count == 2
    assert frag[offset:offset + 7] == b"\x01" * 7        # offset from the moof's first byte
    assert struct.unpack(">IIII", trun[12:28]) == (960, 7, 960, 3)
    tfhd_flags = struct.unpack(">I", traf[b"tfhd"][:4])[0] & 0xFFFFFF
    assert tfhd_flags & 0x020000, "default-base-is-moof, as CMAF requires"


@pytest.mark.parametrize("track", [OPUS_TRACK, AAC_TRACK])
def test_init_segment_is_ftyp_then_moov_with_an_empty_sample_table_and_mvex(track):
    top = fmp4.boxes(fmp4.init_segment(track))
    assert [k for k, _ in top] == [b"ftyp", b"moov"]
    assert top[0][1][:4] == b"iso6" and b"cmfc" in top[0][1]
    moov = dict(fmp4.boxes(top[1][1]))
    assert set(moov) == {b"mvhd", b"trak", b"mvex"}
    stbl = dict(fmp4.boxes(dict(fmp4.boxes(dict(fmp4.boxes(dict(fmp4.boxes(moov[b"trak"]))[b"mdia"]))[b"minf"]))
                           [b"stbl"]))
    for kind in (b"stts", b"stsc", b"stco"):
        assert stbl[kind][4:8] == b"\x00\x00\x00\x00", f"{kind!r} lists no samples: they are in fragments"
    entry = stbl[b"stsd"][8:]
    assert entry[4:8] == (b"Opus" if track.codec == "opus" else b"mp4a")


def test_an_unknown_codec_or_a_box_that_overruns_is_an_error():
    with pytest.raises(ValueError, match="codec"):
        fmp4.init_segment(fmp4.AudioTrack("mp3", 48000, 2))
    with pytest.raises(ValueError, match="overrunning"):
        fmp4.boxes(struct.pack(">I4s", 100, b"moof") + b"\x00" * 10)
    with pytest.raises(ValueError):
        fmp4.fragment(1, 0, [])
