"""The ISO BMFF boxes of one audio track, CMAF style (ISO/IEC 23000-19):
an init segment (ftyp + moov with an empty sample table and mvex) and
fragments (moof + mdat) whose samples carry their own durations and sizes.

Written by hand because one audio track needs a dozen fixed boxes; the
tests read the result back with ffprobe. Opus in ISO BMFF follows the
"Encapsulation of Opus in ISO Base Media File Format" spec (sample entry
'Opus' with a 'dOps' box); AAC follows ISO/IEC 14496-14 ('mp4a' + 'esds')."""
from __future__ import annotations

import struct
from dataclasses import dataclass

TRACK_ID = 1
_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
_UND = ((ord("u") - 0x60) << 10) | ((ord("n") - 0x60) << 5) | (ord("d") - 0x60)   # ISO 639-2 "und", packed


def box(kind: bytes, *payload: bytes) -> bytes:
    """One box: 32-bit size, four-character type, payload."""
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    """A box with the version byte and 24 bits of flags before its payload."""
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


@dataclass(frozen=True)
class AudioTrack:
    """What the init segment says of the track."""
    codec: str            # "opus" or "aac"
    sample_rate: int      # also the track's timescale
    channels: int
    config: bytes = b""   # AAC: the AudioSpecificConfig (ISO/IEC 14496-3)
    bitrate: int = 0      # the encoder's target, for esds; 0 = unknown


def _opus_entry(t: AudioTrack) -> bytes:
    # dOps: version 0, output channels, pre-skip 0 (a live stream is joined
    # mid-way: nothing to trim), input rate, gain 0, mapping family 0 (mono/stereo)
    dops = box(b"dOps", struct.pack(">BBHIhB", 0, t.channels, 0, t.sample_rate, 0, 0))
    return _audio_entry(b"Opus", t, dops)


def _descriptor(tag: int, body: bytes) -> bytes:
    if len(body) >= 0x80:
        raise ValueError("descriptor too long for a one-byte length")
    return bytes([tag, len(body)]) + body


def _aac_entry(t: AudioTrack) -> bytes:
    # 0x40: MPEG-4 audio; stream type 5 (audio) << 2 | upstream 0 | reserved 1
    dec_config = _descriptor(0x04, struct.pack(">BB", 0x40, 0x15) + b"\x00\x00\x00"
                             + struct.pack(">II", t.bitrate, t.bitrate) + _descriptor(0x05, t.config))
    es = _descriptor(0x03, struct.pack(">HB", 0, 0) + dec_config + _descriptor(0x06, b"\x02"))
    return _audio_entry(b"mp4a", t, full_box(b"esds", 0, 0, es))


def _audio_entry(kind: bytes, t: AudioTrack, child: bytes) -> bytes:
    # AudioSampleEntry (ISO/IEC 14496-12 12.2.3): 16-bit samples, rate as 16.16
    return box(kind, b"\x00" * 6, struct.pack(">H", 1), b"\x00" * 8,
               struct.pack(">HHHHI", t.channels, 16, 0, 0, t.sample_rate << 16), child)


def init_segment(t: AudioTrack) -> bytes:
    """ftyp + moov for one audio track whose samples all come in fragments."""
    if t.codec == "opus":
        entry = _opus_entry(t)
    elif t.codec == "aac":
        entry = _aac_entry(t)
    else:
        raise ValueError(f"no sample entry for codec {t.codec!r}")
    ftyp = box(b"ftyp", b"iso6", struct.pack(">I", 0), b"iso6", b"cmfc", b"mp41")
    mvhd = full_box(b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, t.sample_rate, 0),
                    struct.pack(">IH", 0x10000, 0x100), b"\x00" * 10, _MATRIX, b"\x00" * 24,
                    struct.pack(">I", TRACK_ID + 1))
    tkhd = full_box(b"tkhd", 0, 0x3, struct.pack(">IIIII", 0, 0, TRACK_ID, 0, 0), b"\x00" * 8,
                    struct.pack(">HHHH", 0, 0, 0x100, 0), _MATRIX, struct.pack(">II", 0, 0))
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, t.sample_rate, 0, _UND, 0))
    hdlr = full_box(b"hdlr", 0, 0, struct.pack(">I", 0), b"soun", b"\x00" * 12, b"SoundHandler\x00")
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    stbl = box(b"stbl", full_box(b"stsd", 0, 0, struct.pack(">I", 1), entry),
               full_box(b"stts", 0, 0, struct.pack(">I", 0)), full_box(b"stsc", 0, 0, struct.pack(">I", 0)),
               full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)), full_box(b"stco", 0, 0, struct.pack(">I", 0)))
    minf = box(b"minf", full_box(b"smhd", 0, 0, struct.pack(">HH", 0, 0)), dinf, stbl)
    trak = box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, minf))
    mvex = box(b"mvex", full_box(b"trex", 0, 0, struct.pack(">IIIII", TRACK_ID, 1, 0, 0, 0)))
    return ftyp + box(b"moov", mvhd, trak, mvex)


def fragment(sequence: int, decode_time: int, samples: list[tuple[bytes, int]]) -> bytes:
    """moof + mdat holding `samples` ((data, duration in timescale units),
    in order) starting at `decode_time`. Every audio sample is a sync
    sample, which the track's default flags (0) already say."""
    if not samples:
        raise ValueError("a fragment holds at least one sample")
    n = len(samples)
    # moof: 8 + mfhd 16 + traf(8 + tfhd 16 + tfdt 20 + trun 20 + 8n)
    moof_size = 8 + 16 + 8 + 16 + 20 + 20 + 8 * n
    trun = full_box(b"trun", 0, 0x000301, struct.pack(">Ii", n, moof_size + 8),
                    b"".join(struct.pack(">II", dur, len(data)) for data, dur in samples))
    traf = box(b"traf", full_box(b"tfhd", 0, 0x020000, struct.pack(">I", TRACK_ID)),
               full_box(b"tfdt", 1, 0, struct.pack(">Q", decode_time)), trun)
    moof = box(b"moof", full_box(b"mfhd", 0, 0, struct.pack(">I", sequence & 0xFFFFFFFF)), traf)
    assert len(moof) == moof_size
    return moof + box(b"mdat", *(data for data, _ in samples))


def boxes(data: bytes, at: int = 0, end: int | None = None) -> list[tuple[bytes, bytes]]:
    """The (type, payload) of each top-level box in `data[at:end]`: what
    the tests and the replay read back. Raises ValueError on a box that
    overruns its container."""
    end = len(data) if end is None else end
    out = []
    while at < end:
        if end - at < 8:
            raise ValueError(f"truncated box header at {at}")
        size, kind = struct.unpack_from(">I4s", data, at)
        if size < 8 or at + size > end:
            raise ValueError(f"box {kind!r} at {at} has size {size}, overrunning its container")
        out.append((kind, data[at + 8:at + size]))
        at += size
    return out
