"""A join storm while a room is live: the listeners already there hear every
packet, and every newcomer gets an ACCEPT or an explicit REJECT."""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from relay.testing.loadgen import LoopbackCrowd, scrape
from relay.wire.sockets import SOCKET_BUFFER
from tests.conftest import start_relay, stop

EXISTING = 300
STORM = 3000
pytestmark = pytest.mark.solo   # 3,000 joiners and 300 receivers in this process: run alone (pyproject.toml)


def test_join_storm_keeps_existing_listeners_whole(tmp_path) -> None:
    relay = start_relay(tmp_path, extra_node=(
        f'max_listeners = {EXISTING + 1500}\njoin_rate = 1000\nredirect = "127.0.0.1:7999"'))
    pub = subprocess.Popen(relay.relay_cmd("publish", "--to", f"{relay.ingest[0]}:{relay.ingest[1]}",
                                           "--duration", "60"), env=relay.env, stderr=subprocess.DEVNULL)
    existing = LoopbackCrowd(EXISTING, relay.listen, relay.room)
    storm = LoopbackCrowd(STORM, relay.listen, relay.room, first_address=EXISTING)
    try:
        assert existing.join().accepted == EXISTING
        existing.run(2.0)
        before = existing.crowd.totals()
        t0 = time.monotonic()
        res = storm.join(attempts=1, timeout=10, retry_limited=False)
        storm_s = time.monotonic() - t0
        existing.run(2.0)
        after = existing.crowd.totals()
        print(f"\nstorm: {STORM} joins in {storm_s:.2f} s: {res.accepted} accepted, "
              f"rejected {res.rejected}, {res.unanswered} unanswered; existing listeners "
              f"received {after['received'] - before['received']} packets, lost {after['lost']}")
        # every newcomer got an answer, and the answers add up
        assert res.unanswered == 0
        assert res.accepted + sum(res.rejected.values()) == STORM
        assert res.accepted <= 1500
        assert set(res.rejected) <= {"rate_limited", "node_full"}
        assert res.rejected, "the storm should have met a limit"
        # and the listeners already there lost nothing
        assert after["heard"] == EXISTING
        assert after["lost"] == 0
        assert after["received"] - before["received"] >= EXISTING * 40
        m = scrape(relay.admin)
        assert m['relay_drops_total{reason="overflow"}'] == 0
    finally:
        pub.kill()
        pub.wait()
        existing.close()
        storm.close()
        assert stop(relay.proc) == 0


def test_the_listener_socket_gets_the_buffer_it_asks_for(tmp_path) -> None:
    """A storm's burst of JOINs waits in the listener socket's kernel buffer
    while the loop is busy; capped at net.core.rmem_max (208 KiB on a stock
    kernel) it overflowed and joiners went unanswered. A node with
    CAP_NET_ADMIN (these tests run as root) takes the full size."""
    relay = start_relay(tmp_path)
    try:
        out = subprocess.run(["ss", "-uamnH", "sport", "=", f":{relay.listen[1]}"], capture_output=True,
                             text=True, check=True).stdout
        rb = int(re.search(r"\brb(\d+)", out).group(1))
        tb = int(re.search(r"\btb(\d+)", out).group(1))
        # the kernel doubles what it is asked for (its bookkeeping share)
        assert rb >= 2 * SOCKET_BUFFER and tb >= 2 * SOCKET_BUFFER, out
    finally:
        assert stop(relay.proc) == 0
