"""The HLS port: what each URL answers, blocking reloads, and the limits
that keep a crowd or an attacker from costing more than a bounded amount.

URLs (NAME url-quoted, R one of the room's renditions, "aac" or "opus"):

    /rooms/NAME/index.m3u8        multivariant playlist
    /rooms/NAME/R/index.m3u8      media playlist (_HLS_msn, _HLS_part, _HLS_skip)
    /rooms/NAME/R/init.mp4        init segment
    /rooms/NAME/R/sMSN.m4s        a whole segment
    /rooms/NAME/R/sMSN.PART.m4s   a part

Caching, for a CDN in front: init, parts and segments never change once
made (immutable: their numbers start at the wall clock's second, so a
restarted node never reuses one). A blocking reload's answer is final for
the part its URL names and is kept a second, which is what lets a CDN's
request collapsing send the node one request per part; the plain playlist
is not kept at all, since a fraction of a part is less than HTTP's one
second. Errors are not kept."""
from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from relay.hls import playlist, replay
from relay.hls.http import Connection, Held, Request, Response
from relay.hls.room import RoomHls
from relay.hls.track import PARTS_PER_SEGMENT, Track

log = logging.getLogger("relay.hls")

PLAYLIST = "application/vnd.apple.mpegurl"
MEDIA = "audio/mp4"
IMMUTABLE = "public, max-age=31536000, immutable"
BLOCKED_KEPT = "public, max-age=1"
LIVE = "public, max-age=0, must-revalidate"
MULTIVARIANT_KEPT = "public, max-age=10"
HOLD_S = 3.0                 # three target durations, then 503 (RFC 8216bis 6.2.5.2)
MAX_MSN_DIGITS = 18
MAX_PART = 64                # a part number past this is no mistake a player makes
AHEAD_SEGMENTS = 2           # _HLS_msn may be at most this past the last segment

_REPLAY = re.compile(r"^/rooms/(?P<room>[^/]+)/(?:replay\.m3u8|(?P<r>[a-z]+)/(?:replay\.m3u8|"
                     r"replay/(?P<session>\d{1,12})/(?P<file>init\.mp4|s\d{1,18}\.m4s)))$")
REPLAY_LIVE = "public, max-age=1"
_ROUTE = re.compile(r"^/rooms/(?P<room>[^/]+)/(?:index\.m3u8|(?P<r>[a-z]+)/(?P<file>index\.m3u8|init\.mp4|"
                    r"s(?P<msn>\d{1,18})(?:\.(?P<part>\d{1,2}))?\.m4s))$")


@dataclass
class HlsCounters:
    """What the HLS port counts, read by the metrics collector at scrape time."""
    requests: Counter[str] = field(default_factory=Counter)     # by kind of URL
    responses: Counter[int] = field(default_factory=Counter)    # by status code
    held: int = 0                   # requests held now (blocking reloads, parts not yet made)
    held_refused: int = 0           # requests that would have been held past max_held: 503
    connections: int = 0
    connections_evicted: int = 0    # connections dropped for a new one at max_connections
    timeouts: int = 0               # connections closed because a head was not sent in time


class HlsServer:
    """The HLS HTTP port over the rooms that have HLS on (`rooms` looks one up)."""

    def __init__(self, rooms: Callable[[str], RoomHls | None], max_held: int = 10_000,
                 max_connections: int = 20_000, record_root: Path | None = None) -> None:
        self.rooms = rooms
        self.record_root = record_root
        self.max_held, self.max_connections = max_held, max_connections
        self.counters = HlsCounters()
        self._conns: dict[Connection, None] = {}    # insertion order: the oldest first
        self._server: asyncio.base_events.Server | None = None
        self._cache: dict[tuple[int, str, bool], tuple[int, bytes]] = {}

    # ------------------------------------------------------------ lifecycle

    async def start(self, host: str, port: int) -> None:
        """Bind and serve. Raises OSError if the address is taken."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Connection(self), host, port, backlog=4096)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the port is bound to."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.close()

    def opened(self, conn: Connection) -> None:
        """A new connection: past the bound, the oldest one still reading a
        head makes room (a slow client cannot hold a place for ever); if
        every connection is answering, the new one goes."""
        if len(self._conns) >= self.max_connections:
            victim = next((c for c in self._conns if c.reading_head), None)
            self.counters.connections_evicted += 1
            (victim or conn).close()
            if victim is None:
                return
            self._conns.pop(victim, None)
        self._conns[conn] = None
        self.counters.connections = len(self._conns)

    def closed(self, conn: Connection) -> None:
        self._conns.pop(conn, None)
        self.counters.connections = len(self._conns)

    # -------------------------------------------------------------- answers

    def answer(self, req: Request) -> Response | Held:
        """What a request gets: a response now, or one held until its part exists."""
        if req.method == "OPTIONS":
            self.counters.requests["preflight"] += 1
            return Response(204, cache="public, max-age=86400", headers=[
                ("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS"),
                ("Access-Control-Allow-Headers", "*"), ("Access-Control-Max-Age", "86400")])
        if req.method not in ("GET", "HEAD"):
            self.counters.requests["other"] += 1
            return Response(405, b"GET or HEAD\n", headers=[("Allow", "GET, HEAD, OPTIONS")])
        if "/replay" in req.path:
            return self._replay(req.path)
        m = _ROUTE.match(req.path)
        room = self.rooms(m["room"]) if m else None
        if m is None or room is None:
            self.counters.requests["not_found"] += 1
            return Response(404, b"no such room or file\n")
        if m["r"] is None:
            self.counters.requests["multivariant"] += 1
            return Response(200, playlist.multivariant(room.tracks).encode(), PLAYLIST, MULTIVARIANT_KEPT)
        track = next((t for t in room.tracks if t.name == m["r"]), None)
        if track is None:
            self.counters.requests["not_found"] += 1
            return Response(404, b"no such rendition\n")
        if m["file"] == "index.m3u8":
            return self._playlist(track, req.query)
        if m["file"] == "init.mp4":
            self.counters.requests["init"] += 1
            return Response(200, track.init, MEDIA, IMMUTABLE)
        msn = int(m["msn"])
        if m["part"] is None:
            self.counters.requests["segment"] += 1
            return self._media(track, msn, None)
        self.counters.requests["part"] += 1
        return self._media(track, msn, int(m["part"]))

    def _replay(self, path: str) -> Response:
        """A recorded room's replay: multivariant, media playlists, files."""
        m = _REPLAY.match(path)
        room = self.rooms(m["room"]) if m else None
        if m is None or room is None or room.recorder is None or self.record_root is None:
            self.counters.requests["not_found"] += 1
            return Response(404, b"no such replay\n")
        self.counters.requests["replay"] += 1
        if m["r"] is None:
            text = playlist.multivariant(room.tracks).replace("/index.m3u8", "/replay.m3u8")
            return Response(200, text.encode(), PLAYLIST, REPLAY_LIVE)
        if m["file"] is not None:
            data = replay.replay_file(self.record_root, room.name, m["r"], m["session"], m["file"])
            return Response(200, data, MEDIA, IMMUTABLE) if data else Response(404, b"no such file\n")
        media = replay.playlist(self.record_root, room.name, m["r"])
        if media is None:
            return Response(404, b"nothing recorded yet\n")
        return Response(200, media.encode(), PLAYLIST, "public, max-age=60" if "#EXT-X-ENDLIST" in media
                        else REPLAY_LIVE)

    def _playlist(self, track: Track, query: dict[str, str]) -> Response | Held:
        msn_s, part_s, skip_s = query.get("_HLS_msn"), query.get("_HLS_part"), query.get("_HLS_skip")
        skip = skip_s in ("YES", "v2")
        if skip_s is not None and not skip:
            return self._bad("_HLS_skip is YES or v2")
        if msn_s is None:
            if part_s is not None:
                return self._bad("_HLS_part needs _HLS_msn")
            self.counters.requests["playlist"] += 1
            return Response(200, self._render(track, skip), PLAYLIST, LIVE)
        if not _number(msn_s) or (part_s is not None and not _number(part_s)):
            return self._bad("_HLS_msn and _HLS_part are whole numbers")
        msn, part = int(msn_s), None if part_s is None else int(part_s)
        if part is not None and part >= MAX_PART:
            return self._bad(f"_HLS_part is below {MAX_PART}")
        if part is not None and part >= PARTS_PER_SEGMENT:
            msn, part = msn + 1, 0     # past a segment's last part: the next segment's first
        self.counters.requests["blocking"] += 1
        if not track.empty:
            last = track.segments[-1].msn
            if msn > last + AHEAD_SEGMENTS:
                return self._bad(f"_HLS_msn {msn} is more than {AHEAD_SEGMENTS} past the last segment, {last}")

        def answer() -> Response:
            return Response(200, self._render(track, skip), PLAYLIST, BLOCKED_KEPT)

        def late() -> Response:
            if track.empty:   # no audio yet: an empty playlist, not an error
                return Response(200, self._render(track, skip), PLAYLIST, LIVE)
            return Response(503, b"the part asked for did not come in time\n", headers=[("Retry-After", "1")])
        return self._hold(track, msn, part, answer, late)

    def _media(self, track: Track, msn: int, part: int | None) -> Response | Held:
        data = track.segment(msn) if part is None else track.part(msn, part)
        if data:
            return Response(200, data, MEDIA, IMMUTABLE)
        if part is not None and part >= PARTS_PER_SEGMENT:
            return Response(404, b"no such part\n")
        if track.empty or track.has(msn, part) or not self._soon(track, msn, part):
            return Response(404, b"no such part or segment (gone, or not soon)\n")

        def answer() -> Response:
            got = track.segment(msn) if part is None else track.part(msn, part)
            return Response(200, got, MEDIA, IMMUTABLE) if got else Response(404, b"gone\n")
        return self._hold(track, msn, part, answer,
                          lambda: Response(503, b"not made in time\n", headers=[("Retry-After", "1")]))

    @staticmethod
    def _soon(track: Track, msn: int, part: int | None) -> bool:
        """Is (msn, part) within the next segment's worth of parts, so a
        request for it (the preload hint, or a player a little ahead) is
        held rather than refused?"""
        nmsn, npart = track.next_position()
        ahead = (msn - nmsn) * PARTS_PER_SEGMENT + ((PARTS_PER_SEGMENT - 1) if part is None else part) - npart
        return 0 <= ahead <= 2 * PARTS_PER_SEGMENT

    def _hold(self, track: Track, msn: int, part: int | None, answer: Callable[[], Response],
              late: Callable[[], Response]) -> Response | Held:
        ready = track.waiter(msn, part)
        if ready.done():
            return answer()
        if self.counters.held >= self.max_held:
            ready.cancel()
            self.counters.held_refused += 1
            return Response(503, b"too many requests waiting\n", headers=[("Retry-After", "1")])
        return Held(ready, answer, late, HOLD_S)

    def _render(self, track: Track, skip: bool) -> bytes:
        key = (id(track), track.name, skip)
        got = self._cache.get(key)
        if got is None or got[0] != track.version:
            got = (track.version, playlist.media(track, skip).encode())
            self._cache[key] = got
        return got[1]

    def forget(self, room: RoomHls) -> None:
        """Drop cached playlists of a room that has gone."""
        for t in room.tracks:
            for skip in (False, True):
                self._cache.pop((id(t), t.name, skip), None)

    def _bad(self, why: str) -> Response:
        self.counters.requests["bad"] += 1
        return Response(400, (why + "\n").encode())


def _number(s: str) -> bool:
    return s.isdigit() and s.isascii() and len(s) <= MAX_MSN_DIGITS
