"""Prometheus metrics read from the core's C counters at scrape time.

Nothing is counted in Python on the packet path: the collector below asks
the core and the session table for their counters when Prometheus scrapes,
and turns them into metric families. Room labels are bounded: only the
first `room_label_limit` rooms get their own series, the rest are summed
under room="_other".
"""
from __future__ import annotations

import os
import resource
import time
from typing import TYPE_CHECKING, Iterator

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from relay.server import Node

_CORE_DROPS = ("foreign", "malformed", "oversized", "late", "no_room", "overflow", "send_error")


class NodeCollector(Collector):
    """Yields the node's metric families from live counters."""

    def __init__(self, node: "Node", room_label_limit: int = 50) -> None:
        self.node = node
        self.room_label_limit = room_label_limit

    def collect(self) -> Iterator[Metric]:
        node = self.node
        c = node.core.counters()
        sc = node.sessions.counters
        yield GaugeMetricFamily("relay_rooms", "Rooms configured on this node.", len(node.rooms))
        listeners = GaugeMetricFamily("relay_listeners", "Listeners connected.",
                                      labels=["room", "transport"])
        packets_in = CounterMetricFamily("relay_room_packets_in", "RTP packets accepted from publishers.",
                                         labels=["room"])
        other_l = other_p = 0
        for i, room in enumerate(node.rooms.values()):
            stats = node.core.room_stats(room.index)
            if i < self.room_label_limit:
                listeners.add_metric([room.name, "udp"], stats["listeners"])
                packets_in.add_metric([room.name], stats["packets_in"])
            else:
                other_l += stats["listeners"]
                other_p += stats["packets_in"]
        if len(node.rooms) > self.room_label_limit:
            listeners.add_metric(["_other", "udp"], other_l)
            packets_in.add_metric(["_other"], other_p)
        yield listeners
        yield packets_in
        yield GaugeMetricFamily("relay_listener_capacity", "Listeners this node admits.",
                                node.cfg.max_listeners)
        yield CounterMetricFamily("relay_packets_in", "RTP packets accepted from publishers.",
                                  c["packets_in"])
        yield CounterMetricFamily("relay_bytes_in", "Bytes of accepted publisher RTP.", c["bytes_in"])
        yield CounterMetricFamily("relay_packets_out", "Listener packets handed to the kernel.",
                                  c["packets_out"])
        yield CounterMetricFamily("relay_bytes_out", "Listener bytes handed to the kernel.",
                                  c["bytes_out"])
        yield CounterMetricFamily("relay_sendmmsg_calls", "sendmmsg system calls.", c["sendmmsg_calls"])
        yield CounterMetricFamily("relay_sendmmsg_messages", "Datagrams sent through sendmmsg.",
                                  c["sendmmsg_messages"])
        yield CounterMetricFamily("relay_egress_would_block", "Times the egress socket was full.",
                                  c["would_block"])
        yield CounterMetricFamily("relay_resends", "Packets resent in answer to NACKs.", c["resends"])
        yield CounterMetricFamily("relay_source_restarts",
                                  "New publisher streams spliced into a room's numbering.",
                                  c["source_restarts"])
        drops = CounterMetricFamily("relay_drops", "Packets dropped, by reason.", labels=["reason"])
        for reason in _CORE_DROPS:
            drops.add_metric([reason], c[f"drop_{reason}"])
        yield drops
        yield CounterMetricFamily("relay_joins", "Listeners admitted.", sc.joins)
        yield CounterMetricFamily("relay_leaves", "Listeners that left.", sc.leaves)
        yield CounterMetricFamily("relay_timeouts", "Listeners ended by keepalive timeout.", sc.timeouts)
        yield CounterMetricFamily("relay_challenges", "Cookie challenges sent.", sc.challenges)
        yield CounterMetricFamily("relay_nacks", "Sequence numbers NACKed by listeners.", sc.nacks)
        yield CounterMetricFamily("relay_control_malformed", "Control datagrams that did not parse.",
                                  sc.control_malformed)
        rej = CounterMetricFamily("relay_rejections", "JOINs refused, by reason.", labels=["reason"])
        for reason, n in sorted(sc.rejections.items()):
            rej.add_metric([reason], n)
        yield rej
        bounds, counts, total = node.core.latency_histogram()
        buckets, acc = [], 0
        for b, n in zip(bounds, counts):
            acc += n
            buckets.append(("+Inf" if b == float("inf") else repr(b), acc))
        yield HistogramMetricFamily("relay_fanout_latency_seconds",
                                    "Ingest receive to the last send of that packet.",
                                    buckets=buckets, sum_value=total)
        yield GaugeMetricFamily("relay_loop_lag_seconds", "Event-loop lag at the last probe.",
                                node.loop_lag)
        yield GaugeMetricFamily("relay_draining", "1 while the node is draining.",
                                1 if node.sessions.draining else 0)
        yield GaugeMetricFamily("relay_process_resident_memory_bytes", "Resident memory.", _rss())
        yield GaugeMetricFamily("relay_process_open_fds", "Open file descriptors.", _fds())
        ru = resource.getrusage(resource.RUSAGE_SELF)
        yield CounterMetricFamily("relay_process_cpu_seconds", "CPU time, user + system.",
                                  ru.ru_utime + ru.ru_stime)
        yield GaugeMetricFamily("relay_uptime_seconds", "Seconds since start.",
                                time.monotonic() - node.started)


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def registry_for(node: "Node") -> CollectorRegistry:
    """A registry holding only this node's collector (no global state)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(NodeCollector(node))
    return reg
