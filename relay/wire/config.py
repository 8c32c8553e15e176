"""Node configuration: a TOML file, flags on top, and an embedded default
for the demo. Every mistake becomes one ConfigError line naming what to fix."""
from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping

from relay.wire.directory_url import SENTINEL_SCHEME, sentinel_url, shown_url
from relay.wire.config_values import ConfigError, address, integer, number, seconds
from relay.wire.protocol import MAX_REDIRECT
from relay.wire.room_config import (PLAIN_TAKEOVER_S, SRTP_TAKEOVER_S, RoomConfig, room)  # noqa: F401 (re-exported)
from relay.wire.egress_config import KEYS as EGRESS_KEYS
from relay.wire.egress_config import XdpConfig, xdp_config

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


def _quic(cfg: NodeConfig, node: dict[str, Any]) -> None:
    quic = node.get("quic", "")
    cfg.quic = None if quic == "" else address("[node] quic", quic)
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
        cfg.listen = address("[node] listen", node["listen"])
    if "admin" in node:
        cfg.admin = None if node["admin"] == "" else address("[node] admin", node["admin"])
    if node.get("public", "") != "":
        cfg.public = address("[node] public", node["public"])
        if cfg.admin is not None and cfg.public[1] == cfg.admin[1] \
                and (cfg.public[0] == cfg.admin[0] or WILDCARDS & {cfg.public[0], cfg.admin[0]}):
            raise ConfigError(f"[node] public: {cfg.public[0]}:{cfg.public[1]} is the admin port; give the "
                              "listeners' HTTP a port of its own (or leave public out to serve both on admin)")
    _auth(cfg, node, env)
    cfg.max_listeners = integer("[node] max_listeners", node.get("max_listeners", cfg.max_listeners), 1, 10**7)
    cfg.ring_depth = integer("[node] ring_depth", node.get("ring_depth", cfg.ring_depth), 2, 4096)
    if cfg.ring_depth & (cfg.ring_depth - 1):
        raise ConfigError(f"[node] ring_depth: must be a power of two, got {cfg.ring_depth}")
    # a ring must hold at least the largest packet it is asked to carry
    cfg.ring_bytes = integer("[node] ring_bytes", node.get("ring_bytes", cfg.ring_bytes),
                          MIN_RING_BYTES, MAX_RING_BYTES)
    cfg.burst_packets = integer("[node] burst_packets", node.get("burst_packets", cfg.burst_packets),
                             0, cfg.ring_depth - 1)
    # the ACCEPT carries both in milliseconds; keepalives faster than 10 a
    # second would only be load
    cfg.keepalive_interval = seconds("[node] keepalive_interval",
                                      node.get("keepalive_interval", cfg.keepalive_interval), 0.1, 600)
    cfg.session_timeout = seconds("[node] session_timeout",
                                   node.get("session_timeout", cfg.session_timeout), 0.2, 3600)
    if cfg.session_timeout < 2 * cfg.keepalive_interval:
        raise ConfigError("[node] session_timeout: must be at least twice keepalive_interval")
    _check_arena(cfg)
    cfg.room_label_limit = integer("[node] room_label_limit",
                                node.get("room_label_limit", cfg.room_label_limit), 0, 10_000)
    cfg.join_rate = seconds("[node] join_rate", node.get("join_rate", cfg.join_rate))
    cfg.join_rate_per_source = seconds("[node] join_rate_per_source",
                                        node.get("join_rate_per_source", cfg.join_rate_per_source))
    cfg.max_rooms = integer("[node] max_rooms", node.get("max_rooms", cfg.max_rooms), 1, 100_000)
    cfg.speaker_slots = integer("[node] speaker_slots", node.get("speaker_slots", cfg.speaker_slots), 0, 100_000)
    cfg.drain_grace = number("[node] drain_grace", node.get("drain_grace", cfg.drain_grace), 0, 3600)
    cfg.drain_rate = number("[node] drain_rate", node.get("drain_rate", cfg.drain_rate), 1, 10**7)
    cfg.log_interval = seconds("[node] log_interval", node.get("log_interval", cfg.log_interval), 0.1, 3600)
    cfg.upstream_linger = seconds("[node] upstream_linger", node.get("upstream_linger", cfg.upstream_linger),
                                   0.1, 3600)
    pair = node.get("upstream_pair", True)
    if not isinstance(pair, bool):
        raise ConfigError(f"[node] upstream_pair: true or false, not {pair!r}")
    cfg.upstream_pair = pair
    cfg.quic_max_pending = integer("[node] quic_max_pending", node.get("quic_max_pending", cfg.quic_max_pending),
                                1, 10**6)
    cfg.quic_max_pending_per_source = integer("[node] quic_max_pending_per_source",
                                           node.get("quic_max_pending_per_source", cfg.quic_max_pending_per_source),
                                           1, 10**6)
    cfg.load_floor = integer("[node] load_floor", node.get("load_floor", cfg.load_floor), 0, 10**7)
    cfg.max_sessions_per_token = integer("[node] max_sessions_per_token",
                                      node.get("max_sessions_per_token", cfg.max_sessions_per_token), 0, 10**7)
    for key, what in (("max_load", "a core"), ("max_machine_load", "the machine's CPUs")):
        value = node.get(key, getattr(cfg, key))
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise ConfigError(f"[node] {key}: expected a fraction of {what} from 0 (off) to 1, got {value!r}")
        setattr(cfg, key, float(value))
    workers = node.get("workers", "auto")
    if workers == "auto":
        workers = max(1, min(os.cpu_count() or 1, 64))
    cfg.workers = integer("[node] workers", workers, 1, 64)
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
    cfg.hls = None if hls == "" else address("[node] hls", hls)
    if cfg.hls is not None and cfg.admin is not None and cfg.hls[1] == cfg.admin[1] \
            and (cfg.hls[0] == cfg.admin[0] or WILDCARDS & {cfg.hls[0], cfg.admin[0]}):
        raise ConfigError(f"[node] hls: {cfg.hls[0]}:{cfg.hls[1]} is the admin port; give HLS a port of its own")
    cfg.hls_max_held = integer("[node] hls_max_held", node.get("hls_max_held", cfg.hls_max_held), 1, 10**7)
    cfg.hls_max_connections = integer("[node] hls_max_connections",
                                   node.get("hls_max_connections", cfg.hls_max_connections), 16, 10**7)
    cfg.record_dir = node.get("record_dir", "")
    if not isinstance(cfg.record_dir, str):
        raise ConfigError(f"[node] record_dir: a directory path, not {cfg.record_dir!r}")
    cfg.record_retention = seconds("[node] record_retention",
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
        h, p = address("[node] advertise", advertise)
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
    cfg.rooms = [room(i, r, cfg.auth == "open", environ) for i, r in enumerate(rooms)]
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
