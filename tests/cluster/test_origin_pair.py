"""An origin pair: one ffmpeg publishes one encode to two origins through
its tee muxer (each output with its own SSRC, sequence and timestamp
bases), the origins agree on one numbering by matching payloads, and an
edge that takes the room from both loses nothing when either origin is
killed mid-stream."""
from __future__ import annotations

import signal
import subprocess
import time

import pytest

from relay.client.publish import ffmpeg_command
from relay.testing.loadgen import LoopbackCrowd, free_port, scrape
from tests.cluster.conftest import Node, listen_token
from tests.conftest import stop

SECONDS = 8


@pytest.mark.parametrize("dies", ["lead", "follow"])
def test_an_edge_loses_nothing_when_either_origin_of_a_pair_dies(tmp_path, dies: str) -> None:
    ports = (free_port(), free_port())
    lead = Node(tmp_path, "lead", listen_port=ports[0],
                extra_room=f'pair = "127.0.0.1:{ports[1]}"\npair_lead = true\n')
    follow = Node(tmp_path, "follow", listen_port=ports[1], extra_room=f'pair = "127.0.0.1:{ports[0]}"\n')
    edge = Node(tmp_path, "edge", upstream=[lead, follow])
    crowd = LoopbackCrowd(4, edge.listen, "live", token=listen_token())
    publisher = None
    try:
        assert crowd.join().accepted == 4
        deadline = time.monotonic() + 10
        while not (lead.listeners() >= 2 and follow.listeners() >= 2):   # the edge and the partner
            assert time.monotonic() < deadline, "the pair and the edge never linked up"
            crowd.crowd.poll(50)
        tee = ffmpeg_command("sine=frequency=440:sample_rate=48000", [lead.ingest, follow.ingest],
                             lavfi=True, duration=SECONDS)
        publisher = subprocess.Popen(tee,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            crowd.crowd.poll(50)
        victim = lead if dies == "lead" else follow
        victim.proc.send_signal(signal.SIGKILL)                 # an origin dies mid-stream
        end = time.monotonic() + SECONDS + 10
        while publisher.poll() is None and time.monotonic() < end:
            crowd.crowd.poll(50)
        assert publisher.wait(5) == 0
        crowd.crowd.poll(300)
        totals = crowd.crowd.totals()
        m = scrape(edge.admin)
        assert totals["heard"] == 4 and totals["lost"] == 0, (totals, m.get("relay_upstream_gap_fills_total"))
        assert totals["received"] >= 4 * 50 * (SECONDS - 1), totals
        assert m["relay_source_restarts_total"] == 0          # one numbering from both origins throughout
        assert m["relay_upstream_duplicates_total"] > 50
    finally:
        if publisher is not None and publisher.poll() is None:
            publisher.kill()
        crowd.close()
        victim_proc = (lead if dies == "lead" else follow).proc
        victim_proc.wait()
        for node in (edge, follow if dies == "lead" else lead):
            assert stop(node.proc) == 0
