"""Admission limits: token buckets for the join rate of the whole node and
of each source address. Over a limit the answer is an explicit REJECT, so a
crowd arriving at once is turned away cleanly instead of starving the
listeners already served."""
from __future__ import annotations

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


class JoinLimiter:
    """The node-wide join rate and a per-source-IP one. Per-source buckets
    are kept for the `max_sources` most recent addresses only, so a flood
    from many addresses cannot grow this table without bound."""

    def __init__(self, node_rate: float, source_rate: float, max_sources: int = 65536) -> None:
        self.node = TokenBucket(node_rate, max(1.0, node_rate))
        self.source_rate = source_rate
        self.max_sources = max_sources
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, source_ip: str, now: float) -> str | None:
        """None if this join may proceed, else which limit it hit
        ('source' or 'node'). The per-source limit is checked first so one
        noisy address does not spend the node's budget."""
        bucket = self._sources.get(source_ip)
        if bucket is None:
            bucket = TokenBucket(self.source_rate, max(1.0, 2 * self.source_rate))
            self._sources[source_ip] = bucket
            if len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source_ip)
        if not bucket.take(now):
            return "source"
        if not self.node.take(now):
            return "node"
        return None
