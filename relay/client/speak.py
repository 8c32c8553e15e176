"""`relay publish --token`: a speaker on a room's stage.

The speaker joins like a listener (JOIN with the speaker flag and a publish
token, the cookie CHALLENGE, ACCEPT), over the node's listener port. The
ACCEPT carries an SRTP key; the speaker's audio goes out as SRTP
(AES_CM_128_HMAC_SHA1_80) on the same socket, so the node can tell its
packets from anyone else's, a spoofed source address included. Each packet
carries its audio level (RFC 6464, one-byte extension id 1), which is how
the node shows who is speaking without decoding a lone speaker. What comes
back on the session is the stage without this speaker's own voice, handled
like any listener's audio (NACKs, keepalives, the sink).
"""
from __future__ import annotations

import array
import asyncio
import itertools
import math
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from typing import Callable, Generator, Iterator

import opuslib
from pylibsrtp import Policy, Session as SrtpSession

from relay.client.listen import JoinRefused, ListenClient, ListenStats
from relay.client.publish import FRAME, PAYLOAD_TYPE, RATE, RtpPacketizer, tone_frames
from relay.wire.keyx import Keys, mac, speaker_keys
from relay.wire.protocol import (SILENT_LEVEL, Accept, Challenge, Join, Keepalive, Leave, MsgType, Reason,
                                 rfc6464_level)

LEVEL_EXT_ID = 1          # the node reads the audio level from this extension id


def audio_level(pcm: bytes) -> int:
    """RFC 6464 level of 16-bit PCM: -dBov of its RMS, 0 to 127 (silence)."""
    samples = array.array("h", pcm)[::8]      # every 8th sample is plenty for a level
    if not samples:
        return SILENT_LEVEL
    return rfc6464_level(math.sqrt(sum(s * s for s in samples) / len(samples)))


def with_level(packet: bytes, level: int, voice: bool = True) -> bytes:
    """`packet` (a 12-byte-header RTP packet) with an RFC 6464 level extension."""
    ext = struct.pack("!HHBBH", 0xBEDE, 1, (LEVEL_EXT_ID << 4) | 0, (0x80 if voice else 0) | level, 0)
    return bytes([packet[0] | 0x10]) + packet[1:12] + ext + packet[12:]


class SpeakerClient(ListenClient):
    """A speaker: `sink` gets the stage without this speaker (mix-minus)."""

    def __init__(self, server: str, room: str, token: str = "",
                 sink: Callable[[bytes], None] | None = None) -> None:
        super().__init__(server, room, token, sink)
        self.speaker = True
        self.sent = 0
        self._keys: Keys | None = None      # the exchange's, once the node has answered it
        self._counter = 0                   # our control messages' counter (it must grow)

    async def join(self, attempts: int = 5, timeout: float = 1.0) -> Accept:
        """The JOIN handshake, with its key exchange; a node that does not
        put us on a stage took us for a listener (it has no stages):
        refused, as `no_stage`."""
        self._keys = None
        accept = await super().join(attempts, timeout)
        if not accept.speaker or self._keys is None:
            raise JoinRefused(Reason.NO_STAGE)
        return accept

    def _join_message(self, challenge: Challenge | None) -> Join:
        """The first JOIN asks for the exchange; the second answers the
        node's public key with ours and the token sealed (keyx.py): nothing
        that would let an observer speak or end our session goes in clear."""
        if challenge is None:
            return Join(self.room, "", speaker=True, keyx=True)
        if not challenge.public:
            # a node without stages (or an old one) offers no exchange: our
            # token still does not go in clear; its refusal follows
            return Join(self.room, "", challenge.cookie, speaker=True, keyx=True)
        public, self._keys = speaker_keys(challenge.cookie, challenge.public)
        self._counter = 0
        return Join(self.room, "", challenge.cookie, speaker=True, keyx=True, public=public,
                    sealed=self._keys.seal(self.token))

    def _signed(self, kind: int) -> tuple[bytes, int, bytes]:
        assert self._session is not None and self._keys is not None
        self._counter += 1
        sid = self._session.session_id
        return sid, self._counter, mac(self._keys.control_key, kind, sid, self._counter)

    def _keepalive(self) -> Keepalive:
        return Keepalive(*self._signed(MsgType.KEEPALIVE))

    def _leave(self) -> Leave:
        return Leave(*self._signed(MsgType.LEAVE))

    def _srtp(self) -> SrtpSession:
        if self._session is None or self._keys is None:
            raise RuntimeError("not on a stage: no keys were agreed")
        return SrtpSession(Policy(key=self._keys.srtp_key, ssrc_type=Policy.SSRC_ANY_OUTBOUND,
                                  srtp_profile=Policy.SRTP_PROFILE_AES128_CM_SHA1_80))

    async def speak(self, frames: Iterator[bytes], duration: float | None, bitrate: int = 64000,
                    also: tuple["SpeakerClient", ...] = ()) -> int:
        """Encode and send PCM frames (20 ms, 48 kHz stereo) in real time as
        SRTP for `duration` seconds (forever if None), to this node and to
        the sessions in `also` (an origin pair's other origin): one encode,
        each copy sealed with its own session's key. Returns packets sent."""
        enc = opuslib.Encoder(RATE, 2, opuslib.APPLICATION_AUDIO)
        enc.bitrate = bitrate
        sessions = [(c, c._srtp()) for c in (self, *also)]
        rtp = RtpPacketizer()
        start = time.monotonic()
        n = 0
        while duration is None or n * FRAME / RATE < duration:
            pcm = next(frames)
            packet = with_level(rtp.packet(enc.encode(pcm, FRAME)), audio_level(pcm))
            for client, srtp in sessions:
                client._send(srtp.protect(packet))
            n += 1
            self.sent = n
            delay = start + n * FRAME / RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        return n


def file_frames(path: str) -> Iterator[bytes]:
    """20 ms frames (48 kHz stereo 16-bit PCM) of any file ffmpeg reads,
    decoded as they are needed; silence after its end. Raises
    FileNotFoundError without ffmpeg."""
    return _ffmpeg_frames(["-i", path], tail=True)


def mic_frames(device: str = "default") -> Iterator[bytes]:
    """20 ms frames from a microphone, captured by ffmpeg: an ALSA device
    ("default", "hw:1", "null" for silence), or "pulse:NAME" for a
    PulseAudio source. Raises MicError, naming the device and ffmpeg's
    reason, when it cannot be opened; FileNotFoundError without ffmpeg."""
    backend, name = ("pulse", device[6:] or "default") if device.startswith("pulse:") else ("alsa", device)
    frames = _ffmpeg_frames(["-f", backend, "-i", name], tail=False)
    try:
        first = next(frames)
    except StopIteration as e:
        raise MicError(f"--mic {device}: ffmpeg could not capture from {backend} device {name!r}: "
                       f"{e.value or 'no audio'}") from None
    return itertools.chain([first], frames)


class MicError(Exception):
    """The microphone could not be opened: one line naming it and why."""


def _ffmpeg_frames(source: list[str], tail: bool) -> Generator[bytes, None, str]:
    """What ffmpeg decodes from `source`, in 20 ms frames; with `tail`,
    silence after its end. A source that ends at once returns ffmpeg's
    last complaint (StopIteration's value)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise FileNotFoundError("ffmpeg is not installed: it decodes --file and captures --mic (apt install ffmpeg)")
    size = FRAME * 2 * 2
    # its complaints go to a file, not a pipe: a capture device's warnings
    # would fill a pipe nobody reads and stall the audio behind them
    errors = tempfile.TemporaryFile()
    proc = subprocess.Popen([ffmpeg, "-v", "error", "-nostdin", *source, "-f", "s16le", "-ac", "2",
                             "-ar", str(RATE), "-"], stdout=subprocess.PIPE, stderr=errors)
    assert proc.stdout is not None
    try:
        pcm = b""
        while True:
            pcm = proc.stdout.read(size)
            if len(pcm) < size:
                break
            yield pcm
        if pcm:
            yield pcm + bytes(size - len(pcm))
        elif not tail:
            proc.wait()
            errors.seek(0)
            said = errors.read().decode(errors="replace").strip().splitlines()
            return said[-1] if said else ""
        while tail:
            yield bytes(size)
        return ""
    finally:
        proc.kill()
        proc.wait()
        errors.close()


async def speak_tone(server: str, room: str, token: str, freq: float, duration: float | None,
                     sink: Callable[[bytes], None] | None = None, bitrate: int = 64000,
                     client: SpeakerClient | None = None, frames: Iterator[bytes] | None = None,
                     joined: Callable[[list[str]], None] | None = None, also: tuple[str, ...] = ()) -> ListenStats:
    """Join `room`'s stage at `server` (and at every node in `also`: the
    other origin of a stage pair), speak a tone (or `frames`, 20 ms of 48 kHz
    stereo PCM each) for `duration` seconds while hearing the others, then
    leave. `joined` is called with the nodes that took us. A node of `also`
    that refuses or does not answer is left out; `server` must take us.
    Returns what was heard at `server` (the mix-minus)."""
    client = client or SpeakerClient(server, room, token, sink)
    others = [SpeakerClient(node, room, token) for node in also]
    results = await asyncio.gather(client.join(), *(o.join() for o in others), return_exceptions=True)
    if isinstance(results[0], BaseException):
        for o in others:
            o.close()
        raise results[0]
    taken = tuple(o for o, r in zip(others, results[1:], strict=True) if not isinstance(r, BaseException))
    for o, r in zip(others, results[1:], strict=True):
        if isinstance(r, BaseException):
            o.close()
            print(f"relay: {o.server[0]}:{o.server[1]}: not speaking there: {r or type(r).__name__}",
                  file=sys.stderr)
    if joined is not None:
        joined([server] + [f"{o.server[0]}:{o.server[1]}" for o in taken])
    hearing = [asyncio.create_task(c.receive()) for c in (client, *taken)]
    try:
        await client.speak(frames if frames is not None else tone_frames(freq), duration, bitrate, also=taken)
    finally:
        for task in hearing:
            task.cancel()
        await asyncio.gather(*hearing, return_exceptions=True)
        for c in (client, *taken):
            c.close()
    return client.stats


__all__ = ["SpeakerClient", "speak_tone", "file_frames", "mic_frames", "MicError", "audio_level", "with_level",
           "PAYLOAD_TYPE"]
