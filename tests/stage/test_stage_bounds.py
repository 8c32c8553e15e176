"""A stage's bounds, on the Stage itself (sans-IO: packets in, packets
out): static publishers take seats like speakers, and one voice may not
send more than a voice needs."""
from __future__ import annotations

import os

from relay.stage.stage import VOICE_MAX_PPS, Stage
from tests.rtp import rtp

BYE = bytes([0x81, 203, 0, 1]) + (0x1234).to_bytes(4, "big")
MS = 1_000_000


def _stage(limit: int) -> Stage:
    return Stage("panel", 0, os.urandom, limit=limit)


def test_static_publishers_take_seats_and_a_full_stage_counts_the_rest() -> None:
    st = _stage(limit=3)
    for port in range(5000, 5005):          # every source port of an allowed address was a new voice
        for k in range(3):
            st.on_ingest(("ingest", "127.0.0.1", port), rtp(k, 960 * k, port, b"\xfc" * 40), k * 20 * MS)
    assert len(st.voices) == 3 and st.ingest_voices == 3
    assert st.drops["full"] == 2 * 3
    st.on_ingest(("ingest", "127.0.0.1", 5000), BYE, 100 * MS)
    assert len(st.voices) == 2 and st.ingest_voices == 2


def test_a_voice_is_clipped_to_what_a_voice_needs() -> None:
    """500 packets a second for 2 s from one publisher (a lone voice is
    passed through to every listener): about VOICE_MAX_PPS a second pass,
    the rest are counted."""
    st = _stage(limit=0)
    key = ("ingest", "127.0.0.1", 5000)
    passed = 0
    for k in range(1000):
        out = st.on_ingest(key, rtp(k, 96 * k, 7, b"\xfc" * 40), k * 2 * MS)
        passed += sum(1 for index, _pkt, _speaker in out if index == 0)
    assert st.drops["rate"] > 700
    # the bucket starts a second full, and refills at the bound
    assert passed <= VOICE_MAX_PPS * 3 + 1, passed
    assert 1000 - st.drops["rate"] <= VOICE_MAX_PPS * 3 + 1


def test_a_voice_held_back_for_a_late_packet_drifts_back_once_its_path_recovers() -> None:
    """Two publishers in the mix; one packet of Ann's comes 60 ms late, so
    the stage holds her a frame longer. Her path is steady again after it,
    and once she is quiet the stage moves her back a frame (it used to keep
    every such frame for good: 10-40 ms of drift over a 20 s run)."""
    import opuslib
    from relay.client.publish import encode_tone
    from relay.stage.stage import FRAME_NS, RECOVER_NS
    silence = opuslib.Encoder(48000, 2, opuslib.APPLICATION_AUDIO).encode(bytes(960 * 4), 960)
    tone = encode_tone(660.0, 1.0)
    st = _stage(limit=0)
    ann, bo = ("ingest", "127.0.0.1", 5000), ("ingest", "127.0.0.1", 5002)
    extra_after_late = None
    now = 0
    for k in range(500):                               # 10 s of 20 ms frames
        now = k * FRAME_NS + 1_000_000
        st.on_ingest(bo, rtp(k, 960 * k, 2, tone[k % 50]), now)
        if k != 50:
            st.on_ingest(ann, rtp(k, 960 * k, 1, silence), now)
        if k == 53:                                    # frame 50, 60 ms late
            st.on_ingest(ann, rtp(50, 960 * 50, 1, silence), now)
        while st.tick_ns and st.tick_ns <= now:
            st.tick(now)
        if k == 60:
            extra_after_late = st.voices[ann].extra
    assert st.mode == "mix"
    assert extra_after_late == 1 and st.drops["late"] >= 1
    assert st.voices[ann].extra == 0 and st.drifted_back == 1, (st.voices[ann].extra, st.drifted_back)
    assert 500 * FRAME_NS > 60 * FRAME_NS + RECOVER_NS       # the run is long enough to have recovered
