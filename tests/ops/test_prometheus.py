"""The shipped dashboard and alert rules, proven against a real Prometheus
server scraping a relay with live traffic."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from relay.testing.loadgen import LoopbackCrowd
from tests.conftest import free_port, need, start_relay, stop

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/relay.json"
PROM_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"


def test_promtool_accepts_config_and_rules() -> None:
    promtool = need("promtool")
    for args in (["check", "config", str(PROM_CONFIG)], ["check", "rules", str(ALERTS)]):
        p = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr


def test_dashboard_is_the_generated_one_and_importable() -> None:
    gen = subprocess.run([sys.executable, "-c", "import json, runpy; d = runpy.run_path("
                          f"{str(ROOT / 'deploy/grafana/make_dashboard.py')!r})['dashboard'](); "
                          "print(json.dumps(d))"], capture_output=True, text=True, check=True)
    shipped = json.loads(DASHBOARD.read_text())
    assert shipped == json.loads(gen.stdout), "run deploy/grafana/make_dashboard.py"
    ids = [p["id"] for p in shipped["panels"]]
    assert len(ids) == len(set(ids))
    for p in shipped["panels"]:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert p["targets"] and all(t["expr"] for t in p["targets"])
    names = [v["name"] for v in shipped["templating"]["list"]]
    assert names == ["datasource", "node"]


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]


def _panel_exprs() -> list[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"].replace('"$node"', '".*"').replace("$__rate_interval", "30s"))
            for p in d["panels"] for t in p["targets"]]


# what only a node in a cluster exports: checked by the cluster test
CLUSTER_ONLY = ("relay_directory_", "relay_upstream_")


def _cluster_only(expr: str) -> bool:
    return any(m in expr for m in CLUSTER_ONLY)


def _start_prometheus(tmp_path: Path, targets: list[tuple[str, int]]) -> tuple[subprocess.Popen, "Prometheus"]:
    """A real Prometheus with our config and rules, scraping `targets` every second."""
    prometheus = need("prometheus")
    port = free_port(__import__("socket").SOCK_STREAM)
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    cfg = PROM_CONFIG.read_text().replace("15s", "1s").replace(
        '"127.0.0.1:7080"', ", ".join(f'"{h}:{p}"' for h, p in targets))
    (tmp_path / "prometheus.yml").write_text(cfg)
    prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return prom, Prometheus(f"http://127.0.0.1:{port}")


def _stop_prometheus(prom: subprocess.Popen) -> None:
    prom.terminate()
    try:
        prom.wait(10)
    except subprocess.TimeoutExpired:
        prom.kill()


def _signal(expr: str) -> str:
    """An alert's expression without its final threshold comparison."""
    m = re.match(r"^(.*)\s(>|<|>=|<=|==|!=)\s*[0-9.]+\s*$", expr.strip(), re.S)
    assert m, f"alert expression is not '<signal> <op> <threshold>': {expr}"
    return m.group(1)


def test_every_panel_and_alert_returns_data_from_real_prometheus(tmp_path) -> None:
    relay = start_relay(tmp_path)
    pub = subprocess.Popen(relay.relay_cmd("publish", "--to", f"{relay.ingest[0]}:{relay.ingest[1]}",
                                           "--duration", "60"), env=relay.env, stderr=subprocess.DEVNULL)
    crowd = LoopbackCrowd(20, relay.listen, relay.room)
    prom, p = _start_prometheus(tmp_path, [relay.admin])
    try:
        assert crowd.join().accepted == 20
        crowd.run(10.0)  # traffic while Prometheus scrapes every second
        deadline = time.monotonic() + 30
        while not p.query('relay_packets_out_total > 0') and time.monotonic() < deadline:
            crowd.run(1.0)
        assert f"{relay.admin[0]}:{relay.admin[1]}" in p.api(
            "label/instance/values", **{"match[]": "relay_build_info"})
        empty = [(title, expr) for title, expr in _panel_exprs() if not _cluster_only(expr) and not p.query(expr)]
        assert empty == [], f"panels with no data: {empty}"

        groups = p.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == 8
        assert all(r["health"] == "ok" for r in rules), rules
        no_signal = [r["name"] for r in rules if not _cluster_only(r["query"]) and not p.query(_signal(r["query"]))]
        assert no_signal == [], f"alert signals with no data: {no_signal}"

        # the publisher goes quiet: its alert must start pending within its window
        pub.terminate()
        pub.wait(10)
        deadline = time.monotonic() + 40
        state = None
        while time.monotonic() < deadline:
            crowd.run(1.0)
            alerts = [a for a in p.api("alerts")["alerts"] if a["labels"]["alertname"] == "RelayPublisherSilent"]
            if alerts:
                state = alerts[0]["state"]
                assert alerts[0]["labels"]["room"] == relay.room
                break
        assert state in ("pending", "firing")
    finally:
        crowd.close()
        if pub.poll() is None:
            pub.kill()
        _stop_prometheus(prom)
        assert stop(relay.proc) == 0


def test_the_cluster_row_and_alerts_from_real_prometheus(tmp_path) -> None:
    """An origin and an edge sharing a Redis directory: the cluster panels
    and alert signals have data, and the edge losing its only upstream
    while it has listeners starts RelayEdgeWithoutUpstream."""
    import signal as signals
    from tests.cluster.conftest import Node, listen_token
    from tests.cluster.conftest import RedisServer
    redis = RedisServer()
    origin = Node(tmp_path, "origin", directory=redis.url)
    edge = Node(tmp_path, "edge", upstream=[origin], directory=redis.url)
    pub = subprocess.Popen([sys.executable, "-m", "relay", "publish", "--to",
                            f"{origin.ingest[0]}:{origin.ingest[1]}", "--duration", "60"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    crowd = LoopbackCrowd(5, edge.listen, "live", token=listen_token())
    prom, p = _start_prometheus(tmp_path, [origin.admin, edge.admin])
    try:
        assert crowd.join().accepted == 5
        crowd.run(8.0)
        deadline = time.monotonic() + 30
        while not p.query('relay_upstream_connected == 1') and time.monotonic() < deadline:
            crowd.run(1.0)
        cluster_panels = [(t, e) for t, e in _panel_exprs() if _cluster_only(e)]
        assert len(cluster_panels) == 4
        empty = [(t, e) for t, e in cluster_panels if not p.query(e)]
        assert empty == [], f"cluster panels with no data: {empty}"
        rules = [r for g in p.api("rules")["groups"] for r in g["rules"] if _cluster_only(r["query"])]
        assert sorted(r["name"] for r in rules) == ["RelayDirectoryUnreachable", "RelayEdgeWithoutUpstream"]
        # the signals: every directory node reachable, the edge connected
        assert p.query('max by (instance) (relay_directory_reachable) == 1')
        assert p.query('max by (instance, room) (relay_upstream_connected) == 1')

        origin.proc.send_signal(signals.SIGKILL)     # the edge's only upstream dies under its listeners
        deadline = time.monotonic() + 40
        state = None
        while time.monotonic() < deadline and state is None:
            crowd.run(1.0)
            alerts = [a for a in p.api("alerts")["alerts"] if a["labels"]["alertname"] == "RelayEdgeWithoutUpstream"]
            if alerts:
                state = alerts[0]["state"]
                assert alerts[0]["labels"]["room"] == "live"
        assert state in ("pending", "firing")
    finally:
        crowd.close()
        pub.kill()
        pub.wait()
        _stop_prometheus(prom)
        origin.proc.wait()
        assert stop(edge.proc) == 0
        redis.stop()
