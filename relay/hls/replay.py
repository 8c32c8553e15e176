"""Replays: a recorded room's segments on disk, and the VOD playlist they make.

With `record = true` a room's whole segments are written as they complete,
under `[node] record_dir`:

    ROOM/SESSION/journal        one line per event, appended
    ROOM/SESSION/R/init.mp4     the rendition's init segment
    ROOM/SESSION/R/sMSN.m4s     its segments

A session is one run of the node for the room (SESSION is the Unix second
it began), so a node restart starts a new one; the playlist puts an
EXT-X-DISCONTINUITY between sessions, and at a publisher restart within
one (the journal's "disc"). Journal lines: "seg R MSN SECONDS PDT",
"disc", "end" (the room went quiet or the node stopped: the playlist is
then a VOD with EXT-X-ENDLIST until audio comes again). Sessions older
than `[node] record_retention` are deleted, whole."""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from relay.hls.track import Segment, Track

log = logging.getLogger("relay.hls")

_SESSION = re.compile(r"^\d{1,12}$")


class Recorder:
    """Writes one room's segments and journal for the replay."""

    def __init__(self, root: Path, room: str, now: float | None = None) -> None:
        self.dir = root / _safe(room) / str(int(time.time() if now is None else now))
        self.dir.mkdir(parents=True, exist_ok=True)
        self._journal = open(self.dir / "journal", "a", buffering=1)   # a line at a time: a crash loses little
        self.ended = False
        self.errors = 0

    def segment(self, track: Track, seg: Segment) -> None:
        """A rendition completed a segment: keep it."""
        try:
            d = self.dir / track.name
            if not d.exists():
                d.mkdir()
                (d / "init.mp4").write_bytes(track.init)
            (d / f"s{seg.msn}.m4s").write_bytes(seg.data)
            if self.ended:
                self._journal.write("disc\n")   # audio again after the room had ended
                self.ended = False
            self._journal.write(f"seg {track.name} {seg.msn} {seg.duration:.5f} {seg.wall:.3f}\n")
        except OSError as e:
            self._failed(e)

    def discontinuity(self) -> None:
        """The publisher's stream restarted."""
        self._line("disc")

    def end(self) -> None:
        """The room has ended (quiet, removed, or the node is stopping)."""
        if not self.ended:
            self._line("end")
            self.ended = True

    def close(self) -> None:
        self.end()
        self._journal.close()

    def _line(self, text: str) -> None:
        try:
            self._journal.write(text + "\n")
        except (OSError, ValueError) as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        if self.errors == 0:
            log.error("recording to %s failed (%s); the replay misses what follows until it works again",
                      self.dir, e)
        self.errors += 1


def _safe(room: str) -> str:
    """A room name as one directory name (names are free text on the wire)."""
    return re.sub(r"[^A-Za-z0-9._-]", lambda m: f"%{ord(m[0]):02X}", room) or "%00"


def sessions(root: Path, room: str) -> list[Path]:
    """The room's recorded sessions, oldest first."""
    d = root / _safe(room)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _SESSION.match(p.name)), key=lambda p: int(p.name))


def playlist(root: Path, room: str, rendition: str) -> str | None:
    """The replay's media playlist of one rendition, or None if nothing is recorded."""
    lines: list[str] = []
    ended, first, disc = True, True, False
    for s in sessions(root, room):
        try:
            journal = (s / "journal").read_text().splitlines()
        except OSError:
            continue
        disc = disc or not first      # a new session: a new timeline
        for entry in journal:
            f = entry.split()
            if not f:
                continue
            if f[0] == "disc":
                disc = True
            elif f[0] == "end":
                ended = True
            elif f[0] == "seg" and len(f) == 5 and f[1] == rendition:
                if disc and lines:
                    lines.append("#EXT-X-DISCONTINUITY")
                if first or disc:
                    lines.append(f'#EXT-X-MAP:URI="replay/{s.name}/init.mp4"')
                disc, first, ended = False, False, False
                when = datetime.fromtimestamp(float(f[4]), timezone.utc).isoformat(timespec="milliseconds")
                lines += [f"#EXT-X-PROGRAM-DATE-TIME:{when.replace('+00:00', 'Z')}", f"#EXTINF:{float(f[3]):.5f},",
                          f"replay/{s.name}/s{int(f[2])}.m4s"]
    if not lines:
        return None
    head = ["#EXTM3U", "#EXT-X-VERSION:7", "#EXT-X-TARGETDURATION:1",
            f"#EXT-X-PLAYLIST-TYPE:{'VOD' if ended else 'EVENT'}", "#EXT-X-MEDIA-SEQUENCE:0"]
    return "\n".join(head + lines + (["#EXT-X-ENDLIST"] if ended else [])) + "\n"


def replay_file(root: Path, room: str, rendition: str, session: str, name: str) -> bytes | None:
    """A recorded init segment or segment, or None."""
    if not _SESSION.match(session) or not re.fullmatch(r"init\.mp4|s\d{1,18}\.m4s", name):
        return None
    try:
        return (root / _safe(room) / session / rendition / name).read_bytes()
    except OSError:
        return None


def expire(root: Path, retention_s: float, now: float | None = None) -> int:
    """Delete sessions whose journal has not changed for `retention_s`;
    returns how many went."""
    now = time.time() if now is None else now
    gone = 0
    if not root.is_dir():
        return 0
    for room in root.iterdir():
        for s in (p for p in room.iterdir() if _SESSION.match(p.name)) if room.is_dir() else []:
            try:
                last = os.stat(s / "journal").st_mtime
            except OSError:
                last = int(s.name)
            if now - last > retention_s:
                shutil.rmtree(s, ignore_errors=True)
                gone += 1
    return gone
