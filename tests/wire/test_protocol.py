"""The control protocol, tokens and the session policy, without sockets."""
from __future__ import annotations

import time

import pytest
from hypothesis import given, settings, strategies as st

from relay._core import Core
from relay.wire.addr import to_sockaddr
from relay.wire.config import load
from relay.wire.cookies import CookieJar
from relay.wire.protocol import (MIN_JOIN, Accept, Challenge, Join, Keepalive, Leave,
                            ProtocolError, Reason, Reject, Speaker, Speakers, decode, encode)
from relay.wire.rtcp import build_nack, parse_rtcp
from relay.listeners.admission import JoinLimiter, source_key
from relay.listeners.sessions import RoomState, Sessions
from relay.listeners.session import udp_sends
from relay.wire.tokens import Auth, TokenError, mint

SECRET = "s3cret-for-tests-0123456789abcdef"
ADDR = ("127.0.0.1", 40000)


@pytest.mark.parametrize("msg", [
    Join("demo", "tok", b""), Join("dé", "t" * 300, bytes(20)), Challenge(bytes(20)),
    Accept(b"12345678", 0xDEADBEEF, 5000, 15000), Reject(Reason.NODE_FULL, "10.0.0.2:7000"),
    Keepalive(b"abcdefgh"), Leave(b"abcdefgh"),
    Join("stage", "tok", bytes(20), speaker=True), Join("live", "", bytes(20), relay=True),
    Accept(b"12345678", 7, 5000, 15000, speaker=True),
    Join("stage", "", speaker=True, keyx=True), Challenge(bytes(20), bytes(range(32))),
    Join("stage", "", bytes(20), speaker=True, keyx=True, public=bytes(range(32)), sealed=b"s" * 60),
    Keepalive(b"abcdefgh", 7, bytes(16)), Leave(b"abcdefgh", 2**32 - 1, b"m" * 16),
    Speakers(()), Speakers((Speaker("ann-1", "Ann Ö", 13, True), Speaker("b", "", 127, False))),
])
def test_messages_round_trip(msg) -> None:
    assert decode(encode(msg)) == msg


def test_join_is_padded_so_replies_fit_under_it() -> None:
    join = encode(Join("r", ""))
    assert len(join) == MIN_JOIN
    assert len(encode(Challenge(bytes(20), bytes(32)))) < MIN_JOIN      # a speaker's, with the node's key
    assert len(encode(Reject(Reason.DRAINING, "x" * 200))) < MIN_JOIN


@settings(max_examples=2000)
@given(st.binary(max_size=300))
def test_garbage_never_raises_anything_but_protocol_error(data: bytes) -> None:
    try:
        decode(bytes([0x0B, 1]) + data)
        decode(data)
    except ProtocolError:
        pass


@settings(max_examples=2000)
@given(st.binary(max_size=200))
def test_rtcp_parser_takes_any_bytes(data: bytes) -> None:
    ok, nacks = parse_rtcp(data)
    assert ok or nacks == []


def test_rtcp_with_trailing_bytes_is_refused_whole() -> None:
    # found by the fuzzer: a valid NACK followed by stray bytes
    assert parse_rtcp(build_nack(1, 2, [5]) + b"\x80\xcd") == (False, [])


def test_nack_round_trip() -> None:
    seqs = [65534, 65535, 0, 3, 17, 40]
    ok, nacks = parse_rtcp(build_nack(1, 0xCAFE, seqs))
    assert ok and len(nacks) == 1 and nacks[0].media_ssrc == 0xCAFE
    assert sorted(nacks[0].seqs) == sorted(seqs)


def test_cookie_is_bound_to_address_and_time() -> None:
    jar = CookieJar(b"k" * 32, lifetime_s=10)
    a, b = to_sockaddr(("127.0.0.1", 1)), to_sockaddr(("127.0.0.1", 2))
    c = jar.make(a, 1000.0)
    assert jar.check(c, a, 1005.0)
    assert not jar.check(c, b, 1005.0)
    assert not jar.check(c, a, 1011.5)
    assert not jar.check(c[:-1] + bytes([c[-1] ^ 1]), a, 1001.0)
    assert not CookieJar(b"x" * 32).check(c, a, 1001.0)


def test_tokens() -> None:
    auth = Auth("jwt", SECRET)
    auth.check(mint(SECRET, "demo"), "demo")
    cases = [
        (mint(SECRET, "demo", ttl_s=-10), Reason.EXPIRED_TOKEN),
        (mint("another-secret-of-32-bytes-or-more", "demo"), Reason.BAD_TOKEN),
        (mint(SECRET, "other"), Reason.WRONG_ROOM),
        (mint(SECRET, "demo", role="publish"), Reason.WRONG_ROLE),
        ("not.a.jwt", Reason.BAD_TOKEN),
        ("", Reason.BAD_TOKEN),
    ]
    good = mint(SECRET, "demo")
    head, body, sig = good.split(".")
    cases.append((f"{head}.{body}x.{sig}", Reason.BAD_TOKEN))           # tampered claims
    cases.append(("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0." + body + ".", Reason.BAD_TOKEN))  # alg none
    for token, reason in cases:
        with pytest.raises(TokenError) as e:
            auth.check(token, "demo")
        assert e.value.reason == reason, token
    Auth("open").check("", "demo")


def _sessions(max_listeners: int = 100, auth: Auth | None = None) -> Sessions:
    cfg = load()
    cfg.max_listeners = max_listeners
    cfg.redirect = "127.0.0.2:7000"
    core = Core(max_listeners, rooms=1)
    core.room_open(0, True)
    return Sessions(core, cfg, {"demo": RoomState("demo", 0, 0)}, auth or Auth("open"))


def _join(s: Sessions, addr=ADDR, room="demo", token="", now=None):
    now = time.time() if now is None else now
    challenge = decode(s.on_control(encode(Join(room, token)), addr, now))
    assert isinstance(challenge, Challenge)
    return decode(s.on_control(encode(Join(room, token, challenge.cookie)), addr, now))


def test_join_handshake_admits_after_the_cookie() -> None:
    s = _sessions()
    acc = _join(s)
    assert isinstance(acc, Accept)
    assert s.core.listeners == 1
    # a lost ACCEPT: the same JOIN again gets the same session, not a second one
    acc2 = _join(s)
    assert acc2 == acc and s.core.listeners == 1


def test_spoofed_join_without_or_with_a_foreign_cookie_admits_no_one() -> None:
    s = _sessions()
    assert isinstance(decode(s.on_control(encode(Join("demo", "")), ADDR, time.time())), Challenge)
    stolen = s.cookies.make(to_sockaddr(("127.0.0.1", 1)), time.time())
    reply = decode(s.on_control(encode(Join("demo", "", stolen)), ADDR, time.time()))
    assert isinstance(reply, Challenge)
    assert s.core.listeners == 0


def test_short_join_gets_no_reply_at_all() -> None:
    s = _sessions()
    assert s.on_control(encode(Join("demo", ""))[:40], ADDR, time.time()) is None


def test_full_node_says_go_there() -> None:
    s = _sessions(max_listeners=2)
    for port in (1, 2):
        assert isinstance(_join(s, ("127.0.0.1", port)), Accept)
    rej = _join(s, ("127.0.0.1", 3))
    assert rej == Reject(Reason.NODE_FULL, "127.0.0.2:7000")
    assert s.counters.rejections["node_full"] == 1


def test_token_problems_are_rejected_with_their_reason() -> None:
    s = _sessions(auth=Auth("jwt", SECRET))
    assert _join(s, token=mint(SECRET, "demo", ttl_s=-5)) == Reject(Reason.EXPIRED_TOKEN)
    assert _join(s, token="garbage") == Reject(Reason.BAD_TOKEN)
    assert _join(s, room="nope", token=mint(SECRET, "nope")) == Reject(Reason.UNKNOWN_ROOM)
    assert isinstance(_join(s, token=mint(SECRET, "demo")), Accept)


def test_keepalive_timeout_and_leave() -> None:
    s = _sessions()
    t = 1000.0
    acc = _join(s, now=t)
    ka = encode(Keepalive(acc.session_id))
    assert s.on_control(ka, ADDR, t + 10) == ka
    assert s.expire(t + 10 + s.cfg.session_timeout - 1) == 0
    assert s.expire(t + 10 + s.cfg.session_timeout + 1) == 1
    assert s.core.listeners == 0
    assert decode(s.on_control(ka, ADDR, t + 30)) == Reject(Reason.UNKNOWN_SESSION)
    acc = _join(s, now=t + 40)
    assert s.on_control(encode(Leave(b"wrongid!")), ADDR, t + 41) is None
    assert s.core.listeners == 1
    s.on_control(encode(Leave(acc.session_id)), ADDR, t + 41)
    assert s.core.listeners == 0


def test_unsupported_version_is_told_so() -> None:
    s = _sessions()
    join = bytearray(encode(Join("demo", "")))
    join[1] = 9
    assert decode(s.on_control(bytes(join), ADDR, time.time())) == Reject(Reason.UNSUPPORTED_VERSION)


def test_drain_tells_everyone_and_stops_admitting() -> None:
    s = _sessions()
    for port in (1, 2, 3):
        _join(s, ("127.0.0.1", port))
    told = udp_sends(s.drain())
    assert len(told) == 3 and all(decode(m) == Reject(Reason.DRAINING, "127.0.0.2:7000") for _, m in told)
    assert s.core.listeners == 0
    assert _join(s) == Reject(Reason.DRAINING, "127.0.0.2:7000")


def test_joins_stop_before_the_senders_run_out_of_time() -> None:
    s = _sessions(max_listeners=100)
    s.cfg.max_load = 0.8
    for port in range(1, 11):
        assert isinstance(_join(s, ("127.0.0.1", port)), Accept)
    # the senders were 40 % busy with those 10 listeners: about 10 more fit under 80 %
    s.note_load(0.40, 0.0, 10)
    results = [_join(s, ("127.0.0.1", 100 + i)) for i in range(15)]
    accepted = sum(isinstance(r, Accept) for r in results)
    assert accepted == 10  # 20 listeners project to exactly 0.80; a 21st would pass it
    assert all(r == Reject(Reason.NODE_FULL, "127.0.0.2:7000") for r in results[accepted:])
    assert s.counters.rejections_load == 15 - accepted
    # a quiet publisher gives no signal: only max_listeners applies
    s.note_load(0.01, 0.0, 20)
    assert isinstance(_join(s, ("127.0.0.1", 200)), Accept)


def test_a_busy_machine_is_not_projected_onto_the_relays_listeners() -> None:
    # One unrelated busy process: the machine is 60 % busy while the relay's
    # own duty is 0.0012 with one listener. The old projection (the larger
    # of the two, times (n + 1) / n) refused every join; the machine's CPU is
    # now a cap of its own (max_machine_load), not a cost per listener.
    s = _sessions(max_listeners=100)
    s.cfg.max_load, s.cfg.max_machine_load = 0.8, 0.95
    assert isinstance(_join(s, ("127.0.0.1", 1)), Accept)
    s.note_load(0.0012, 0.60, 1)
    assert all(isinstance(_join(s, ("127.0.0.1", 2 + i)), Accept) for i in range(5))
    assert s.counters.rejections_load == 0
    # a machine with no headroom left, filled by others: still admits
    s.gate.floor = 5
    s.note_load(0.0012, 0.97, 6, relay_share=0.05)
    assert isinstance(_join(s, ("127.0.0.1", 49)), Accept)
    # filled by the relay itself, past the floor: refuses, without projecting
    s.note_load(0.0012, 0.97, 7, relay_share=0.6)
    assert _join(s, ("127.0.0.1", 50)) == Reject(Reason.NODE_FULL, "127.0.0.2:7000")
    assert s.counters.rejections_load == 1
    s.cfg.max_machine_load = 0   # off
    assert isinstance(_join(s, ("127.0.0.1", 51)), Accept)


def test_one_token_holds_a_bounded_number_of_sessions() -> None:
    s = _sessions(auth=Auth("jwt", SECRET))
    s.cfg.max_sessions_per_token = 3
    token = mint(SECRET, "demo")
    assert all(isinstance(_join(s, ("127.0.0.1", p), token=token), Accept) for p in (1, 2, 3))
    assert _join(s, ("127.0.0.1", 4), token=token) == Reject(Reason.TOKEN_IN_USE)
    # the same session joining again is not a new one
    assert isinstance(_join(s, ("127.0.0.1", 1), token=token), Accept)
    # a session that leaves frees its place; other tokens are not affected
    s.end(("127.0.0.1", 1), "left")
    assert isinstance(_join(s, ("127.0.0.1", 4), token=token), Accept)
    assert isinstance(_join(s, ("127.0.0.1", 5), token=mint(SECRET, "demo", ttl_s=60)), Accept)


def test_bad_tokens_do_not_spend_the_nodes_join_budget() -> None:
    s = _sessions(auth=Auth("jwt", SECRET))
    s.limiter = JoinLimiter(node_rate=5, source_rate=1000)
    t = 1000.0
    for port in range(1, 200):
        assert _join(s, ("127.0.0.1", port), token="forged", now=t) == Reject(Reason.BAD_TOKEN)
    good = [_join(s, ("127.0.0.2", p), token=mint(SECRET, "demo", ttl_s=600 + p), now=t) for p in range(1, 6)]
    assert all(isinstance(r, Accept) for r in good), good


def test_the_per_source_limit_counts_an_ipv6_slash_64_as_one_source() -> None:
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.7") == source_key("192.0.2.7") == "192.0.2.7"
    limiter = JoinLimiter(node_rate=1000, source_rate=1)
    spent = [limiter.allow_source(f"2001:db8:1:2::{i:x}", 0.0) for i in range(1, 10)]
    assert spent.count(True) == 2   # a burst of twice the per-second rate, for the whole /64


def _stage_sessions(max_speakers: int = 2, slots: int = 2) -> Sessions:
    """Sessions over a core with a stage room ("stage", room 0), a room fed
    by ingest ("demo", room 1), and `slots` mix-minus rooms."""
    import os
    from relay.stage.stages import Stages
    from relay.wire.config import RoomConfig
    cfg = load()
    core = Core(100, rooms=2 + slots)
    core.room_open(1, True)
    s = Sessions(core, cfg, {"stage": RoomState("stage", 0, 0), "demo": RoomState("demo", 1, 0)},
                 Auth("jwt", SECRET))
    s.stages = Stages(core, list(range(2, 2 + slots)), lambda: None, os.urandom)
    s.stages.open(RoomConfig("stage", None, [], max_speakers=max_speakers), 0)
    return s


SPEAKER_KEYS: dict = {}     # address -> the keys its last _speak agreed


def _speak(s: Sessions, token: str, room: str = "stage", addr=ADDR):
    """A speaker's handshake, key exchange included (as SpeakerClient does it)."""
    from relay.wire.keyx import speaker_keys
    now = time.time()
    challenge = decode(s.on_control(encode(Join(room, "", speaker=True, keyx=True)), addr, now))
    assert isinstance(challenge, Challenge) and len(challenge.public) == 32
    public, keys = speaker_keys(challenge.cookie, challenge.public)
    SPEAKER_KEYS[addr] = keys
    return decode(s.on_control(encode(Join(room, "", challenge.cookie, speaker=True, keyx=True, public=public,
                                           sealed=keys.seal(token))), addr, now))


def test_speakers_need_a_publish_token_a_stage_and_a_free_place() -> None:
    s = _stage_sessions(max_speakers=2)
    ann = _speak(s, mint(SECRET, "stage", "publish", speaker="ann", name="Ann"))
    # a speaker's ACCEPT puts it on the stage (its keys come from the
    # exchange, never the wire); it listens in a mix-minus room of its own
    assert isinstance(ann, Accept) and ann.speaker
    assert s.stages.members[ADDR].name == "Ann" and s.stages.members[ADDR].minus_index in (2, 3)
    assert s.core.room_listeners(s.stages.members[ADDR].minus_index) == 1
    refused = [_speak(s, mint(SECRET, "stage", "listen"), addr=("127.0.0.1", 2)),      # a listener's token
               _speak(s, mint(SECRET, "demo", "publish"), room="demo", addr=("127.0.0.1", 3))]  # no stage
    assert [r.reason for r in refused] == [Reason.WRONG_ROLE, Reason.NO_STAGE]
    bo = _speak(s, mint(SECRET, "stage", "publish"), addr=("127.0.0.1", 4))
    cy = _speak(s, mint(SECRET, "stage", "publish"), addr=("127.0.0.1", 5))
    assert isinstance(bo, Accept) and isinstance(cy, Reject) and cy.reason == Reason.STAGE_FULL
    # a LEAVE with the session id alone (which anyone watching has seen) is
    # ignored; leaving with the MAC of the exchange's control key frees the
    # place and the mix-minus room
    from relay.wire.keyx import mac
    from relay.wire.protocol import MsgType
    s.on_control(encode(Leave(ann.session_id)), ADDR, time.time())
    assert ADDR in s.stages.members and s.counters.control_unsigned == 1
    signed = mac(SPEAKER_KEYS[ADDR].control_key, MsgType.LEAVE, ann.session_id, 1)
    s.on_control(encode(Leave(ann.session_id, 1, signed)), ADDR, time.time())
    assert ADDR not in s.stages.members and len(s.stages._free) == 1
    assert isinstance(_speak(s, mint(SECRET, "stage", "publish"), addr=("127.0.0.1", 5)), Accept)
    # and a listener's JOIN to the stage room is an ordinary listener
    assert isinstance(_join(s, ("127.0.0.1", 6), "stage", mint(SECRET, "stage")), Accept)
    assert s.core.room_listeners(0) == 1


def test_one_token_holds_one_seat_and_an_expired_token_leaves_the_stage() -> None:
    s = _stage_sessions(max_speakers=4)
    tok = mint(SECRET, "stage", "publish", ttl_s=60)                 # no sub: the token is the speaker
    for port in range(1, 5):
        assert isinstance(_speak(s, tok, addr=("127.0.0.1", port)), Accept)
    assert len(s.stages.members) == 1 and s.counters.replaced == 3   # one seat, not four
    other = _speak(s, mint(SECRET, "stage", "publish", speaker="bo", ttl_s=3600), addr=("127.0.0.1", 9))
    assert isinstance(other, Accept) and len(s.stages.members) == 2
    # an hour on: the first token has expired, and its speaker leaves the stage
    assert s.expire(time.monotonic(), wall=time.time() + 61) == 1
    assert [m.speaker_id for m in s.stages.members.values()] == ["bo"]
    assert s.counters.rejections["expired_token"] == 1


def test_a_node_below_gets_the_room_in_the_origins_numbering() -> None:
    """A relay-role session (in open mode, the JOIN's relay flag) is sent the
    room with no offsets under the room's relay SSRC, so two parents send a
    child identical copies; a listener gets its own SSRC and offsets."""
    from relay.listeners.sessions import relay_ssrc
    s = _sessions()
    node = s.join(("127.0.0.1", 1), "udp", "demo", "", "127.0.0.1", time.time(),
                  sockaddr=to_sockaddr(("127.0.0.1", 1)), relay=True)
    listener = s.join(("127.0.0.1", 2), "udp", "demo", "", "127.0.0.1", time.time(),
                      sockaddr=to_sockaddr(("127.0.0.1", 2)))
    assert node.role == "relay" and node.ssrc == relay_ssrc("demo")
    assert listener.role == "listen" and listener.ssrc != relay_ssrc("demo")


def test_a_framed_join_keeps_its_resume_point_and_a_keepalive_frames() -> None:
    from relay.wire.protocol import FrameReader, frame
    reader = FrameReader()
    msgs = reader.feed(frame(Join("demo", "tok", resume=0xBEEF)) + frame(Keepalive(b"12345678")))
    assert msgs == [Join("demo", "tok", b"", resume=0xBEEF), Keepalive(b"12345678")]
    assert reader.feed(frame(Join("demo", "tok"))) == [Join("demo", "tok")]


def test_speakers_past_every_bound_encode_to_one_datagram() -> None:
    """300 voices with 32-byte ids and names (256 raised ValueError, which
    ended the node's housekeeping): the loudest that fit one datagram."""
    from relay.wire.protocol import MAX_SPEAKERS_BYTES, Speaker, Speakers
    many = Speakers(tuple(Speaker(f"{k:032d}", "n" * 40, k % 128, k % 2 == 0) for k in range(300)))
    data = encode(many)
    assert len(data) <= MAX_SPEAKERS_BYTES
    told = decode(data)
    assert isinstance(told, Speakers) and 0 < len(told.speakers) < 300
    kept = many.speakers[:len(told.speakers)]
    assert told.speakers == tuple(Speaker(s.id, "n" * 32, s.level, s.active) for s in kept)
