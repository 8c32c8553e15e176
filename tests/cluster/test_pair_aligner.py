"""The origin pair's numbering, sans-IO: the follower finds the offset from
whichever copy of a packet comes second, holds its copies back until then,
numbers the stream itself when no leader shows up, passes RTCP through,
and finds the offset anew after the publisher restarts."""
from __future__ import annotations

import os
import struct

import pytest

from relay.cluster.pair import LEADER_WAIT_S, Aligner
from relay.wire.config import ConfigError, load
from tests.rtp import rtp

SSRC = 0x5EED


def _fields(packet: bytes) -> tuple[int, int, int]:
    return struct.unpack_from("!HII", packet, 2)


def test_the_follower_takes_the_leaders_numbering_from_matching_payloads() -> None:
    a = Aligner(SSRC, lead=False)
    payloads = [os.urandom(40) for _ in range(8)]
    # the leader numbered them 1000.., the publisher's copy to us says 7..
    assert a.translate(rtp(7, 700, 0xAA, payloads[0]), 0.0) is None        # held: no offset yet
    a.partner_packet(rtp(1000, 50_000, SSRC, payloads[0]), 0.01)          # the partner's copy comes second
    a.partner_packet(rtp(1001, 50_960, SSRC, payloads[1]), 0.02)          # ... and first
    assert a.translate(rtp(8, 1660, 0xAA, payloads[1]), 0.03) is None      # two matches: not sure yet
    a.partner_packet(rtp(1002, 51_920, SSRC, payloads[2]), 0.04)
    out = a.translate(rtp(9, 2620, 0xAA, payloads[2]), 0.05)
    assert out is not None and _fields(out) == (1002, 51_920, SSRC)
    assert _fields(a.translate(rtp(10, 3580, 0xAA, payloads[3]), 0.06)) == (1003, 52_880, SSRC)
    assert a.held == 2
    # RTCP on the ingest port goes to the core as it came
    report = struct.pack("!BBHI", 0x80, 200, 6, 0xAA) + bytes(20)
    assert a.translate(report, 0.07) == report
    # the publisher restarts (a new SSRC, new bases): held until matched again
    for k in range(4, 7):
        now = 0.1 + 0.02 * k
        assert a.translate(rtp(496 + k, 9 + 960 * (k - 4), 0xBB, payloads[k]), now) is None
        a.partner_packet(rtp(1000 + k, 50_000 + 960 * k, SSRC, payloads[k]), now + 0.002)
    assert _fields(a.translate(rtp(503, 2889, 0xBB, payloads[7]), 0.3)) == (1007, 50_000 + 960 * 7, SSRC)


def test_a_periodic_sound_is_aligned_by_when_its_copies_arrive() -> None:
    """A 440 Hz tone in 20 ms frames repeats its payloads every fifth packet:
    the bytes alone would put the follower five packets off; the copy that
    arrived at about the same time is the same packet."""
    a = Aligner(SSRC, lead=False)
    period = [os.urandom(40) for _ in range(5)]
    out = []
    for k in range(40):
        now = 0.02 * k
        a.partner_packet(rtp(1000 + k, 960 * k, SSRC, period[k % 5]), now + 0.003)   # the leader's, 3 ms later
        got = a.translate(rtp(7 + k, 700 + 960 * k, 0xAA, period[k % 5]), now + 0.004)
        if got is not None:
            out.append(_fields(got)[0] - (7 + k))
    assert out and set(out) == {993}, out          # always the true offset, 1000 - 7


def test_an_origin_alone_numbers_the_stream_itself() -> None:
    lead = Aligner(SSRC, lead=True)
    assert _fields(lead.translate(rtp(7, 700, 0xAA, os.urandom(40)), 0.0)) == (7, 700, SSRC)
    follow = Aligner(SSRC, lead=False)
    assert follow.translate(rtp(7, 700, 0xAA, os.urandom(40)), 0.0) is None       # waits for the leader ...
    out = follow.translate(rtp(8, 1660, 0xAA, os.urandom(40)), LEADER_WAIT_S + 0.1)
    assert out is not None and _fields(out) == (8, 1660, SSRC) and follow.own   # ... not for ever


def test_short_payloads_never_decide_the_offset() -> None:
    a = Aligner(SSRC, lead=False)
    silence = b"\xf8\xff\xfe"          # an Opus silence frame: every origin has many
    a.partner_packet(rtp(1000, 0, SSRC, silence), 0.0)
    a.partner_packet(rtp(1001, 960, SSRC, silence), 0.01)
    assert a.translate(rtp(5, 0, 0xAA, silence), 0.02) is None and a.offset is None


@pytest.mark.parametrize("room, error", [
    ('pair = "nowhere"', "room 'p': pair"),
    ('pair = "127.0.0.1:7001"\npair_lead = "yes"', "pair_lead is true or false"),
    ('pair_lead = true', "pair_lead is true or false, on one origin of a 'pair'"),
])
def test_a_bad_pair_is_named(room: str, error: str) -> None:
    text = ('[node]\nauth = "open"\n[[room]]\nname = "p"\ningest = "127.0.0.1:5004"\nsources = ["127.0.0.1"]\n'
            + room + "\n")
    with pytest.raises(ConfigError, match=error):
        load(text, environ={})


@pytest.mark.parametrize("room, error", [
    ('pair = "127.0.0.1:7001"\npair_lead = true', "pair_lead is for pass-through pairs"),
    ('pair = "here"', "room 's': pair"),
])
def test_a_stage_pair_has_no_leader(room: str, error: str) -> None:
    text = '[node]\nauth = "open"\n[[room]]\nname = "s"\n' + room + "\n"
    with pytest.raises(ConfigError, match=error):
        load(text, environ={})
    # a stage room (no ingest) or a stage with an ingest port may name its other origin
    for extra in ("", 'ingest = "127.0.0.1:5004"\nsources = ["127.0.0.1"]\nmax_speakers = 4\n'):
        cfg = load('[node]\nauth = "open"\n[[room]]\nname = "s"\npair = "127.0.0.1:7001"\n' + extra, environ={})
        assert cfg.rooms[0].pair == ("127.0.0.1", 7001) and cfg.rooms[0].stage
