"""Config mistakes are one readable line; `relay serve` never shows a traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from relay.wire.config import ConfigError, load

GOOD = """
[node]
listen = "127.0.0.1:7100"
auth = "jwt"
[[room]]
name = "a"
ingest = "127.0.0.1:5100"
sources = ["127.0.0.1", "10.1.2.3:5000"]
"""


def test_good_config_and_secret_from_environment() -> None:
    cfg = load(GOOD, environ={"RELAY_SECRET": "x" * 32})
    assert cfg.secret == "x" * 32
    assert cfg.rooms[0].sources == [("127.0.0.1", 0), ("10.1.2.3", 5000)]


@pytest.mark.parametrize("text, needle", [
    (GOOD, "RELAY_SECRET"),
    ("[node\n", "not valid TOML"),
    (GOOD.replace('"127.0.0.1:5100"', '"127.0.0.1:99999"'), "port 99999 out of range"),
    (GOOD.replace('name = "a"', 'name = "a"\ncolour = 1'), "unknown key 'colour'"),
    (GOOD.replace('sources = ["127.0.0.1", "10.1.2.3:5000"]', 'sources = ["*"]'), "only allowed with auth"),
    (GOOD.replace('auth = "jwt"', 'auth = "jwt"\nring_depth = 12'), "power of two"),
    (GOOD + GOOD.split("[[room]]")[1].join(["[[room]]", ""]), "defined twice"),
    ('[node]\nauth = "open"', "no [[room]]"),
    (GOOD.replace('name = "a"', 'name = "a"\nmax_speakers = 65'), "max_speakers: expected an integer from 0 to 64"),
    (GOOD + '[[room]]\nname = "s"\nsources = ["127.0.0.1"]\n', "'sources' is for rooms with an 'ingest' port"),
    (GOOD + '[[room]]\nname = "s"\nmax_speakers = 0\n', "max_speakers: expected an integer from 1 to 64"),
    (GOOD.replace('auth = "jwt"', 'auth = "jwt"\nsecret_env = "SHORT"'), "at least 32 bytes"),
    (GOOD.replace('auth = "jwt"', 'auth = "jwt"\nquic = "127.0.0.1:7100"'), "also the UDP listen address"),
    (GOOD.replace('auth = "jwt"', 'auth = "jwt"\nquic = "127.0.0.1:7443"\nquic_cert = "c.pem"'),
     "quic_cert and quic_key go together"),
    (GOOD.replace('auth = "jwt"', 'auth = "jwt"\nquic = "127.0.0.1:7443"\nquic_cert = "/nonexistent.pem"\n'
                                  'quic_key = "/nonexistent.key"'), "cannot read /nonexistent.pem"),
])
def test_mistakes_are_named(text: str, needle: str) -> None:
    env = {} if needle == "RELAY_SECRET" else {"RELAY_SECRET": "x" * 32, "SHORT": "abc"}
    with pytest.raises(ConfigError) as e:
        load(text, environ=env)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_serve_with_bad_config_prints_one_line(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nauth = "maybe"\n')
    p = subprocess.run([sys.executable, "-m", "relay", "serve", "-c", str(bad)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert p.stderr.strip() == 'relay: error: [node] auth: expected "jwt" or "open", got \'maybe\''
    missing = subprocess.run([sys.executable, "-m", "relay", "serve", "-c", str(tmp_path / "nope.toml")],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "cannot read" in missing.stderr


# values that were accepted and then failed at run time (a MemoryError
# traceback, a TypeError, a struct.error on every JOIN, a source reported as
# a certificate problem, a keepalive ten thousand times a second)
ACCEPTED_THEN_FAILING = [
    ('max_listeners = 10000000\nring_bytes = 16384', "max_listeners = 10000000 needs"),  # 165 GB
    ('secret_env = 5', "secret_env: expected the name of an environment variable"),
    ('session_timeout = 5000000', "session_timeout: expected a positive number of seconds from 0.2 to 3600"),
    ('keepalive_interval = 0.0001', "keepalive_interval: expected a positive number of seconds from 0.1 to 600"),
    ('ring_bytes = 1000', "ring_bytes: expected an integer from 1287 to 16384"),
    ('slot_bytes = 480', "slot_bytes is gone: rings now hold packets of any length; size them with ring_bytes"),
]


@pytest.mark.parametrize("line, needle", ACCEPTED_THEN_FAILING)
def test_values_that_cannot_work_are_refused_up_front(line: str, needle: str, tmp_path) -> None:
    text = GOOD.replace('auth = "jwt"', f'auth = "jwt"\n{line}')
    with pytest.raises(ConfigError) as e:
        load(text, environ={"RELAY_SECRET": "x" * 32})
    assert needle in str(e.value) and "\n" not in str(e.value)
    cfg = tmp_path / "node.toml"
    cfg.write_text(text)
    p = subprocess.run([sys.executable, "-m", "relay", "serve", "-c", str(cfg)], capture_output=True,
                       text=True, timeout=30, env={"RELAY_SECRET": "x" * 32, "PATH": "/usr/bin:/bin"})
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and needle in p.stderr


def test_the_arena_estimate_is_what_the_core_reserves() -> None:
    from relay._core import listener_bytes
    from relay.wire.config import arena_bytes
    for extra in ("", "ring_bytes = 8192\nring_depth = 64\nmax_listeners = 3"):
        cfg = load(GOOD.replace('auth = "jwt"', f'auth = "jwt"\n{extra}'), environ={"RELAY_SECRET": "x" * 32})
        assert arena_bytes(cfg) == cfg.max_listeners * listener_bytes(cfg.ring_depth, cfg.ring_bytes)


def test_a_host_name_source_is_named_as_a_source_problem(tmp_path) -> None:
    text = GOOD.replace('sources = ["127.0.0.1", "10.1.2.3:5000"]', 'sources = ["localhost"]')
    with pytest.raises(ConfigError) as e:
        load(text, environ={"RELAY_SECRET": "x" * 32})
    assert str(e.value).startswith("room 'a': source 'localhost':")
    assert "quic_cert" not in str(e.value)


@pytest.mark.parametrize("value, needle", [
    (None, "environment variable ROOM_KEY is not set"),
    ("not base64!", "ROOM_KEY is not base64"),
    ("AAAAAAAAAAAAAAAAAAAAAA==", "ROOM_KEY holds 16 bytes; AES_CM_128_HMAC_SHA1_80 needs 30"),
])
def test_an_srtp_key_that_cannot_work_is_named(value: str | None, needle: str) -> None:
    text = GOOD.replace('name = "a"', 'name = "a"\nsrtp_key_env = "ROOM_KEY"')
    env = {"RELAY_SECRET": "x" * 32} | ({"ROOM_KEY": value} if value else {})
    with pytest.raises(ConfigError) as e:
        load(text, environ=env)
    assert str(e.value).startswith("room 'a': srtp_key_env: ") and needle in str(e.value)


def test_rooms_take_over_by_rule() -> None:
    import base64
    key = base64.b64encode(bytes(range(30))).decode()
    text = GOOD.replace('name = "a"', 'name = "a"\nsrtp_key_env = "ROOM_KEY"')
    cfg = load(text, environ={"RELAY_SECRET": "x" * 32, "ROOM_KEY": key})
    assert cfg.rooms[0].srtp_key == bytes(range(30)) and cfg.rooms[0].takeover_after == 0.15
    plain = load(GOOD, environ={"RELAY_SECRET": "x" * 32})
    # a plain room frees itself after a silence no live publisher makes
    assert plain.rooms[0].srtp_key == b"" and plain.rooms[0].takeover_after == 2.0
    chosen = load(GOOD.replace('name = "a"', 'name = "a"\ntakeover_after = 5'), environ={"RELAY_SECRET": "x" * 32})
    assert chosen.rooms[0].takeover_after == 5.0
    env = {"RELAY_SECRET": "x" * 32}
    strict = load(GOOD.replace('name = "a"', 'name = "a"\ntakeover_after = "never"'), environ=env)
    assert strict.rooms[0].takeover_after is None
    with pytest.raises(ConfigError, match='takeover_after .seconds, or "never".: expected a number'):
        load(GOOD.replace('name = "a"', 'name = "a"\ntakeover_after = "soon"'), environ={"RELAY_SECRET": "x" * 32})


def test_a_room_without_ingest_or_upstream_is_a_stage() -> None:
    cfg = load(GOOD + '[[room]]\nname = "s"\n[[room]]\nname = "t"\nmax_speakers = 3\n'
               + GOOD.split("[[room]]")[1].join(["[[room]]", ""]).replace('"a"', '"u"').replace("5100", "5101")
               + "max_speakers = 2\n", environ={"RELAY_SECRET": "x" * 32})
    # an ingest room takes speakers only if it says so; its publishers then go on the stage
    assert [(r.name, r.stage, r.max_speakers) for r in cfg.rooms] == [("a", False, 0), ("s", True, 16),
                                                                       ("t", True, 3), ("u", True, 2)]
    assert cfg.speaker_slots == 64


@pytest.mark.parametrize("extra, ingest, says", [
    ("", "127.0.0.1:7300", "room 'b': ingest 127.0.0.1:7300 is the port of [node] listen"),
    ('quic = "127.0.0.1:7302"\n', "0.0.0.0:7302", "room 'b': ingest 0.0.0.0:7302 is the port of [node] quic"),
    ("", "127.0.0.1:5100", "room 'b': ingest 127.0.0.1:5100 is the port of room 'a''s ingest"),
])
def test_an_ingest_port_that_clashes_names_what_it_clashes_with(extra: str, ingest: str, says: str) -> None:
    text = (f'[node]\nlisten = "127.0.0.1:7300"\nauth = "open"\n{extra}'
            '[[room]]\nname = "a"\ningest = "127.0.0.1:5100"\nsources = ["127.0.0.1"]\n'
            f'[[room]]\nname = "b"\ningest = "{ingest}"\nsources = ["127.0.0.1"]\n')
    with pytest.raises(ConfigError) as e:
        load(text, environ={})
    assert str(e.value).startswith(says) and "give the room a port of its own" in str(e.value)


def test_rooms_on_one_port_of_different_addresses_do_not_clash() -> None:
    text = ('[node]\nlisten = "127.0.0.1:7300"\nauth = "open"\n'
            '[[room]]\nname = "a"\ningest = "127.0.0.2:7300"\nsources = ["127.0.0.1"]\n')
    assert load(text, environ={}).rooms[0].ingest == ("127.0.0.2", 7300)
