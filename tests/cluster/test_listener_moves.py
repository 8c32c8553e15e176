"""A listener's ACCEPT names two alternates, so an edge that dies together
with the first of them (a rack, a zone) still leaves the listener
somewhere to go."""
from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time

from relay.client.listen import ListenClient
from relay.client.publish import encode_tone
from relay.testing.loadgen import LoopbackCrowd
from relay.wire.protocol import Accept
from tests.cluster.conftest import ENV, Node, RedisServer, listen_token
from tests.conftest import stop
from tests.rtp import rtp


def test_a_listener_whose_edge_and_first_alternate_die_together_moves_to_the_second(tmp_path) -> None:
    r = RedisServer()
    origin = Node(tmp_path, "origin", directory=r.url, extra_node='tier = "origin"\n')
    edges = [Node(tmp_path, f"edge{i}", upstream=[origin], directory=r.url) for i in (1, 2, 3)]
    keep = [LoopbackCrowd(1, e.listen, "live", token=listen_token()) for e in edges[1:]]   # both carry the room
    pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener = None
    try:
        for k in keep:
            assert k.join().accepted == 1
        time.sleep(2.5)     # every edge has read the others, and chosen its alternates
        e1 = edges[0]

        async def accept_at_e1() -> Accept:
            c = ListenClient(f"{e1.listen[0]}:{e1.listen[1]}", "live", token=listen_token())
            try:
                return await c.join()
            finally:
                c.close()
        named = asyncio.run(accept_at_e1()).alternate.split(",")
        assert sorted(named) == sorted(f"{e.listen[0]}:{e.listen[1]}" for e in edges[1:]), named
        listener = subprocess.Popen([sys.executable, "-m", "relay", "listen", "--server",
                                     f"{e1.listen[0]}:{e1.listen[1]}", "--room", "live", "--token", listen_token(),
                                     "--duration", "8"], env=ENV, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
        frames = encode_tone(440, 1.0)
        start = time.monotonic()
        for k in range(450):                  # 9 s at 50 packets a second, bounded
            pub.sendto(rtp(k, 960 * k, 0xC0DE, frames[k % len(frames)]), origin.ingest)
            if k == 150:
                for e in edges[:2]:           # the listener's edge and edge2 die at once
                    e.proc.send_signal(signal.SIGKILL)
            time.sleep(max(0.0, start + (k + 1) * 0.02 - time.monotonic()))
        _, err = listener.communicate(timeout=30)
        assert listener.returncode == 0, err
        e3 = edges[2]
        assert f"moving to {e3.listen[0]}:{e3.listen[1]}" in err, err
        received, lost = map(int, re.search(r"received (\d+) packets .* lost (\d+)", err).groups())
        assert lost <= 75 and received + lost >= 8 * 50 - 60, err     # the dead alternate cost its tries
    finally:
        pub.close()
        for k in keep:
            k.close()
        if listener is not None and listener.poll() is None:
            listener.kill()
        for e in edges[:2]:
            if e.proc.poll() is None:
                e.proc.kill()
            e.proc.wait()
        for node in (edges[2], origin):
            assert stop(node.proc) == 0
        r.stop()
