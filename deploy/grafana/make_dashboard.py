"""Writes deploy/grafana/relay.json, the dashboard we ship.

The JSON is generated so panels stay consistent (same node filter, same
rate window); the committed file is what operators import, and a test
checks that it matches this script.
"""
from __future__ import annotations

import json
from pathlib import Path

N = 'instance=~"$node"'
R = "$__rate_interval"

# (title, unit, [(legend, expr)], width)
PANELS: list[tuple[str, str, list[tuple[str, str]], int]] = [
    ("Listeners", "short", [("{{instance}}", f"sum by (instance) (relay_listeners{{{N}}})")], 8),
    ("Headroom to capacity", "percentunit",
     [("{{instance}}", f"1 - sum by (instance) (relay_listeners{{{N}}}) / on (instance) "
                       f"relay_listener_capacity{{{N}}}")], 8),
    ("Listeners by room", "short",
     [("{{room}}", f"sum by (room) (relay_listeners{{{N}}})")], 8),
    ("Listeners by transport", "short",
     [("{{transport}}", f"sum by (transport) (relay_listeners{{{N}}})")], 12),
    ("QUIC datagrams /s", "pps",
     [("{{transport}}", f"sum by (transport) (rate(relay_quic_datagrams_sent_total{{{N}}}[{R}]))"),
      ("ACKs read in the core", f"sum (rate(relay_quic_acks_total{{{N}}}[{R}]))"),
      ("lost", f"sum (rate(relay_quic_lost_total{{{N}}}[{R}]))"),
      ("acknowledged late (not lost)", f"sum (rate(relay_quic_late_acked_total{{{N}}}[{R}]))"),
      ("window shut", f"sum (rate(relay_quic_window_shut_total{{{N}}}[{R}]))")], 12),
    ("Joins and rejections /s", "reqps",
     [("joins {{instance}}", f"sum by (instance) (rate(relay_joins_total{{{N}}}[{R}]))"),
      ("rejected: {{reason}}", f"sum by (reason) (rate(relay_rejections_total{{{N}}}[{R}]))"),
      ("timeouts", f"sum (rate(relay_timeouts_total{{{N}}}[{R}]))"),
      ("leaves", f"sum (rate(relay_leaves_total{{{N}}}[{R}]))")], 12),
    ("Egress packets /s", "pps",
     [("out {{instance}}", f"sum by (instance) (rate(relay_packets_out_total{{{N}}}[{R}]))"),
      ("in {{instance}}", f"sum by (instance) (rate(relay_packets_in_total{{{N}}}[{R}]))")], 12),
    ("Egress bandwidth", "bps",
     [("{{instance}}", f"8 * sum by (instance) (rate(relay_bytes_out_total{{{N}}}[{R}]))")], 12),
    ("Drops by reason /s", "pps",
     [("{{reason}}", f"sum by (reason) (rate(relay_drops_total{{{N}}}[{R}]))")], 12),
    ("Fan-out latency (ingest to last send)", "s",
     [(f"p{int(q * 100)}", f"histogram_quantile({q}, sum by (le) "
                           f"(rate(relay_fanout_latency_seconds_bucket{{{N}}}[{R}])))")
      for q in (0.5, 0.9, 0.99)], 12),
    ("sendmmsg batch size (mean)", "short",
     [("{{instance}}", f"sum by (instance) (rate(relay_sendmmsg_batch_size_sum{{{N}}}[{R}])) / "
                       f"sum by (instance) (rate(relay_sendmmsg_batch_size_count{{{N}}}[{R}]))")], 12),
    ("NACKs and resends /s", "pps",
     [("NACKed", f"sum (rate(relay_nacks_total{{{N}}}[{R}]))"),
      ("resent", f"sum (rate(relay_resends_total{{{N}}}[{R}]))")], 12),
    ("Publisher silence", "s",
     [("{{room}}", f"max by (room) (relay_room_publisher_silence_seconds{{{N}}})")], 12),
    ("Load (admission stops at max_load)", "percentunit",
     [("fan-out {{instance}}", f"max by (instance) (relay_fanout_duty_ratio{{{N}}})"),
      ("loop {{instance}}", f"max by (instance) (relay_loop_duty_ratio{{{N}}})"),
      ("machine {{instance}}", f"max by (instance) (relay_machine_cpu_busy_ratio{{{N}}})")], 12),
    ("Event-loop lag", "s", [("{{instance}}", f"max by (instance) (relay_loop_lag_seconds{{{N}}})")], 8),
    ("CPU (cores)", "short",
     [("{{instance}}", f"rate(relay_process_cpu_seconds_total{{{N}}}[{R}])")], 8),
    ("Memory and fds", "bytes",
     [("RSS {{instance}}", f"relay_process_resident_memory_bytes{{{N}}}"),
      ("fds {{instance}}", f"relay_process_open_fds{{{N}}}")], 8),
    # stages: rooms of several speakers, mixed on this node
    ("Stages: speakers, mixer CPU, dropped speaker audio", "short",
     [("speakers {{instance}}", f"relay_speakers{{{N}}}"),
      ("mixer cores {{instance}}", f"rate(relay_mixer_cpu_seconds_total{{{N}}}[{R}])"),
      ("dropped /s: {{reason}}", f"sum by (reason) (rate(relay_stage_drops_total{{{N}}}[{R}]))")], 12),
    ("Stages: mixed frames and switches /s", "short",
     [("mixed {{instance}}", f"rate(relay_mixed_frames_total{{{N}}}[{R}])"),
      ("switches {{instance}}", f"rate(relay_stage_switches_total{{{N}}}[{R}])"),
      ("clipped samples {{instance}}", f"rate(relay_limiter_clipped_samples_total{{{N}}}[{R}])")], 12),
    # the cluster: the directory, the tree above each node, joiners sent on
    ("Cluster: nodes in the directory", "short",
     [("seen by {{instance}}", f"relay_directory_peers{{{N}}} + 1"),
      ("directory reachable {{instance}}", f"relay_directory_reachable{{{N}}}")], 8),
    ("Cluster: joiners sent to another node /s", "reqps",
     [("{{reason}}", f'sum by (reason) (rate(relay_rejections_total{{{N},reason=~"node_full|room_full|draining"}}'
                     f"[{R}]))")], 8),
    ("Cluster: upstream health and failovers", "short",
     [("connected {{instance}} {{room}}", f"relay_upstream_connected{{{N}}}"),
      ("failovers {{instance}} {{room}}", f"increase(relay_upstream_switches_total{{{N}}}[{R}])")], 8),
]


def dashboard() -> dict:
    panels, x, y, row_h = [], 0, 0, 8
    ds = {"type": "prometheus", "uid": "${datasource}"}
    for pid, (title, unit, targets, width) in enumerate(PANELS, start=1):
        if x + width > 24:
            x, y = 0, y + row_h
        panels.append({
            "id": pid, "type": "timeseries", "title": title, "datasource": ds,
            "gridPos": {"x": x, "y": y, "w": width, "h": row_h},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [{"refId": chr(ord("A") + i), "datasource": ds, "expr": expr,
                         "legendFormat": legend} for i, (legend, expr) in enumerate(targets)],
        })
        x += width
    return {
        "title": "relay node",
        "uid": "relay-node",
        "description": "Live-audio relay: listeners, egress, drops, latency, capacity.",
        "tags": ["relay", "audio"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
            {"name": "node", "type": "query", "label": "Node", "datasource": ds,
             "query": {"query": "label_values(relay_build_info, instance)", "refId": "node"},
             "definition": "label_values(relay_build_info, instance)",
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
             "current": {"text": "All", "value": "$__all"}},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("relay.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")
