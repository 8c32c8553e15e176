"""A room's stage: the speakers who publish into it, and what the room hears.

Speakers join a stage room like listeners, with a publish token
(sessions.py), and send SRTP with the key their ACCEPT gave them from the
address they joined from. Each speaker also listens, in a room of its own
in the core (its *mix-minus room*), to the stage without its own voice. A
room with an ingest port and max_speakers also puts its static publishers
on the stage, a voice per source address.

What the room hears depends on who is live (sent audio in the last second):
- nobody: nothing;
- one speaker: that speaker's packets, passed through as they arrive,
  renumbered into the stage's own stream (no decode, no re-encode);
- two or more: the mix (mixer.py), one packet per 20 ms frame.
Every output (the room, each mix-minus room) has one SSRC and continuous
sequence numbers and timestamps across those modes, and each frame of the
timeline goes out once: a switch to the mix starts at the first frame the
speaker's own packets did not already carry, and the mixer's lookahead
compensation makes its audio continue where theirs stopped.

Everything in a Stage runs on the StageWorker's thread, off the event loop:
SRTP, jitter buffers, decoding, mixing and encoding. The loop hands it
packets and joins; it hands the loop finished RTP packets for the core.
"""
from __future__ import annotations

import logging
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Hashable

from pylibsrtp import Error as SrtpError, Policy, Session as SrtpSession

from relay.stage.mixer import FRAME, SILENT, SPEAKING, Mixer, Voice
from relay.wire.rtp import has_bye, rtp_payload
from relay.wire.protocol import Speaker

log = logging.getLogger("relay.stage")

LIVE_NS = 1_000_000_000      # a speaker who sent audio this recently is live
ACTIVE_NS = 300_000_000      # and one loud enough this recently is speaking
MAX_EXTRA_FRAMES = 5         # a jittery speaker is held up to this many frames longer (100 ms)
RECOVER_NS = 5_000_000_000   # and goes back a frame after its packets have all been that much early this long
GONE_NS = 5_000_000_000      # a static publisher (no session to end) silent this long leaves the stage
MARGIN_NS = 3_000_000        # a packet is due this long before the tick that first needs it
FRAME_NS = 20_000_000
PAYLOAD_TYPE = 111
# a speaker's audio the stage drops, by reason (relay_stage_drops_total)
STAGE_DROPS = ("foreign", "auth", "replay", "malformed", "late", "full", "rate", "muted")
# what one voice may send: a 10 ms Opus stream is 100 packets a second, and
# Opus tops out at 510 kbit/s. A voice past either is clipped to it, counted
# ("rate"): a lone speaker is passed through to every listener, and a flood
# from one would be multiplied by all of them
VOICE_MAX_PPS = 100.0
VOICE_MAX_BPS = 600_000.0
Output = tuple[int, bytes, Hashable]  # (core room, RTP packet, the speaker whose mix-minus room it is, or None)


@dataclass
class Stream:
    """A core room the stage feeds: one SSRC-less stream (the core sets each
    listener's SSRC) with its own continuous numbering."""
    index: int
    seq: int
    ts_base: int
    emitted: int | None = None   # the last timeline position sent

    def packet(self, position: int, payload: bytes) -> bytes | None:
        """The RTP packet carrying timeline frame `position`, unless that
        frame (or a later one) already went out."""
        if self.emitted is not None and position <= self.emitted:
            return None
        self.emitted = position
        self.seq = (self.seq + 1) & 0xFFFF
        return struct.pack("!BBHII", 0x80, PAYLOAD_TYPE, self.seq, (self.ts_base + position) & 0xFFFFFFFF,
                           0) + payload


@dataclass
class Stage:
    """One stage room's audio state (owned by the worker thread)."""
    name: str
    index: int
    rng_bytes: Callable[[int], bytes]
    voices: dict[Hashable, Voice] = field(default_factory=dict)
    minus: dict[Hashable, Stream] = field(default_factory=dict)
    srtp: dict[Hashable, SrtpSession | None] = field(default_factory=dict)   # None: sealed by its transport
    mode: str = "idle"           # "idle", "pass" or "mix"
    solo: Hashable = None
    next_t: int = 0              # the timeline position of the next tick's frame
    tick_ns: int = 0             # when the next tick runs
    drops: Counter = field(default_factory=Counter)
    frames_mixed: int = 0
    switches: int = 0
    busy_ns: int = 0             # worker time spent on this stage
    snapshot: tuple = ()         # (Speaker, ...) for the loop thread to read
    limit: int = 0               # voices at most, speakers and static publishers together (0: no bound)
    ingest_voices: int = 0       # of the voices, static publishers (the loop thread reads it)
    buckets: dict[Hashable, "Bucket"] = field(default_factory=dict)
    drifted_back: int = 0        # frames voices were moved back earlier after their paths recovered
    _early_since: dict[Hashable, int] = field(default_factory=dict)   # voice -> early on every packet since

    def __post_init__(self) -> None:
        self.room = self._output(self.index)
        self.mixer = Mixer()

    def _output(self, index: int) -> Stream:
        r = self.rng_bytes(6)
        return Stream(index, int.from_bytes(r[:2], "big"), int.from_bytes(r[2:], "big"))

    # ----------------------------------------------------------- membership

    def add(self, key: Hashable, speaker_id: str, name: str, srtp_key: bytes, minus_index: int) -> None:
        """A speaker joined: its voice, its SRTP context, its mix-minus room.
        Without `srtp_key` its transport already authenticates and encrypts
        its packets (a QUIC or WebTransport session): they come in plain."""
        self.voices[key] = Voice(key, speaker_id, name)
        self.srtp[key] = SrtpSession(Policy(key=srtp_key, ssrc_type=Policy.SSRC_ANY_INBOUND,
                                            srtp_profile=Policy.SRTP_PROFILE_AES128_CM_SHA1_80)) if srtp_key else None
        self.minus[key] = self._output(minus_index)

    def remove(self, key: Hashable, now_ns: int) -> list[Output]:
        """A speaker left: the room goes on without it at once."""
        if key in self.voices and key not in self.srtp:
            self.ingest_voices -= 1
        self.buckets.pop(key, None)
        self._early_since.pop(key, None)
        self.voices.pop(key, None)
        self.srtp.pop(key, None)
        self.minus.pop(key, None)
        self.mixer.forget(key)
        out = self._choose_mode(now_ns)
        self._snapshot(now_ns)
        return out

    # --------------------------------------------------------------- packets

    def on_packet(self, key: Hashable, datagram: bytes, now_ns: int) -> list[Output]:
        """One SRTP datagram from a speaker's address, or one RTP datagram
        from a speaker's QUIC or WebTransport session."""
        voice = self.voices.get(key)
        if voice is None or key not in self.srtp:
            self.drops["foreign"] += 1
            return []
        srtp = self.srtp[key]
        if srtp is None:
            return self._on_rtp(key, voice, datagram, now_ns)
        try:
            plain = srtp.unprotect(datagram)
        except SrtpError as e:
            self.drops["replay" if "replay" in str(e) else "auth"] += 1
            return []
        except ValueError:   # longer than libsrtp handles: no voice's packet is
            self.drops["malformed"] += 1
            return []
        return self._on_rtp(key, voice, plain, now_ns)

    def on_ingest(self, key: Hashable, packet: bytes, now_ns: int) -> list[Output]:
        """A datagram from one of the room's static publishers (its ingest
        port; the source was checked, SRTP opened): a voice of its own,
        made on its first packet and gone after its BYE or a silence."""
        if len(packet) >= 2 and 72 <= packet[1] & 0x7F <= 76:
            # RTCP: a BYE takes the publisher off the stage at once
            return self.remove(key, now_ns) if has_bye(packet) and key in self.voices else []
        voice = self.voices.get(key)
        if voice is None:
            if self.limit and len(self.voices) >= self.limit:
                # the stage is full: a static publisher counts as a speaker,
                # and every new source port would otherwise be a new voice
                self.drops["full"] += 1
                return []
            where = f"{key[1]}:{key[2]}" if isinstance(key, tuple) and len(key) == 3 else str(key)
            voice = self.voices[key] = Voice(key, f"ingest-{where}", f"publisher {where}")
            self.ingest_voices += 1
        return self._on_rtp(key, voice, packet, now_ns)

    def mute(self, speaker_id: str, muted: bool, now_ns: int) -> list[Output]:
        """A host muted (or unmuted) a speaker: its packets stop reaching
        the mix at once, and the room goes on without it."""
        for v in self.voices.values():
            if v.id == speaker_id:
                v.muted = muted
                if muted:
                    v.heard_ns = 0          # not live: the mode is chosen without it now
                    v.packets.clear()
        self._snapshot(now_ns)
        return self._choose_mode(now_ns)

    def _on_rtp(self, key: Hashable, voice: Voice, plain: bytes, now_ns: int) -> list[Output]:
        if voice.muted:
            self.drops["muted"] += 1
            return []
        parsed = rtp_payload(plain)
        if parsed is None:
            self.drops["malformed"] += 1
            return []
        _seq, ts, payload, level = parsed
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = Bucket(now_ns)
        if not bucket.take(len(plain), now_ns):
            self.drops["rate"] += 1
            return []
        if self.mode == "idle":
            # the first live voice sets the clock, and the timeline resumes
            # past anything already sent
            self.tick_ns = now_ns + MARGIN_NS
            if self.room.emitted is not None and self.room.emitted >= self.next_t:
                self._shift(self.room.emitted + FRAME - self.next_t)
        ext = voice.extend(ts)
        self._place(voice, ext, now_ns)
        voice.heard_ns = now_ns
        if level is not None:
            voice.level = level
            if level < SPEAKING:
                voice.spoke_ns = now_ns
        elif self.mode != "mix" and len(payload) > 10:   # no level sent: a non-DTX packet is speech
            voice.spoke_ns = now_ns
        assert voice.offset is not None
        position = ext + voice.offset
        if not voice.put(position, payload):
            self.drops["late"] += 1
            self._early_since.pop(key, None)
            if voice.extra < MAX_EXTRA_FRAMES:
                # its path jitters more than the margin: hold it a frame
                # longer from now on (one concealed frame now, none after)
                voice.extra += 1
                voice.offset += FRAME
                voice.packets = {p + FRAME: pkt for p, pkt in voice.packets.items()}
                voice.put(position + FRAME, payload)
        elif voice.extra and self.mode == "mix":
            self._drift_back(key, voice, position, now_ns)
        if self.mode == "idle" or (self.mode == "pass" and key != self.solo):
            out = self._choose_mode(now_ns)
        else:
            out = []
        if self.mode == "pass" and key == self.solo:
            out += self._pass(key, position, payload)
            self._follow(position, now_ns)
        return out

    def _drift_back(self, key: Hashable, voice: Voice, position: int, now_ns: int) -> None:
        """A voice held frames longer after late packets goes back one frame
        once its path has recovered: every packet for RECOVER_NS arrived a
        frame and the margin earlier than it had to. The frame is dropped
        while the voice is quiet, where the restarted decoder is not heard,
        so its speech does not stay up to 100 ms behind the others for good."""
        due = self.tick_ns + (position - FRAME - self.next_t) // FRAME * FRAME_NS
        if due - now_ns < FRAME_NS + MARGIN_NS:
            self._early_since.pop(key, None)
            return
        since = self._early_since.setdefault(key, now_ns)
        if now_ns - since < RECOVER_NS or voice.level < SPEAKING:
            return
        assert voice.offset is not None       # placed: it has sent a packet
        voice.extra -= 1
        voice.offset -= FRAME
        voice.packets = {p - FRAME: pkt for p, pkt in voice.packets.items()}
        voice.rewind()
        self.drifted_back += 1
        self._early_since[key] = now_ns

    def _follow(self, position: int, now_ns: int) -> None:
        """While one speaker is passed through, nothing is mixed, so the
        ticks can move for free: keep them late enough that its packet for
        a frame arrives MARGIN_NS before the tick that would first need it
        in a mix. Its path's jitter is then absorbed before a mix begins,
        not by concealing a frame of it when one does."""
        due = self.tick_ns + (position - FRAME - self.next_t) // FRAME * FRAME_NS
        if now_ns + MARGIN_NS > due:
            self.tick_ns += now_ns + MARGIN_NS - due

    def _slot(self, now_ns: int) -> int:
        """The frame of the first tick at least MARGIN_NS from now."""
        ahead = max(0, -(-(now_ns + MARGIN_NS - self.tick_ns) // FRAME_NS))
        return self.next_t + ahead * FRAME

    def _place(self, voice: Voice, ext: int, now_ns: int) -> None:
        """Map a speaker's timestamps onto the timeline: its packet is due one
        frame after the next tick (the mixer's lookahead needs it then).
        When its clock or its path has moved it more than three frames from
        there, it is placed afresh; a solo speaker instead takes the
        timeline with it, so what it passes through stays continuous."""
        target = self._slot(now_ns) + FRAME * (1 + voice.extra)
        if voice.offset is None:
            voice.offset = target - ext
            return
        lead = ext + voice.offset - target
        if abs(lead) <= 3 * FRAME:
            return
        if self.mode == "pass" and voice.key == self.solo:
            self._shift(lead)
        else:
            voice.offset -= lead
            voice.packets.clear()
            voice.rewind()

    def _pass(self, key: Hashable, position: int, payload: bytes) -> list[Output]:
        """A solo speaker's packet, as it is, to the room and to every other
        speaker's mix-minus room."""
        out: list[Output] = []
        pkt = self.room.packet(position, payload)
        if pkt is not None:
            out.append((self.room.index, pkt, None))
        for other, o in self.minus.items():
            if other != key:
                pkt = o.packet(position, payload)
                if pkt is not None:
                    out.append((o.index, pkt, other))
        return out

    # ------------------------------------------------------------------ ticks

    def tick(self, now_ns: int) -> list[Output]:
        """Timeline frame next_t is due: choose the mode, and mix it if two
        or more speakers are live."""
        out: list[Output] = []
        for key in [k for k, v in self.voices.items() if k not in self.srtp and now_ns - v.heard_ns > GONE_NS]:
            out += self.remove(key, now_ns)     # a static publisher silent this long has gone
        out += self._choose_mode(now_ns)
        if self.mode == "mix":
            live = [v for v in self.voices.values() if now_ns - v.heard_ns < LIVE_NS]
            room, minus = self.mixer.frame(live, list(self.minus), self.next_t, now_ns)
            self.frames_mixed += 1
            pkt = self.room.packet(self.next_t, room)
            if pkt is not None:
                out.append((self.room.index, pkt, None))
            for key, payload in minus.items():
                pkt = self.minus[key].packet(self.next_t, payload)
                if pkt is not None:
                    out.append((self.minus[key].index, pkt, key))
        self.next_t += FRAME
        self.tick_ns += FRAME_NS
        self._snapshot(now_ns)
        return out

    def _choose_mode(self, now_ns: int) -> list[Output]:
        live = [k for k, v in self.voices.items() if v.heard_ns and now_ns - v.heard_ns < LIVE_NS]
        mode = "idle" if not live else "pass" if len(live) == 1 else "mix"
        out: list[Output] = []
        if mode == self.mode and (mode != "pass" or self.solo == live[0]):
            return out
        self.switches += 1
        if mode == "pass":
            solo = self.voices[live[0]]
            # what the mix had not sent yet of the solo speaker's packets goes now
            for position in sorted(p for p in solo.packets if self.room.emitted is None or p > self.room.emitted):
                out += self._pass(solo.key, position, solo.packets[position])
            self.solo = solo.key
        elif mode == "mix":
            for v in self.voices.values():
                v.rewind()
            # the timeline catches up with what the solo speaker's packets
            # already carried, so the mix goes on right after them
            if self.room.emitted is not None and self.room.emitted >= self.next_t + 2 * FRAME:
                self._shift(self.room.emitted - FRAME - self.next_t)
            self.mixer.prime([self.voices[k] for k in live], list(self.minus), self.next_t, now_ns)
            self.solo = None
        self.mode = mode
        return out

    def _shift(self, d: int) -> None:
        """Move the timeline on by `d` samples; the voices' packets move with it."""
        self.next_t += d
        for v in self.voices.values():
            if v.offset is not None and v.key != self.solo:
                v.offset += d
                v.packets = {p + d: pkt for p, pkt in v.packets.items()}

    def _snapshot(self, now_ns: int) -> None:
        self.snapshot = tuple(
            Speaker(v.id, v.name, v.level if now_ns - v.heard_ns < LIVE_NS and not v.muted else SILENT,
                    now_ns - v.spoke_ns < ACTIVE_NS and not v.muted, v.muted)
            for v in sorted(self.voices.values(), key=lambda v: (v.level, v.id)))


@dataclass
class Bucket:
    """Token buckets a second deep for one voice's packets and bytes: a
    jitter burst passes, a flood is cut to VOICE_MAX_PPS and VOICE_MAX_BPS."""
    at_ns: int
    packets: float = VOICE_MAX_PPS
    bits: float = VOICE_MAX_BPS

    def take(self, size: int, now_ns: int) -> bool:
        """Whether a packet of `size` bytes may pass now."""
        dt = max(0, now_ns - self.at_ns) / 1e9
        self.at_ns = now_ns
        self.packets = min(VOICE_MAX_PPS, self.packets + dt * VOICE_MAX_PPS)
        self.bits = min(VOICE_MAX_BPS, self.bits + dt * VOICE_MAX_BPS)
        if self.packets < 1 or self.bits < 8 * size:
            return False
        self.packets -= 1
        self.bits -= 8 * size
        return True
