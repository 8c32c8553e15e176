"""The admin port's health and room endpoints, capacity with redirect, and
the SIGTERM drain that tells every listener where to go."""
from __future__ import annotations

import json
import signal
import time

from relay.testing.loadgen import LoopbackCrowd
from relay.wire.protocol import Reason, Reject, decode
from tests.conftest import start_relay, stop


def test_capacity_readiness_rooms_and_drain(tmp_path) -> None:
    relay = start_relay(tmp_path, extra_node='max_listeners = 3\nredirect = "127.0.0.1:7999"')
    crowd = LoopbackCrowd(5, relay.listen, relay.room)
    try:
        assert relay.get("/healthz") == (200, "ok\n")
        assert relay.get("/readyz") == (200, "ready\n")
        res = crowd.join(attempts=1)
        assert res.accepted == 3
        assert res.rejected == {"node_full": 2}
        assert relay.get("/readyz") == (503, "full\n")
        status, body = relay.get("/rooms")
        assert status == 200
        rooms = json.loads(body)["rooms"]
        assert rooms == [{"name": relay.room, "listeners": 3,
                          "by_transport": {"udp": 3, "quic": 0, "webtransport": 0}, "packets_in": 0,
                          "bitrate_in_bps": 0, "loss_in": 0.0,
                          "drops_in": {"foreign": 0, "malformed": 0, "oversized": 0, "late": 0},
                          "publisher_silent_s": None}]
        assert relay.get("/nope")[0] == 404

        relay.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        told: dict[int, Reject] = {}
        while len(told) < 3 and time.monotonic() < deadline:
            crowd.crowd.poll(50)
            for i, data in crowd.crowd.take_control():
                msg = decode(data)
                if isinstance(msg, Reject):
                    told[i] = msg
        assert sorted(told) == sorted(crowd.sessions)
        assert all(m == Reject(Reason.DRAINING, "127.0.0.1:7999") for m in told.values())
        assert relay.proc.wait(10) == 0
    finally:
        crowd.close()
        stop(relay.proc)


def test_rooms_show_bitrate_and_loss_in_and_the_index_links_everything(tmp_path) -> None:
    import socket

    from tests.rtp import rtp

    relay = start_relay(tmp_path)
    pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        status, page = relay.get("/")
        assert status == 200
        for link in (f"/listen?room={relay.room}", "/rooms", "/metrics", "/healthz", "/readyz", "/quic.json"):
            assert f'href="{link}"' in page
        # 2.5 s of 100-byte payloads at 50 packets/s, every tenth one lost on the way
        sent = 0
        for k in range(125):
            if k % 10 != 9:
                pub.sendto(rtp(k, 960 * k, 0xC0DE, bytes(100)), relay.ingest)
                sent += 1
            time.sleep(0.02)
        room = json.loads(relay.get("/rooms")[1])["rooms"][0]
        assert room["packets_in"] == sent
        assert abs(room["loss_in"] - 0.1) < 0.02, room
        assert 30_000 < room["bitrate_in_bps"] < 50_000, room      # 45 packets/s of 112 bytes
        assert room["drops_in"] == {"foreign": 0, "malformed": 0, "oversized": 0, "late": 0}
    finally:
        pub.close()
        assert stop(relay.proc) == 0
