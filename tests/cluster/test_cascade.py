"""A tree of nodes (the cascade): an edge takes a room from an upstream
node as one `relay`-role listener and serves its own listeners from it;
it subscribes only while it has listeners; when its upstream dies it
takes the room from the next node in its list, and its listeners' stream
stays one continuous sequence with a gap under a second."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from relay.client.publish import encode_tone, ffmpeg_command
from relay.testing.loadgen import LoopbackCrowd, scrape
from tests.conftest import need, stop
from tests.rtp import rtp
from tests.conftest import TONE_HZ, dominant_hz
from tests.cluster.conftest import ENV, Node, listen_token


def test_an_edge_takes_the_room_from_upstream_only_while_it_has_listeners(tmp_path) -> None:
    origin = Node(tmp_path, "origin")
    edge = Node(tmp_path, "edge", upstream=[origin], workers=2)
    publisher = subprocess.Popen(ffmpeg_command(f"sine=frequency={TONE_HZ}:sample_rate=48000", origin.ingest,
                                                lavfi=True, duration=15),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        need("ffmpeg")
        time.sleep(1.0)
        assert origin.listeners() == 0          # no listener on the edge yet: no subscription
        out = tmp_path / "edge.ogg"
        heard = subprocess.run([sys.executable, "-m", "relay", "listen", "--server",
                                f"{edge.listen[0]}:{edge.listen[1]}", "--room", "live", "--token", listen_token(),
                                "--out", str(out), "--duration", "4"],
                               env=ENV, capture_output=True, text=True, timeout=60)
        assert heard.returncode == 0, heard.stderr
        assert int(re.search(r"received (\d+) packets", heard.stderr).group(1)) >= 150, heard.stderr
        assert abs(dominant_hz(out) - TONE_HZ) < 3
        # the edge held one relay session at the origin while it had a listener ...
        m = scrape(origin.admin)
        assert m["relay_joins_total"] == 1
        # ... and leaves it once its last listener has been gone for upstream_linger
        deadline = time.monotonic() + 5
        while origin.listeners() != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert origin.listeners() == 0
        assert scrape(origin.admin)["relay_leaves_total"] == 1
    finally:
        publisher.kill()
        publisher.wait()
        assert stop(edge.proc) == 0
        assert stop(origin.proc) == 0


def _stream(pub: socket.socket, origin: Node, crowd: LoopbackCrowd, frames: list[bytes], first: int,
            count: int) -> None:
    """Packets `first` .. `first + count` of a tone into the origin, 50 a
    second, bounded, the crowd read between them."""
    for k in range(first, first + count):
        pub.sendto(rtp(k, 960 * k, 0xC0DE, frames[k % len(frames)]), origin.ingest)
        crowd.crowd.poll(0)
        time.sleep(0.02)


def test_an_edge_with_two_parents_loses_nothing_when_one_dies(tmp_path) -> None:
    """The edge takes the room from both mids at once and merges the copies
    by the origin's numbering: killing a mid mid-stream costs its listeners
    no packet, and their count of missing packets (by that numbering,
    which nothing renumbers on the way) says so honestly."""
    origin = Node(tmp_path, "origin")
    mid = [Node(tmp_path, f"mid{i}", upstream=[origin]) for i in range(2)]
    edge = Node(tmp_path, "edge", upstream=mid)
    crowd = LoopbackCrowd(5, edge.listen, "live", token=listen_token())
    frames = encode_tone(440, 1.0)
    pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert crowd.join().accepted == 5
        deadline = time.monotonic() + 10
        while not (mid[0].listeners() == 1 and mid[1].listeners() == 1):   # the edge is on both
            assert time.monotonic() < deadline, "the edge did not subscribe to both mids"
            crowd.crowd.poll(50)

        _stream(pub, origin, crowd, frames, 0, 100)
        mid[0].proc.send_signal(signal.SIGKILL)                       # one parent dies mid-stream
        _stream(pub, origin, crowd, frames, 100, 150)
        crowd.crowd.poll(300)
        totals = crowd.crowd.totals()
        assert totals["heard"] == 5 and totals["lost"] == 0, totals
        assert totals["received"] >= 5 * 250, totals
        m = scrape(edge.admin)
        assert m["relay_source_restarts_total"] == 0     # one stream throughout, in the origin's numbering
        assert m["relay_upstream_duplicates_total"] >= 90   # both copies arrived while both mids lived
        assert m['relay_upstream_connected{room="live"}'] == 1
        assert m['relay_upstream_switches_total{room="live"}'] == 0   # the other link stayed where it was
    finally:
        crowd.close()
        pub.close()
        mid[0].proc.wait()
        for node in (edge, mid[1], origin):
            assert stop(node.proc) == 0


def test_an_edge_with_one_parent_shows_the_switch_as_loss(tmp_path) -> None:
    """With the pair off, an edge whose only parent dies moves to the next
    within a second, and its listeners count what the move cost: the
    numbering is the origin's on both sides, so the gap is not hidden."""
    origin = Node(tmp_path, "origin")
    mid = [Node(tmp_path, f"mid{i}", upstream=[origin]) for i in range(2)]
    edge = Node(tmp_path, "edge", upstream=mid, extra_node="upstream_pair = false\n")
    crowd = LoopbackCrowd(5, edge.listen, "live", token=listen_token())
    frames = encode_tone(440, 1.0)
    pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert crowd.join().accepted == 5

        _stream(pub, origin, crowd, frames, 0, 100)
        assert mid[0].listeners() == 1 and mid[1].listeners() == 0   # the first in the list carries it
        mid[0].proc.send_signal(signal.SIGKILL)
        _stream(pub, origin, crowd, frames, 100, 150)
        crowd.crowd.poll(300)
        totals = crowd.crowd.totals()
        assert totals["heard"] == 5, totals
        # the new parent's join burst refills part of the hole; what is left
        # is counted, under a second of 20 ms packets per listener
        assert 0 < totals["lost"] <= 5 * 50, totals
        assert totals["received"] + totals["lost"] >= 5 * 230, totals   # all but the first few
        assert mid[1].listeners() == 1
        m = scrape(edge.admin)
        # the move shows as one gap of the room's upstream, of under a second
        assert m['relay_upstream_gap_seconds_bucket{le="1.0"}'] - m['relay_upstream_gap_seconds_bucket{le="0.25"}'] >= 1
        assert m['relay_upstream_gap_seconds_bucket{le="+Inf"}'] == m['relay_upstream_gap_seconds_bucket{le="1.0"}']
        assert m["relay_source_restarts_total"] == 0
        assert m['relay_upstream_switches_total{room="live"}'] == 1
        assert m['relay_upstream_connected{room="live"}'] == 1
    finally:
        crowd.close()
        pub.close()
        mid[0].proc.wait()
        for node in (edge, mid[1], origin):
            assert stop(node.proc) == 0


def test_a_node_without_the_cluster_secret_cannot_pull_a_room(tmp_path) -> None:
    """Whatever a directory says, the upstream checks the relay token: a
    node that does not hold the cluster's secret gets nothing."""
    origin = Node(tmp_path, "origin")
    forged = dict(ENV, RELAY_SECRET="another-secret-0123456789abcdef01234567")
    rogue = Node(tmp_path, "rogue", upstream=[origin], env=forged)
    pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rogue_token = subprocess.run([sys.executable, "-m", "relay", "token", "--room", "live"], env=forged,
                                     capture_output=True, text=True, check=True).stdout.strip()
        listener = subprocess.Popen([sys.executable, "-m", "relay", "listen", "--server",
                                     f"{rogue.listen[0]}:{rogue.listen[1]}", "--room", "live", "--duration", "3",
                                     "--token", rogue_token],
                                    env=forged, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        frames = encode_tone(440, 1.0)
        for k in range(150):
            pub.sendto(rtp(k, 960 * k, 0xF00D, frames[k % len(frames)]), origin.ingest)
            time.sleep(0.02)
        _, err = listener.communicate(timeout=30)
        assert listener.returncode == 5, err            # joined the rogue node, heard nothing
        m = scrape(origin.admin)
        assert m['relay_rejections_total{reason="bad_token"}'] >= 1
        assert m["relay_joins_total"] == 0 and origin.listeners() == 0
    finally:
        pub.close()
        assert stop(rogue.proc) == 0
        assert stop(origin.proc) == 0


@pytest.mark.parametrize("carried", [True, False], ids=["alternate-carries", "alternate-idle"])
def test_a_listener_whose_edge_dies_moves_to_the_alternate_and_resumes(tmp_path, carried: bool) -> None:
    """No directory and no --via: edge 1's ACCEPT names edge 2 ([node]
    redirect) as the alternate. Edge 1 is killed mid-stream; the listener
    notices within half a second (its probe goes unanswered), joins edge 2
    asking for what it missed, and counts in the origin's numbering what
    the room's history could not give back: nothing, on a machine that
    moves it within a second. An idle edge 2 (not carrying the room yet)
    subscribes with the mover's resume point, so the origin's history
    fills the gap through it."""
    origin = Node(tmp_path, "origin")
    e2 = Node(tmp_path, "edge2", upstream=[origin])
    e1 = Node(tmp_path, "edge1", upstream=[origin], extra_node=f'redirect = "{e2.listen[0]}:{e2.listen[1]}"\n')
    keep = LoopbackCrowd(1, e2.listen, "live", token=listen_token())
    if carried:
        assert keep.join().accepted == 1
    frames = encode_tone(440, 1.0)
    pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener = subprocess.Popen([sys.executable, "-m", "relay", "listen", "--server", f"{e1.listen[0]}:{e1.listen[1]}",
                                 "--room", "live", "--token", listen_token(), "--duration", "8"],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        start = time.monotonic()
        for k in range(450):                      # 9 s at 50 packets a second, bounded
            pub.sendto(rtp(k, 960 * k, 0xC0DE, frames[k % len(frames)]), origin.ingest)
            if k == 150:
                e1.proc.send_signal(signal.SIGKILL)
            time.sleep(max(0.0, start + (k + 1) * 0.02 - time.monotonic()))
        _, err = listener.communicate(timeout=30)
        assert listener.returncode == 0, err
        assert f"moving to {e2.listen[0]}:{e2.listen[1]}" in err, err
        received, lost = map(int, re.search(r"received (\d+) packets .* lost (\d+)", err).groups())
        # detected in half a second, and the whole gap sent again from the
        # alternate's history (about a second of it: more than a ring's 15
        # packets, which left 11-26 missing). A machine slow enough to take
        # longer than that to move leaves a few, counted
        resumed = scrape((e2 if carried else origin).admin)["relay_resumed_packets_total"]
        assert resumed > 15, (resumed, err)
        assert 0 <= lost <= 10, err
        assert received + lost >= 8 * 50 - 60, err
    finally:
        pub.close()
        keep.close()
        if listener.poll() is None:
            listener.kill()
        e1.proc.wait()
        for node in (e2, origin):
            assert stop(node.proc) == 0
