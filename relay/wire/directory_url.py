"""The cluster directory's URL: redis://, rediss:// or redis+sentinel://,
taken apart and shown without its password."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from relay.wire.addr import parse_hostport


# The directory behind Redis Sentinel: the sentinels to ask (any one that
# answers will do), the name they know the master by, and the database.
SENTINEL_SCHEME = "redis+sentinel://"
SENTINEL_PORT = 26379
SENTINEL_FORM = "redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER_NAME[/DB]"


@dataclass(frozen=True)
class SentinelURL:
    """A redis+sentinel:// directory URL, taken apart. The user and password
    are the master's (and its replicas'); the sentinels are asked without."""
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def sentinel_url(url: str) -> SentinelURL:
    """Parse a redis+sentinel:// URL; raises ValueError saying what is wrong
    (never quoting the password)."""
    if not url.startswith(SENTINEL_SCHEME):
        raise ValueError(f"expected {SENTINEL_FORM}")
    rest = url[len(SENTINEL_SCHEME):]
    if "?" in rest or "#" in rest:
        raise ValueError(f"options after '?' are not taken; expected {SENTINEL_FORM}")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username, password = unquote(user) or None, (unquote(secret) or None) if colon else None
    if not hosts:
        raise ValueError(f"no sentinel listed; expected {SENTINEL_FORM}")
    sentinels = []
    for h in hosts.split(","):
        if not h.strip():
            raise ValueError(f"a sentinel's address is empty; expected {SENTINEL_FORM}")
        try:
            host, port = parse_hostport(h, default_port=SENTINEL_PORT)
        except ValueError as e:
            raise ValueError(f"sentinel {h!r}: {e}") from None
        if not host or not host.isprintable() or " " in host or not 1 <= port <= 65535:
            raise ValueError(f"sentinel {h!r}: expected HOST[:PORT] with a port from 1 to 65535")
        sentinels.append((host, port))
    service, _, db_text = path.partition("/")
    if not service or any(c.isspace() or not c.isprintable() for c in unquote(service)):
        raise ValueError(f"no master name after the sentinels; expected {SENTINEL_FORM}")
    if db_text.endswith("/"):
        db_text = db_text[:-1]
    if db_text and (not db_text.isdigit() or int(db_text) > 1_000_000):
        raise ValueError(f"database {db_text!r}: expected a number from 0 to 1000000")
    return SentinelURL(tuple(sentinels), unquote(service), int(db_text or 0), username, password)


def shown_url(url: str) -> str:
    """A directory URL fit for a log line or an error: its password hidden."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, tail = rest.rpartition("@") if sep else ("", "", rest)
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{tail}"
