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
        assert rooms == [{"name": relay.room, "listeners": 3, "packets_in": 0, "publisher_silent_s": None}]
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
