"""Node configuration: a TOML file, flags on top, and an embedded default
for the demo. Every mistake becomes one ConfigError line naming what to fix."""
from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping

from relay.wire.addr import parse_hostport
from relay.wire.directory_url import SENTINEL_SCHEME, sentinel_url, shown_url
from relay.wire.egress_config import KEYS as EGRESS_KEYS
from relay.wire.egress_config import XdpConfig, xdp_config
from relay.wire.protocol import MAX_REDIRECT, MAX_ROOM

DEFAULT_TOML = """
# The embedded default: one open room on loopback, for `make demo`.
[node]
listen = "127.0.0.1:7000"
admin = "127.0.0.1:7080"
# QUIC and WebTransport listeners; the web player is at the admin port's /listen
quic = "127.0.0.1:7443"
auth = "open"
join_rate = 10000
# the demo's listeners run on this same machine and would count as load
max_load = 0
max_machine_load = 0
# the demo ends its relay with SIGTERM: no load balancer to wait for
drain_grace = 0

[[room]]
name = "demo"
ingest = "127.0.0.1:5004"
sources = ["127.0.0.1"]
"""


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


class ConfigError(Exception):
    """A configuration mistake, as one readable line."""


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


@dataclass
class NodeConfig:
    listen: tuple[str, int] = ("127.0.0.1", 7000)
    admin: tuple[str, int] | None = ("127.0.0.1", 7080)
    # listeners' HTTP (/join, the page, /quic.json, /hls.json) on a port of
    # its own; the admin port then keeps only the operator's paths
    public: tuple[str, int] | None = None
    auth: str = "jwt"
    secret: str = ""
    max_listeners: int = 100_000
    ring_depth: int = 16
    ring_bytes: int = 3840
    burst_packets: int = 8
    keepalive_interval: float = 5.0
    session_timeout: float = 15.0
    redirect: str = ""
    room_label_limit: int = 50
    join_rate: float = 2000.0            # admitted joins per second, node-wide
    join_rate_per_source: float = 20.0   # admitted joins per second per source IP (IPv6: per /64)
    max_sessions_per_token: int = 16     # sessions one token may hold at once; 0 = no limit
    log_interval: float = 10.0           # seconds between summary log lines (joins, refusals, drops)
    upstream_linger: float = 10.0        # an upstream room is left this long after its last listener
    upstream_pair: bool = True           # take an upstream room from two parents at once, merged
    # the cluster directory (relay/cluster/directory.py): a redis://,
    # rediss:// or redis+sentinel:// URL, this node's id and tier, and the
    # address other nodes and listeners reach it at
    directory: str = ""
    node_id: str = ""
    tier: str = "edge"
    advertise: str = ""
    drain_grace: float = 5.0             # on SIGTERM: seconds to keep serving after /readyz fails
    drain_rate: float = 2000.0           # then listeners moved per second
    quic_max_pending: int = 512          # QUIC connections open but not yet joined, node-wide
    quic_max_pending_per_source: int = 16  # ... from one IPv4 address or IPv6 /64
    max_rooms: int = 64                  # room slots reserved for reloads
    speaker_slots: int = 64              # speakers on every stage of the node at once (each hears its own mix)
    workers: int = 1                     # sender threads; "auto" = one per core
    xdp: XdpConfig | None = None         # egress = "xdp": listeners' audio through AF_XDP (egress_config.py)
    max_load: float = 0.8                # admit while the relay's projected duty stays below this; 0 = off
    max_machine_load: float = 0.95       # and while the whole machine is less busy than this; 0 = off
    # (the machine cap refuses only when the relay's own work fills the
    # machine or its senders fall behind, and never below load_floor)
    load_floor: int = 100                # listeners admitted whatever the machine's load
    quic: tuple[str, int] | None = None  # QUIC + WebTransport listener endpoint (UDP); None = off
    quic_cert: str = ""                  # PEM certificate chain; "" = a fresh self-signed one
    quic_key: str = ""                   # PEM private key for quic_cert
    quic_redirect: str = ""              # the QUIC endpoint sent to listeners turned away
    quic_fast_path: bool = True          # joined listeners' audio and ACKs in the core (docs/quic-fast-path.md)
    # LL-HLS (relay/hls): the HTTP port a CDN pulls from; None = off
    hls: tuple[str, int] | None = None
    hls_max_held: int = 10_000           # blocking requests held at once; past it: 503
    hls_max_connections: int = 20_000    # open connections; past it the oldest idle one goes
    record_dir: str = ""                 # where recorded rooms' segments go (relay/hls/replay.py)
    record_retention: float = 7 * 86400.0   # seconds a recording is kept after its last segment
    rooms: list[RoomConfig] = field(default_factory=list)


_NODE_KEYS = {"listen", "admin", "public", "auth", "secret_env", "max_listeners", "ring_depth",
              "ring_bytes", "burst_packets", "keepalive_interval", "session_timeout", "redirect",
              "room_label_limit", "join_rate", "join_rate_per_source", "max_rooms", "speaker_slots", "workers",
              "max_load",
              "max_machine_load", "load_floor", "max_sessions_per_token",
              "quic_max_pending", "quic_max_pending_per_source", "log_interval", "drain_grace", "drain_rate",
              "upstream_linger", "upstream_pair", "directory", "node_id", "tier", "advertise",
              "quic", "quic_cert", "quic_key", "quic_redirect", "quic_fast_path",
              "hls", "hls_max_held", "hls_max_connections", "record_dir", "record_retention"} | EGRESS_KEYS
_ROOM_KEYS = {"name", "ingest", "sources", "max_listeners", "srtp_key_env", "takeover_after", "upstream",
              "pair", "pair_lead", "max_packet_rate", "max_bitrate",
              "max_speakers", "hls", "record"}
DEFAULT_SPEAKERS = 16    # a stage room's max_speakers unless it says
MAX_SPEAKERS = 64
SRTP_KEY_BYTES = 30      # AES_CM_128_HMAC_SHA1_80: a 16-byte master key and a 14-byte salt


def _addr(where: str, value: Any) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected \"host:port\", got {value!r}")
    try:
        return parse_hostport(value)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _int(where: str, value: Any, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{where}: expected an integer from {lo} to {hi}, got {value!r}")
    return value


def _float(where: str, value: Any, lo: float, hi: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{where}: expected a number from {lo:g} to {hi:g}, got {value!r}")
    return float(value)


def _seconds(where: str, value: Any, lo: float = 0.0, hi: float = float("inf")) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0 or not lo <= value <= hi:
        bounds = f" from {lo:g} to {hi:g}" if hi != float("inf") else ""
        raise ConfigError(f"{where}: expected a positive number of seconds{bounds}, got {value!r}")
    return float(value)


# what one listener slot costs besides its ring's bytes and index: the
# Listener struct and its free-list and queue entries (Core.listener_bytes()
# says the same, and a test holds the two together)
SLOT_OVERHEAD = 128
# each held packet's index entry: offset and length
INDEX_ENTRY = 4
# the largest ring_bytes the core takes, and the smallest that carries
# every Opus frame (1,275 bytes at most, RFC 6716 3.4) with its RTP header
MAX_RING_BYTES = 16384
MIN_RING_BYTES = 1275 + 12


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def arena_bytes(cfg: NodeConfig) -> int:
    """What the listener arena reserves for this config: every listener's
    ring, its index and its slot."""
    return cfg.max_listeners * (cfg.ring_bytes + cfg.ring_depth * INDEX_ENTRY + SLOT_OVERHEAD)


def _check_arena(cfg: NodeConfig) -> None:
    """The listener arena is reserved at start-up; refuse a size the machine
    could never hold, with the figures, instead of failing in calloc."""
    need = arena_bytes(cfg)
    have = _physical_memory()
    if have and need > have:
        raise ConfigError(f"[node] max_listeners = {cfg.max_listeners} needs {need / 2**30:.1f} GiB of "
                          f"listener rings (ring_bytes {cfg.ring_bytes} each) "
                          f"but this machine has {have / 2**30:.1f} GiB: lower max_listeners or ring_bytes")


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
    limit = _int(f"{where}: max_listeners", raw.get("max_listeners", 0), 0, 10**7)
    if nodes == "directory":
        return RoomConfig(name, None, [], False, limit, from_directory=True)
    if isinstance(nodes, str):
        nodes = [nodes]
    if not isinstance(nodes, list) or not nodes:
        raise ConfigError(f"{where}: 'upstream' must list the nodes to take the room from (host:port), "
                          "or be \"directory\"")
    upstream = [_addr(f"{where}: upstream", n) for n in nodes]
    return RoomConfig(name, None, [], False, limit, upstream=upstream)


def _room(i: int, raw: Any, open_auth: bool, environ: Mapping[str, str]) -> RoomConfig:
    where = f"room #{i + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = set(raw) - _ROOM_KEYS
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
    speakers = _int(f"{where}: max_speakers", raw.get("max_speakers", 0), 0, MAX_SPEAKERS)
    ingest = _addr(f"{where}: ingest", raw["ingest"])
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
    limit = _int(f"{where}: max_listeners", raw.get("max_listeners", 0), 0, 10**7)
    srtp_key = _srtp_key(where, raw, environ)
    takeover: float | None = SRTP_TAKEOVER_S if srtp_key else PLAIN_TAKEOVER_S
    if raw.get("takeover_after") == "never":
        takeover = None
    elif "takeover_after" in raw:
        takeover = _float(f"{where}: takeover_after (seconds, or \"never\")", raw["takeover_after"], 0, 86400)
    if srtp_key and not speakers and "pair" in raw:
        raise ConfigError(f"{where}: 'pair' is for plain-RTP rooms and stages, not an SRTP ingest room")
    pair, lead = _pair(where, raw, stage=speakers > 0)
    pps = _float(f"{where}: max_packet_rate (packets a second, 0 = no bound)",
                 raw.get("max_packet_rate", MAX_PACKET_RATE), 0, 10_000)
    bps = _float(f"{where}: max_bitrate (bits a second, 0 = no bound)", raw.get("max_bitrate", MAX_BITRATE),
                 0, 100_000_000)
    return RoomConfig(name, ingest, sources, any_source, limit, srtp_key, takeover, max_speakers=speakers,
                      pair=pair, pair_lead=lead, max_packet_rate=pps, max_bitrate=bps)


def _stage_room(where: str, name: str, raw: dict[str, Any]) -> RoomConfig:
    """A room whose audio comes from speakers who join it (no ingest port)."""
    for key in ("sources", "srtp_key_env", "takeover_after"):
        if key in raw:
            raise ConfigError(f"{where}: '{key}' is for rooms with an 'ingest' port; this one has none, "
                              "so its audio comes from speakers who join with a publish token")
    speakers = _int(f"{where}: max_speakers", raw.get("max_speakers", DEFAULT_SPEAKERS), 1, MAX_SPEAKERS)
    limit = _int(f"{where}: max_listeners", raw.get("max_listeners", 0), 0, 10**7)
    pair, _ = _pair(where, raw, stage=True)
    return RoomConfig(name, None, [], False, limit, max_speakers=speakers, pair=pair)


def _pair(where: str, raw: dict[str, Any], stage: bool) -> tuple[tuple[str, int] | None, bool]:
    """The room's other origin, and whether this one leads the numbering.
    A stage pair has no leader: each origin mixes on its own, and the
    nodes below follow one of them (relay/cluster/follow.py)."""
    pair = _addr(f"{where}: pair", raw["pair"]) if "pair" in raw else None
    lead = raw.get("pair_lead", False)
    if not isinstance(lead, bool) or (lead and pair is None):
        raise ConfigError(f"{where}: pair_lead is true or false, on one origin of a 'pair'")
    if lead and stage:
        raise ConfigError(f"{where}: pair_lead is for pass-through pairs; the two origins of a stage each "
                          "mix, and the nodes below follow one of them")
    return pair, lead


def _quic(cfg: NodeConfig, node: dict[str, Any]) -> None:
    quic = node.get("quic", "")
    cfg.quic = None if quic == "" else _addr("[node] quic", quic)
    if cfg.quic is not None and cfg.quic == cfg.listen:
        raise ConfigError(f"[node] quic: {cfg.quic[0]}:{cfg.quic[1]} is also the UDP listen address")
    cfg.quic_cert, cfg.quic_key = str(node.get("quic_cert", "")), str(node.get("quic_key", ""))
    if bool(cfg.quic_cert) != bool(cfg.quic_key):
        raise ConfigError("[node] quic_cert and quic_key go together: set both, or neither "
                          "for a short-lived self-signed certificate")
    for key in ("quic_cert", "quic_key"):
        path = getattr(cfg, key)
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"[node] {key}: cannot read {path}")
    cfg.quic_redirect = str(node.get("quic_redirect", ""))
    if len(cfg.quic_redirect.encode()) > MAX_REDIRECT:
        raise ConfigError(f"[node] quic_redirect: at most {MAX_REDIRECT} bytes")
    fast = node.get("quic_fast_path", True)
    if not isinstance(fast, bool):
        raise ConfigError(f"[node] quic_fast_path: true or false, not {fast!r}")
    cfg.quic_fast_path = fast


def load(text: str | None = None, path: str | None = None,
         environ: Mapping[str, str] | None = None, overrides: dict[str, Any] | None = None) -> NodeConfig:
    """Parse a config (file at `path`, else `text`, else the embedded default)."""
    label = path or "config"
    if path is not None:
        try:
            with open(path, "rb") as f:
                text = f.read().decode()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        raw = tomllib.loads(DEFAULT_TOML if text is None else text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{label}: not valid TOML: {e}") from None
    return from_dict(raw, label, environ, overrides)


def from_dict(raw: dict[str, Any], label: str = "config", environ: Mapping[str, str] | None = None,
              overrides: dict[str, Any] | None = None) -> NodeConfig:
    """Validate a parsed config; `overrides` (from command-line flags) replace
    [node] keys, and a "room" entry replaces the room list."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    raw = dict(raw)
    raw["node"] = dict(raw.get("node", {})) if isinstance(raw.get("node", {}), dict) else raw["node"]
    for key, value in (overrides or {}).items():
        if key == "room":
            raw["room"] = value
        elif isinstance(raw["node"], dict):
            raw["node"][key] = value
    unknown = set(raw) - {"node", "room"}
    if unknown:
        raise ConfigError(f"{label}: unknown section [{sorted(unknown)[0]}]")
    node = raw.get("node", {})
    if not isinstance(node, dict):
        raise ConfigError(f"{label}: [node] must be a table")
    if "slot_bytes" in node:
        raise ConfigError(f"{label}: [node] slot_bytes is gone: rings now hold packets of any length; "
                          f"size them with ring_bytes (bytes per listener, default {NodeConfig.ring_bytes})")
    unknown = set(node) - _NODE_KEYS
    if unknown:
        raise ConfigError(f"{label}: [node]: unknown key {sorted(unknown)[0]!r}")
    cfg = NodeConfig()
    if "listen" in node:
        cfg.listen = _addr("[node] listen", node["listen"])
    if "admin" in node:
        cfg.admin = None if node["admin"] == "" else _addr("[node] admin", node["admin"])
    if node.get("public", "") != "":
        cfg.public = _addr("[node] public", node["public"])
        if cfg.admin is not None and cfg.public[1] == cfg.admin[1] \
                and (cfg.public[0] == cfg.admin[0] or WILDCARDS & {cfg.public[0], cfg.admin[0]}):
            raise ConfigError(f"[node] public: {cfg.public[0]}:{cfg.public[1]} is the admin port; give the "
                              "listeners' HTTP a port of its own (or leave public out to serve both on admin)")
    _auth(cfg, node, env)
    cfg.max_listeners = _int("[node] max_listeners", node.get("max_listeners", cfg.max_listeners), 1, 10**7)
    cfg.ring_depth = _int("[node] ring_depth", node.get("ring_depth", cfg.ring_depth), 2, 4096)
    if cfg.ring_depth & (cfg.ring_depth - 1):
        raise ConfigError(f"[node] ring_depth: must be a power of two, got {cfg.ring_depth}")
    # a ring must hold at least the largest packet it is asked to carry
    cfg.ring_bytes = _int("[node] ring_bytes", node.get("ring_bytes", cfg.ring_bytes),
                          MIN_RING_BYTES, MAX_RING_BYTES)
    cfg.burst_packets = _int("[node] burst_packets", node.get("burst_packets", cfg.burst_packets),
                             0, cfg.ring_depth - 1)
    # the ACCEPT carries both in milliseconds; keepalives faster than 10 a
    # second would only be load
    cfg.keepalive_interval = _seconds("[node] keepalive_interval",
                                      node.get("keepalive_interval", cfg.keepalive_interval), 0.1, 600)
    cfg.session_timeout = _seconds("[node] session_timeout",
                                   node.get("session_timeout", cfg.session_timeout), 0.2, 3600)
    if cfg.session_timeout < 2 * cfg.keepalive_interval:
        raise ConfigError("[node] session_timeout: must be at least twice keepalive_interval")
    _check_arena(cfg)
    cfg.room_label_limit = _int("[node] room_label_limit",
                                node.get("room_label_limit", cfg.room_label_limit), 0, 10_000)
    cfg.join_rate = _seconds("[node] join_rate", node.get("join_rate", cfg.join_rate))
    cfg.join_rate_per_source = _seconds("[node] join_rate_per_source",
                                        node.get("join_rate_per_source", cfg.join_rate_per_source))
    cfg.max_rooms = _int("[node] max_rooms", node.get("max_rooms", cfg.max_rooms), 1, 100_000)
    cfg.speaker_slots = _int("[node] speaker_slots", node.get("speaker_slots", cfg.speaker_slots), 0, 100_000)
    cfg.drain_grace = _float("[node] drain_grace", node.get("drain_grace", cfg.drain_grace), 0, 3600)
    cfg.drain_rate = _float("[node] drain_rate", node.get("drain_rate", cfg.drain_rate), 1, 10**7)
    cfg.log_interval = _seconds("[node] log_interval", node.get("log_interval", cfg.log_interval), 0.1, 3600)
    cfg.upstream_linger = _seconds("[node] upstream_linger", node.get("upstream_linger", cfg.upstream_linger),
                                   0.1, 3600)
    pair = node.get("upstream_pair", True)
    if not isinstance(pair, bool):
        raise ConfigError(f"[node] upstream_pair: true or false, not {pair!r}")
    cfg.upstream_pair = pair
    cfg.quic_max_pending = _int("[node] quic_max_pending", node.get("quic_max_pending", cfg.quic_max_pending),
                                1, 10**6)
    cfg.quic_max_pending_per_source = _int("[node] quic_max_pending_per_source",
                                           node.get("quic_max_pending_per_source", cfg.quic_max_pending_per_source),
                                           1, 10**6)
    cfg.load_floor = _int("[node] load_floor", node.get("load_floor", cfg.load_floor), 0, 10**7)
    cfg.max_sessions_per_token = _int("[node] max_sessions_per_token",
                                      node.get("max_sessions_per_token", cfg.max_sessions_per_token), 0, 10**7)
    for key, what in (("max_load", "a core"), ("max_machine_load", "the machine's CPUs")):
        value = node.get(key, getattr(cfg, key))
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise ConfigError(f"[node] {key}: expected a fraction of {what} from 0 (off) to 1, got {value!r}")
        setattr(cfg, key, float(value))
    workers = node.get("workers", "auto")
    if workers == "auto":
        workers = max(1, min(os.cpu_count() or 1, 64))
    cfg.workers = _int("[node] workers", workers, 1, 64)
    if cfg.workers > cfg.max_listeners:
        cfg.workers = cfg.max_listeners
    cfg.redirect = str(node.get("redirect", ""))
    if len(cfg.redirect.encode()) > MAX_REDIRECT:
        raise ConfigError(f"[node] redirect: at most {MAX_REDIRECT} bytes")
    cfg.xdp = xdp_config(node, ConfigError)
    _quic(cfg, node)
    _hls(cfg, node)
    _directory(cfg, node)
    _rooms(cfg, raw.get("room", []), label, env)
    return cfg


def _hls(cfg: NodeConfig, node: dict[str, Any]) -> None:
    """[node] hls, hls_max_held, hls_max_connections: the LL-HLS port (TCP)."""
    hls = node.get("hls", "")
    cfg.hls = None if hls == "" else _addr("[node] hls", hls)
    if cfg.hls is not None and cfg.admin is not None and cfg.hls[1] == cfg.admin[1] \
            and (cfg.hls[0] == cfg.admin[0] or WILDCARDS & {cfg.hls[0], cfg.admin[0]}):
        raise ConfigError(f"[node] hls: {cfg.hls[0]}:{cfg.hls[1]} is the admin port; give HLS a port of its own")
    cfg.hls_max_held = _int("[node] hls_max_held", node.get("hls_max_held", cfg.hls_max_held), 1, 10**7)
    cfg.hls_max_connections = _int("[node] hls_max_connections",
                                   node.get("hls_max_connections", cfg.hls_max_connections), 16, 10**7)
    cfg.record_dir = node.get("record_dir", "")
    if not isinstance(cfg.record_dir, str):
        raise ConfigError(f"[node] record_dir: a directory path, not {cfg.record_dir!r}")
    cfg.record_retention = _seconds("[node] record_retention",
                                    node.get("record_retention", cfg.record_retention), 60, 10 * 365 * 86400)


def _room_hls(cfg: NodeConfig, r: RoomConfig, raw: Any) -> None:
    """A room's `hls = true/false` (default true: every room of a node with
    [node] hls) and `record = true/false` (default false)."""
    for key, default in (("hls", True), ("record", False)):
        value = raw.get(key, default) if isinstance(raw, dict) else default
        if not isinstance(value, bool):
            raise ConfigError(f"room {r.name!r}: {key}: true or false, not {value!r}")
        setattr(r, key, value)
    if r.record and (cfg.hls is None or not r.hls):
        raise ConfigError(f"room {r.name!r}: record = true records its LL-HLS: set [node] hls (and keep hls = true)")
    if r.record and not cfg.record_dir:
        raise ConfigError(f"room {r.name!r}: record = true needs [node] record_dir, where the replay is kept")


TIERS = ("origin", "mid", "edge")


def _directory(cfg: NodeConfig, node: dict[str, Any]) -> None:
    cfg.directory = str(node.get("directory", ""))
    if cfg.directory.startswith(SENTINEL_SCHEME):
        try:
            sentinel_url(cfg.directory)
        except ValueError as e:
            raise ConfigError(f"[node] directory: {e}") from None
    elif cfg.directory and not cfg.directory.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"[node] directory: expected a redis://, rediss:// or {SENTINEL_SCHEME} URL, "
                          f"got {shown_url(cfg.directory)!r}")
    cfg.tier = str(node.get("tier", cfg.tier))
    if cfg.tier not in TIERS:
        raise ConfigError(f"[node] tier: one of {', '.join(TIERS)}, got {cfg.tier!r}")
    host, port = cfg.listen
    advertise = node.get("advertise")
    if advertise is not None:
        h, p = _addr("[node] advertise", advertise)
        cfg.advertise = f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
    elif host in ("0.0.0.0", "::"):
        if cfg.directory:
            raise ConfigError(f"[node] advertise: listen is {host}:{port}, which other nodes cannot reach; "
                              f"set the address they should use (host:port)")
    else:
        cfg.advertise = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cfg.node_id = str(node.get("node_id", "") or f"{socket.gethostname()}:{port}")


def _auth(cfg: NodeConfig, node: dict[str, Any], env: Mapping[str, str]) -> None:
    cfg.auth = node.get("auth", "jwt")
    if cfg.auth not in ("jwt", "open"):
        raise ConfigError(f"[node] auth: expected \"jwt\" or \"open\", got {cfg.auth!r}")
    if cfg.auth == "jwt":
        secret_env = node.get("secret_env", "RELAY_SECRET")
        if not isinstance(secret_env, str) or not secret_env:
            raise ConfigError(f"[node] secret_env: expected the name of an environment variable, "
                              f"got {secret_env!r}")
        cfg.secret = env.get(secret_env, "")
        if not cfg.secret:
            raise ConfigError(f"[node] auth = \"jwt\" needs a secret: set the environment "
                              f"variable {secret_env} (or use auth = \"open\" for local use)")
        if len(cfg.secret.encode()) < 32:
            raise ConfigError(f"[node] the secret in {secret_env} is {len(cfg.secret.encode())} bytes; "
                              "HS256 wants at least 32 bytes")


WILDCARDS = {"0.0.0.0", "::"}


def _rooms(cfg: NodeConfig, rooms: Any, label: str, environ: Mapping[str, str]) -> None:
    if not isinstance(rooms, list):
        raise ConfigError(f"{label}: rooms are [[room]] tables")
    cfg.rooms = [_room(i, r, cfg.auth == "open", environ) for i, r in enumerate(rooms)]
    for r, raw in zip(cfg.rooms, rooms, strict=True):
        _room_hls(cfg, r, raw)
    if not cfg.rooms:
        raise ConfigError(f"{label}: no [[room]] configured")
    if len(cfg.rooms) > cfg.max_rooms:
        raise ConfigError(f"{label}: {len(cfg.rooms)} rooms but [node] max_rooms = {cfg.max_rooms}")
    seen: set[str] = set()
    taken: list[tuple[tuple[str, int], str]] = [(cfg.listen, "[node] listen")]   # UDP sockets, and whose
    if cfg.quic is not None:
        taken.append((cfg.quic, "[node] quic"))
    for r in cfg.rooms:
        if r.name in seen:
            raise ConfigError(f"room {r.name!r}: defined twice")
        seen.add(r.name)
        if r.from_directory and not cfg.directory:
            raise ConfigError(f"room {r.name!r}: upstream = \"directory\" needs [node] directory (a redis:// URL)")
        if r.from_directory and cfg.tier == "origin":
            raise ConfigError(f"room {r.name!r}: upstream = \"directory\" takes parents from the tier above "
                              "this node's; an origin has none: set [node] tier = \"mid\" or \"edge\"")
        if r.ingest is None:
            continue
        for (host, port), what in taken:
            # one port on one address, or on a wildcard that covers both
            if port == r.ingest[1] and (host == r.ingest[0] or WILDCARDS & {host, r.ingest[0]}):
                raise ConfigError(f"room {r.name!r}: ingest {r.ingest[0]}:{r.ingest[1]} is the port of "
                                  f"{what}: give the room a port of its own")
        taken.append((r.ingest, f"room {r.name!r}'s ingest"))
