"""The fan-out latency histogram counts what its doc says: one observation
per packet per sender thread, so with two threads its count is twice the
packets in."""
from __future__ import annotations

import socket
import time

from relay.testing.loadgen import LoopbackCrowd, scrape
from tests.conftest import start_relay, stop
from tests.rtp import rtp


def test_fanout_latency_is_observed_once_per_packet_per_sender_thread(tmp_path) -> None:
    relay = start_relay(tmp_path, extra_node="workers = 2")
    crowd = LoopbackCrowd(4, relay.listen, relay.room)     # listeners on both threads
    pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert crowd.join().accepted == 4
        for k in range(40):
            pub.sendto(rtp(k, 960 * k, 0xA, bytes(60)), relay.ingest)
            time.sleep(0.01)
        deadline = time.monotonic() + 10
        while True:
            m = scrape(relay.admin)
            count, packets = m["relay_fanout_latency_seconds_count"], m["relay_packets_in_total"]
            if count == 2 * packets or time.monotonic() > deadline:
                break
            crowd.crowd.poll(50)
        assert m["relay_sender_threads"] == 2
        assert packets == 40 and count == 2 * packets, (packets, count)
        # and the metric's own help says so, as docs/metrics.md does
        help_line = next(line for line in relay.get("/metrics")[1].splitlines()
                         if line.startswith("# HELP relay_fanout_latency_seconds "))
        assert "per sender thread" in help_line, help_line
    finally:
        pub.close()
        crowd.close()
        assert stop(relay.proc) == 0
