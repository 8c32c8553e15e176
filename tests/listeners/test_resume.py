"""A listener moving here from a dead node with a resume point gets what it
missed from the room's history, numbered as its own session, ahead of its
ACCEPT; and nothing more than its token may hear."""
from __future__ import annotations

import struct
import time

from relay._core import Core
from relay.listeners.resume import RESUME_PACKETS
from relay.listeners.sessions import RoomState, Sessions
from relay.wire.config import load
from relay.wire.protocol import Accept, Challenge, Join, Reason, Reject, decode, encode
from relay.wire.tokens import Auth, mint
from tests.rtp import SRC_A, rtp

SECRET = "s3cret-for-tests-0123456789abcdef"
ADDR = ("127.0.0.1", 40000)


def _node() -> Sessions:
    core = Core(16, rooms=2, depth=16)
    for room in (0, 1):
        core.room_open(room, True)
    for k in range(80):                     # 1.6 s of room "a", numbered from 1000
        core.feed(0, rtp(1000 + k, 960 * k, 7, bytes([k]) * 20), SRC_A)
    return Sessions(core, load(), {"a": RoomState("a", 0, 0), "b": RoomState("b", 1, 0)}, Auth("jwt", SECRET))


def _join(s: Sessions, room: str, token: str, resume: int | None) -> object:
    challenge = decode(s.on_control(encode(Join(room, token, resume=resume)), ADDR, time.monotonic()))
    assert isinstance(challenge, Challenge)
    return decode(s.on_control(encode(Join(room, token, challenge.cookie, resume=resume)), ADDR, time.monotonic()))


def test_a_resuming_listener_gets_what_it_missed_in_its_own_numbering() -> None:
    s = _node()
    acc = _join(s, "a", mint(SECRET, "a"), resume=1050)
    assert isinstance(acc, Accept) and acc.origin is not None
    seq_off, ts_off = acc.origin
    sent = [p.data for p in s.outbox]
    assert all(p.addr == ADDR for p in s.outbox)
    # 1051..1079: 29 packets, each with the session's SSRC and offsets
    assert [(struct.unpack_from("!H", d, 2)[0] - seq_off) & 0xFFFF for d in sent] == list(range(1051, 1080))
    assert [(struct.unpack_from("!I", d, 4)[0] - ts_off) & 0xFFFFFFFF for d in sent] == [960 * k for k in
                                                                                         range(51, 80)]
    assert {struct.unpack_from("!I", d, 8)[0] for d in sent} == {acc.ssrc}
    assert [d[12] for d in sent] == list(range(51, 80))
    assert s.counters.resumes == 1 and s.counters.resumed_packets == 29


def test_a_forged_resume_point_gets_no_more_than_the_history() -> None:
    s = _node()
    assert isinstance(_join(s, "a", mint(SECRET, "a"), resume=1000 - 20000), Accept)
    # the history reads at most three ring depths: 48 packets, under the cap
    assert 0 < len(s.outbox) <= min(48, RESUME_PACKETS)
    assert [d.data[12] for d in s.outbox] == list(range(80 - len(s.outbox), 80))


def test_a_resume_into_a_room_the_token_does_not_open_gets_nothing() -> None:
    s = _node()
    refused = _join(s, "a", mint(SECRET, "b"), resume=1050)
    assert isinstance(refused, Reject) and refused.reason == Reason.WRONG_ROOM
    assert s.outbox == [] and s.core.listeners == 0
    assert isinstance(_join(s, "b", mint(SECRET, "b"), resume=1050), Accept)
    assert s.outbox == []                   # room b has no audio to give


def test_a_join_without_a_resume_point_gets_only_the_usual_burst() -> None:
    s = _node()
    assert isinstance(_join(s, "a", mint(SECRET, "a"), resume=None), Accept)
    assert s.outbox == [] and s.counters.resumes == 0
