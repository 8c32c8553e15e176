"""Load-aware admission on a machine that is busy with something else: with
the default limits, an unrelated CPU-bound process must not make an idle
relay refuse listeners (it did: the machine's CPU was projected as if it
grew with the relay's listeners)."""
from __future__ import annotations

import subprocess
import sys
import time

from relay.testing.loadgen import LoopbackCrowd, scrape
from tests.conftest import start_relay, stop

# one core's worth of unrelated work, bounded in time
NEIGHBOUR = "import time\nend = time.monotonic() + 20\nwhile time.monotonic() < end:\n    pass\n"


def test_idle_relay_admits_beside_a_cpu_bound_neighbour(tmp_path) -> None:
    # the default max_load; the machine cap is left off so that whatever else
    # shares this machine with the test cannot fill it
    relay = start_relay(tmp_path, extra_node="max_load = 0.8\nmax_machine_load = 0")
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR])
    first = LoopbackCrowd(1, relay.listen, relay.room)
    crowd = LoopbackCrowd(20, relay.listen, relay.room)
    try:
        assert first.join(attempts=1).accepted == 1
        # let the node measure the busy machine with a listener on board
        deadline = time.monotonic() + 5
        while scrape(relay.admin).get("relay_machine_cpu_busy_ratio", 0) < 0.3:
            assert time.monotonic() < deadline, "the neighbour never showed up as machine load"
            time.sleep(0.1)
        time.sleep(0.6)
        res = crowd.join(attempts=1)
        metrics = scrape(relay.admin)
        assert res.accepted == 20, (res.rejected, metrics.get("relay_machine_cpu_busy_ratio"))
        assert metrics["relay_rejections_load_total"] == 0
    finally:
        neighbour.kill()
        neighbour.wait()
        first.close()
        crowd.close()
        assert stop(relay.proc) == 0
