"""Admission limits: token buckets for the join rate of the whole node and
of each source address, and the gate that stops joins before the node runs
out of CPU. Over a limit the answer is an explicit REJECT, so a crowd
arriving at once is turned away cleanly instead of starving the listeners
already served."""
from __future__ import annotations

import ipaddress
import logging
from collections import OrderedDict
from typing import Callable

log = logging.getLogger("relay.sessions")

LOAD_LOG_EVERY_S = 10.0   # at most one log line per this long about refusals for load


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


class LoadGate:
    """Joins stop before the node runs out of CPU, not after: the relay's
    own fan-out duty cycle, projected to one more listener, against
    max_load; the machine's CPU against max_machine_load; and a transport's
    own limit (the QUIC loop thread).

    The machine cap guards the relay's share of a machine it shares with
    other software (a backup, a neighbour VM stealing time). Refusing
    listeners helps no one when the others are what keeps the CPUs busy,
    so it refuses only when the relay's own work is at least half of what
    keeps the machine busy, or when a shortfall shows (its senders falling
    behind the packet rate), and never while the node has fewer than
    `floor` listeners."""

    def __init__(self, floor: int = 100) -> None:
        self.floor = floor
        self.load = 0.0           # the relay's fan-out duty cycle at the last measurement
        self.machine = 0.0        # the machine's CPU busy fraction then
        self.load_listeners = 0   # listeners at that measurement
        self.relay_share = 0.0    # the relay process's CPU, as a fraction of the whole machine
        self.behind = False       # the senders fell behind in that interval
        self._logged = -LOAD_LOG_EVERY_S
        self._refused = 0         # refusals since the last log line

    def note(self, duty: float, machine: float, listeners: int, relay_share: float = 0.0,
             behind: bool = False) -> None:
        """A new measurement: duty cycle (0..1 of a core) with this many
        listeners, the machine's CPU busy fraction and the relay's own share
        of the machine (0..1), and whether the senders fell behind."""
        self.load, self.machine, self.load_listeners = duty, machine, listeners
        self.relay_share, self.behind = relay_share, behind

    def _machine_full(self, listeners: int, max_machine_load: float) -> str:
        if max_machine_load <= 0 or self.machine <= max_machine_load or listeners < self.floor:
            return ""
        if self.behind:
            return (f"machine CPU {self.machine:.3f} busy > max_machine_load {max_machine_load} "
                    "and the sender threads fell behind the packet rate")
        if self.relay_share >= self.machine / 2:
            return (f"machine CPU {self.machine:.3f} busy > max_machine_load {max_machine_load}, "
                    f"{self.relay_share:.3f} of it the relay's own")
        return ""

    def refuses(self, now: float, listeners: int, max_load: float, max_machine_load: float,
                transport_full: Callable[[], bool] | None = None) -> bool:
        """Whether a join now would take the node past a load limit; logs
        the reason, at most once per LOAD_LOG_EVERY_S."""
        # The relay's cost grows with its listeners, so one more costs about
        # load / load_listeners; below 5 % the measure is mostly noise (or
        # the publisher is quiet) and only max_listeners applies. The
        # machine's CPU is not projected: other processes do not grow with
        # our listeners. It is a cap of its own, with headroom.
        projected = self.load * (listeners + 1) / self.load_listeners if self.load_listeners else 0.0
        why = ""
        if max_load > 0 and self.load >= 0.05 and projected > max_load:
            why = f"relay duty {self.load:.3f} with {self.load_listeners} listeners projects to " \
                  f"{projected:.3f} > max_load {max_load}"
        elif (machine := self._machine_full(listeners, max_machine_load)):
            why = machine
        elif transport_full is not None and transport_full():
            why = "the event-loop thread would pass max_load with one more QUIC session"
        if not why:
            return False
        self._refused += 1
        if now - self._logged >= LOAD_LOG_EVERY_S:
            # a storm refuses thousands a second: one line per interval, with the count
            log.warning("refusing joins for load: %s (%d refused since the last line)", why, self._refused)
            self._logged, self._refused = now, 0
        return True
