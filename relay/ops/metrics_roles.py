"""The metric families of the node's roles beside its core: the stages
and their hosts, the cluster directory and the upstream links. The
collector (metrics.py) yields them from what it reads at scrape time."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from relay.cluster.upstream import UpstreamState
from relay.ops.hosting import ACTIONS as HOST_ACTIONS
from relay.stage.moderation import Moderation
from relay.stage.stage import STAGE_DROPS
from relay.stage.stages import Stages


def histogram(name: str, doc: str, hist: tuple[list[float], list[int], float]) -> Metric:
    """A Prometheus histogram family from (bounds, counts per bucket, sum)."""
    bounds, counts, total = hist
    buckets, acc = [], 0
    for bound, n in zip(bounds, counts, strict=True):
        acc += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
    if bounds[-1] != float("inf"):
        buckets.append(("+Inf", acc))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


@dataclass
class Cluster:
    """The node's place in the cluster, as the collector reads it."""
    directory: bool = False
    reachable: bool = False
    peers: int = 0
    failures: int = 0
    upstreams: dict[str, UpstreamState] = field(default_factory=dict)
    gaps: tuple[list[float], list[int], float] | None = None   # pauses in what rooms took from upstream
    rejected: dict[str, int] = field(default_factory=dict)     # directory records refused, by reason


def stage_families(stages: Stages, m: Moderation) -> Iterator[Metric]:
    """The stages' and their hosts' metric families."""
    t = stages.totals()
    yield GaugeMetricFamily("relay_speakers", "Speakers on this node's stages.", t["speakers"])
    for name, key, doc in (
        ("relay_mixer_cpu_seconds", "mixer_seconds", "CPU time the stage worker spent mixing "
         "(decoding, summing, encoding)."),
        ("relay_mixed_frames", "frames_mixed", "20 ms frames mixed, over every stage."),
        ("relay_stage_switches", "switches", "Stages switching between nobody, one speaker passed "
         "through, and the mix."),
        ("relay_limiter_clipped_samples", "clipped", "Mixed samples the limiter let past full scale "
         "(should stay 0)."),
        ("relay_mixer_skipped_ticks", "skipped_ticks", "Mix frames skipped because the stage worker "
         "was held up for 200 ms or more."),
    ):
        yield CounterMetricFamily(name, doc, t[key])
    drops = CounterMetricFamily("relay_stage_drops", "Speaker audio dropped before the stage: foreign "
                                "(RTP from no speaker's address), auth, replay, malformed, late, full, rate, "
                                "muted (by a host).",
                                labels=["reason"])
    counts = stages.drops()
    for why in STAGE_DROPS:
        drops.add_metric([why], counts[why])
    yield drops
    actions = CounterMetricFamily("relay_host_actions", "Hosts' actions taken through the stage API.",
                                  labels=["action"])
    for action in HOST_ACTIONS:
        actions.add_metric([action], m.actions[action])
    yield actions
    refused = CounterMetricFamily("relay_stage_messages_dropped", "Listeners' hands and reactions dropped: "
                                  "over a session's rate, or a full hands queue.", labels=["reason"])
    for why in ("hand_rate", "reaction_rate", "hands_full"):
        refused.add_metric([why], m.drops[why])
    yield refused
    yield CounterMetricFamily("relay_hands_raised", "Hands raised by listeners.", m.hands_raised)
    yield CounterMetricFamily("relay_reactions", "Reactions taken from listeners (summed once a second to "
                              "each session of the room).", m.reactions_in)


def cluster_families(c: Cluster) -> Iterator[Metric]:
    """The directory's and the upstream links' metric families."""
    if c.directory:
        yield GaugeMetricFamily("relay_directory_reachable", "1 while the last heartbeat reached the "
                                "cluster directory (Redis).", float(c.reachable))
        yield GaugeMetricFamily("relay_directory_peers", "Other live nodes in this node's view of the "
                                "directory.", c.peers)
        yield CounterMetricFamily("relay_directory_heartbeat_failures", "Heartbeats that did not reach "
                                  "the directory.", c.failures)
        refused = CounterMetricFamily("relay_directory_records_rejected", "Peers' directory records read "
                                      "and refused: invalid (a field no node writes), signature (a tag "
                                      "that does not verify).", labels=["reason"])
        for why in ("invalid", "signature"):
            refused.add_metric([why], c.rejected.get(why, 0))
        yield refused
    if c.gaps is not None:
        yield histogram("relay_upstream_gap_seconds", "Pauses of 40 ms or more between packets a room "
                         "took from upstream (first copies), over every such room.", c.gaps)
    if c.upstreams:
        up = GaugeMetricFamily("relay_upstream_connected", "1 while a room taken from upstream has a "
                               "live upstream node.", labels=["room"])
        switches = CounterMetricFamily("relay_upstream_switches", "Times a room taken from upstream "
                                       "moved to another upstream node.", labels=["room"])
        splices = CounterMetricFamily("relay_upstream_splices", "Times a room whose two parents send "
                                      "different streams (a mixed stage on an origin pair) went over to "
                                      "the other parent when the followed one went quiet.", labels=["room"])
        disagree = CounterMetricFamily("relay_upstream_disagreements", "Times a room's two parents were "
                                       "found sending two different streams, not copies of one: the "
                                       "node follows one of them.", labels=["room"])
        following = GaugeMetricFamily("relay_upstream_following", "1 for the parent a room follows "
                                      "while its two parents send different streams (none while they "
                                      "send copies, which are merged).", labels=["room", "parent"])
        for room, u in c.upstreams.items():
            up.add_metric([room], float(u.connected))
            switches.add_metric([room], u.switches)
            splices.add_metric([room], u.splices)
            disagree.add_metric([room], u.disagreements)
            if u.following:
                following.add_metric([room, u.following], 1)
        yield from (up, switches, splices, disagree, following)
