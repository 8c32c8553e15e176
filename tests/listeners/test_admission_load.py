"""Load-aware admission on a machine that is busy with something else: with
the default limits, an unrelated CPU-bound process must not make an idle
relay refuse listeners (it did: the machine's CPU was projected as if it
grew with the relay's listeners; and with every core busy, the machine cap
refused a node with no listeners at all). The machine cap refuses only
when the relay's own share makes the machine busy or its senders fall
behind, and never below the admission floor."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from relay.listeners.admission import LoadGate
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


def test_an_idle_node_admits_while_other_programs_fill_every_core(tmp_path) -> None:
    # every default, the machine cap included
    relay = start_relay(tmp_path, extra_node="max_load = 0.8\nmax_machine_load = 0.95")
    neighbours = [subprocess.Popen([sys.executable, "-c", NEIGHBOUR]) for _ in range(os.cpu_count() or 2)]
    crowd = LoopbackCrowd(4, relay.listen, relay.room)
    try:
        deadline = time.monotonic() + 10
        while scrape(relay.admin).get("relay_machine_cpu_busy_ratio", 0) <= 0.95:
            assert time.monotonic() < deadline, "the neighbours never filled the machine"
            time.sleep(0.1)
        res = crowd.join(attempts=1)
        metrics = scrape(relay.admin)
        assert res.accepted == 4, (res.rejected, metrics.get("relay_machine_cpu_busy_ratio"))
        assert metrics["relay_rejections_load_total"] == 0
    finally:
        for n in neighbours:
            n.kill()
            n.wait()
        crowd.close()
        assert stop(relay.proc) == 0


def test_the_machine_cap_refuses_only_for_the_relays_own_load_or_a_shortfall() -> None:
    gate = LoadGate(floor=100)
    # the machine is full, but of other programs: the relay uses 5 % of it
    gate.note(0.1, 0.99, 500, relay_share=0.05, behind=False)
    assert not gate.refuses(0.0, 500, max_load=0.8, max_machine_load=0.95)
    # the relay's own work makes the machine busy
    gate.note(0.1, 0.99, 500, relay_share=0.7, behind=False)
    assert gate.refuses(1.0, 500, max_load=0.8, max_machine_load=0.95)
    # ... but below the floor it still admits
    assert not gate.refuses(2.0, 99, max_load=0.8, max_machine_load=0.95)
    # the machine is full of others and the senders fall behind: refuse
    gate.note(0.1, 0.99, 500, relay_share=0.05, behind=True)
    assert gate.refuses(3.0, 500, max_load=0.8, max_machine_load=0.95)
    # a machine with room never refuses
    gate.note(0.1, 0.5, 500, relay_share=0.5, behind=True)
    assert not gate.refuses(4.0, 500, max_load=0.8, max_machine_load=0.95)
