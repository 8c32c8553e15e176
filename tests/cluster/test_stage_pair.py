"""A mixed stage on an origin pair: two speakers each speak to both origins
(`relay publish --server A --server B`), each origin mixes them on its own
(different bytes), and an edge that takes the room from both follows one
origin and splices the other in when the followed one is killed
mid-stream: at most 60 ms (three 20 ms frames) lost, never two encoders
mixed packet by packet."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

from relay.testing.loadgen import LoopbackCrowd, free_port, scrape
from tests.cluster.conftest import ENV, Node, listen_token
from tests.conftest import stop
from tests.stage.conftest import token

SECONDS = 9


def test_an_edge_loses_at_most_60_ms_when_the_origin_it_follows_dies(tmp_path) -> None:
    ports = (free_port(), free_port())
    origins = [Node(tmp_path, name, listen_port=ports[i],
                    extra_room=f'max_speakers = 4\npair = "127.0.0.1:{ports[1 - i]}"\n')
               for i, name in enumerate(("a", "b"))]
    edge = Node(tmp_path, "edge", upstream=origins)
    crowd = LoopbackCrowd(4, edge.listen, "live", token=listen_token())
    speakers: list[subprocess.Popen] = []
    victim = None
    try:
        assert crowd.join().accepted == 4
        for name, tone in (("ann", 440), ("bo", 660)):
            speakers.append(subprocess.Popen(
                [sys.executable, "-m", "relay", "publish", "--room", "live", "--token", token("live", speaker=name),
                 "--tone", str(tone), "--duration", str(SECONDS),
                 *(arg for o in origins for arg in ("--server", f"{o.listen[0]}:{o.listen[1]}"))],
                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        # the edge finds its parents send two streams, and follows one
        deadline = time.monotonic() + 15
        following = []
        while not following:
            assert time.monotonic() < deadline, "the edge never found which origin to follow"
            crowd.crowd.poll(100)
            m = scrape(edge.admin)
            following = [k for k, v in m.items() if k.startswith("relay_upstream_following{") and v == 1]
        until = time.monotonic() + 2.0
        while time.monotonic() < until:
            crowd.crowd.poll(50)
        m = scrape(edge.admin)
        followed = next(o for o in origins if f'parent="127.0.0.1:{o.listen[1]}"' in following[0])
        victim = followed
        victim.proc.send_signal(signal.SIGKILL)            # the origin the edge follows dies mid-mix
        end = time.monotonic() + SECONDS + 10
        while any(s.poll() is None for s in speakers) and time.monotonic() < end:
            crowd.crowd.poll(50)
        for s in speakers:
            out = s.communicate(timeout=10)[0]
            assert s.returncode == 0 and "speaking a" in out and " and " in out, out
        crowd.crowd.poll(300)
        totals = crowd.crowd.totals()
        m = scrape(edge.admin)
        assert totals["heard"] == 4
        assert totals["received"] >= 4 * 50 * (SECONDS - 3), totals
        # at most three frames missing per listener across the death of an origin
        assert totals["lost"] <= 4 * 3, totals
        assert m['relay_upstream_splices_total{room="live"}'] == 1
        assert m['relay_upstream_disagreements_total{room="live"}'] >= 1
        assert m["relay_source_restarts_total"] == 0          # the room's numbering ran on across the splice
        # the surviving origin really mixed two speakers (different bytes at each origin)
        survivor = next(o for o in origins if o is not victim)
        assert scrape(survivor.admin)["relay_mixed_frames_total"] > 50 * (SECONDS - 3)
    finally:
        for s in speakers:
            if s.poll() is None:
                s.kill()
        crowd.close()
        for o in origins:
            if o is victim:
                o.proc.wait()
            else:
                assert stop(o.proc) == 0
        assert stop(edge.proc) == 0
