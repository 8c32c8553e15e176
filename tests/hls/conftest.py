"""Helpers for the LL-HLS tests: a relay with its HLS port, an ffmpeg
publisher into it, and plain HTTP reads of the port."""
from __future__ import annotations

import http.client
import socket
import subprocess
import time

import pytest

from relay.client.publish import ffmpeg_command
from relay.testing.loadgen import free_port
from tests.conftest import RunningRelay, start_relay, stop


class HlsRelay:
    """A running relay and the address of its HLS port."""

    def __init__(self, relay: RunningRelay, hls: tuple[str, int]) -> None:
        self.relay, self.hls = relay, hls

    def base(self, rendition: str | None = None) -> str:
        room = f"http://{self.hls[0]}:{self.hls[1]}/rooms/{self.relay.room}"
        return room if rendition is None else f"{room}/{rendition}"

    def request(self, path: str, method: str = "GET", timeout: float = 10.0,
                conn: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body) of one request on `conn` or a new connection."""
        c = conn or http.client.HTTPConnection(*self.hls, timeout=timeout)
        try:
            c.request(method, path)
            r = c.getresponse()
            body = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, body
        finally:
            if conn is None:
                c.close()

    def wait_parts(self, rendition: str = "opus", parts: int = 1, timeout: float = 20.0,
                   tag: str = "#EXT-X-PART:") -> str:
        """The media playlist once it lists at least `parts` parts (or other `tag`s)."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            status, _, body = self.request(f"/rooms/{self.relay.room}/{rendition}/index.m3u8")
            text = body.decode()
            if status == 200 and text.count(tag) >= parts:
                return text
            time.sleep(0.1)
        raise AssertionError(f"no {parts} parts in {timeout} s; last playlist:\n{text}")


def start_hls_relay(tmp_path, extra_node: str = "", extra_room: str = "") -> HlsRelay:
    hls = ("127.0.0.1", free_port(socket.SOCK_STREAM))
    relay = start_relay(tmp_path, extra_node=f'hls = "{hls[0]}:{hls[1]}"\nworkers = 2\n{extra_node}',
                        extra_room=extra_room)
    return HlsRelay(relay, hls)


@pytest.fixture
def hls_relay(tmp_path):
    r = start_hls_relay(tmp_path)
    yield r
    assert stop(r.relay.proc) == 0, "relay did not exit cleanly on SIGTERM"


def publish(relay: RunningRelay, source: str, lavfi: bool = True, duration: float | None = None) -> subprocess.Popen:
    """ffmpeg publishing `source` into the relay's room in real time."""
    return subprocess.Popen(ffmpeg_command(source, relay.ingest, lavfi=lavfi, duration=duration),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture
def tone(hls_relay):
    """A 660 Hz tone published into the room for the test's length."""
    p = publish(hls_relay.relay, "sine=frequency=660:sample_rate=48000")
    yield p
    p.terminate()
    p.wait(10)
