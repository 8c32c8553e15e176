"""The feed from two parents (relay/cluster/follow.py): copies are merged,
two streams are never mixed, and a silent followed parent is spliced onto
the other at the right frame."""
from __future__ import annotations

import logging
import struct

import pytest

from relay.cluster.follow import Merge


def frame(seq: int, ts: int, tag: bytes, moment: int) -> bytes:
    """An RTP packet whose payload says which parent made it and which
    20 ms of the speakers' audio it carries."""
    return struct.pack("!BBHII", 0x80, 111, seq & 0xFFFF, ts & 0xFFFFFFFF, 0) + tag + struct.pack("!I", moment) * 6


def moment(pkt: bytes) -> tuple[bytes, int]:
    return pkt[12:13], struct.unpack_from("!I", pkt, 13)[0]


def numbers(pkt: bytes) -> tuple[int, int]:
    return struct.unpack_from("!HI", pkt, 2)


def run(merge: Merge, frames: int, streams: dict[int, tuple[int, int, bytes, float]],
        dies: dict[int, int] | None = None) -> list[bytes]:
    """Both parents send `frames` frames of the same audio, each in its own
    numbering (seq base, ts base, tag, delay); parent k sends nothing from
    frame dies[k] on. Returns what the room was fed, in order."""
    events = []
    for k, (seq0, ts0, tag, delay) in streams.items():
        for n in range(frames):
            if dies and k in dies and n >= dies[k]:
                break
            events.append((1.0 + n * 0.02 + delay, k, frame(seq0 + n, ts0 + 960 * n, tag, n)))
    fed = []
    for at, k, pkt in sorted(events, key=lambda e: e[0]):
        fed += merge.packet(k, pkt, at)
    return fed


def test_copies_of_one_numbering_are_merged() -> None:
    merge = Merge("live")
    fed = run(merge, 50, {0: (100, 5000, b"A", 0.002), 1: (100, 5000, b"A", 0.004)})
    assert merge.merging and merge.disagreements == 0
    # the core gets both copies (it keeps the first of each): 50 + nearly 50
    assert len(fed) > 90 and {moment(p)[1] for p in fed} == set(range(50))


@pytest.mark.parametrize("phase", [0.003, 0.009, -0.007])
@pytest.mark.parametrize("dies", ["followed", "other"])
def test_two_streams_are_never_mixed_and_a_silent_one_is_spliced_onto_the_other(
        phase: float, dies: str, caplog) -> None:
    caplog.set_level(logging.WARNING, "relay.upstream")
    merge = Merge("live", lambda k: f"origin-{'ab'[k]}")
    streams = {0: (40_000, 1_000_000, b"A", 0.004), 1: (7, 123, b"B", 0.004 + phase)}
    first = 0 if phase > 0 else 1           # the parent heard first is followed
    victim = first if dies == "followed" else 1 - first
    fed = run(merge, 100, streams, dies={victim: 60})
    assert not merge.merging and merge.splices == (dies == "followed")
    # one stream at a time: all of the followed parent's, then the other's
    tags = [moment(p)[0] for p in fed]
    assert tags[0] == b"AB"[first:first + 1] and tags[-1] == b"AB"[1 - victim:2 - victim]
    switch = next((i for i in range(1, len(tags)) if tags[i] != tags[i - 1]), None)
    assert switch is None or set(tags[switch:]) == {tags[-1]}
    # the room's numbering runs on without a hole or a repeat across the splice
    seqs = [numbers(p)[0] for p in fed]
    assert all((b - a) & 0xFFFF == 1 for a, b in zip(seqs, seqs[1:], strict=False))
    stamps = [numbers(p)[1] for p in fed]
    assert all((b - a) & 0xFFFFFFFF == 960 for a, b in zip(stamps, stamps[1:], strict=False))
    # and the audio too: the frames neither parent lost all go out, at most
    # one repeated or skipped where the pairing by arrival time was a frame off
    moments = [moment(p)[1] for p in fed]
    steps = [b - a for a, b in zip(moments, moments[1:], strict=False)]
    assert all(s == 1 for i, s in enumerate(steps) if switch is None or i != switch - 1)
    assert switch is None or steps[switch - 1] in (0, 1, 2)
    assert moments[-1] == 99 and moments[0] == 0
    assert merge.disagreements == 1
    said = [r.getMessage() for r in caplog.records if "two different streams" in r.getMessage()]
    assert len(said) == 1 and "origin-a" in said[0] and "origin-b" in said[0]


def test_merged_parents_that_start_to_disagree_are_followed_one_at_a_time() -> None:
    merge = Merge("live")
    run(merge, 20, {0: (100, 5000, b"A", 0.002), 1: (100, 5000, b"A", 0.004)})
    assert merge.merging
    # parent 1 is replaced by a misconfigured origin: same numbers, other bytes
    fed = []
    for n in range(20, 40):
        at = 1.0 + n * 0.02
        fed += merge.packet(0, frame(100 + n, 5000 + 960 * n, b"A", n), at + 0.002)
        fed += merge.packet(1, frame(100 + n, 5000 + 960 * n, b"X", n), at + 0.004)
    assert not merge.merging and merge.followed == 0
    assert b"X" not in {moment(p)[0] for p in fed}


def test_a_parent_never_paired_is_spliced_by_the_time_that_passed() -> None:
    merge = Merge("live")
    fed = [merge.packet(0, frame(500 + n, 960 * n, b"A", n), 1.0 + 0.02 * n) for n in range(10)]
    # parent 0 dies at frame 10; parent 1 joins only at frame 13
    fed2 = [merge.packet(1, frame(9000 + n, 77 + 960 * n, b"B", n), 1.0 + 0.02 * n) for n in range(13, 20)]
    out = [p for ps in fed + fed2 for p in ps]
    seqs = [numbers(p)[0] for p in out]
    assert seqs[:10] == list(range(500, 510))
    # what B sent goes on where the time says, a gap for the frames nobody sent
    assert seqs[10] - seqs[9] >= 2 and all(b - a == 1 for a, b in zip(seqs[10:], seqs[11:], strict=False))
    assert merge.splices == 1
