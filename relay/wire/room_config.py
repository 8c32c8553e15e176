"""A [[room]] of the config: where its audio comes from (an ingest port,
speakers on a stage, or the nodes upstream), who may publish, and its
bounds. Parsed one key at a time, each mistake one line naming the room
and the key (relay/wire/config.py reads the rest of the file)."""
from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Mapping

from relay.wire.addr import parse_hostport
from relay.wire.config_values import ConfigError, address, integer, number
from relay.wire.protocol import MAX_ROOM

# how long an SRTP room's stream must be silent before another authenticated
# one may take over (sooner, two key holders would fight packet by packet)
SRTP_TAKEOVER_S = 0.15
# A plain-RTP room's live stream may be replaced by another stream from an
# allowed source once it has been silent this long. No live publisher is:
# ffmpeg, GStreamer and OBS send a packet every 20 ms, and Opus DTX still
# sends one at least every 400 ms, so 2 s is five DTX intervals (four lost
# comfort-noise packets in a row, or a network stall of that length, do
# not open the room). A crashed or killed publisher, which sends no BYE,
# frees its room after this silence instead of locking it until an
# operator releases it. `takeover_after = "never"` keeps the strict lock.
PLAIN_TAKEOVER_S = 2.0
# A publisher's input, bounded by default: Opus at its most (510 kbit/s) in
# 10 ms frames with RTP headers fits with room for a burst; ffmpeg and OBS
# send 50 packets a second at 64-128 kbit/s. More is a flood or a broken
# encoder, multiplied by every listener.
MAX_PACKET_RATE = 100.0
MAX_BITRATE = 600_000.0


@dataclass
class RoomConfig:
    name: str
    ingest: tuple[str, int] | None   # None: the room comes from upstream nodes
    sources: list[tuple[str, int]]   # port 0 = any port
    any_source: bool = False
    max_listeners: int = 0           # 0 = only the node limit
    # SRTP (AES_CM_128_HMAC_SHA1_80) master key and salt, 30 bytes: every
    # packet must authenticate with it, and holding it is what lets a new
    # stream take over the room
    srtp_key: bytes = b""
    # seconds of silence after which another stream may take the room
    # (None: never; a BYE from the live stream or the operator releases it)
    takeover_after: float | None = PLAIN_TAKEOVER_S
    # nodes to take the room from, in order of preference (a cascade):
    # this node joins the first that answers as a relay listener
    upstream: list[tuple[str, int]] = field(default_factory=list)
    # upstream = "directory": the parents are live nodes of the tier above
    # this one, read from the directory (routing.parents)
    from_directory: bool = False
    # speakers the room's stage holds at once: a room with neither ingest
    # nor upstream takes its audio from speakers who join with a publish
    # token; a room with an ingest port takes them too if this is set, and
    # its publishers go on the stage beside them
    max_speakers: int = 0
    # an origin pair: the other origin of this room (both take the
    # publisher's stream and agree on one numbering: relay/cluster/pair.py),
    # and whether this one numbers a stream both see start at once
    pair: tuple[str, int] | None = None
    pair_lead: bool = False
    # the most a room takes from its publisher a second (0: no bound); the
    # rest is counted and dropped, since every listener would get each one
    max_packet_rate: float = 0.0
    max_bitrate: float = 0.0
    hls: bool = True                 # LL-HLS for this room when the node has [node] hls
    record: bool = False             # keep its segments for a replay ([node] record_dir)

    @property
    def stage(self) -> bool:
        """Does the room's audio go through a stage (relay/stage/stage.py)?"""
        return not self.from_upstream and (self.ingest is None or self.max_speakers > 0)

    @property
    def from_upstream(self) -> bool:
        """Does the room come from other nodes (a list, or the directory)?"""
        return bool(self.upstream) or self.from_directory

    @property
    def origin(self) -> str:
        """Where the room's audio comes from, in words (the start-up line)."""
        if self.stage:
            return f"up to {self.max_speakers} speakers"
        if self.from_directory:
            return "upstream nodes the directory names"
        if self.ingest is None:
            return "upstream " + ", ".join(f"{h}:{p}" for h, p in self.upstream)
        return f"{self.ingest[0]}:{self.ingest[1]}"


ROOM_KEYS = {"name", "ingest", "sources", "max_listeners", "srtp_key_env", "takeover_after", "upstream",
              "pair", "pair_lead", "max_packet_rate", "max_bitrate",
              "max_speakers", "hls", "record"}
DEFAULT_SPEAKERS = 16    # a stage room's max_speakers unless it says
MAX_SPEAKERS = 64
SRTP_KEY_BYTES = 30      # AES_CM_128_HMAC_SHA1_80: a 16-byte master key and a 14-byte salt


def _srtp_key(where: str, raw: dict[str, Any], environ: Mapping[str, str]) -> bytes:
    name = raw.get("srtp_key_env")
    if name is None:
        return b""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: srtp_key_env: expected the name of an environment variable, got {name!r}")
    value = environ.get(name)
    if not value:
        raise ConfigError(f"{where}: srtp_key_env: environment variable {name} is not set "
                          f"(the base64 of a 30-byte SRTP master key and salt, e.g. openssl rand -base64 30)")
    try:
        key = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where}: srtp_key_env: {name} is not base64") from None
    if len(key) != SRTP_KEY_BYTES:
        raise ConfigError(f"{where}: srtp_key_env: {name} holds {len(key)} bytes; AES_CM_128_HMAC_SHA1_80 "
                          f"needs {SRTP_KEY_BYTES} (a 16-byte master key and a 14-byte salt)")
    return key


def _upstream_room(where: str, name: str, raw: dict[str, Any]) -> RoomConfig:
    """A room this node takes from other nodes instead of from publishers."""
    for key in ("ingest", "sources", "srtp_key_env", "takeover_after", "max_speakers"):
        if key in raw:
            raise ConfigError(f"{where}: '{key}' is for rooms with publishers; this one comes from 'upstream'")
    nodes = raw["upstream"]
    limit = integer(f"{where}: max_listeners", raw.get("max_listeners", 0), 0, 10**7)
    if nodes == "directory":
        return RoomConfig(name, None, [], False, limit, from_directory=True)
    if isinstance(nodes, str):
        nodes = [nodes]
    if not isinstance(nodes, list) or not nodes:
        raise ConfigError(f"{where}: 'upstream' must list the nodes to take the room from (host:port), "
                          "or be \"directory\"")
    upstream = [address(f"{where}: upstream", n) for n in nodes]
    return RoomConfig(name, None, [], False, limit, upstream=upstream)


def room(i: int, raw: Any, open_auth: bool, environ: Mapping[str, str]) -> RoomConfig:
    """The `i`th [[room]] table, checked."""
    where = f"room #{i + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = set(raw) - ROOM_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or len(name.encode()) > MAX_ROOM:
        raise ConfigError(f"{where}: 'name' must be a string of 1 to {MAX_ROOM} bytes")
    where = f"room {name!r}"
    if "upstream" in raw:
        return _upstream_room(where, name, raw)
    if "ingest" not in raw:
        return _stage_room(where, name, raw)
    speakers = integer(f"{where}: max_speakers", raw.get("max_speakers", 0), 0, MAX_SPEAKERS)
    ingest = address(f"{where}: ingest", raw["ingest"])
    sources_raw = raw.get("sources")
    if not isinstance(sources_raw, list) or not sources_raw:
        raise ConfigError(f"{where}: 'sources' must list the publisher addresses allowed in")
    sources, any_source = [], False
    for s in sources_raw:
        if s == "*":
            if not open_auth:
                raise ConfigError(f"{where}: sources = [\"*\"] is only allowed with auth = \"open\"")
            any_source = True
            continue
        try:
            host, port = parse_hostport(str(s), default_port=0)
            ipaddress.ip_address(host)
        except ValueError as e:
            raise ConfigError(f"{where}: source {s!r}: {e}") from None
        sources.append((host, port))
    limit = integer(f"{where}: max_listeners", raw.get("max_listeners", 0), 0, 10**7)
    srtp_key = _srtp_key(where, raw, environ)
    takeover: float | None = SRTP_TAKEOVER_S if srtp_key else PLAIN_TAKEOVER_S
    if raw.get("takeover_after") == "never":
        takeover = None
    elif "takeover_after" in raw:
        takeover = number(f"{where}: takeover_after (seconds, or \"never\")", raw["takeover_after"], 0, 86400)
    if srtp_key and not speakers and "pair" in raw:
        raise ConfigError(f"{where}: 'pair' is for plain-RTP rooms and stages, not an SRTP ingest room")
    pair, lead = _pair(where, raw, stage=speakers > 0)
    pps = number(f"{where}: max_packet_rate (packets a second, 0 = no bound)",
                 raw.get("max_packet_rate", MAX_PACKET_RATE), 0, 10_000)
    bps = number(f"{where}: max_bitrate (bits a second, 0 = no bound)", raw.get("max_bitrate", MAX_BITRATE),
                 0, 100_000_000)
    return RoomConfig(name, ingest, sources, any_source, limit, srtp_key, takeover, max_speakers=speakers,
                      pair=pair, pair_lead=lead, max_packet_rate=pps, max_bitrate=bps)


def _stage_room(where: str, name: str, raw: dict[str, Any]) -> RoomConfig:
    """A room whose audio comes from speakers who join it (no ingest port)."""
    for key in ("sources", "srtp_key_env", "takeover_after"):
        if key in raw:
            raise ConfigError(f"{where}: '{key}' is for rooms with an 'ingest' port; this one has none, "
                              "so its audio comes from speakers who join with a publish token")
    speakers = integer(f"{where}: max_speakers", raw.get("max_speakers", DEFAULT_SPEAKERS), 1, MAX_SPEAKERS)
    limit = integer(f"{where}: max_listeners", raw.get("max_listeners", 0), 0, 10**7)
    pair, _ = _pair(where, raw, stage=True)
    return RoomConfig(name, None, [], False, limit, max_speakers=speakers, pair=pair)


def _pair(where: str, raw: dict[str, Any], stage: bool) -> tuple[tuple[str, int] | None, bool]:
    """The room's other origin, and whether this one leads the numbering.
    A stage pair has no leader: each origin mixes on its own, and the
    nodes below follow one of them (relay/cluster/follow.py)."""
    pair = address(f"{where}: pair", raw["pair"]) if "pair" in raw else None
    lead = raw.get("pair_lead", False)
    if not isinstance(lead, bool) or (lead and pair is None):
        raise ConfigError(f"{where}: pair_lead is true or false, on one origin of a 'pair'")
    if lead and stage:
        raise ConfigError(f"{where}: pair_lead is for pass-through pairs; the two origins of a stage each "
                          "mix, and the nodes below follow one of them")
    return pair, lead
