"""The chaos bench's short form (bench/chaos.py --smoke): a live tree with an
origin pair, each part killed in turn, run once for the tests below. What
holds today is asserted on packet counts: a mid's death and either origin's
death cost the edges' listeners nothing, listeners on an edge that dies
move and resume, a crashed publisher's successor is heard within the
takeover window and a margin, and every event is in the report with an
outcome."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.solo   # it loads the whole machine: run alone (pyproject.toml)

ROOT = Path(__file__).resolve().parent.parent
EVENTS = {"origin_lead", "origin_follow", "mid0", "mid1", "edge", "publisher", "redis", "storm"}
OUTCOMES = {"met", "not met", "failed", "not run"}
# the publisher's successor: the 2 s takeover window and a margin; the
# bench's own goal is 3 s, the extra second is for a CPU-bound neighbour
PUBLISHER_BACK_S = 4.0


@pytest.fixture(scope="module")
def chaos(tmp_path_factory) -> dict:
    """Every event of one smoke run, by name."""
    out = tmp_path_factory.mktemp("chaos") / "chaos.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr, p.stdout[-3000:] + p.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["runs"]) == 1
    return {e["event"]: e for e in result["runs"][0]["events"]}


def test_every_event_is_reported_with_an_outcome(chaos: dict) -> None:
    assert set(chaos) == EVENTS, sorted(chaos)
    for key, e in chaos.items():
        assert e["outcome"] in OUTCOMES, (key, e)
        if e["outcome"] in ("failed", "not run"):
            assert e.get("error"), (key, e)
    # the listeners of the edge that died are reported, not hidden; the
    # other edges' listeners lose nothing
    edge = chaos["edge"]
    assert edge["outcome"] != "failed" and edge["listeners"]["listeners"] == 5, edge
    assert edge["other_edges"]["missing"]["max"] == 0, edge
    # its `relay listen` processes moved to an alternate and got what they
    # missed from its history (about a second of it: a machine slower than
    # that to notice and move leaves a few packets, counted)
    movers = edge["movers"]
    assert movers["listeners"] == movers["moved"] == 4 and movers["missing"]["max"] <= 5, movers


@pytest.mark.parametrize("key", ["origin_lead", "origin_follow", "mid0", "mid1"])
def test_a_dead_origin_or_mid_costs_the_listeners_nothing(chaos: dict, key: str) -> None:
    e = chaos[key]
    assert e["outcome"] == "met", e
    heard = e["listeners"]
    assert heard["listeners"] == 15 and heard["missing"]["max"] == 0 and heard["not_back"] == 0, heard


def test_a_crashed_publishers_successor_is_heard_within_the_takeover_window(chaos: dict) -> None:
    pub = chaos["publisher"]["listeners"]
    assert pub["not_back"] == 0 and pub["back_s"] is not None and pub["back_s"] <= PUBLISHER_BACK_S, pub
