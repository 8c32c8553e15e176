"""A host runs its stage through the HTTP API (relay/ops/hosting.py), and
every session sees each change on its own transport: a raised hand in the
host's queue, a mute in SPEAKERS, an invitation a listener takes with the
token it has, a speaker sent back to the audience, a removal that holds
until the host lets the listener back, reactions summed once a second, and
the room ended for everyone."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest

from relay.client.listen import JoinRefused, ListenClient
from relay.client.speak import SpeakerClient
from relay.testing.loadgen import scrape
from relay.wire.protocol import Reason
from tests.conftest import start_relay, stop
from tests.stage.conftest import STAGE, speaker, token


def api(relay, path: str, bearer: str = "", method: str = "GET") -> tuple[int, dict]:
    req = urllib.request.Request(relay.url(path), method=method,
                                 headers={"Authorization": f"Bearer {bearer}"} if bearer else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def until(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture
def stage(tmp_path):
    relay = start_relay(tmp_path, auth="jwt", extra_room=STAGE)
    yield relay
    stop(relay.proc)


def test_a_host_moderates_and_every_session_sees_it(stage) -> None:
    host = token("stage", "host", "hostess", "Hostess")
    where = f"{stage.listen[0]}:{stage.listen[1]}"
    ann = speaker(stage, "ann", 30)                       # on stage, a 440 Hz tone

    async def run() -> None:
        lis = {sub: ListenClient(where, "stage", token("stage", "listen", sub, sub.title()))
               for sub in ("lis1", "lis2")}
        tasks = []
        for c in lis.values():
            await c.join()
            tasks.append(asyncio.create_task(c.receive(duration=25)))
        await until(lambda: all(c.speakers and c.speakers.speakers for c in lis.values()))

        # without a host's token, nothing is taken
        assert api(stage, "/stage/stage")[0] == 401
        status, body = api(stage, "/stage/stage", token("stage", "listen", "lis1"))
        assert status == 403 and "not a host" in body["error"], body

        # a raised hand reaches the host's queue, with its name
        lis["lis1"].raise_hand()
        await until(lambda: api(stage, "/stage/stage", host)[1]["hands"] != [])
        assert [h["name"] for h in api(stage, "/stage/stage", host)[1]["hands"]] == ["Lis1"]

        # a mute: every session's SPEAKERS says so, and the stage drops her audio
        assert api(stage, "/stage/stage/mute?speaker=ann", host, "POST")[0] == 200
        await until(lambda: all(c.speakers.speakers[0].muted for c in lis.values()))
        await asyncio.sleep(0.3)
        assert scrape(stage.admin)['relay_stage_drops_total{reason="muted"}'] > 5
        # a muted speaker that joins again (another device, a restart: it
        # takes the seat over) stays muted
        again = SpeakerClient(where, "stage", token("stage", speaker="ann", name="Ann"))
        assert (await again.join()).speaker
        await asyncio.sleep(0.3)
        assert api(stage, "/stage/stage", host)[1]["speakers"][0]["muted"]
        assert api(stage, "/stage/stage/unmute?speaker=ann", host, "POST")[0] == 200
        await until(lambda: not lis["lis1"].speakers.speakers[0].muted)
        again.close()

        # an invitation: lis1 speaks with the listen token it has; lis2 may not
        assert api(stage, "/stage/stage/invite?sub=lis1", host, "POST")[0] == 200
        await until(lambda: lis["lis1"].stats.invited)
        assert api(stage, "/stage/stage", host)[1]["hands"] == []
        on_stage = SpeakerClient(where, "stage", lis["lis1"].token)
        assert (await on_stage.join()).speaker
        with pytest.raises(JoinRefused) as refused:
            await SpeakerClient(where, "stage", lis["lis2"].token).join()
        assert refused.value.reason == Reason.WRONG_ROLE
        hearing = asyncio.create_task(on_stage.receive(duration=10))
        # ... and back to the audience
        assert api(stage, "/stage/stage/audience?speaker=lis1", host, "POST")[0] == 200
        await asyncio.wait_for(hearing, 5)
        assert on_stage.stats.ended == Reason.AUDIENCE
        on_stage.close()

        # reactions: a flood from one session is clipped, the rest summed once a second
        for _ in range(40):
            lis["lis2"].react("👏")
        await until(lambda: lis["lis1"].stats.reactions["👏"] > 0)
        await asyncio.sleep(1.2)
        assert 0 < lis["lis1"].stats.reactions["👏"] <= 10, lis["lis1"].stats.reactions

        # a removal ends lis2's session and holds until the host lets it back
        assert api(stage, "/stage/stage/remove?sub=lis2", host, "POST")[0] == 200
        await asyncio.wait_for(tasks[1], 5)
        assert lis["lis2"].stats.ended == Reason.REMOVED
        again = ListenClient(where, "stage", token("stage", "listen", "lis2"))   # even with a new token
        with pytest.raises(JoinRefused) as refused:
            await again.join()
        assert refused.value.reason == Reason.REMOVED
        assert api(stage, "/stage/stage/unban?sub=lis2", host, "POST")[0] == 200
        await again.join()
        tasks[1] = asyncio.create_task(again.receive(duration=10))

        # the end: every session is told, and no one joins again
        status, body = api(stage, "/stage/stage/end", host, "POST")
        assert status == 200, body
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert lis["lis1"].stats.ended == Reason.ROOM_ENDED and again.stats.ended == Reason.ROOM_ENDED
        with pytest.raises(JoinRefused) as refused:
            await ListenClient(where, "stage", token("stage", "listen", "lis3")).join()
        assert refused.value.reason == Reason.ROOM_ENDED
        for c in (*lis.values(), again):
            c.close()

    try:
        asyncio.run(run())
        m = scrape(stage.admin)
        assert m['relay_stage_messages_dropped_total{reason="reaction_rate"}'] >= 25
        assert m['relay_host_actions_total{action="end"}'] == 1 and m["relay_hands_raised_total"] == 1
    finally:
        ann.kill()
        ann.wait()


def test_relay_host_runs_the_stage_from_a_terminal(stage, tmp_path) -> None:
    """`relay host`: the stage as a host reads it, an action, and each
    refusal as one line naming what to fix."""
    import subprocess
    import sys

    from tests.stage.conftest import ENV

    def host(*args: str, tok: str | None = None) -> subprocess.CompletedProcess:
        env = dict(ENV, RELAY_TOKEN=token("stage", "host", "hostess") if tok is None else tok)
        return subprocess.run([sys.executable, "-m", "relay", "host", "--server",
                               f"http://{stage.admin[0]}:{stage.admin[1]}", "--room", "stage", *args],
                              env=env, capture_output=True, text=True, timeout=30)
    ann = speaker(stage, "ann", 10)
    try:
        deadline = time.monotonic() + 10
        while "Ann" not in (got := host("stage")).stdout:
            assert time.monotonic() < deadline, got
            time.sleep(0.2)
        assert got.returncode == 0 and "on stage  Ann (ann)" in got.stdout, got
        got = host("mute", "ann")
        assert got.returncode == 0 and "'ann' muted" in got.stdout, got
        assert "muted" in host("stage").stdout
        got = host("mute")
        assert got.returncode == 2 and "name the speaker" in got.stderr and "Traceback" not in got.stderr, got
        got = host("end", tok=token("stage", "listen"))
        assert got.returncode == 3 and "403" in got.stderr and "not a host" in got.stderr, got
        assert len(got.stderr.strip().splitlines()) == 1, got.stderr
    finally:
        ann.kill()
        ann.wait()


def test_an_ended_room_ends_on_the_nodes_below_too(tmp_path) -> None:
    """The host ends a stage room at its origin: an edge taking the room
    from it tells its own listeners, and takes no new ones."""
    from tests.cluster.conftest import Node

    origin = Node(tmp_path, "origin", extra_room="max_speakers = 4\n")
    edge = Node(tmp_path, "edge", upstream=[origin])
    where = f"{edge.listen[0]}:{edge.listen[1]}"

    async def run() -> None:
        c = ListenClient(where, "live", token("live", "listen", "lis1"))
        await c.join()
        hearing = asyncio.create_task(c.receive(duration=20))
        deadline = time.monotonic() + 10
        while scrape(origin.admin).get('relay_listeners{room="live",transport="udp"}', 0) < 1:
            assert time.monotonic() < deadline, "the edge never subscribed"
            await asyncio.sleep(0.1)
        req = urllib.request.Request(f"http://{origin.admin[0]}:{origin.admin[1]}/stage/live/end", method="POST",
                                     headers={"Authorization": f"Bearer {token('live', 'host', 'h')}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
        await asyncio.wait_for(hearing, 10)
        assert c.stats.ended == Reason.ROOM_ENDED
        c.close()
        with pytest.raises(JoinRefused) as refused:
            await ListenClient(where, "live", token("live", "listen", "lis2")).join()
        assert refused.value.reason == Reason.ROOM_ENDED

    try:
        asyncio.run(run())
    finally:
        for n in (edge, origin):
            assert stop(n.proc) == 0
