"""The node behind a real caching proxy (nginx with proxy_cache_lock, the
config in deploy/nginx/hls-origin.conf): a crowd of LL-HLS clients gets
every part, and the node sees only a few requests per part."""
from __future__ import annotations

import asyncio
import http.client
import os
import re
import subprocess
from pathlib import Path

import pytest

from relay.testing.hls_crowd import crowd
from relay.testing.loadgen import raise_fd_limit, scrape
from relay.testing.nginx import start_nginx as nginx_for
from tests.conftest import need, stop
from tests.hls.conftest import publish, start_hls_relay

CLIENTS = int(os.environ.get("RELAY_HLS_CLIENTS", "1000"))
PARTS = 10
# 1,000 clients in this process and nginx: beside another test, nginx's
# cache lock ages out and the node sees a hundred requests a part
pytestmark = pytest.mark.solo


def start_nginx(tmp_path: Path, upstream: tuple[str, int]) -> tuple[subprocess.Popen, tuple[str, int]]:
    need("nginx")
    return nginx_for(tmp_path, upstream)


def test_a_crowd_behind_a_caching_proxy_gets_every_part_and_the_node_few_requests(tmp_path):
    raise_fd_limit(CLIENTS + 256)
    r = start_hls_relay(tmp_path)
    nginx, proxy = start_nginx(tmp_path, r.hls)
    tone = publish(r.relay, "sine=frequency=660:sample_rate=48000")
    try:
        text = r.wait_parts("opus", 3)
        msn, part = (int(x) for x in re.search(r'PRELOAD-HINT:TYPE=PART,URI="s(\d+)\.(\d+)\.m4s"', text).groups())
        before = scrape(r.relay.admin)
        logs = asyncio.run(crowd(*proxy, "/rooms/live/opus", (msn, part), CLIENTS, PARTS, seconds=30))
        after = scrape(r.relay.admin)
        complete = [log for log in logs if len(log.parts) == PARTS]
        errors = [e for log in logs for e in log.errors][:5]
        assert len(complete) == CLIENTS, f"{CLIENTS - len(complete)} clients missed parts; first errors: {errors}"
        # every client got the same bytes for each part, in order with no gap
        reference = [(uri, crc) for uri, crc, _ in complete[0].parts]
        assert all([(uri, crc) for uri, crc, _ in log.parts] == reference for log in complete)
        assert len({uri for uri, _ in reference}) == PARTS
        seen = {kind: after[f'relay_hls_requests_total{{kind="{kind}"}}']
                - before.get(f'relay_hls_requests_total{{kind="{kind}"}}', 0) for kind in ("blocking", "part")}
        # one of each per part when the proxy collapses perfectly; a few more
        # when its lock ages out under load, never one per client
        assert seen["part"] <= 3 * PARTS and seen["blocking"] <= 3 * PARTS, seen
        # errors are not kept: each 404 goes to the node
        for _ in range(2):
            c = http.client.HTTPConnection(*proxy, timeout=10)
            c.request("GET", "/rooms/nosuch/index.m3u8")
            resp = c.getresponse()
            resp.read()
            assert resp.status == 404 and resp.getheader("X-Cache") in ("MISS", "EXPIRED", "BYPASS")
            c.close()
    finally:
        tone.terminate()
        tone.wait(10)
        nginx.terminate()
        nginx.wait(10)
        assert stop(r.relay.proc) == 0
