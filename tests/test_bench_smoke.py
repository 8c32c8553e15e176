"""A seconds-long run of the benchmark suites, so bench/ cannot rot: every
implementation (and both transports) delivers to every listener, the
cluster's tree works end to end, and the reports are written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.solo   # it loads the whole machine: run alone (pyproject.toml)

ROOT = Path(__file__).resolve().parent.parent


def _smoke(script: str, tmp_path: Path) -> dict:
    """Run bench/SCRIPT --smoke; the JSON it wrote."""
    out = tmp_path / "result.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_smoke_runs_every_implementation() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--name", "smoke-test"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = ROOT / "bench" / "results" / "smoke-test.json"
    result = json.loads(out.read_text())
    out.unlink()
    medians = result["medians"]["50"]
    assert set(medians) == {"limit", "relay", "python", "gst"}
    for impl, m in medians.items():
        # 50 listeners at 500 packets/s: each implementation delivered nearly all of it
        assert m["delivered_per_s"] > 0.8 * 50 * 500, (impl, m)
    assert result["storm"]["unanswered"] == 0
    assert result["storm"]["existing_lost"] == 0


def test_quic_bench_smoke(tmp_path) -> None:
    result = _smoke("quic.py", tmp_path)
    medians = result["medians"]["10"]
    for transport in ("udp", "quic"):
        # 10 listeners at 50 packets/s each, over the measured window
        assert medians[transport]["delivered_per_s"] > 0.8 * 10 * 50, (transport, medians)
    assert medians["quic"]["loss_ratio"] < 0.01, medians


def test_cluster_bench_smoke(tmp_path) -> None:
    result = _smoke("cluster.py", tmp_path)
    assert all(row["origin_sessions"] == 2 for row in result["origin_cost"])   # two mids, whatever the crowd
    storm = result["storm"]
    assert storm["accepted"] == storm["joins"] and storm["past_limit"] == 0 and storm["redirects"] > 0, storm
    assert result["failover"]["numbering_gaps"] == 0 and result["failover"]["gap_s_max"] < 2.0, result["failover"]
    assert result["redis_outage"]["lost"] == 0 and result["redis_outage"]["nodes_alive"] == 7


def test_speakers_bench_smoke(tmp_path) -> None:
    result = _smoke("speakers.py", tmp_path)
    # one speaker passes through, more are mixed, and the mix never clips
    assert [(r["speakers"], r["on_stage"], r["mode"]) for r in result["cpu"]] == [
        (1, 1, "pass"), (2, 2, "mix"), (4, 4, "mix"), (8, 8, "mix"), (16, 16, "mix"), (2, 16, "mix")]
    # the room's encode and one per talking speaker, whoever else is on stage
    assert [round(r["encodes_per_frame"]) for r in result["cpu"][1:]] == [3, 5, 9, 17, 3]
    assert all(r["clipped"] == 0 and r["rooms_per_core"] > 0 for r in result["cpu"])
    # every frame the first speaker sent is found in the listener's stream
    for r in result["latency"]:
        assert r["matched"] >= 0.9 * r["frames"], r
    # the spread over join phases is measured from every phase's frames
    spread = result["join_phases"]
    assert spread["phases_ms"] == [0.0, 10.0] and spread["frames"] > 50, spread
    assert 0 < spread["added_p50_ms"] <= spread["added_p99_ms"] <= spread["added_max_ms"], spread
