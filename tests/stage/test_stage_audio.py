"""The stage's audio path in one process: a node on loopback, real speaker
and listener clients, and the mixer's parts on their own (levels, the
limiter, loss concealment)."""
from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys

import numpy as np
import opuslib
import pytest

from relay.client.listen import ListenClient
from relay.client.publish import encode_tone, tone_frames
from relay.client.speak import SpeakerClient, with_level
from relay.stage.mixer import CHANNELS, FRAME, LIMIT, Limiter, Voice, level_of
from relay.node import Node
from relay.wire.rtp import rtp_payload
from relay.testing.loadgen import free_port
from relay.wire.config import load


def node_config(port: int) -> str:
    return f"""
[node]
listen = "127.0.0.1:{port}"
admin = ""
auth = "open"
max_load = 0
max_machine_load = 0
[[room]]
name = "stage"
"""


def decode(packets: list[bytes]) -> np.ndarray:
    dec = opuslib.Decoder(48000, 1)
    return np.frombuffer(b"".join(dec.decode(p[12:], 5760) for p in packets), "<i2").astype(float)


def tone_residual(x: np.ndarray, hz: float = 440.0, win: int = 480, hop: int = 240) -> np.ndarray:
    """Per 10 ms window: the share of its energy that is not the tone (a
    click, a jump in phase). Codec noise alone keeps it near 1e-4."""
    t = np.arange(win) / 48000
    basis = np.stack([np.sin(2 * np.pi * hz * t), np.cos(2 * np.pi * hz * t), np.ones(win)], 1)
    out = []
    for i in range(0, len(x) - win, hop):
        seg = x[i:i + win]
        coef, *_ = np.linalg.lstsq(basis, seg, rcond=None)
        out.append(float(np.sum((seg - basis @ coef) ** 2) / (np.sum(seg ** 2) + 1e-9)))
    return np.array(out)


async def _switching(lookahead: int | None) -> tuple[list[bytes], Node]:
    """Ann speaks a tone for 4.5 s; Bo is on stage, live but silent, from
    1 s to 2.5 s: the room goes from Ann's own packets to the mix and back."""
    port = free_port()
    node = Node(load(node_config(port)))
    await node.start()
    if lookahead is not None:
        node.stages.worker.stages["stage"].mixer.lookahead = lookahead
    heard: list[bytes] = []
    lis = ListenClient(f"127.0.0.1:{port}", "stage", sink=heard.append)
    listening = asyncio.create_task(lis.listen(5.0))
    await asyncio.sleep(0.2)
    ann = SpeakerClient(f"127.0.0.1:{port}", "stage")
    await ann.join()
    speaking = asyncio.create_task(ann.speak(tone_frames(440.0), 4.5))
    await asyncio.sleep(1.0)
    bo = SpeakerClient(f"127.0.0.1:{port}", "stage")
    await bo.join()
    await bo.speak(tone_frames(660.0, amplitude=0.0), 1.5)
    bo.close()
    await speaking
    ann.close()
    await listening
    return heard, node


@pytest.mark.parametrize("aligned", [True, False])
def test_switching_to_the_mix_and_back_is_seamless(aligned: bool) -> None:
    heard, node = asyncio.run(_switching(None if aligned else 0))
    try:
        stage = node.stages.worker.stages["stage"]
        assert stage.switches >= 3 and stage.frames_mixed > 50, (stage.switches, stage.frames_mixed)
        # one stream: every sequence number, and timestamps a frame apart
        seqs = [struct.unpack_from("!H", p, 2)[0] for p in heard]
        stamps = [struct.unpack_from("!I", p, 4)[0] for p in heard]
        assert all((b - a) & 0xFFFF == 1 for a, b in zip(seqs, seqs[1:], strict=False))
        assert all((b - a) & 0xFFFFFFFF == FRAME for a, b in zip(stamps, stamps[1:], strict=False))
        assert len(heard) > 200
        # Ann's tone, and nothing else, from after her start to before her end
        worst = tone_residual(decode(heard))[100:-100].max()
        if aligned:
            assert worst < 0.002, worst
        else:
            # the control: a mix that ignores the encoder's lookahead jumps
            # back 312 samples at each switch, and the measure sees it
            assert worst > 0.01, worst
    finally:
        node.close()


def test_injected_and_spoofed_speaker_audio_is_dropped() -> None:
    """Only a speaker's own session may put audio on the stage: RTP from
    another address is refused, and RTP forged with the speaker's very
    address and port (a raw socket) fails SRTP's authentication."""
    if os.geteuid() != 0:
        pytest.skip("forging a source address needs a raw socket (root)")

    async def run() -> tuple[list[bytes], Node, tuple]:
        port = free_port()
        node = Node(load(node_config(port)))
        await node.start()
        heard: list[bytes] = []
        lis = ListenClient(f"127.0.0.1:{port}", "stage", sink=heard.append)
        listening = asyncio.create_task(lis.listen(3.0))
        ann = SpeakerClient(f"127.0.0.1:{port}", "stage")
        await ann.join()
        speaking = asyncio.create_task(ann.speak(tone_frames(440.0), 2.5))
        await asyncio.sleep(0.5)
        assert ann._transport is not None
        ann_addr = ann._transport.get_extra_info("sockname")
        loud = [with_level(struct.pack("!BBHII", 0x80, 111, 1000 + i, 960 * i, 0x1234) + p, 3)
                for i, p in enumerate(encode_tone(1000.0, 1.0))]
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        for pkt in loud:
            other.sendto(pkt, ("127.0.0.1", port))
            raw.sendto(_udp_ip(ann_addr, ("127.0.0.1", port), pkt), ("127.0.0.1", 0))
            await asyncio.sleep(0.02)
        other.close()
        raw.close()
        await speaking
        ann.close()
        await listening
        return heard, node, ann_addr

    heard, node, _ = asyncio.run(run())
    try:
        drops, gate = node.stages.drops(), node.udp.gate_counters()
        # the stranger's RTP never reaches the stage: the listener port's
        # gate drops what comes from an address without a session; the
        # forged copies from the speaker's own address fail SRTP's tag
        assert gate["not_session"] >= 50 and drops["foreign"] == 0 and drops["auth"] == 50, (drops, gate)
        at = _peaks(heard, (440, 1000))
        assert at[1000] < 0.01 * at[440], at
    finally:
        node.close()


def test_what_an_observer_sees_lets_it_neither_speak_nor_end_the_session() -> None:
    """Everything a speaker and the node say to each other is recorded, as
    someone watching the wire would. With it, and the speaker's own address
    forged (a raw socket), the observer tries every 30 bytes it saw as the
    SRTP key of a 1000 Hz tone, replays the speaker's KEEPALIVEs, and sends
    a LEAVE with the session id it read from the ACCEPT. None of it works:
    the listener hears only the speaker, who stays on the stage until it
    leaves itself; and the token never crossed the wire in clear."""
    if os.geteuid() != 0:
        pytest.skip("forging a source address needs a raw socket (root)")
    from pylibsrtp import Policy, Session as SrtpSession
    from relay.wire.protocol import Accept as AcceptMsg, Keepalive, Leave, decode as decode_msg, encode as encode_msg
    from relay.wire.tokens import mint
    secret = "observer-test-secret-0123456789abcdef"
    token = mint(secret, "stage", "publish", speaker="ann", name="Ann")
    seen: list[bytes] = []

    async def run() -> tuple[list[bytes], Node, bool, int]:
        port = free_port()
        text = node_config(port).replace('auth = "open"', 'auth = "jwt"\nsecret_env = "SECRET"\n'
                                         'keepalive_interval = 0.3')
        node = Node(load(text, environ={"SECRET": secret}))
        await node.start()
        heard: list[bytes] = []
        lis = ListenClient(f"127.0.0.1:{port}", "stage", token=mint(secret, "stage"), sink=heard.append)
        listening = asyncio.create_task(lis.listen(3.5))
        ann = SpeakerClient(f"127.0.0.1:{port}", "stage", token)
        send, datagram = ann._send, ann._datagram
        ann._send = lambda data: (seen.append(bytes(data)), send(data))[1]  # type: ignore[method-assign]
        ann._datagram = lambda data: (seen.append(bytes(data)), datagram(data))[1]  # type: ignore[method-assign]
        await ann.join()
        speaking = asyncio.create_task(ann.speak(tone_frames(440.0), 3.0))
        hearing = asyncio.create_task(ann.receive(3.0))
        await asyncio.sleep(1.2)                     # a keepalive or two have gone by
        assert ann._transport is not None
        ann_addr = ann._transport.get_extra_info("sockname")
        control = [d for d in seen if d[:1] == b"\x0b"]
        accept = next(m for m in map(decode_msg, control) if isinstance(m, AcceptMsg))
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        tone = encode_tone(1000.0, 1.0)
        candidates = {d[i:i + 30] for d in control for i in range(0, len(d) - 29)}
        for n, key in enumerate(sorted(candidates)):
            srtp = SrtpSession(Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND,
                                      srtp_profile=Policy.SRTP_PROFILE_AES128_CM_SHA1_80))
            pkt = with_level(struct.pack("!BBHII", 0x80, 111, 5000 + n, 960 * n, 0x1234) + tone[n % 50], 3)
            raw.sendto(_udp_ip(ann_addr, ("127.0.0.1", port), srtp.protect(pkt)), ("127.0.0.1", 0))
            if n % 20 == 19:
                await asyncio.sleep(0.01)
        for d in control:                                  # every KEEPALIVE it saw, again
            if isinstance(decode_msg(d), Keepalive):
                raw.sendto(_udp_ip(ann_addr, ("127.0.0.1", port), d), ("127.0.0.1", 0))
        raw.sendto(_udp_ip(ann_addr, ("127.0.0.1", port), encode_msg(Leave(accept.session_id))), ("127.0.0.1", 0))
        raw.close()
        await asyncio.sleep(0.5)
        still_on = ("127.0.0.1", ann_addr[1]) in node.sessions.table
        unsigned = node.sessions.counters.control_unsigned
        await speaking
        await hearing
        ann.close()
        await listening
        return heard, node, still_on, unsigned

    heard, node, still_on, unsigned = asyncio.run(run())
    try:
        assert not any(token.encode() in d or token.encode()[-43:] in d for d in seen)
        assert still_on and unsigned >= 3, (still_on, unsigned)     # 2+ replayed KEEPALIVEs, the LEAVE
        drops = node.stages.drops()
        assert drops["auth"] > 300, drops
        at = _peaks(heard, (440, 1000))
        assert at[1000] < 0.01 * at[440], at
    finally:
        node.close()


def _peaks(heard: list[bytes], tones: tuple[int, ...]) -> dict[int, float]:
    """Each tone's spectral peak in what a listener heard, past its first half second."""
    x = decode(heard)[24000:]
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    bins = np.fft.rfftfreq(len(x), 1 / 48000)
    return {hz: spectrum[(bins > hz - 8) & (bins < hz + 8)].max() for hz in tones}


def _udp_ip(src: tuple, dst: tuple, payload: bytes) -> bytes:
    """An IPv4 datagram from `src` to `dst` (the kernel fills in the
    header checksum; a UDP checksum of 0 means none, which IPv4 allows)."""
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    return ip + udp


# ---------------------------------------------------------------- the parts

def test_levels_follow_rfc_6464() -> None:
    assert level_of(np.zeros(1920, dtype=np.int32)) == 127
    full = (32767 * np.sin(np.arange(1920) / 7)).astype(np.int32)
    assert level_of(full) == 3          # a full-scale sine is -3 dBov
    assert level_of(full // 10) == 23
    assert rtp_payload(with_level(struct.pack("!BBHII", 0x80, 111, 1, 2, 3) + b"opus", 42)) == (1, 2, b"opus", 42)
    assert rtp_payload(struct.pack("!BBHII", 0x80, 111, 1, 2, 3) + b"opus") == (1, 2, b"opus", None)
    assert rtp_payload(b"\x90" + bytes(11)) is None      # an extension that is not there


def test_the_limiter_never_clips_sixteen_loud_voices() -> None:
    lim = Limiter()
    rng = np.random.default_rng(1)
    peaks = []
    for k in range(100):
        voices = [(20000 * np.sin(2 * np.pi * (200 + 50 * v) * (np.arange(FRAME) + k * FRAME) / 48000))
                  for v in range(16)]
        mix = np.repeat(np.sum(voices, axis=0), CHANNELS).astype(np.int32) + rng.integers(-5, 5, FRAME * CHANNELS)
        out = np.frombuffer(lim.apply(mix), "<i2")
        peaks.append(np.abs(out).max())
    assert lim.clipped == 0 and max(peaks) <= LIMIT + 1
    assert max(peaks) > 0.8 * LIMIT     # limited, not silenced
    # and a quiet mix passes untouched once the gain has recovered
    quiet = (1000 * np.sin(np.arange(FRAME * CHANNELS) / 5)).astype(np.int32)
    for _ in range(60):
        out = np.frombuffer(lim.apply(quiet), "<i2")
    assert np.array_equal(out, quiet.astype("<i2"))


def test_a_lost_packet_is_concealed_and_a_silent_voice_fades_to_nothing() -> None:
    packets = encode_tone(440.0, 0.4)      # 20 packets, stereo
    v = Voice("k", "ann", "Ann")
    for i, p in enumerate(packets):
        if i != 8:                         # one lost on the way
            v.put(i * FRAME, p)
    pcm = np.concatenate([v.audio(i * FRAME, FRAME) for i in range(1, 30)])
    frame_rms = [np.sqrt(np.mean(pcm[i * 2 * FRAME:(i + 1) * 2 * FRAME].astype(float) ** 2)) for i in range(29)]
    # the lost one from the next packet (its FEC, or concealment where it
    # carries none), the five after the last packet by concealment
    assert (v.recovered, v.concealed) == (1, 5)
    assert frame_rms[7] > 0.5 * frame_rms[5]         # the lost frame still sounds
    assert max(frame_rms[-5:]) == 0.0                # after the last packet: concealment, then silence
    assert v.put(2 * FRAME, packets[2]) is False and v.late == 1   # too late to be used


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_only_speakers_with_a_voice_in_the_mix_cost_an_encode() -> None:
    """Sixteen on stage, two talking: the room's encode and two mix-minus
    ones per frame; the other fourteen are sent the room's packet."""
    from relay.stage.mixer import Mixer
    voices = []
    for k, hz in enumerate((440.0, 660.0)):
        v = Voice(k, f"s{k}", f"S{k}")
        for i, p in enumerate(encode_tone(hz, 0.5)):
            v.put(i * FRAME, p)
        voices.append(v)
    mixer = Mixer()
    listeners = list(range(16))
    for n in range(1, 20):
        room, minus = mixer.frame(voices, listeners, n * FRAME, 0)
        assert all(minus[k] is room for k in range(2, 16)) and minus[0] is not room and minus[1] is not room
    assert mixer.encodes == 19 * 3
    # one that starts talking gets an encoder of its own, fed the room's last
    # frames first; one that stops goes back to the room's packet
    assert set(mixer.minus) == {0, 1}
    mixer.frame(voices[:1], listeners, 20 * FRAME, 0)
    assert set(mixer.minus) == {0}


def test_a_speaker_who_has_not_spoken_yet_moves_no_clock() -> None:
    """On stage but silent: the stage has no clock yet (its first packet sets
    it), so its worker neither counts the machine's uptime as skipped ticks
    nor moves the timeline (it counted 1,058,769 after one 2 s speaker)."""
    async def run() -> tuple[int, int]:
        port = free_port()
        node = Node(load(node_config(port)))
        await node.start()
        try:
            quiet = SpeakerClient(f"127.0.0.1:{port}", "stage")
            await quiet.join()
            await asyncio.sleep(0.3)
            st = node.stages.worker.stages["stage"]
            quiet.close()
            return node.stages.worker.skipped_ticks, st.next_t
        finally:
            node.close()
    skipped, next_t = asyncio.run(run())
    assert skipped == 0 and next_t == 0, (skipped, next_t)

