"""Coverage-guided fuzzing (atheris) of every parser of untrusted bytes.

    python fuzz/fuzz_parsers.py TARGET [libFuzzer flags, e.g. -runs=100000]

Targets: control (control messages through the session policy), rtcp,
token, rtp (the compiled core's ingest, RTCP BYEs included), stream (framed
control messages on a QUIC/WebTransport stream, arriving in arbitrary
pieces), srtp (a room's SRTP ingest: raw bytes, and real SRTP packets
altered or replayed), stage (a speaker's audio on a stage: raw bytes, and
authentic SRTP around any RTP and any payload, mixed each frame), quic (the
core's opening of a listener's 1-RTT packets and its ACK reader: raw bytes,
and authentic packets around any frames). Each checks invariants, not only
"no crash": no reply larger than its request, only the documented
exceptions, rings that never hold more than they should.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import atheris

# import relay from the source tree (the in-place build), not through the
# editable install's custom loader, which atheris cannot instrument
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["relay"], enable_loader_override=False):
    from relay.wire import protocol, tokens
    from relay.wire import rtcp as rtcp_wire
    from relay._core import Core, Ingest, QuicOpener, QuicPath
    from relay.wire.addr import to_sockaddr
    from relay.wire.config import load
    from relay.listeners.sessions import RoomState, Sessions
    from relay.ingest.srtp import SrtpIngest
    from relay.wire.rtp import rtp_payload
    from relay.stage.stage import FRAME_NS, Stage
from aioquic.quic.crypto import CryptoContext, derive_key_iv_hp  # noqa: E402  (the peer's side, not under test)
from aioquic.buffer import Buffer  # noqa: E402
from aioquic.tls import CipherSuite  # noqa: E402
from pylibsrtp import Error as SrtpError, Policy, Session  # noqa: E402  (libsrtp: the reference encoder, not under test)

SECRET = "fuzz-secret-0123456789abcdef0123456789"
SRC = to_sockaddr(("127.0.0.1", 5000))


def _sessions() -> Sessions:
    cfg = load()
    cfg.max_listeners = 64
    core = Core(64, rooms=1)
    core.room_open(0, True)
    return Sessions(core, cfg, {"demo": RoomState("demo", 0, 0)}, tokens.Auth("open"))


SESSIONS = _sessions()
AUTH = tokens.Auth("jwt", SECRET)
CORE = Core(8, rooms=2, depth=8, ring_bytes=600)  # small: fuzzed packets wrap and overflow it
CORE.room_open(0)
CORE.room_allow(0, SRC)
CORE.room_open(1, True)
SLOTS = [CORE.listener_add(r, SRC, 1, 2, 3) for r in (0, 1)]
NOW = [1_000.0]


def control(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    port = fdp.ConsumeIntInRange(1, 8)
    msg = fdp.ConsumeBytes(fdp.remaining_bytes())
    # a fuzzed JOIN rarely carries a valid cookie; give it one sometimes
    if len(msg) > 8 and msg[:4] == b"\x0b\x01\x01\x00" and port % 2:
        try:
            j = protocol.decode(msg)
            if isinstance(j, protocol.Join):
                cookie = SESSIONS.cookies.make(to_sockaddr(("127.0.0.1", port)), NOW[0])
                msg = protocol.encode(protocol.Join(j.room, j.token, cookie))
        except protocol.ProtocolError:
            pass
    NOW[0] += 0.5
    reply = SESSIONS.on_control(msg, ("127.0.0.1", port), NOW[0])
    if reply is not None and len(reply) > len(msg):
        raise AssertionError(f"amplification: {len(msg)} bytes in, {len(reply)} out")
    SESSIONS.expire(NOW[0])


def rtcp(data: bytes) -> None:
    ok, nacks = rtcp_wire.parse_rtcp(data)
    assert ok or not nacks
    # read only as far as a listener's NACK budget pays for
    cap = data[0] % 40 if data else 0
    ok_capped, capped = rtcp_wire.parse_rtcp(data, max_seqs=cap)
    assert ok_capped == ok and sum(len(n.seqs) for n in capped) <= cap


def token(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        AUTH.check(text, "demo")
    except tokens.TokenError:
        return
    raise AssertionError(f"a fuzzed token was accepted: {text!r}")


def rtp(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    room = fdp.ConsumeIntInRange(0, 2)
    now = fdp.ConsumeIntInRange(0, 10**12)
    pkt = fdp.ConsumeBytes(fdp.remaining_bytes())
    code = CORE.feed(room, pkt, SRC, now)
    assert code in set(Ingest), code
    for slot in SLOTS:
        ring = CORE.ring(slot)
        assert len(ring) <= 8
        assert all(12 < len(p) <= 600 and p[0] == 0x80 for p in ring)
        assert sum(map(len, ring)) <= 600   # what a ring holds fits its bytes


def stream(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    reader = protocol.FrameReader()
    whole = b""
    try:
        while fdp.remaining_bytes():
            piece = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
            whole += piece
            for msg in reader.feed(piece):
                # what parsed must be what the sender framed
                assert protocol.FrameReader().feed(protocol.frame(msg))[0] == msg
    except protocol.ProtocolError:
        return
    # without an error, the reader holds at most one partial frame
    assert len(reader._buf) <= 2 + protocol.MAX_FRAME, len(reader._buf)


SRTP_KEY = bytes(range(30))
SRTP_IN = SrtpIngest(SRTP_KEY)
SRTP_OUT = Session(Policy(key=SRTP_KEY, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
SRTP_SEQ = [0]


def srtp(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:                    # anything at all: without the key nothing authenticates
        assert SRTP_IN.open(fdp.ConsumeBytes(fdp.remaining_bytes())) is None
        return
    SRTP_SEQ[0] += 1
    seq = SRTP_SEQ[0] & 0xFFFF
    plain = bytes([0x80, 111]) + seq.to_bytes(2, "big") + bytes(4) + (7).to_bytes(4, "big") + \
        fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 300))
    sealed = bytearray(SRTP_OUT.protect(plain))
    if mode == 1 and fdp.remaining_bytes() >= 2:
        # one byte changed anywhere: the tag must catch it
        at = fdp.ConsumeIntInRange(0, len(sealed) - 1)
        flip = fdp.ConsumeIntInRange(1, 255)
        sealed[at] ^= flip
        assert SRTP_IN.open(bytes(sealed)) is None
        return
    assert SRTP_IN.open(bytes(sealed)) == plain
    assert SRTP_IN.open(bytes(sealed)) is None      # the same packet again is a replay


STAGE = Stage("fuzz", 0, lambda n: bytes(n))
STAGE.add("ann", "ann", "Ann", SRTP_KEY, 1)
STAGE.add("bo", "bo", "Bo", bytes(30), 2)    # a second voice: the stage mixes, so payloads are decoded
STAGE_OUT = Session(Policy(key=SRTP_KEY, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
STAGE_NOW = [10**9]
BO_OUT = Session(Policy(key=bytes(30), ssrc_type=Policy.SSRC_ANY_OUTBOUND))
BO_OPUS = bytes.fromhex("fc ff fe")   # a valid Opus packet (20 ms of CELT silence)
BO_SEQ = [0]


def stage(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    authentic = fdp.ConsumeBool()
    if authentic:
        # Ann's own key around RTP with any flags, timestamp and payload (a
        # fresh sequence number: libsrtp will not seal an index twice)
        BO_SEQ[0] += 1
        flags = fdp.ConsumeIntInRange(0, 0x3F) if fdp.ConsumeBool() else 0    # CSRCs, extension, padding
        packet = bytes([0x80 | flags, 111]) + (BO_SEQ[0] & 0xFFFF).to_bytes(2, "big") \
            + fdp.ConsumeBytes(4).rjust(4, b"\0") + (5).to_bytes(4, "big") + fdp.ConsumeBytes(1500)
    else:
        packet = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 1500))
    parsed = rtp_payload(packet)
    assert parsed is None or (0 < len(parsed[2]) < len(packet) and (parsed[3] is None or 0 <= parsed[3] <= 127))
    if authentic:
        try:
            packet = STAGE_OUT.protect(packet)
        except SrtpError:       # libsrtp refuses to seal some malformed headers: sent as they are
            authentic = False
    dropped = sum(STAGE.drops.values())
    STAGE_NOW[0] += fdp.ConsumeIntInRange(0, 3) * FRAME_NS // 2
    # Bo speaks well all along, so the stage stays two voices: mixed, Ann's payloads decoded
    BO_SEQ[0] += 1
    bo = bytes([0x80, 111]) + (BO_SEQ[0] & 0xFFFF).to_bytes(2, "big") + (960 * BO_SEQ[0] & 0xFFFFFFFF).to_bytes(
        4, "big") + (9).to_bytes(4, "big") + BO_OPUS
    out = STAGE.on_packet("bo", BO_OUT.protect(bo), STAGE_NOW[0])
    out += STAGE.on_packet("ann", packet, STAGE_NOW[0])
    while STAGE.tick_ns <= STAGE_NOW[0]:
        out += STAGE.tick(STAGE_NOW[0])
    # what reaches the core is well-formed RTP, and a packet that was not
    # used was counted
    assert all(len(p) > 12 and p[0] == 0x80 and p[1] == 111 for _, p, _ in out), out
    assert parsed is not None or not authentic or sum(STAGE.drops.values()) > dropped or out == []


QUIC_CID = bytes(range(1, 9))
QUIC_SECRET = bytes(range(32))
QUIC_PEER = CryptoContext()      # aioquic's own packet protection: the peer's side, not under test
QUIC_PEER.setup(cipher_suite=CipherSuite.AES_128_GCM_SHA256, secret=QUIC_SECRET, version=1)
QUIC_OPENER = QuicOpener(0x1301, *derive_key_iv_hp(cipher_suite=CipherSuite.AES_128_GCM_SHA256,
                                                   secret=QUIC_SECRET, version=1), QUIC_CID)
QUIC_PN = [0]


def _quic_path() -> tuple[Core, QuicPath, int, socket.socket, socket.socket]:
    """A listener on the core's QUIC path whose ACKs come from QUIC_PEER:
    the core sends it audio on a loopback socket, and reads what it sends back."""
    core = Core(4, rooms=1, depth=64)
    core.room_open(0, True)
    node, peer = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    for sock in (node, peer):
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
    path = QuicPath(core)
    path.socket(node.fileno())
    slot = core.listener_add(0, b"", 1, 0, 0, pull=True)
    path.attach(slot, 1, to_sockaddr(peer.getsockname()), b"\x09" * 8, QUIC_CID, b"", 3, 0.025)
    key, iv, hp = derive_key_iv_hp(cipher_suite=CipherSuite.AES_128_GCM_SHA256, secret=QUIC_SECRET, version=1)
    path.keys(slot, 0x1301, bytes(16), bytes(12), bytes(16), 0, key, iv, hp, 0)
    path.resume(slot, 0)
    return core, path, slot, node, peer


QUIC_CORE, QUIC_PATH, QUIC_SLOT, QUIC_NODE, QUIC_LISTENER = _quic_path()


def quic(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():                    # anything at all
        what, *_ = QUIC_OPENER.open(fdp.ConsumeBytes(fdp.remaining_bytes()), QUIC_PN[0])
        assert what in ("not_ours", "forged", "other", "ack")
        return
    QUIC_PN[0] += fdp.ConsumeIntInRange(1, 300)
    pn_len = fdp.ConsumeIntInRange(1, 4)
    if fdp.ConsumeBool():
        # an ACK frame from fuzzed numbers (consistent or not), then anything
        ack = Buffer(capacity=2048)
        ack.push_uint8(fdp.ConsumeIntInRange(2, 3))
        for _ in range(4 + 2 * fdp.ConsumeIntInRange(0, 40)):
            ack.push_uint_var(fdp.ConsumeIntInRange(0, 1 << fdp.ConsumeIntInRange(0, 62)) & ((1 << 62) - 1))
        frames = ack.data + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
    else:
        frames = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 1200))
    header = bytes([0x40 | (pn_len - 1)]) + QUIC_CID + (QUIC_PN[0] % (1 << (8 * pn_len))).to_bytes(pn_len, "big")
    frames += bytes(max(0, 4 - pn_len))      # the sample needs 4 bytes past a short number
    packet = QUIC_PEER.encrypt_packet(header, frames, QUIC_PN[0])
    what, pn, largest, _delay, ranges = QUIC_OPENER.open(packet, QUIC_PN[0])
    assert what in ("ack", "other", "forged"), what    # authentic: never taken for another's
    if what == "ack" or ranges:
        # (an ACK beside other frames is read too)
        assert pn == QUIC_PN[0]
        # ranges run from the largest acknowledged down, never overlapping
        assert ranges[0][1] == largest and all(lo <= hi for lo, hi in ranges)
        assert all(a[0] > b[1] + 1 for a, b in zip(ranges, ranges[1:], strict=False))
    # the same packet through the node's whole receive path, with audio in
    # flight: the connection's accounting stays sane whatever the ACK says
    QUIC_CORE.feed(0, bytes([0x80, 111]) + QUIC_PN[0].to_bytes(8, "big")[-2:] + bytes(170), SRC)
    QUIC_CORE.flush(QUIC_NODE.fileno())
    QUIC_LISTENER.sendto(packet, QUIC_NODE.getsockname())
    up = QUIC_PATH.ingest(QUIC_NODE.fileno())
    assert len(up) <= 1 and (not up or what != "ack" or up[0][1] == QUIC_LISTENER.getsockname())
    st = QUIC_PATH.state(QUIC_SLOT)
    assert 2400 <= st["cwnd"] <= 76800 and 0 <= st["in_flight"] <= 64 * 1200, st
    assert st["acked"] + st["lost"] + st["late"] + st["lost_pending"] <= st["next_pn"], st
    while True:                                # what the core sent the listener
        try:
            QUIC_LISTENER.recv(2048)
        except BlockingIOError:
            break


TARGETS = {"control": control, "rtcp": rtcp, "token": token, "rtp": rtp, "stream": stream, "srtp": srtp,
           "stage": stage, "quic": quic}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv.pop(1)]
    os.environ.setdefault("PYTHONHASHSEED", "0")
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
