"""LL-HLS: a room's audio as CMAF fMP4 parts and playlists on an HTTP port a CDN pulls.

Off the per-packet path: each room with `hls = true` has one pull listener
in the core (room.py's tap), drained by the event loop a few times a part,
so the core's fan-out cost per listener does not change. What it holds:

    opus.py      what HLS needs to know of an Opus packet (its duration)
    fmp4.py      the boxes of one audio track: init segment and fragments
    track.py     one rendition's parts and segments, and who waits for them
    playlist.py  media and multivariant playlists, delta updates
    aac.py       the AAC-LC rendition: Opus decoded and encoded once (PyAV)
    room.py      a room's tap and its two renditions
    replay.py    recorded rooms: segments on disk, the VOD playlist
    http.py      the HTTP/1.1 connection: keep-alive, HEAD, bounded heads
    server.py    the port: routes, blocking reloads, limits, counters
    rooms.py     what node.py wires: the rooms with HLS, their taps, the port

May import relay.wire and relay._core.
"""
