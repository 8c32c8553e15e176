"""NACKs from a listener are answered from its ring, byte for byte, and
rate-limited so a NACK storm cannot take the node's egress."""
from __future__ import annotations

import socket
import struct
import time

from relay.testing.loadgen import scrape
from relay.wire.rtcp import build_nack
from tests.conftest import start_relay, stop
from tests.rtp import rtp
from tests.listeners.conftest import udp_join


def test_nack_is_answered_from_the_ring_and_rate_limited(tmp_path) -> None:
    relay = start_relay(tmp_path, extra_node="ring_depth = 64")
    pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lst = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lst.bind(("127.0.0.1", 0))
    lst.connect(relay.listen)
    lst.settimeout(2)
    try:
        acc = udp_join(lst, relay.room)
        for k in range(60):
            pub.sendto(rtp(k, 960 * k, 0xFEED, struct.pack("!H", k) * 20), relay.ingest)
            time.sleep(0.002)
        got = {}
        while len(got) < 60:
            p = lst.recv(2048)
            if p[0] >> 6 == 2:
                got[struct.unpack_from("!H", p, 2)[0]] = p
        seqs = sorted(got)
        want = seqs[10:13]
        lst.send(build_nack(0x1234, acc.ssrc, want))
        resent = [lst.recv(2048) for _ in want]
        assert sorted(resent) == sorted(got[s] for s in want)
        # a NACK naming an SSRC that is not ours is ignored
        lst.send(build_nack(0x1234, acc.ssrc ^ 1, seqs[20:21]))
        # a storm of NACKs: the burst allowance is resent, the rest counted
        for s in seqs[:60]:
            lst.send(build_nack(0x1234, acc.ssrc, [s]))
        lst.settimeout(0.5)
        storm = []
        try:
            while True:
                storm.append(lst.recv(2048))
        except socket.timeout:
            pass
        assert 25 <= len(storm) <= 32, len(storm)
        m = scrape(relay.admin)
        assert m["relay_resends_total"] == len(storm) + 3
        assert m["relay_nacks_rate_limited_total"] == 60 - len(storm)
    finally:
        pub.close()
        lst.close()
        assert stop(relay.proc) == 0
