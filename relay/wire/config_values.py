"""The config's value checks: each names the key it read and what it
wanted, as one line (ConfigError), never a traceback."""
from __future__ import annotations

from typing import Any

from relay.wire.addr import parse_hostport


class ConfigError(Exception):
    """A configuration mistake, as one readable line."""


def address(where: str, value: Any) -> tuple[str, int]:
    """A "host:port" value, or ConfigError naming `where`."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected \"host:port\", got {value!r}")
    try:
        return parse_hostport(value)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def integer(where: str, value: Any, lo: int, hi: int) -> int:
    """An integer from `lo` to `hi`, or ConfigError naming `where`."""
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{where}: expected an integer from {lo} to {hi}, got {value!r}")
    return value


def number(where: str, value: Any, lo: float, hi: float) -> float:
    """A number from `lo` to `hi`, or ConfigError naming `where`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{where}: expected a number from {lo:g} to {hi:g}, got {value!r}")
    return float(value)


def seconds(where: str, value: Any, lo: float = 0.0, hi: float = float("inf")) -> float:
    """A positive number of seconds (within `lo`..`hi`), or ConfigError naming `where`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0 or not lo <= value <= hi:
        bounds = f" from {lo:g} to {hi:g}" if hi != float("inf") else ""
        raise ConfigError(f"{where}: expected a positive number of seconds{bounds}, got {value!r}")
    return float(value)
