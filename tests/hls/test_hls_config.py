"""The HLS settings: [node] hls and its bounds, a room's hls = true/false."""
from __future__ import annotations

import pytest

from relay.wire.config import ConfigError, load

ROOM = '[[room]]\nname = "a"\ningest = "127.0.0.1:5004"\nsources = ["127.0.0.1"]\n'


def test_hls_is_off_unless_the_node_names_a_port_and_then_on_for_every_room_that_does_not_say_no():
    assert load('[node]\nauth = "open"\n' + ROOM).hls is None
    cfg = load('[node]\nauth = "open"\nhls = "127.0.0.1:8088"\nhls_max_held = 50\n' + ROOM
               + '[[room]]\nname = "b"\ningest = "127.0.0.1:5006"\nsources = ["127.0.0.1"]\nhls = false\n')
    assert cfg.hls == ("127.0.0.1", 8088) and cfg.hls_max_held == 50
    assert [r.hls for r in cfg.rooms] == [True, False]


@pytest.mark.parametrize("node,room,needle", [
    ('hls = "nowhere"', "", "[node] hls"),
    ('hls = "127.0.0.1:7080"', "", "[node] hls: 127.0.0.1:7080 is the admin port"),
    ('hls = "127.0.0.1:8088"\nhls_max_held = 0', "", "[node] hls_max_held"),
    ('hls = "127.0.0.1:8088"\nhls_max_connections = "many"', "", "[node] hls_max_connections"),
    ('hls = "127.0.0.1:8088"', 'hls = "yes"\n', "room 'a': hls: true or false"),
    ('hls = "127.0.0.1:8088"', 'record = true\n', "room 'a': record = true needs [node] record_dir"),
    ('record_dir = "/tmp/x"', 'record = true\n', "room 'a': record = true records its LL-HLS: set [node] hls"),
    ('hls = "127.0.0.1:8088"\nrecord_dir = "/tmp/x"\nrecord_retention = 1', "", "[node] record_retention"),
])
def test_mistakes_name_the_key(node, room, needle):
    with pytest.raises(ConfigError) as e:
        load(f'[node]\nauth = "open"\n{node}\n' + ROOM + room)
    assert needle in str(e.value) and "\n" not in str(e.value)
