"""The event loop's side of the node's stages: who is on which stage, the
core rooms their mix-minus streams go to, and the hand-over to and from
the StageWorker thread (worker.py), which does the audio.

Each speaker takes one of the node's `speaker_slots` core rooms for the
stage without its own voice; its session listens there like any listener
(rings, NACKs, keepalives). Every RTP packet the worker finishes comes back
here and is fed to the core on the loop thread, the only thread that
writes a room's history, as an ingest datagram from STAGE_SOURCE.
"""
from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Hashable

from relay._core import Core
from relay.stage.stage import STAGE_DROPS, Output, Stage
from relay.stage.worker import StageWorker
from relay.wire.addr import to_sockaddr
from relay.wire.config import RoomConfig
from relay.wire.protocol import Reason, Speakers, encode

# the source address the stage's packets are fed to the core from: no
# socket delivers it, and a stage room has no ingest socket anyway
STAGE_SOURCE = to_sockaddr(("0.0.0.0", 0), socket.AF_INET)
SPEAKERS_EVERY_S = 1.0      # how often a stage tells its room who is speaking


@dataclass
class Member:
    """A speaker on a stage, as the loop sees it."""
    room: str
    key: Hashable
    speaker_id: str
    name: str
    minus_index: int


class Stages:
    """Every stage of one node."""

    def __init__(self, core: Core, free_minus: list[int], sent: Callable[[], None],
                 rng_bytes: Callable[[int], bytes], emit: Callable[..., None] = lambda *a, **kw: None) -> None:
        # sent: the core was fed from here (an inline core sends now);
        # emit: the node's operator log (events.emit)
        self.core, self.sent, self.rng_bytes, self.emit = core, sent, rng_bytes, emit
        self._free = free_minus                       # core rooms for mix-minus streams
        self.limits: dict[str, int] = {}              # stage room -> max_speakers
        self.members: dict[Hashable, Member] = {}
        self._owner: dict[int, Hashable] = {}         # mix-minus room -> its speaker
        self.worker = StageWorker(self._from_worker)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.refused_rtp = 0                           # RTP on the listener port from no speaker
        self.refused_ingest = 0                        # on a stage's ingest port from no allowed source
        self._told = 0.0
        self._was_told: set[str] = set()             # stage rooms last told of someone on stage

    # ------------------------------------------------------------ lifecycle

    def open(self, r: RoomConfig, index: int) -> None:
        """A stage room was opened (room `index` of the core)."""
        self.core.room_open(index, True)   # only the stage feeds it: no ingest socket exists
        self.limits[r.name] = r.max_speakers
        self.worker.stages[r.name] = Stage(r.name, index, self.rng_bytes, limit=r.max_speakers)

    def close(self, name: str) -> None:
        """A stage room goes away (its sessions were ended first)."""
        self.limits.pop(name, None)
        self.worker.drop(name)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the worker thread; finished packets come back to `loop`."""
        self._loop = loop
        self.worker.start()

    def stop(self) -> None:
        """Stop the worker thread."""
        self.worker.stop()

    def has(self, room: str) -> bool:
        """Is `room` a stage room?"""
        return room in self.limits

    def set_limit(self, room: str, max_speakers: int) -> None:
        """A reload changed the room's max_speakers (for joins from now on)."""
        self.limits[room] = max_speakers
        stage = self.worker.stages.get(room)
        if stage is not None:
            stage.limit = max_speakers

    # ------------------------------------------------------------ membership

    def admit(self, room: str, key: Hashable, claims: dict, srtp_key: bytes) -> int | Reason:
        """A speaker with a checked publish token: the core room of its
        mix-minus stream, or why not."""
        if room not in self.limits:
            return Reason.NO_STAGE
        # static publishers on the stage (voices of its ingest port) take seats too
        on_stage = sum(1 for m in self.members.values() if m.room == room) + self.worker.stages[room].ingest_voices
        if on_stage >= self.limits[room]:
            return Reason.STAGE_FULL
        if not self._free:
            return Reason.NODE_FULL
        index = self._free.pop()
        self.core.room_open(index, True)
        speaker_id = seat_of(claims) or f"speaker-{self.rng_bytes(3).hex()}"
        name = str(claims.get("name") or speaker_id)
        self.members[key] = Member(room, key, speaker_id, name, index)
        self._owner[index] = key
        stage = self.worker.stages[room]
        self.worker.call(stage.add, key, speaker_id, name, srtp_key, index)
        self.emit("speaker_joined", f"room {room!r}: speaker {name!r} ({speaker_id}) joined the stage "
             f"({on_stage + 1} of {self.limits[room]})", room=room, speaker=speaker_id)
        return index

    def holder(self, room: str, speaker_id: str) -> Hashable | None:
        """The session that holds `speaker_id`'s seat on `room`'s stage, if any."""
        return next((m.key for m in self.members.values() if m.room == room and m.speaker_id == speaker_id), None)

    def leave(self, key: Hashable) -> None:
        """A speaker's session ended (left, timed out, the room went)."""
        m = self.members.pop(key, None)
        if m is None:
            return
        del self._owner[m.minus_index]
        self.core.room_close(m.minus_index)
        self._free.append(m.minus_index)
        stage = self.worker.stages.get(m.room)
        if stage is not None:
            self.worker.call(stage.remove, key, time.monotonic_ns())
        self.emit("speaker_left", f"room {m.room!r}: speaker {m.name!r} ({m.speaker_id}) left the stage",
             room=m.room, speaker=m.speaker_id)

    def mute(self, room: str, speaker_id: str, muted: bool) -> bool:
        """Mute or unmute a speaker of `room` (its id, the token's `sub`);
        False if no such speaker is on the stage. Everyone is told at the
        next SPEAKERS, sent now."""
        stage = self.worker.stages.get(room)
        if stage is None or not any(m.room == room and m.speaker_id == speaker_id for m in self.members.values()):
            return False
        self.worker.call(stage.mute, speaker_id, muted, time.monotonic_ns())
        self.tell_now()
        return True

    def minus_rooms(self, room: str) -> list[int]:
        """The core rooms of `room`'s speakers' mix-minus streams."""
        return [m.minus_index for m in self.members.values() if m.room == room]

    def tell_now(self) -> None:
        """The next housekeeping tick tells every stage room who is on it
        (a host changed it), not a second later."""
        self._told = 0.0

    def on_rtp(self, data: bytes, key: Hashable) -> None:
        """RTP on the listener port from `key`'s address: a speaker's audio
        goes to its stage; anything else is refused and counted."""
        m = self.members.get(key)
        if m is None:
            self.refused_rtp += 1
            return
        self.worker.call(self.worker.stages[m.room].on_packet, key, data, time.monotonic_ns())

    def on_ingest(self, room: str, addr: tuple, data: bytes | None) -> None:
        """A datagram on the room's ingest port, from an allowed publisher
        (opened if the room uses SRTP), or None from one that is not."""
        stage = self.worker.stages.get(room)
        if stage is None:
            return
        if data is None:
            self.refused_ingest += 1
            return
        self.worker.call(stage.on_ingest, ("ingest", *addr[:2]), data, time.monotonic_ns())

    # --------------------------------------------------------------- output

    def _from_worker(self, out: list[Output]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._feed, out)

    def _feed(self, out: list[Output]) -> None:
        fed = False
        for index, packet, speaker in out:
            # a mix-minus room whose speaker left (and which another may
            # hold by now) gets nothing more from the old one
            if speaker is not None and self._owner.get(index) != speaker:
                continue
            self.core.feed(index, packet, STAGE_SOURCE)
            fed = True
        if fed:
            self.sent()

    def tell_speakers(self, fd: int, now: float, quic_send: Callable[[str, Speakers], None] | None,
                      relayed: dict[str, tuple[int, Speakers]] | None = None) -> int:
        """Every SPEAKERS_EVERY_S, tell each stage room and each speaker who
        is on the stage and who is speaking: one small datagram each, sent
        by the core in sendmmsg batches. `relayed`: rooms this node takes
        from upstream (name -> (core room, what the upstream said)), passed
        on to their listeners the same way. Returns datagrams sent."""
        if now - self._told < SPEAKERS_EVERY_S:
            return 0
        self._told = now
        told: list[tuple[str, list[int], Speakers]] = []    # (room, core rooms, message)
        for name, stage in list(self.worker.stages.items()):
            # an empty stage is told once, so listeners stop showing the last speaker
            if not stage.snapshot and name not in self._was_told:
                continue
            self._was_told.discard(name)
            if stage.snapshot:
                self._was_told.add(name)
            told.append((name, [stage.index, *self.minus_rooms(name)], Speakers(stage.snapshot)))
        told += [(name, [index], speakers) for name, (index, speakers) in (relayed or {}).items()]
        sent = 0
        for name, rooms, speakers in told:
            data = encode(speakers)
            sent += sum(self.core.room_send(index, fd, data)[0] for index in rooms)
            if quic_send is not None:
                quic_send(name, speakers)
        return sent

    # ----------------------------------------------------------- what shows

    def speakers(self, room: str) -> list[dict]:
        """The room's stage for /rooms: each speaker's id, name, level and
        whether it is speaking now, loudest first."""
        stage = self.worker.stages.get(room)
        if stage is None:
            return []
        return [{"id": s.id, "name": s.name, "level_dbov": -s.level, "speaking": s.active, "muted": s.muted}
                for s in stage.snapshot]

    def describe(self, room: str) -> dict:
        """A stage room's state for /rooms."""
        stage = self.worker.stages[room]
        return {"mode": stage.mode, "speakers": self.speakers(room),
                "max_speakers": self.limits.get(room, 0), "frames_mixed": stage.frames_mixed,
                "mixer_cpu_s": round(stage.busy_ns / 1e9, 3)}

    def totals(self) -> dict[str, float]:
        """Counters over every stage, for the metrics."""
        stages = list(self.worker.stages.values())
        return {"speakers": len(self.members), "mixer_seconds": self.worker.busy_ns / 1e9,
                "frames_mixed": sum(st.frames_mixed for st in stages),
                "switches": sum(st.switches for st in stages),
                "clipped": sum(st.mixer.clipped for st in stages), "skipped_ticks": self.worker.skipped_ticks}

    def drops(self) -> Counter[str]:
        """Speaker audio dropped, by reason, over every stage."""
        total: Counter[str] = Counter({reason: 0 for reason in STAGE_DROPS})
        total["foreign"] += self.refused_rtp + self.refused_ingest
        for stage in list(self.worker.stages.values()):
            total.update(stage.drops)
        return total


def seat_of(claims: dict) -> str:
    """Who a speaker's token says it is, for one seat per speaker: its `sub`,
    else its token's own id (one token, one seat); "" for no token (open
    mode), where every join is a speaker of its own."""
    if claims.get("sub"):
        return str(claims["sub"])
    return f"speaker-{str(claims['jti'])[:8]}" if claims.get("jti") else ""
