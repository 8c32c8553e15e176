"""What a user sees when something is wrong: one line that names the
address, the flag or the fix, an exit status that says which kind of
failure it was, and never a traceback."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from relay.client.listen import KEEPALIVE_MS, ListenClient
from relay.testing.loadgen import LoopbackCrowd, free_port
from relay.wire.protocol import Accept
from tests.conftest import start_relay, stop


def relay(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_line(p: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in p.stderr, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.startswith("relay")]
    assert len(lines) == 1, p.stderr
    return lines[0]


@pytest.mark.parametrize("quic", [False, True])
def test_a_server_name_that_does_not_resolve_is_named(quic: bool) -> None:
    p = relay("listen", "--server", "nosuchhost.invalid:7000", "--duration", "1", *(["--quic"] if quic else []))
    assert p.returncode == 4
    assert "cannot resolve nosuchhost.invalid:7000" in one_line(p)


@pytest.mark.parametrize("args, needle", [
    (("token", "--room", "r", "--ttl", "-5"), "argument --ttl: must be above 0, got -5"),
    (("demo", "--listeners", "-5"), "argument --listeners: must be above 0, got -5"),
    (("listen", "--sdp", "x.sdp"), "--sdp describes the stream --forward sends"),
    (("serve", "--max-listeners", "0"), "argument --max-listeners: must be above 0"),
])
def test_impossible_flags_are_refused(args: tuple[str, ...], needle: str) -> None:
    p = relay(*args)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert needle in p.stderr


def test_a_port_in_use_is_named_with_its_setting_and_fix(tmp_path) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        for flag, setting in (("--listen", "[node] listen"), ("--quic", "[node] quic")):
            args = ["serve", "--open", "--admin", "", "--listen", f"127.0.0.1:{free_port()}",
                    "--room", f"r=127.0.0.1:{free_port()}", flag, f"127.0.0.1:{port}"]
            p = relay(*args)
            assert p.returncode == 1
            line = one_line(p).replace("relay: error: ", "")
            assert line == (f"cannot bind: {setting} 127.0.0.1:{port}: Address already in use; another "
                            f"program has it: choose a free port ({setting} or {flag})"), line
    finally:
        taken.close()


def test_a_room_that_needs_a_token_says_so(tmp_path) -> None:
    r = start_relay(tmp_path, auth="jwt")
    try:
        env = {k: v for k, v in r.env.items() if k != "RELAY_TOKEN"}
        p = relay("listen", "--server", f"{r.listen[0]}:{r.listen[1]}", "--room", r.room, "--duration", "1",
                  env=env)
        assert p.returncode == 3
        assert one_line(p) == "relay: join refused: this room needs a token (pass --token or set RELAY_TOKEN)"
        p = relay("listen", "--server", f"{r.listen[0]}:{r.listen[1]}", "--room", r.room, "--duration", "1",
                  "--token", "not-a-jwt", env=env)
        assert p.returncode == 3 and one_line(p) == "relay: join refused: bad_token"
    finally:
        assert stop(r.proc) == 0


@pytest.mark.parametrize("target", ["nobody", "nosuchhost.invalid:7000"])
def test_a_redirect_says_where_and_why(tmp_path, target: str) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    redirect = nobody if target == "nobody" else target
    r = start_relay(tmp_path, extra_node=f'max_listeners = 1\nredirect = "{redirect}"')
    crowd = LoopbackCrowd(1, r.listen, r.room)
    here = f"{r.listen[0]}:{r.listen[1]}"
    try:
        assert crowd.join().accepted == 1
        p = relay("listen", "--server", here, "--room", r.room, "--duration", "2")
        assert p.returncode == 4 and "Traceback" not in p.stderr, p.stderr
        assert f"relay: {here} said node_full: going to {redirect}" in p.stderr
        if target == "nobody":
            assert f"relay: no answer from {nobody} (sent there by {here}: node_full)" in p.stderr
        else:
            assert f"relay: cannot resolve {redirect} (sent there by {here}: node_full)" in p.stderr
    finally:
        crowd.close()
        assert stop(r.proc) == 0


def test_quic_without_a_trusted_certificate_says_how_to_trust_it(tmp_path) -> None:
    port = free_port()
    r = start_relay(tmp_path, extra_node=f'quic = "127.0.0.1:{port}"')
    try:
        p = relay("listen", "--quic", "--server", f"127.0.0.1:{port}", "--room", r.room, "--duration", "1")
        assert p.returncode == 3
        assert one_line(p).startswith("relay: the node's certificate is not trusted here (")
        assert "--cert-hash" in p.stderr and "--cafile" in p.stderr
    finally:
        assert stop(r.proc) == 0


def test_the_client_clamps_what_an_accept_tells_it() -> None:
    client = ListenClient("127.0.0.1:9", "r")
    got = client._joined(Accept(b"12345678", 7, 0, 15_000))
    assert got.keepalive_ms == KEEPALIVE_MS[0]
    got = client._joined(Accept(b"12345678", 7, 10**9, 15_000))
    assert got.keepalive_ms == KEEPALIVE_MS[1]
    assert any("keepalives every 0 ms" in e for e in client.stats.events)


def test_token_without_a_secret_names_the_variable() -> None:
    p = relay("token", "--room", "r", env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 2 and "RELAY_SECRET" in one_line(p)
