"""Route and neighbour lookups through rtnetlink, for the AF_XDP egress.

An AF_XDP frame carries its own Ethernet header, so the egress needs what
the kernel's IP stack would have used: the route to a listener (which
interface, which gateway, which source address) and the next hop's MAC from
the neighbour table. The messages are built and parsed here as bytes
(`route_request`, `parse`); `Netlink` is the thin socket around them,
including the subscription to neighbour changes that keeps cached MACs
fresh. Linux only; no library beyond the standard one.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Iterator

NETLINK_ROUTE = 0
RTMGRP_NEIGH = 0x4
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC = 1, 4, 5, 7
NDA_DST, NDA_LLADDR = 1, 2
RTN_UNICAST = 1
# neighbour states whose MAC may be used: confirmed, or unconfirmed but not
# failed (the kernel re-probes STALE ones itself when it sends)
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80
_HDR = struct.Struct("=IHHII")       # nlmsghdr
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg
_NDMSG = struct.Struct("=BxxxiHBB")   # ndmsg
_RTA = struct.Struct("=HH")


@dataclass(frozen=True)
class Route:
    """Where the kernel would send a packet to one address."""
    ifindex: int
    next_hop: str        # the gateway, or the destination itself when on-link
    source: str          # the preferred source address ("" if the route has none)


@dataclass(frozen=True)
class Neighbour:
    """One entry of the neighbour table (ARP or NDP), or its removal."""
    ifindex: int
    ip: str
    mac: bytes           # b"" when the entry has none or is not usable
    gone: bool = False


def _attrs(data: bytes, at: int) -> dict[int, bytes]:
    out = {}
    while at + 4 <= len(data):
        n, kind = _RTA.unpack_from(data, at)
        if n < 4:
            break
        out[kind & 0x3FFF] = data[at + 4:at + n]
        at += (n + 3) & ~3
    return out


def _attr(kind: int, value: bytes) -> bytes:
    raw = _RTA.pack(4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def _message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return _HDR.pack(_HDR.size + len(body), kind, flags, seq, 0) + body


def route_request(dst: str, seq: int = 1) -> bytes:
    """RTM_GETROUTE for one destination address."""
    ip = ipaddress.ip_address(dst)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    body = _RTMSG.pack(family, ip.max_prefixlen, 0, 0, 0, 0, 0, 0, 0) + _attr(RTA_DST, ip.packed)
    return _message(RTM_GETROUTE, NLM_F_REQUEST, seq, body)


def neighbour_dump(family: int = socket.AF_UNSPEC, seq: int = 2) -> bytes:
    """RTM_GETNEIGH for the whole table."""
    return _message(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, seq, _NDMSG.pack(family, 0, 0, 0, 0))


def _ip(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def parse(data: bytes) -> Iterator[Route | Neighbour | OSError | None]:
    """The messages in one netlink read: Routes, Neighbours, an OSError for
    an error reply, None for the end of a dump. Others are skipped."""
    at = 0
    while at + _HDR.size <= len(data):
        n, kind, _flags, _seq, _pid = _HDR.unpack_from(data, at)
        if n < _HDR.size:
            return
        body = data[at + _HDR.size:at + n]
        at += (n + 3) & ~3
        if kind == NLMSG_DONE:
            yield None
        elif kind == NLMSG_ERROR and len(body) >= 4:
            err = -struct.unpack_from("=i", body)[0]
            if err:
                yield OSError(err, os.strerror(err))
        elif kind == RTM_NEWROUTE and len(body) >= _RTMSG.size:
            rtype = _RTMSG.unpack_from(body)[7]
            a = _attrs(body, _RTMSG.size)
            if rtype != RTN_UNICAST or RTA_OIF not in a:
                yield Route(0, "", "")      # local, unreachable or blackhole: not for AF_XDP
                continue
            hop = a.get(RTA_GATEWAY) or a.get(RTA_DST) or b""
            yield Route(struct.unpack("=i", a[RTA_OIF])[0], _ip(hop) if hop else "",
                        _ip(a[RTA_PREFSRC]) if RTA_PREFSRC in a else "")
        elif kind in (RTM_NEWNEIGH, RTM_DELNEIGH) and len(body) >= _NDMSG.size:
            _family, ifindex, state, _f, _t = _NDMSG.unpack_from(body)
            a = _attrs(body, _NDMSG.size)
            if NDA_DST not in a:
                continue
            mac = a.get(NDA_LLADDR, b"") if state & NUD_USABLE else b""
            yield Neighbour(ifindex, _ip(a[NDA_DST]), mac if len(mac) == 6 else b"", kind == RTM_DELNEIGH)


class Netlink:
    """An rtnetlink socket: one-off queries, and (with `watch`) a
    non-blocking socket that receives neighbour changes."""

    def __init__(self, watch: bool = False) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_NEIGH if watch else 0))
        if watch:
            self.sock.setblocking(False)
        self._seq = 100

    def _ask(self, request: bytes) -> list[Route | Neighbour]:
        self.sock.settimeout(1.0)
        self.sock.send(request)
        out: list[Route | Neighbour] = []
        while True:
            for m in parse(self.sock.recv(1 << 16)):
                if isinstance(m, OSError):
                    raise m
                if m is None:
                    return out
                out.append(m)
                if isinstance(m, Route):     # a route reply is a single message
                    return out

    def route(self, dst: str) -> Route:
        """The kernel's route to `dst` (an OSError if there is none)."""
        self._seq += 1
        got = self._ask(route_request(dst, self._seq))
        return got[0] if got and isinstance(got[0], Route) else Route(0, "", "")

    def neighbours(self) -> list[Neighbour]:
        """The whole neighbour table, IPv4 and IPv6."""
        self._seq += 1
        return [m for m in self._ask(neighbour_dump(seq=self._seq)) if isinstance(m, Neighbour)]

    def changes(self) -> list[Neighbour]:
        """Neighbour changes received since the last call (watching socket)."""
        out: list[Neighbour] = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError:          # ENOBUFS: changes were lost; the caller re-reads the table
                return out + [Neighbour(0, "", b"", gone=True)]
            out.extend(m for m in parse(data) if isinstance(m, Neighbour))

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
