"""Safari 26.4's WebTransport handshake: the node's SETTINGS carry
SETTINGS_WT_MAX_SESSIONS (both ids), it takes both :protocol tokens, and a
CONNECT it refuses is logged in one line and counted."""
from __future__ import annotations

import asyncio

import pytest

from relay.client.publish import ffmpeg_command
from relay.testing.loadgen import scrape
from relay.wire.addr import parse_hostport
from tests.conftest import stop
from tests.listeners.conftest import quic_relay
from tests.listeners.safari import SafariRefused, listen_like_safari


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    import subprocess
    relay, server, _ = quic_relay(tmp_path_factory.mktemp("safari"))
    tone = subprocess.Popen(ffmpeg_command("sine=frequency=660", relay.ingest, lavfi=True),
                            stdout=subprocess.DEVNULL)
    yield relay, parse_hostport(server)
    tone.terminate()
    tone.wait(10)
    assert stop(relay.proc) == 0


@pytest.mark.parametrize("protocol", [b"webtransport-h3", b"webtransport"])
def test_a_client_that_does_what_safari_does_joins_and_hears_audio(node, protocol):
    relay, (host, port) = node
    datagrams = asyncio.run(listen_like_safari(host, port, relay.room, seconds=1.5, protocol=protocol))
    assert datagrams >= 25      # 20 ms packets for 1.5 s, with room for start-up


def test_a_refused_connect_is_answered_404_logged_once_and_counted(node):
    relay, (host, port) = node
    before = scrape(relay.admin).get("relay_quic_requests_refused_total", 0)
    with pytest.raises(SafariRefused, match="404"):
        asyncio.run(listen_like_safari(host, port, relay.room, protocol=b"connect-udp"))
    with pytest.raises(SafariRefused, match="404"):
        asyncio.run(listen_like_safari(host, port, relay.room, path="/elsewhere"))
    assert scrape(relay.admin)["relay_quic_requests_refused_total"] - before == 2
    relay.proc.send_signal(15)
    out = relay.proc.stdout.read()
    refused = [line for line in out.splitlines() if "refused an HTTP/3 request" in line]
    assert len(refused) == 1, out      # the second within REFUSED_LOG_EVERY_S is counted, not logged
    assert "'connect-udp' is not webtransport or webtransport-h3" in refused[0]
