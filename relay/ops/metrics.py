"""Prometheus metrics read from the core's C counters at scrape time.

Nothing is counted in Python on the UDP packet path: the collector below
asks the core and the session table for their counters when Prometheus
scrapes, and turns them into metric families. (QUIC datagrams are counted
per pull batch by the QUIC endpoint, which handles them in Python anyway.)
Room labels are bounded: only the first `room_label_limit` rooms get their
own series, the rest are summed under room="_other" ([node]
room_label_limit).
"""
from __future__ import annotations

import os
import platform
import resource
import time
from collections import Counter
from typing import Callable, Iterator

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    Metric)
from prometheus_client.registry import Collector, CollectorRegistry

from relay import __version__
from relay._core import Core
from relay.hls.rooms import HlsStats
from relay.listeners.load import LoadMeter
from relay.listeners.quic.connection import QuicCounters
from relay.listeners.senders import SenderThreads
from relay.listeners.sessions import PULLED, UDP, RoomState, Sessions
from relay.ops.metrics_roles import Cluster, cluster_families, histogram, stage_families  # noqa: F401 (Cluster re-exported)
from relay.ops.tasks import restarts as task_restarts
from relay.ingest.srtp import SRTP_DROPS
from relay.stage.stages import Stages
from relay.wire.protocol import Reason

# refusals the listener port's gate makes before the session table sees them
GATE_REJECTIONS = {Reason.STALE_COOKIE: "stale_cookies", Reason.UNKNOWN_SESSION: "unknown_session"}

# the core counts drops for these reasons (relay_drops_total{reason})
CORE_DROPS = ("foreign", "malformed", "oversized", "late", "no_room", "overflow", "send_error",
               "shard_lag", "rate")


class NodeCollector(Collector):
    """Yields the node's metric families from live counters: the core's,
    the session table's, the load measures, the sender threads' and the
    QUIC port's (when there is one). It reads; it changes nothing."""

    def __init__(self, core: Core, sessions: Sessions, load: LoadMeter, senders: SenderThreads,
                 quic: Callable[[], QuicCounters | None], started: float,
                 srtp_drops: Callable[[], Counter[str]] = Counter,
                 cluster: Callable[[], Cluster] = lambda: Cluster(), stages: Stages | None = None,
                 hls: Callable[[], HlsStats] | None = None,
                 gate: Callable[[], dict[str, int]] = dict,
                 xdp: Callable[[], dict[str, int]] | None = None) -> None:
        self.core, self.sessions, self.load, self.senders = core, sessions, load, senders
        self.gate = gate
        self.stages, self.hls, self.xdp = stages, hls, xdp
        self.quic, self.started, self.srtp_drops, self.cluster = quic, started, srtp_drops, cluster

    @staticmethod
    def _gate(g: dict[str, int]) -> Iterator[Metric]:
        """The listener port's gate (core/gate.pxi): what it let through to the
        policy, answered itself, and dropped, by reason."""
        passed = CounterMetricFamily(
            "relay_control_gate", "Listener-port datagrams the gate sorted, not dropped: known (from a "
            "session's address, always passed), join (a JOIN whose cookie checked out, passed), other "
            "(a stranger's datagram only the policy answers, passed), challenged (answered with a "
            "CHALLENGE by the gate), stale_cookie (of those, JOINs with a forged or expired cookie), "
            "unknown_session (KEEPALIVEs for no session, answered REJECT by the gate).",
            labels=["outcome"])
        for outcome, key in (("known", "known"), ("join", "joins"), ("other", "other"),
                             ("challenged", "challenges"), ("stale_cookie", "stale_cookies"),
                             ("unknown_session", "unknown_session")):
            passed.add_metric([outcome], g.get(key, 0))
        yield passed
        drops = CounterMetricFamily(
            "relay_control_gate_drops", "Strangers' datagrams the gate dropped: source_rate (over the "
            "per-address bound), node_rate (over the node-wide bound on replies or on what goes to the policy), "
            "not_session (RTP, RTCP or LEAVE from an address without a session), malformed, unsent "
            "(replies the kernel refused).", labels=["reason"])
        for reason in ("source_rate", "node_rate", "not_session", "malformed", "unsent"):
            drops.add_metric([reason], g.get(reason, 0))
        yield drops

    def collect(self) -> Iterator[Metric]:
        core, load = self.core, self.load
        c = core.counters()
        sc = self.sessions.counters
        # the gate answers and drops strangers' datagrams before the session
        # table sees them: its counts join the table's where they mean the same
        g = self.gate()
        cfg = self.sessions.cfg
        yield from self._build_info()
        yield GaugeMetricFamily("relay_rooms", "Rooms configured on this node.", len(self.sessions.rooms))
        yield from self._rooms(cfg.room_label_limit)
        yield GaugeMetricFamily("relay_listener_capacity", "Listeners this node admits.",
                                cfg.max_listeners)
        for name, key, doc in (
            ("relay_packets_in", "packets_in", "RTP packets accepted from publishers."),
            ("relay_bytes_in", "bytes_in", "Bytes of accepted publisher RTP."),
            ("relay_packets_out", "packets_out", "UDP listener packets handed to the kernel "
             "(QUIC: relay_quic_datagrams_sent_total)."),
            ("relay_bytes_out", "bytes_out", "UDP listener bytes handed to the kernel."),
            ("relay_sendmmsg_calls", "sendmmsg_calls", "sendmmsg system calls."),
            ("relay_egress_would_block", "would_block", "Times the egress socket was full."),
            ("relay_resends", "resends", "Packets resent in answer to NACKs."),
            ("relay_source_restarts", "source_restarts",
             "New publisher streams spliced into a room's numbering."),
            ("relay_takeovers_refused", "takeovers_refused",
             "Packets of a new publisher stream refused while the live one held its room "
             "(also counted as foreign drops)."),
            ("relay_publisher_byes", "publisher_byes", "RTCP BYEs from a live publisher stream, "
             "each releasing its room to the next stream."),
            ("relay_rtcp_ignored", "rtcp_ignored", "RTCP datagrams on ingest ports (only BYEs are read)."),
            ("relay_upstream_duplicates", "merge_duplicates", "Packets of an upstream room that the other "
             "parent had already brought (taken once, from the first copy)."),
            ("relay_upstream_gap_fills", "merge_gap_fills", "Packets one parent's copy was missing that the "
             "other parent's brought."),
        ):
            yield CounterMetricFamily(name, doc, c[key])
        drops = CounterMetricFamily("relay_drops", "Packets dropped, by reason.", labels=["reason"])
        for why in CORE_DROPS:
            drops.add_metric([why], c[f"drop_{why}"])
        yield drops
        srtp = CounterMetricFamily("relay_srtp_drops", "SRTP ingest datagrams dropped before the core: "
                                   "auth (the tag did not verify with the room's key), replay, malformed.",
                                   labels=["reason"])
        srtp_counts = self.srtp_drops()
        for why in SRTP_DROPS:
            srtp.add_metric([why], srtp_counts[why])
        yield srtp
        for name, value, doc in (
            ("relay_joins", sc.joins, "Listeners admitted."),
            ("relay_leaves", sc.leaves, "Listeners that sent LEAVE (or closed their QUIC connection)."),
            ("relay_timeouts", sc.timeouts, "Listeners ended by keepalive (QUIC: idle) timeout."),
            ("relay_challenges", sc.challenges + g.get("challenges", 0), "Cookie challenges sent."),
            ("relay_keepalives", sc.keepalives, "Keepalives received from listeners."),
            ("relay_nacks", sc.nacks, "Sequence numbers NACKed by listeners."),
            ("relay_nacks_rate_limited", sc.nack_rate_limited, "NACKed packets not resent (rate limit)."),
            ("relay_control_malformed", sc.control_malformed + g.get("malformed", 0),
             "Control datagrams that did not parse."),
            ("relay_replies_suppressed", sc.replies_suppressed,
             "Replies not sent because they were larger than their request."),
            ("relay_control_unsigned", sc.control_unsigned,
             "Speakers' KEEPALIVEs and LEAVEs ignored: no valid MAC of the session's control key."),
            ("relay_speakers_replaced", sc.replaced,
             "Speakers' sessions ended because the same speaker (token sub) joined the stage again."),
            ("relay_resumes", sc.resumes, "Listeners that moved here from a dead node with a resume point."),
            ("relay_resumed_packets", sc.resumed_packets,
             "Packets those listeners missed, sent to them from the room's history."),
        ):
            yield CounterMetricFamily(name, doc, value)
        tasks = CounterMetricFamily("relay_task_restarts", "Background tasks that failed (logged with their "
                                    "traceback) and were started again, by task.", labels=["task"])
        for name in ("housekeeping", *sorted(set(task_restarts) - {"housekeeping"})):
            tasks.add_metric([name], task_restarts[name])
        yield tasks
        yield from self._gate(g)
        rej = CounterMetricFamily("relay_rejections", "JOINs refused, by reason.", labels=["reason"])
        for reason in Reason:
            name = reason.name.lower()
            rej.add_metric([name], sc.rejections.get(name, 0) + g.get(GATE_REJECTIONS.get(reason, ""), 0))
        yield rej
        yield histogram("relay_fanout_latency_seconds",
                         "Ingest receive to a sender thread's last send of that packet: one observation "
                         "per packet per sender thread.", core.latency_histogram())
        yield histogram("relay_sendmmsg_batch_size", "Messages per successful sendmmsg call.",
                         core.batch_histogram())
        yield GaugeMetricFamily("relay_loop_lag_seconds", "Event-loop lag at the last probe.",
                                load.loop_lag)
        yield GaugeMetricFamily("relay_sender_threads", "Sender threads (shards) fanning out.",
                                core.shards)
        yield GaugeMetricFamily("relay_fanout_duty_ratio",
                                "Busy fraction of the busiest sender (1 = a full core); joins "
                                "stop when it would pass max_load.", load.duty)
        yield GaugeMetricFamily("relay_machine_cpu_busy_ratio",
                                "Busy fraction of all the machine's CPUs over the last 250 ms.",
                                load.machine_busy)
        yield GaugeMetricFamily("relay_loop_duty_ratio",
                                "Busy fraction of the event-loop thread (ingest, control, QUIC); "
                                "QUIC joins stop when it would pass max_load.", load.loop_duty)
        yield CounterMetricFamily("relay_rejections_load",
                                  "JOINs refused (as node_full) because the senders (or, for QUIC, the "
                                  "loop thread) are near a full core.",
                                  sc.rejections_load)
        yield CounterMetricFamily("relay_sender_thread_restarts",
                                  "Sender threads found stopped and restarted.", self.senders.restarts)
        yield from self._quic()
        if self.stages is not None:
            yield from stage_families(self.stages, self.sessions.moderation)
        yield from cluster_families(self.cluster())
        if self.hls is not None:
            yield from _hls(self.hls())
        if self.xdp is not None:
            yield from _xdp(self.xdp())
        yield GaugeMetricFamily("relay_draining", "1 while the node is draining.",
                                1 if self.sessions.draining else 0)
        yield GaugeMetricFamily("relay_process_resident_memory_bytes", "Resident memory.", _rss())
        yield GaugeMetricFamily("relay_process_open_fds", "Open file descriptors.", _fds())
        ru = resource.getrusage(resource.RUSAGE_SELF)
        yield CounterMetricFamily("relay_process_cpu_seconds", "CPU time, user + system.",
                                  ru.ru_utime + ru.ru_stime)
        yield GaugeMetricFamily("relay_uptime_seconds", "Seconds since start.",
                                time.monotonic() - self.started)

    def _quic(self) -> Iterator[Metric]:
        q = self.quic() or QuicCounters()
        c = self.core.counters()
        yield CounterMetricFamily("relay_quic_connections", "QUIC handshakes completed.", q.connections)
        # the QUIC library's sends (before a listener is on the core's QUIC path) plus the core's
        for name, values, core_key, doc in (
            ("relay_quic_datagrams_sent", q.datagrams_sent, "datagrams", "Listener packets sent as QUIC datagrams."),
            ("relay_quic_bytes_sent", q.bytes_sent, "bytes", "RTP bytes sent as QUIC datagrams (before QUIC framing)."),
            ("relay_quic_too_large", q.too_large, "too_large",
             "Audio packets not sent to a QUIC listener: larger than one QUIC datagram carries."),
        ):
            family = CounterMetricFamily(name, doc, labels=["transport"])
            for t in PULLED:
                family.add_metric([t], values[t] + c[f"{t}_{core_key}"])
            yield family
        yield CounterMetricFamily("relay_quic_acks", "QUIC listeners' ACK-only packets read in the core.",
                                  c["quic_acks"])
        yield CounterMetricFamily("relay_quic_lost", "Audio datagrams the core's QUIC path declared lost "
                                  "(RFC 9002) and never saw acknowledged.", c["quic_lost"])
        yield CounterMetricFamily("relay_quic_late_acked", "Audio datagrams the core's QUIC path declared lost "
                                  "(RFC 9002) that were acknowledged after all.", c["quic_late_acked"])
        yield CounterMetricFamily("relay_quic_window_shut", "Times a QUIC listener's audio waited for its "
                                  "congestion window (its ring then drops its own oldest).", c["quic_window_shut"])
        dropped = CounterMetricFamily("relay_quic_dropped", "Datagrams from QUIC listeners dropped by the core "
                                      "(forged: failed authentication; replayed), and audio datagrams a full "
                                      "QUIC socket refused (blocked).", labels=["reason"])
        for reason in ("forged", "replayed", "blocked"):
            dropped.add_metric([reason], c[f"quic_{reason}"])
        yield dropped
        yield CounterMetricFamily("relay_quic_stream_errors",
                                  "QUIC control streams closed for a malformed message.", q.stream_errors)
        yield CounterMetricFamily("relay_quic_connections_refused",
                                  "New QUIC connections dropped while too many had not joined "
                                  "(quic_max_pending, quic_max_pending_per_source).", q.refused_connections)
        yield CounterMetricFamily("relay_quic_listeners_gone",
                                  "QUIC listeners ended after 3 s without an answer (also in relay_timeouts_total).",
                                  q.gone)
        yield CounterMetricFamily("relay_quic_join_deadline",
                                  "QUIC connections closed for not joining within 5 s.", q.join_deadline)
        yield CounterMetricFamily("relay_quic_requests_refused",
                                  "HTTP/3 requests that were not a WebTransport session for /relay.",
                                  q.refused_requests)
        yield CounterMetricFamily("relay_quic_stray_datagrams",
                                  "Datagrams from QUIC or WebTransport sessions that are not on a stage "
                                  "(a listener sends none), dropped.", q.stray_datagrams)

    def _build_info(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("relay_build_info", "Version of relay and what it was built with.",
                                 labels=["version", "python", "cython"])
        info.add_metric([__version__, platform.python_version(), _cython_version()], 1)
        yield info

    def _rooms(self, limit: int) -> Iterator[Metric]:
        """Per-room series for the first `limit` rooms; the rest summed as
        room="_other" so a node with thousands of rooms stays scrapeable."""
        sessions, core = self.sessions, self.core
        listeners = GaugeMetricFamily("relay_listeners", "Listeners connected.",
                                      labels=["room", "transport"])
        packets_in = CounterMetricFamily("relay_room_packets_in",
                                         "RTP packets accepted from the room's publisher.",
                                         labels=["room"])
        silence = GaugeMetricFamily("relay_room_publisher_silence_seconds",
                                    "Seconds since the room's publisher last sent a packet "
                                    "(since start if it never did).", labels=["room"])
        now = time.monotonic_ns()
        started = int(self.started * 1e9)
        other_l: Counter = Counter()
        other_p = 0
        other_s = 0.0
        rooms: list[RoomState] = list(sessions.rooms.values())
        for i, room in enumerate(rooms):
            st = core.room_stats(room.index)
            quiet = (now - (st["last_rx_ns"] if st["have_stream"] else started)) / 1e9
            by_transport = {t: sessions.listeners(room.name, t) for t in (UDP, *PULLED)}
            if i < limit:
                for t, n in by_transport.items():
                    listeners.add_metric([room.name, t], n)
                packets_in.add_metric([room.name], st["packets_in"])
                silence.add_metric([room.name], quiet)
            else:
                other_l.update(by_transport)
                other_p += st["packets_in"]
                other_s = max(other_s, quiet)
        if len(rooms) > limit:
            for t in (UDP, *PULLED):
                listeners.add_metric(["_other", t], other_l[t])
            packets_in.add_metric(["_other"], other_p)
            silence.add_metric(["_other"], other_s)
        yield listeners
        yield packets_in
        yield silence


def _xdp(c: dict[str, int]) -> Iterator[Metric]:
    """The AF_XDP egress (egress = "xdp", docs/xdp.md), summed over its sockets."""
    yield GaugeMetricFamily("relay_xdp_sockets", "Sender shards sending through AF_XDP.", c["sockets"])
    yield GaugeMetricFamily("relay_xdp_listeners", "Listeners routed through AF_XDP since start.", c["routed"])
    for name, key, doc in (
            ("relay_xdp_frames", "packets", "Listener packets put on AF_XDP TX rings (also in relay_packets_out)."),
            ("relay_xdp_kicks", "kicks", "sendto calls that asked the kernel to send an AF_XDP TX ring."),
            ("relay_xdp_kick_errors", "kick_errors", "AF_XDP kicks the kernel refused."),
            ("relay_xdp_frames_exhausted", "frames_exhausted", "Times every UMEM frame of a shard was in flight."),
            ("relay_xdp_too_large", "too_large", "Packets too large for a frame or the MTU, sent with sendto.")):
        yield CounterMetricFamily(name, doc, c[key])


def _hls(s: HlsStats) -> Iterator[Metric]:
    """The LL-HLS port and its rooms (relay/hls): labels are fixed sets."""
    p = s.port
    yield GaugeMetricFamily("relay_hls_rooms", "Rooms writing LL-HLS on this node.", s.rooms)
    req = CounterMetricFamily("relay_hls_requests", "HLS requests by kind of URL.", labels=["kind"])
    for kind, n in sorted(p.requests.items()):
        req.add_metric([kind], n)
    yield req
    resp = CounterMetricFamily("relay_hls_responses", "HLS responses by status code.", labels=["code"])
    for code, n in sorted(p.responses.items()):
        resp.add_metric([str(code)], n)
    yield resp
    yield GaugeMetricFamily("relay_hls_held_requests", "Blocking requests held now, waiting for a part.", p.held)
    yield CounterMetricFamily("relay_hls_held_refused", "Requests answered 503 because [node] hls_max_held "
                              "requests were already held.", p.held_refused)
    yield GaugeMetricFamily("relay_hls_connections", "Open connections on the HLS port.", p.connections)
    yield CounterMetricFamily("relay_hls_connections_evicted", "Connections closed to make room at "
                              "[node] hls_max_connections.", p.connections_evicted)
    yield CounterMetricFamily("relay_hls_head_timeouts", "Connections closed for not sending a request "
                              "head in time (slow clients).", p.timeouts)
    parts = CounterMetricFamily("relay_hls_parts", "Partial segments written, by rendition.",
                                labels=["rendition"])
    for name, n in sorted(s.parts.items()):
        parts.add_metric([name], n)
    yield parts
    drops = CounterMetricFamily("relay_hls_dropped", "Packets the HLS renditions could not use, by reason.",
                                labels=["reason"])
    for reason, n in sorted(s.dropped.items()):
        drops.add_metric([reason], n)
    yield drops
    yield CounterMetricFamily("relay_hls_mux_cpu_seconds", "Event-loop CPU time spent reading the rooms' "
                              "taps, muxing and transcoding.", s.mux_seconds)


def _cython_version() -> str:
    try:
        from importlib.metadata import version
        return version("cython")
    except Exception:  # not installed at run time: the build used it, we cannot tell
        return "unknown"


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


def registry_for(collector: NodeCollector) -> CollectorRegistry:
    """A registry holding only this node's collector (no global state)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg
