"""SIGHUP reloads rooms and limits without dropping the listeners of rooms
that stay; listeners of a removed room are told so."""
from __future__ import annotations

import json
import signal
import subprocess
import time

from relay.testing.loadgen import LoopbackCrowd
from relay.wire.protocol import Reason, Reject, decode
from tests.conftest import free_port, start_relay, stop


def _wait_rooms(relay, names: set[str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rooms = {r["name"] for r in json.loads(relay.get("/rooms")[1])["rooms"]}
        if rooms == names:
            return
        time.sleep(0.1)
    raise AssertionError(f"rooms are {rooms}, wanted {names}")


def test_sighup_adds_and_removes_rooms_without_dropping_listeners(tmp_path) -> None:
    relay = start_relay(tmp_path)
    cfg_path = tmp_path / "relay.toml"
    original = cfg_path.read_text()
    pub = subprocess.Popen(relay.relay_cmd("publish", "--to", f"{relay.ingest[0]}:{relay.ingest[1]}",
                                           "--duration", "60"), env=relay.env, stderr=subprocess.DEVNULL)
    stay = LoopbackCrowd(20, relay.listen, relay.room)
    second = None
    try:
        assert stay.join().accepted == 20
        stay.run(1.0)
        second_port = free_port()
        cfg_path.write_text(original + f'''
[[room]]
name = "second"
ingest = "127.0.0.1:{second_port}"
sources = ["127.0.0.1"]
''')
        relay.proc.send_signal(signal.SIGHUP)
        _wait_rooms(relay, {relay.room, "second"})
        second = LoopbackCrowd(5, relay.listen, "second", first_address=100)
        assert second.join().accepted == 5
        stay.run(1.0)

        # a broken file is refused and the node keeps running as it was
        cfg_path.write_text("[node\n")
        relay.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert relay.proc.poll() is None
        _wait_rooms(relay, {relay.room, "second"})

        cfg_path.write_text(original)
        relay.proc.send_signal(signal.SIGHUP)
        _wait_rooms(relay, {relay.room})
        told = []
        deadline = time.monotonic() + 5
        while len(told) < 5 and time.monotonic() < deadline:
            second.crowd.poll(50)
            told += [decode(d) for _, d in second.crowd.take_control()]
        assert told.count(Reject(Reason.UNKNOWN_ROOM)) == 5
        stay.run(1.0)
        totals = stay.crowd.totals()
        assert totals["heard"] == 20 and totals["lost"] == 0
        assert totals["received"] >= 20 * 150
    finally:
        pub.kill()
        pub.wait()
        stay.close()
        if second is not None:
            second.close()
        assert stop(relay.proc) == 0


def test_reload_onto_a_taken_ingest_port_keeps_the_room_on_its_old_port(tmp_path) -> None:
    import socket

    relay = start_relay(tmp_path)
    cfg_path = tmp_path / "relay.toml"
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    busy = taken.getsockname()[1]
    crowd = LoopbackCrowd(5, relay.listen, relay.room)
    pub = None
    try:
        assert crowd.join().accepted == 5
        old = f'ingest = "{relay.ingest[0]}:{relay.ingest[1]}"'
        cfg_path.write_text(cfg_path.read_text().replace(old, f'ingest = "127.0.0.1:{busy}"'))
        relay.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert relay.proc.poll() is None
        # the publisher still reaches the room on the old port, and the
        # listeners hear it: the failed rebind did not leave the room deaf
        pub = subprocess.Popen(relay.relay_cmd("publish", "--to", f"{relay.ingest[0]}:{relay.ingest[1]}",
                                               "--duration", "3"), env=relay.env, stderr=subprocess.DEVNULL)
        crowd.run(2.5)
        totals = crowd.crowd.totals()
        assert totals["heard"] == 5 and totals["received"] >= 5 * 50, totals
    finally:
        if pub is not None:
            pub.kill()
            pub.wait()
        crowd.close()
        taken.close()
        assert stop(relay.proc) == 0
    log = relay.proc.stdout.read()
    assert f"cannot bind ingest 127.0.0.1:{busy}" in log and "kept the old port" in log, log


def test_a_reload_plans_new_publishing_rules_for_a_kept_room() -> None:
    import base64
    from relay.ops.reload import plan_reload
    from relay.wire.config import load
    base = '[node]\nauth = "open"\n[[room]]\nname = "a"\ningest = "127.0.0.1:5100"\nsources = ["127.0.0.1"]\n'
    env = {"K": base64.b64encode(bytes(30)).decode()}
    old = load(base, environ=env)
    keyed = load(base + 'srtp_key_env = "K"\n', environ=env)
    plan = plan_reload(old, keyed, capacity=old.max_listeners, room_slots=old.max_rooms)
    assert [r.name for r in plan.rules] == ["a"] and not plan.rebind and not plan.sources
    same = plan_reload(keyed, load(base + 'srtp_key_env = "K"\n', environ=env), old.max_listeners, old.max_rooms)
    assert same.rules == []


def test_a_reload_keeps_the_egress_until_a_restart() -> None:
    """AF_XDP sockets are opened at start: a reload that asks for another
    egress says it needs a restart and keeps the running one."""
    from relay.ops.reload import plan_reload
    from relay.wire.config import load
    room = '[[room]]\nname = "a"\ningest = "127.0.0.1:5100"\nsources = ["127.0.0.1"]\n'
    old = load('[node]\nauth = "open"\n' + room)
    new = load('[node]\nauth = "open"\negress = "xdp"\nxdp_interface = "eth0"\n' + room)
    plan = plan_reload(old, new, capacity=old.max_listeners, room_slots=old.max_rooms)
    assert new.xdp is None and any(n.startswith("xdp needs a restart") for n in plan.notes), plan.notes
