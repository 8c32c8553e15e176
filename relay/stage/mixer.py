"""A stage's audio, sans-IO: each speaker's Opus packets decoded in timeline
order, summed, limited and encoded once per 20 ms frame, and once more for
every speaker without that speaker's own voice (mix-minus).

A *timeline* is a stage's sample clock (48 kHz). Each speaker's RTP
timestamps are mapped onto it with an offset chosen when the speaker's
first packet arrives (stage.py), so a packet's *position* says which output
frame its audio belongs to. A Voice keeps a few packets by position (the
jitter buffer) and decodes them in order, filling a lost packet from the
next one's in-band FEC when it carries some, else with Opus's packet-loss
concealment for a few frames, then with silence.

Opus's encoder delays its input by its lookahead (312 samples at 48 kHz).
The mixer feeds it that far ahead, so the frame it emits for timeline
[T, T+960) decodes to the mix of exactly [T, T+960): the mixed stream lines
up sample for sample with a speaker's packets passed through unchanged,
and a room can switch between the two without a jump in its audio. The
price is that the mix of frame T needs the packets up to T+960+312: one
frame more of buffering than passing a packet through.

Nothing here touches a socket, a clock or a thread; opuslib's calls are
ctypes calls, which release the GIL while libopus works.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import opuslib

from relay.wire.protocol import SILENT_LEVEL, rfc6464_level

RATE = 48000
CHANNELS = 2
FRAME = 960              # samples per channel in a 20 ms frame
MAX_DECODE = 5760        # the longest Opus packet: 120 ms
HISTORY_FRAMES = 8       # packets a voice keeps behind its playout point
PRIME_FRAMES = 4         # frames encoded (and dropped) before a mix's first, so it continues what was heard
CONCEAL_FRAMES = 5       # frames of concealment before a missing voice is silence
SILENT = SILENT_LEVEL
LIMIT = 0.89 * 32767     # the limiter's ceiling (-1 dBFS)
RELEASE_PER_FRAME = 0.02  # the limiter's gain recovers this much per 20 ms frame
MIX_BITRATE = 64000
SPEAKING = 50            # a voice at least this loud (RFC 6464 level, -dBov) is speaking


def level_of(pcm: np.ndarray) -> int:
    """The RFC 6464 level of 16-bit samples: -dBov of their RMS, 0 (full
    scale) to 127 (silence)."""
    if not len(pcm):
        return SILENT
    return rfc6464_level(math.sqrt(float(np.mean(np.square(pcm, dtype=np.float64)))))


def new_encoder(bitrate: int = MIX_BITRATE) -> opuslib.Encoder:
    """The encoder of a mix: 48 kHz stereo, like the speakers we pass through."""
    enc = opuslib.Encoder(RATE, CHANNELS, opuslib.APPLICATION_AUDIO)
    enc.bitrate = bitrate
    return enc


class Limiter:
    """Keeps a sum of voices under the ceiling without clipping it: the gain
    drops at once to what the loudest sample of a frame needs, ramped over
    the frame's first millisecond from where it was (the ramp's samples
    are checked too), and recovers slowly. Anything still above full scale
    is counted; it should stay 0."""

    RAMP = 48   # 1 ms

    def __init__(self) -> None:
        self.gain = 1.0
        self.clipped = 0

    def apply(self, mix: np.ndarray) -> bytes:
        """16-bit PCM bytes of `mix` (int32 samples, interleaved)."""
        peak = float(np.max(np.abs(mix))) if len(mix) else 0.0
        target = min(1.0, LIMIT / peak) if peak > 0 else 1.0
        new = min(target, self.gain + RELEASE_PER_FRAME)
        if new == 1.0 and self.gain == 1.0:
            out = mix
        else:
            gains = np.full(len(mix) // CHANNELS, new, dtype=np.float64)
            ramp = min(self.RAMP, len(gains))
            # falling: never above the new gain where that would pass the
            # ceiling; rising: a smooth ramp up
            gains[:ramp] = np.minimum(np.linspace(self.gain, new, ramp), max(new, target)) if new < self.gain \
                else np.linspace(self.gain, new, ramp)
            out = mix * np.repeat(gains, CHANNELS)
        self.gain = new
        over = np.abs(out) > 32767
        if over.any():
            self.clipped += int(over.sum())
        return np.clip(out, -32768, 32767).astype("<i2").tobytes()


class Voice:
    """One speaker's audio on its way into the mix."""

    def __init__(self, key: object, speaker_id: str, name: str) -> None:
        self.key, self.id, self.name = key, speaker_id, name
        self.decoder = opuslib.Decoder(RATE, CHANNELS)
        self.packets: dict[int, bytes] = {}     # position -> Opus payload
        self.offset: int | None = None           # position = extended timestamp + offset
        self._ext: int | None = None             # last extended RTP timestamp
        self.pcm = np.zeros(0, dtype=np.int32)   # decoded, interleaved, from dec_at on
        self.dec_at = self.dec_end = 0
        self._decoding = False
        self.missing = 0
        self.level = SILENT
        self.heard_ns = 0                        # when its last packet arrived
        self.spoke_ns = 0                        # when its level last said it was speaking
        self.late = self.concealed = self.recovered = 0
        self.extra = 0                           # frames it is held beyond the margin, for its jitter
        self.muted = False                       # a host muted it: its packets are dropped until unmuted

    def extend(self, ts: int) -> int:
        """The 32-bit RTP timestamp `ts`, unwrapped."""
        if self._ext is None:
            self._ext = ts
        else:
            self._ext += ((ts - self._ext + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        return self._ext

    def put(self, position: int, payload: bytes) -> bool:
        """Keep a packet for its position; False (counted) if its audio was
        already decoded, or concealed, without it."""
        if self._decoding and position < self.dec_end:
            self.late += 1
            return False
        self.packets[position] = payload
        if len(self.packets) > 4 * HISTORY_FRAMES:   # passed through undecoded: keep only recent ones
            for old in [p for p in self.packets if p < position - 2 * HISTORY_FRAMES * FRAME]:
                del self.packets[old]
        return True

    def rewind(self) -> None:
        """Start decoding afresh at the next audio() (after the voice was
        passed through undecoded, or its numbering was moved)."""
        self._decoding = False

    def audio(self, start: int, n: int) -> np.ndarray:
        """Its samples for timeline [start, start+n), decoding as needed."""
        if not self._decoding or start < self.dec_at or start > self.dec_end + HISTORY_FRAMES * FRAME:
            self._decoding = True
            # from a packet boundary at least one packet before, so the
            # decoder's overlap is warm by `start`
            phase = next(iter(self.packets)) % FRAME if self.packets else 0
            self.dec_at = self.dec_end = start - FRAME - (start - FRAME - phase) % FRAME
            self.pcm = np.zeros(0, dtype=np.int32)
            self.missing = CONCEAL_FRAMES  # before the first packet: silence, not concealment
        chunks = [self.pcm]
        while self.dec_end < start + n:
            chunks.append(self._decode_next())
        pcm = np.concatenate(chunks)
        skip = (start - self.dec_at) * CHANNELS
        self.pcm, self.dec_at = pcm[skip:], start
        for old in [p for p in self.packets if p < start - HISTORY_FRAMES * FRAME]:
            del self.packets[old]
        return self.pcm[:n * CHANNELS]

    def _decode_next(self) -> np.ndarray:
        at = self.dec_end
        pkt = self.packets.get(at)
        try:
            if pkt is not None:
                out = self.decoder.decode(pkt, MAX_DECODE)
                self.missing = 0
            elif self.missing < CONCEAL_FRAMES and at + FRAME in self.packets:
                out = self.decoder.decode(self.packets[at + FRAME], FRAME, decode_fec=True)
                self.missing += 1
                self.recovered += 1
            elif self.missing < CONCEAL_FRAMES:
                out = self.decoder.decode(b"", FRAME)
                self.missing += 1
                self.concealed += 1
            else:
                out = bytes(FRAME * CHANNELS * 2)
        except opuslib.OpusError:
            out = bytes(FRAME * CHANNELS * 2)   # a packet libopus refuses: silence for its frame
        samples = np.frombuffer(out, dtype="<i2").astype(np.int32)
        self.dec_end += len(samples) // CHANNELS
        return samples


class Mixer:
    """One stage's encoders: the room's mix, and a mix-minus per speaker.

    A speaker who is not sending, or sends digital silence, adds nothing to
    the mix, so what it should hear is the room's packet itself: only talking speakers cost an encode
    of their own. When one starts talking its encoder is made and first run
    over the last frames of the room's mix, which is what its decoder has
    been fed, so its own stream continues the room's without a click."""

    def __init__(self, bitrate: int = MIX_BITRATE) -> None:
        self.bitrate = bitrate
        self.room = new_encoder(bitrate)
        self.room_limiter = Limiter()
        self.lookahead = int(self.room.lookahead)
        self.minus: dict[object, tuple[opuslib.Encoder, Limiter]] = {}
        self._recent: deque[bytes] = deque(maxlen=PRIME_FRAMES)   # the room encoder's last inputs
        self.encodes = 0            # encodes of mixed frames (the room's, and talking speakers')

    def frame(self, voices: list[Voice], listeners: list[object], start: int,
              now_ns: int) -> tuple[bytes, dict[object, bytes]]:
        """Encode timeline frame [start, start+FRAME): the room's packet, and
        for each key of `listeners` (speakers who hear the stage) the packet
        of the mix without their own voice. Updates the voices' levels."""
        a = start + self.lookahead
        parts = {}
        for v in voices:
            pcm = v.audio(a, FRAME)
            parts[v.key] = pcm
            v.level = level_of(pcm)
            if v.level < SPEAKING:
                v.spoke_ns = now_ns
        total = np.zeros(FRAME * CHANNELS, dtype=np.int32)
        for pcm in parts.values():
            total = total + pcm
        pcm_room = self.room_limiter.apply(total)
        room = self.room.encode(pcm_room, FRAME)
        self.encodes += 1
        minus = {}
        for key in listeners:
            own = parts.get(key)
            if own is None or not own.any():   # nothing of its own in the mix: it hears the room
                self.minus.pop(key, None)
                minus[key] = room
                continue
            if key not in self.minus:
                enc = new_encoder(self.bitrate)
                for heard in self._recent:
                    enc.encode(heard, FRAME)
                self.minus[key] = (enc, Limiter())
            enc, lim = self.minus[key]
            minus[key] = enc.encode(lim.apply(total - own), FRAME)
            self.encodes += 1
        self._recent.append(pcm_room)
        return room, minus

    def prime(self, voices: list[Voice], listeners: list[object], start: int, now_ns: int) -> None:
        """Before a mix's first frame at `start`: run the encoders over the
        frames just before it, and drop what they make. Listeners' decoders
        were fed a speaker's own encoder until now; an encoder that has seen
        the same audio predicts the next frame's energies and pitch as those
        decoders expect, so the mix continues without a click."""
        self._recent.clear()
        counted = self.encodes
        for k in range(PRIME_FRAMES, 0, -1):
            self.frame(voices, listeners, start - k * FRAME, now_ns)
        self.encodes = counted      # `encodes` counts the frames mixed, not the priming

    def forget(self, key: object) -> None:
        """A speaker left: its mix-minus encoder goes."""
        self.minus.pop(key, None)

    @property
    def clipped(self) -> int:
        """Samples the limiters let pass full scale (should be 0)."""
        return self.room_limiter.clipped + sum(lim.clipped for _, lim in self.minus.values())
