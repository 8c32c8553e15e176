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
