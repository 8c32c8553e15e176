"""SIGTERM the way a load balancer needs it: /readyz fails at once while
the node keeps serving for its grace period, then listeners are moved in
batches (not all in one burst) to the redirect, and `relay listen` follows
them there, losing less than a second of audio across the move."""
from __future__ import annotations

import re
import signal
import subprocess
import time

from relay.testing.loadgen import LoopbackCrowd
from relay.wire.protocol import Reason, Reject, decode
from tests.conftest import start_relay, stop


def _publish(relay, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(relay.relay_cmd("publish", "--to", f"{relay.ingest[0]}:{relay.ingest[1]}",
                                            "--duration", str(seconds)), env=relay.env, stderr=subprocess.DEVNULL)


def test_sigterm_drains_gracefully_and_listeners_move_with_their_audio(tmp_path) -> None:
    (tmp_path / "b").mkdir()
    target = start_relay(tmp_path / "b")
    here = f"{target.listen[0]}:{target.listen[1]}"
    relay = start_relay(tmp_path, extra_node=f'drain_grace = 1.5\ndrain_rate = 20\nredirect = "{here}"')
    pubs = [_publish(relay, 12), _publish(target, 12)]
    crowd = LoopbackCrowd(20, relay.listen, relay.room)
    listeners = []
    try:
        time.sleep(0.5)
        for _ in range(3):
            listeners.append(subprocess.Popen(
                relay.relay_cmd("listen", "--server", f"{relay.listen[0]}:{relay.listen[1]}",
                                "--room", relay.room, "--duration", "7"),
                env=relay.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        assert crowd.join().accepted == 20
        time.sleep(2.0)
        relay.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # not ready at once, while the listeners it has keep hearing audio
        deadline = signalled + 1.0
        while relay.get("/readyz")[0] != 503:
            assert time.monotonic() < deadline, "/readyz did not fail promptly"
            time.sleep(0.02)
        before = crowd.crowd.totals()["received"]
        told: dict[int, float] = {}
        end = signalled + 6
        while time.monotonic() < end and len(told) < 20:
            crowd.crowd.poll(20)
            for i, data in crowd.crowd.take_control():
                msg = decode(data)
                if isinstance(msg, Reject) and i not in told:
                    assert msg == Reject(Reason.DRAINING, here)
                    told[i] = time.monotonic() - signalled
        assert len(told) == 20
        assert crowd.crowd.totals()["received"] - before >= 20 * 50, "audio stopped during the grace period"
        first, last = min(told.values()), max(told.values())
        assert first >= 1.4, told                    # the grace period
        assert last - first >= 0.5, told             # 23 listeners at 20 a second: batches, not one burst
        assert relay.proc.wait(10) == 0
        for p in listeners:
            err = p.communicate(timeout=20)[1]
            assert p.returncode == 0, err
            assert f"node draining, moving to {here}" in err
            received = int(re.search(r"received (\d+) packets", err).group(1))
            assert received >= 7 * 50 - 50, err       # under a second of audio lost, the move included
    finally:
        for p in pubs + listeners:
            if p.poll() is None:
                p.kill()
            p.wait()
        crowd.close()
        stop(relay.proc)
        assert stop(target.proc) == 0
