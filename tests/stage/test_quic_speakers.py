"""Stage sessions over QUIC: a speaker joins with a publish token on the
node's QUIC port (ALPN relay-listen/1) and sends plain RTP as QUIC
datagrams, which the connection encrypts and authenticates (no SRTP, no key
exchange). It is mixed beside a UDP speaker and hears the stage without
its own voice; a QUIC listener's datagrams reach nobody and are counted."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import opuslib

from relay.client.publish import RtpPacketizer, encode_tone
from relay.client.quic import QuicListenClient
from relay.client.speak import with_level
from relay.testing.loadgen import scrape
from tests.conftest import need, stop
from tests.listeners.conftest import quic_relay
from tests.stage.conftest import STAGE, speaker, token
from tests.stage.test_stage import finish, listener, pcm_of, shares

SECONDS = 5.0


def decode(packets: list[bytes]) -> np.ndarray:
    """RTP/Opus packets (in order) as mono PCM."""
    dec = opuslib.Decoder(48000, 2)
    pcm = b"".join(dec.decode(p[12:], 960) for p in packets)
    return np.frombuffer(pcm, dtype="<i2").astype(float)[::2]


async def speak_over_quic(server: str, cert: str, tok: str, hz: float) -> tuple[bool, list[bytes]]:
    """A QUIC speaker: its tone for SECONDS, and what it heard meanwhile."""
    heard: list[bytes] = []
    c = QuicListenClient(server, "stage", tok, sink=heard.append, cert_sha256=cert)
    c.speaker = True
    accept = await c.join()
    rtp = RtpPacketizer()
    start = time.monotonic()
    for k, f in enumerate(encode_tone(hz, SECONDS)):
        c.send_audio(with_level(rtp.packet(f), 20))
        await asyncio.sleep(max(0.0, start + (k + 1) * 0.02 - time.monotonic()))
    await c.aclose()
    return accept.speaker, heard


async def stray(server: str, cert: str) -> None:
    """A listener over QUIC that sends a tone on datagrams anyway."""
    c = QuicListenClient(server, "stage", token("stage", "listen"), cert_sha256=cert)
    await c.join()
    rtp = RtpPacketizer()
    for f in encode_tone(1000, 1.0):
        c.send_audio(rtp.packet(f))
        await asyncio.sleep(0.02)
    await c.aclose()


def test_a_quic_speaker_is_mixed_beside_a_udp_speaker_and_hears_only_it(tmp_path) -> None:
    need("ffmpeg")
    relay, server, cert = quic_relay(tmp_path, auth="jwt", extra_room=STAGE)
    room = tmp_path / "room.ogg"
    try:
        lis = listener(relay, SECONDS + 2, room)
        time.sleep(0.5)
        bo = speaker(relay, "bo", SECONDS)                         # 660 Hz over UDP

        async def both() -> tuple[bool, list[bytes]]:
            ann, _ = await asyncio.gather(speak_over_quic(server, cert, token("stage", speaker="ann", name="Ann"),
                                                          440.0),
                                          stray(server, cert))
            return ann
        on_stage, heard = asyncio.run(both())
        finish(bo, lis)
        assert on_stage, "the QUIC speaker's ACCEPT did not put it on the stage"
        # the room hears both speakers, and not the listener's datagrams
        mix = shares(pcm_of(room), (440.0, 660.0, 1000.0))
        assert mix[440.0] > 0.1 and mix[660.0] > 0.1 and mix[1000.0] < 0.05, mix
        # the QUIC speaker heard the stage without itself: the UDP speaker's tone
        assert len(heard) > 50 * (SECONDS - 2), len(heard)
        own = shares(decode(heard)[48000:], (440.0, 660.0))
        assert own[660.0] == 1.0 and own[440.0] < 0.05, own
        m = scrape(relay.admin)
        assert m["relay_quic_stray_datagrams_total"] >= 40
    finally:
        stop(relay.proc)
