"""The files an operator deploys say what the code does: Grafana
provisioning loads a Prometheus data source of the type the dashboard asks
for and a dashboard folder; the systemd unit runs `relay serve` with limits
that match the node, stops it the way the drain needs, and reloads with
SIGHUP; the sysctl file raises the buffers the node asks for."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from relay.wire.sockets import SOCKET_BUFFER

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_grafana_provisioning_matches_the_dashboard() -> None:
    sources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/relay.yml").read_text())
    boards = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/relay.yml").read_text())
    dashboard = json.loads((DEPLOY / "grafana/relay.json").read_text())
    wanted = [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert wanted == ["prometheus"]
    assert [d["type"] for d in sources["datasources"]] == ["prometheus"]
    assert sources["datasources"][0]["isDefault"] is True   # the dashboard's variable picks it
    provider = boards["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


def test_the_unit_stops_reloads_and_limits_the_node_as_it_needs() -> None:
    unit = (DEPLOY / "systemd/relay.service").read_text()
    keys = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    assert keys["ExecStart"].split()[1:] == ["serve", "-c", "/etc/relay/node.toml"]
    assert keys["KillSignal"] == "SIGTERM" and int(keys["TimeoutStopSec"]) > 5   # the drain's grace
    assert "-HUP" in keys["ExecReload"]
    assert int(keys["LimitNOFILE"]) >= 65536
    assert keys["EnvironmentFile"] == "/etc/relay/secret.env"


def test_the_sysctls_allow_the_buffers_the_node_asks_for() -> None:
    conf = dict(re.findall(r"^([\w.]+)\s*=\s*(\d+)", (DEPLOY / "sysctl/90-relay.conf").read_text(), re.M))
    assert int(conf["net.core.wmem_max"]) >= SOCKET_BUFFER
    assert int(conf["net.core.rmem_max"]) >= SOCKET_BUFFER
