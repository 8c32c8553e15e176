"""Helpers for the cluster's tests: a real Redis, a `relay serve` node of a tree, a listener token."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

from relay.testing.loadgen import free_port, scrape, wait_ready
from tests.conftest import SECRET, need


ENV = dict(os.environ, RELAY_SECRET=SECRET, PYTHONUNBUFFERED="1")


class Node:
    """A `relay serve` with one room "live": from an ingest port, or from
    the upstream nodes given, or ("directory") from those the directory names."""

    def __init__(self, tmp: Path, name: str, upstream: list["Node"] | str | None = None, workers: int = 1,
                 env: dict | None = None, directory: str = "", quic: bool = False,
                 max_listeners: int = 100_000, extra_node: str = "", extra_room: str = "",
                 listen_port: int = 0) -> None:
        self.listen = ("127.0.0.1", listen_port or free_port())
        self.admin = ("127.0.0.1", free_port(socket.SOCK_STREAM))
        self.ingest = ("127.0.0.1", free_port())
        if upstream == "directory":
            room = 'upstream = "directory"'
        elif upstream:
            room = f'upstream = [{", ".join(repr(f"{u.listen[0]}:{u.listen[1]}") for u in upstream)}]'
        else:
            room = f'ingest = "{self.ingest[0]}:{self.ingest[1]}"\nsources = ["127.0.0.1"]'
        cfg = tmp / f"{name}.toml"
        cfg.write_text(f'[node]\nlisten = "{self.listen[0]}:{self.listen[1]}"\n'
                       f'admin = "{self.admin[0]}:{self.admin[1]}"\nauth = "jwt"\nworkers = {workers}\n'
                       'max_load = 0\nmax_machine_load = 0\ndrain_grace = 0\nupstream_linger = 0.5\n'
                       f'max_listeners = {max_listeners}\n{extra_node}'
                       + (f'directory = "{directory}"\nnode_id = "{name}"\n' if directory else "")
                       + (f'quic = "127.0.0.1:{free_port()}"\n' if quic else "") +
                       f'[[room]]\nname = "live"\n{room}\n'.replace("'", '"') + extra_room)
        self.proc = subprocess.Popen([sys.executable, "-m", "relay", "--log-level", "warning", "serve", "-c", str(cfg)],
                                     env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert wait_ready(self.admin, self.proc), f"{name} did not start"

    def listeners(self) -> float:
        return scrape(self.admin)['relay_listeners{room="live",transport="udp"}']

    def get_metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.admin[0]}:{self.admin[1]}/metrics", timeout=10) as r:
            return r.read().decode()


def listen_token() -> str:
    return subprocess.run([sys.executable, "-m", "relay", "token", "--room", "live"], env=ENV,
                          capture_output=True, text=True, check=True).stdout.strip()


class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port(socket.SOCK_STREAM)
        self.proc = subprocess.Popen([need("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        self.client = client

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
