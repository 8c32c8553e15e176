"""A node's directory record as Redis holds it: every field a string,
checked one by one when read, and signed by the node that wrote it.

Anyone who can write to Redis can write a record, so a record is believed
only if each field is what a node would write (bounded numbers, a tier
from the list, addresses with valid ports, a WebTransport URL on the QUIC
address, a certificate hash of 64 hex digits, bounded room and parent lists) and,
in a cluster with a secret, if its tag verifies: HMAC-SHA256 over the node
id and every field in a fixed order, keyed by a key derived from the
cluster's secret (so the directory key is never the token key itself).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping
from urllib.parse import urlsplit

from relay.wire.addr import parse_hostport
from relay.wire.config import TIERS
from relay.wire.protocol import MAX_ROOM

# every field of a record, in the order the tag covers them
FIELDS = ("udp", "quic", "webtransport", "cert", "tier", "capacity", "listeners", "load", "draining", "rooms",
          "parents")
TAG = "sig"                  # the hash field holding the tag (hex)
CONTEXT = b"relay directory v1"
MAX_NODE_ID = 128            # bytes of UTF-8
MAX_COUNT = 10**7            # [node] max_listeners' own bound
MAX_LOAD = 1000.0            # a duty far past any real one, but finite
MAX_ROOMS = 100_000          # [node] max_rooms' own bound
MAX_URL_PATH = 256
MAX_PARENTS = 8              # a node's parents named in its record (two per room; a few rooms' worth)
_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?")
_CERT = re.compile(r"[0-9a-f]{64}")
_COUNT = re.compile(r"[0-9]{1,8}")      # no sign, no spaces, no 400-digit numbers
_LOAD = re.compile(r"[0-9]{1,4}(?:\.[0-9]{1,17})?(?:e-?[0-9]{1,2})?")


class Invalid(ValueError):
    """A record that no node of this cluster would write; the message names
    the field and what it should be."""


class Unsigned(ValueError):
    """A record whose tag is missing or does not verify with this
    cluster's key."""


@dataclass
class Peer:
    """Another node, as its last heartbeat described it."""
    id: str
    udp: str
    quic: str
    tier: str
    capacity: int
    listeners: int
    load: float
    draining: bool
    rooms: list[str]
    seen: float           # monotonic time we last read it
    webtransport: str = ""   # the page's URL for it ("" without QUIC)
    cert: str = ""           # its self-signed certificate's SHA-256, for a page to pin
    parents: tuple[str, ...] = ()   # the nodes it takes rooms from now (their udp addresses)

    @property
    def spare(self) -> int:
        return max(0, self.capacity - self.listeners)


class Record(dict[str, Any]):
    """This node's record as routing.node_record builds it, with the key
    its heartbeat signs it with (None: no cluster secret, so unsigned). A
    node checks its peers' tags with the same key: they share the secret."""

    def __init__(self, fields: Mapping[str, Any], key: bytes | None) -> None:
        super().__init__(fields)
        self.key = key


@lru_cache(maxsize=4)
def record_key(secret: str) -> bytes | None:
    """The key records are signed with, derived from the cluster secret;
    None without one (open auth)."""
    if not secret:
        return None
    return hmac.new(secret.encode(), CONTEXT, hashlib.sha256).digest()


def encode(record: Mapping[str, Any]) -> dict[str, str]:
    """A record's fields as Redis stores them: strings, booleans as 0/1,
    the room list as JSON."""
    out = {}
    for k in FIELDS:
        v = record[k]
        out[k] = (json.dumps(v) if isinstance(v, list)
                  else str(int(v) if isinstance(v, bool) else v))
    return out


def tag(key: bytes, node_id: str, fields: Mapping[str, str]) -> str:
    """HMAC-SHA256 over a canonical encoding (a JSON array of strings, which
    no two different records share) of the node id and every field."""
    canonical = json.dumps([CONTEXT.decode(), node_id, *(fields[k] for k in FIELDS)],
                           separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def check_id(node_id: str) -> None:
    """A node id as a record key may carry it: bounded, printable."""
    if not node_id or len(node_id.encode()) > MAX_NODE_ID or not node_id.isprintable():
        raise Invalid(f"node id: expected 1 to {MAX_NODE_ID} bytes of printable text")


def _host(where: str, host: str) -> None:
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host):
        raise Invalid(f"{where}: {host[:64]!r} is neither an IP address nor a host name")


def _hostport(where: str, text: str) -> tuple[str, int]:
    if text != text.strip() or len(text) > 300:
        raise Invalid(f"{where}: expected host:port")
    try:
        host, port = parse_hostport(text)
    except ValueError as e:
        raise Invalid(f"{where}: {e}") from None
    if not 1 <= port <= 65535:
        raise Invalid(f"{where}: port {port} out of range")
    _host(where, host)
    return host.lower(), port


def _count(where: str, text: str, lo: int) -> int:
    if not _COUNT.fullmatch(text) or not lo <= int(text) <= MAX_COUNT:
        raise Invalid(f"{where}: expected an integer from {lo} to {MAX_COUNT}")
    return int(text)


def _load(text: str) -> float:
    value = float(text) if _LOAD.fullmatch(text) else math.nan
    if not math.isfinite(value) or not 0.0 <= value <= MAX_LOAD:
        raise Invalid(f"load: expected a number from 0 to {MAX_LOAD:g}")
    return value


def _webtransport(text: str, quic: tuple[str, int] | None) -> None:
    if quic is None:
        if text:
            raise Invalid("webtransport: a node without QUIC has no WebTransport URL")
        return
    if not text:
        return
    try:
        url = urlsplit(text)
        host, port = url.hostname, url.port
    except ValueError:
        raise Invalid("webtransport: not a URL") from None
    # the page connects where the URL says and pins `cert`: both must be
    # the QUIC endpoint that the record names, never another host
    if (url.scheme != "https" or url.username is not None or url.password is not None
            or (host, port) != quic or url.query or url.fragment):
        raise Invalid("webtransport: expected https://HOST:PORT/PATH on the record's quic address")
    if (not url.path.startswith("/") or len(url.path) > MAX_URL_PATH or not url.path.isprintable()
            or " " in url.path):
        raise Invalid(f"webtransport: expected a path of 1 to {MAX_URL_PATH} printable characters")


def _utf8(text: str) -> int:
    """Bytes of UTF-8; a lone surrogate (JSON can carry one) counts as too long."""
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        return MAX_ROOM + 1


def _rooms(text: str) -> list[str]:
    try:
        rooms = json.loads(text)
    except (ValueError, RecursionError):     # a list nested a million deep is not a room list
        raise Invalid("rooms: not JSON") from None
    if (not isinstance(rooms, list) or len(rooms) > MAX_ROOMS
            or not all(isinstance(r, str) and 0 < _utf8(r) <= MAX_ROOM for r in rooms)):
        raise Invalid(f"rooms: expected a list of at most {MAX_ROOMS} room names of 1 to {MAX_ROOM} bytes")
    return rooms


def _parents(text: str) -> tuple[str, ...]:
    try:
        parents = json.loads(text)
    except (ValueError, RecursionError):
        raise Invalid("parents: not JSON") from None
    if not isinstance(parents, list) or len(parents) > MAX_PARENTS or not all(isinstance(p, str) for p in parents):
        raise Invalid(f"parents: expected a list of at most {MAX_PARENTS} host:port addresses")
    for p in parents:
        _hostport("parents", p)
    return tuple(parents)


def check(node_id: str, fields: Mapping[str, str | None], key: bytes | None, now: float) -> Peer:
    """The peer a record describes, if every field is one a node would
    write and, with a `key`, its tag verifies; else Invalid or Unsigned."""
    check_id(node_id)
    missing = [k for k in ("udp", "capacity", "listeners", "load") if fields.get(k) is None]
    if missing:
        raise Invalid(f"{missing[0]}: missing")
    values = {k: fields.get(k) or "" for k in FIELDS}
    if key is not None:
        got = fields.get(TAG) or ""
        # checked before any field is parsed: nothing unsigned is worth the work
        if not hmac.compare_digest(got.encode(), tag(key, node_id, values).encode()):
            raise Unsigned("its tag does not verify with this cluster's key" if got else "it is not signed")
    _hostport("udp", values["udp"])
    quic = _hostport("quic", values["quic"]) if values["quic"] else None
    _webtransport(values["webtransport"], quic)
    if values["cert"] and not _CERT.fullmatch(values["cert"]):
        raise Invalid("cert: expected 64 lowercase hex digits (a SHA-256) or nothing")
    if values["tier"] not in TIERS:
        raise Invalid(f"tier: expected one of {', '.join(TIERS)}")
    if values["draining"] not in ("0", "1", ""):
        raise Invalid("draining: expected 0 or 1")
    return Peer(node_id, values["udp"], values["quic"], values["tier"],
                _count("capacity", values["capacity"], 1), _count("listeners", values["listeners"], 0),
                _load(values["load"]), values["draining"] == "1", _rooms(values["rooms"] or "[]"), now,
                values["webtransport"], values["cert"], _parents(values["parents"] or "[]"))

