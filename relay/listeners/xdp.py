"""The AF_XDP egress's policy: which shards get a socket, which listeners
go through it, and keeping their next hops' MACs current.

The core (relay/core/xdp.pxi) builds and sends the frames; this module
decides everything around that. At start each sender shard k asks the core
for an AF_XDP socket on queue `xdp_queue + k` of `xdp_interface`; where
the interface or our privileges refuse, those shards keep sendmmsg and one
line in the log says why. A listener goes through AF_XDP when the kernel's
route to it leaves by that interface and the next hop's MAC is in the
neighbour table (the handshake's replies went out through the kernel, so
it usually is); otherwise it stays on sendmmsg until the MAC appears.
Neighbour changes arrive on a netlink socket the event loop watches and
update the next hop for all of its listeners at once.
"""
from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import struct
import time

from relay._core import Core, XdpEgress
from relay.wire.egress_config import XdpConfig
from relay.wire.netlink import Neighbour, Netlink

log = logging.getLogger("relay.egress")

MAX_PATHS = 256          # next hops the core holds (RELAY_XPATHS)
PATH = struct.Struct("=6s6sBx2sH16s")   # relay_xpath in relay/core/xsk.h
BUSY_TRIES, BUSY_WAIT_S = 20, 0.05     # a queue still held by a closed socket: up to a second


def pack_path(dst_mac: bytes, src_mac: bytes, src_ip: str, src_port: int, mtu: int) -> bytes:
    """A next hop as the core's relay_xpath: MACs, our address and port, the link MTU."""
    ip = ipaddress.ip_address(src_ip)
    return PATH.pack(dst_mac, src_mac, ip.version, src_port.to_bytes(2, "big"), mtu, ip.packed)


def dest_ip(sockaddr: bytes) -> str:
    """The IP address in a raw sockaddr_in or sockaddr_in6."""
    if struct.unpack_from("=H", sockaddr)[0] == socket.AF_INET6:
        return str(ipaddress.ip_address(sockaddr[8:24]))
    return str(ipaddress.ip_address(sockaddr[4:8]))


def _link(name: str) -> tuple[int, bytes, int]:
    """(ifindex, MAC, MTU) of an interface; OSError if it does not exist."""
    ifindex = socket.if_nametoindex(name)
    with open(f"/sys/class/net/{name}/address") as f:
        mac = bytes.fromhex(f.read().strip().replace(":", ""))
    with open(f"/sys/class/net/{name}/mtu") as f:
        mtu = int(f.read())
    if len(mac) != 6:
        raise OSError(errno.EOPNOTSUPP, f"{name} is not an Ethernet interface")
    return ifindex, mac, mtu


class XdpListeners:
    """Opens the core's AF_XDP sockets and routes listeners through them."""

    def __init__(self, core: Core, cfg: XdpConfig) -> None:
        self.core, self.cfg = core, cfg
        self.xdp = XdpEgress(core)
        self.active = False
        self.ifindex, self.mac, self.mtu = 0, b"", 0
        self.bound: tuple[str, int] = ("", 0)
        self._nl: Netlink | None = None
        self._watch: Netlink | None = None
        self._macs: dict[str, bytes] = {}                   # next hop IP -> MAC, on our interface
        self._paths: dict[tuple[str, str], int] = {}        # (next hop, source) -> the core's path index
        self._waiting: dict[str, dict[int, bytes]] = {}     # next hop without a MAC -> {slot: sockaddr}
        self.routed = 0

    def start(self, listen_sock: socket.socket) -> bool:
        """Open one AF_XDP socket per shard. False (and one log line) when
        none could be opened: the node then sends with sendmmsg as before."""
        iface, refused = self.cfg.interface, []
        try:
            self.ifindex, self.mac, self.mtu = _link(iface)
            for k in range(self.core.shards):
                err, step = self._open(k)
                if err:
                    refused.append((k, self.cfg.queue + k, step, err))
            if len(refused) < self.core.shards:
                self._nl, self._watch = Netlink(), Netlink(watch=True)
                self._macs = {n.ip: n.mac for n in self._nl.neighbours() if n.ifindex == self.ifindex and n.mac}
        except OSError as e:
            refused = [(k, self.cfg.queue + k, "interface", e.errno or errno.ENODEV)
                       for k in range(self.core.shards)]
        if refused:
            k, queue, step, err = refused[0]
            what = "every shard sends" if len(refused) == self.core.shards else \
                f"shards {', '.join(str(r[0]) for r in refused)} send"
            log.warning('egress = "xdp": AF_XDP refused on %s queue %d (%s: %s); %s with sendmmsg',
                        iface, queue, step, os.strerror(err), what)
        self.active = len(refused) < self.core.shards
        if self.active:
            self.bound = listen_sock.getsockname()[:2]
            log.info("egress: AF_XDP on %s, queues %d..%d (%s mode)", iface, self.cfg.queue,
                     self.cfg.queue + self.core.shards - 1, "zero-copy" if self.cfg.zerocopy else "copy")
        return self.active

    def _open(self, k: int) -> tuple[int, str]:
        # a queue whose last socket just closed stays taken until the
        # kernel's deferred cleanup runs (a restart, a reload): wait for it
        for _ in range(BUSY_TRIES):
            err, step = self.xdp.open(k, self.ifindex, self.cfg.queue + k, self.cfg.frames,
                                      zerocopy=self.cfg.zerocopy)
            if err != errno.EBUSY:
                break
            time.sleep(BUSY_WAIT_S)
        return err, step

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Follow neighbour changes from the event loop."""
        if self._watch is not None:
            loop.add_reader(self._watch.fileno(), self.on_changes)

    def place(self, slot: int, sockaddr: bytes) -> bool:
        """Route a new UDP listener through AF_XDP if its next hop allows;
        True if it now goes out that way."""
        if not self.active or self._nl is None:
            return False
        ip = dest_ip(sockaddr)
        if ip.startswith("::ffff:"):
            return False      # IPv4-mapped listeners of a dual-stack socket stay on sendmmsg
        try:
            route = self._nl.route(ip)
        except OSError:
            return False
        if route.ifindex != self.ifindex or not route.next_hop:
            return False
        source = self.bound[0] if self.bound[0] not in ("0.0.0.0", "::", "") else route.source
        if not source:
            return False
        mac = self._macs.get(route.next_hop)
        if not mac:
            self._waiting.setdefault(route.next_hop, {})[slot] = sockaddr
            return False
        return self._route(slot, sockaddr, route.next_hop, source, mac)

    def _route(self, slot: int, sockaddr: bytes, hop: str, source: str, mac: bytes) -> bool:
        index = self._paths.get((hop, source))
        if index is None:
            if len(self._paths) >= MAX_PATHS:
                return False
            index = self._paths[(hop, source)] = len(self._paths)
            self.xdp.path(index, pack_path(mac, self.mac, source, self.bound[1], self.mtu))
        if not self.xdp.route(slot, index, sockaddr):
            return False       # the listener left (its slot may serve someone else now)
        self.routed += 1
        return True

    def on_changes(self) -> None:
        """Neighbour changes: new MACs for next hops in use, and listeners
        that were waiting for one."""
        if self._watch is None or self._nl is None:
            return
        changes = self._watch.changes()
        if any(n.gone and not n.ip for n in changes):          # lost changes: read the table again
            changes = self._nl.neighbours()
        for n in changes:
            if n.ifindex == self.ifindex and n.mac and not n.gone:
                self._learn(n)

    def _learn(self, n: Neighbour) -> None:
        if self._macs.get(n.ip) == n.mac:
            return
        self._macs[n.ip] = n.mac
        for (hop, source), index in self._paths.items():
            if hop == n.ip:
                log.info("egress: next hop %s is now %s", hop, n.mac.hex(":"))
                self.xdp.path(index, pack_path(n.mac, self.mac, source, self.bound[1], self.mtu))
        for slot, sockaddr in self._waiting.pop(n.ip, {}).items():
            self.place(slot, sockaddr)

    def counters(self) -> dict[str, int]:
        """The core's AF_XDP counters, its sockets and the listeners routed (for /metrics)."""
        return dict(self.xdp.counters(), sockets=sum(self.xdp.shards()), routed=self.routed)

    def close(self) -> None:
        """Stop watching and close the core's AF_XDP sockets (call it
        after the sender threads have stopped)."""
        self.xdp.close()
        self.active = False
        for nl in (self._nl, self._watch):
            if nl is not None:
                try:
                    asyncio.get_running_loop().remove_reader(nl.fileno())
                except RuntimeError:
                    pass
                nl.close()
        self._nl = self._watch = None
