"""Who may publish into a room, and who may replace the live stream.

The core keeps the rules per room (allowed sources, whether a stream is
pinned to its address, the takeover silence); this module turns a room's
config into them, and tells the ingest ports which sources to spend SRTP
on.
"""
from __future__ import annotations

from ipaddress import ip_address
from typing import Callable

from relay._core import Core
from relay.wire.addr import to_sockaddr
from relay.wire.config import SRTP_TAKEOVER_S, RoomConfig


def allow_sources(core: Core, index: int, r: RoomConfig) -> None:
    """Load the room's allowed publisher addresses into the core."""
    core.room_clear_sources(index)
    for host, port in r.sources:
        core.room_allow(index, to_sockaddr((host, port)), any_port=(port == 0))


def source_filter(r: RoomConfig) -> Callable[[tuple], bool]:
    """Whether a datagram's source address may publish into the room."""
    allowed = {(ip_address(h), p) for h, p in r.sources}

    def allowed_source(addr: tuple) -> bool:
        ip = ip_address(addr[0].partition("%")[0])
        return r.any_source or (ip, 0) in allowed or (ip, addr[1]) in allowed
    return allowed_source


def apply_rules(core: Core, index: int, r: RoomConfig) -> None:
    """Who may replace the live stream. With an SRTP key, packets must
    authenticate, and a new stream may take over after a short silence: it
    holds the key. Without one, the live stream is its SSRC and its address,
    and another may take over only after a BYE from it, the operator's
    release, or takeover_after seconds of silence (2 s unless the room says
    otherwise; "never" keeps the room until a BYE or a release)."""
    if r.from_upstream or r.pair:
        # copies of one stream from up to two parents, merged; a parent
        # whose stream is another (another SSRC) is followed only after the
        # live one falls silent, never mixed with it
        core.room_rules(index, SRTP_TAKEOVER_S, pin_source=False, merge=True)
        return
    takeover = -1.0 if r.takeover_after is None else r.takeover_after
    core.room_rules(index, takeover, pin_source=not r.srtp_key, max_pps=r.max_packet_rate,
                    max_bps=r.max_bitrate)


def describe_rules(r: RoomConfig) -> str:
    """The rules in words, for the reload log."""
    return (f"publishers now {'SRTP' if r.srtp_key else 'plain RTP'}, takeover "
            + ("after a BYE or release" if r.takeover_after is None else f"after {r.takeover_after:g} s"))
