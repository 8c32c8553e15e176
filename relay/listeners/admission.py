"""Admission limits: token buckets for the join rate of the whole node and
of each source address. Over a limit the answer is an explicit REJECT, so a
crowd arriving at once is turned away cleanly instead of starving the
listeners already served."""
from __future__ import annotations

import ipaddress
from collections import OrderedDict


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.at: float | None = None

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def source_key(ip: str) -> str:
    """The unit the per-source limit counts: an IPv4 address, or an IPv6
    /64 (one subscriber's whole prefix; addresses within it are free to
    pick)."""
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


class JoinLimiter:
    """The node-wide join rate and a per-source one (IPv4 address or IPv6
    /64). Per-source buckets are kept for the `max_sources` most recent
    sources only, so a flood from many addresses cannot grow this table
    without bound. The node-wide bucket is charged only for joins that can
    succeed (their token checked out), so a flood of bad tokens cannot
    spend the budget legitimate listeners need."""

    def __init__(self, node_rate: float, source_rate: float, max_sources: int = 65536) -> None:
        self.node = TokenBucket(node_rate, max(1.0, node_rate))
        self.source_rate = source_rate
        self.max_sources = max_sources
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow_source(self, source_ip: str, now: float) -> bool:
        """Spend one of this source's joins; False once it has none left."""
        key = source_key(source_ip)
        bucket = self._sources.get(key)
        if bucket is None:
            bucket = TokenBucket(self.source_rate, max(1.0, 2 * self.source_rate))
            self._sources[key] = bucket
            if len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(key)
        return bucket.take(now)

    def allow_node(self, now: float) -> bool:
        """Spend one of the node's joins (for a join that can succeed)."""
        return self.node.take(now)
