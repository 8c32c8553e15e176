"""Nobody publishes who was not admitted: against a live node, a
plain-RTP room's live stream cannot be taken by another stream from an
allowed address, not even during a pause, until the publisher says BYE or
the operator releases the room; an SRTP room takes only packets that
authenticate with its key (ffmpeg's srtp:// output, as publishers use it),
refuses forgeries and replays, and lets a key holder take over."""
from __future__ import annotations

import base64
import os
import re
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request

from pylibsrtp import Policy, Session

from relay.client.publish import encode_tone
from relay.ops.admin import AdminServer, AdminViews
from relay.testing.loadgen import LoopbackCrowd, scrape
from tests.conftest import need, start_relay, stop
from tests.rtp import rtp
from tests.conftest import TONE_HZ, dominant_hz

OPUS = encode_tone(440, 4.0)   # 200 real 20 ms Opus frames


def _udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def _bye(ssrc: int) -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc) + struct.pack("!BBHI", 0x81, 203, 1, ssrc)


def _post(admin: tuple[str, int], path: str) -> int:
    req = urllib.request.Request(f"http://{admin[0]}:{admin[1]}{path}", method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _stream(sock: socket.socket, to: tuple[str, int], ssrc: int, first: int, count: int,
            crowd: LoopbackCrowd, wrap=lambda p: p) -> None:
    """`count` packets of a real Opus stream at 50 a second."""
    for k in range(first, first + count):
        sock.sendto(wrap(rtp(k, 960 * k, ssrc, OPUS[k % len(OPUS)])), to)
        crowd.crowd.poll(0)
        time.sleep(0.02)


def test_a_live_plain_room_is_not_taken_by_another_stream(tmp_path) -> None:
    relay = start_relay(tmp_path)
    crowd = LoopbackCrowd(3, relay.listen, relay.room)
    publisher, attacker, successor, next_one = _udp(), _udp(), _udp(), _udp()
    try:
        assert crowd.join().accepted == 3
        _stream(publisher, relay.ingest, 0xA11CE, 1000, 50, crowd)
        # the publisher pauses for 0.4 s (DTX, a network hiccup): the old
        # rule let any new SSRC from an allowed address take the room once
        # it had been quiet for 150 ms
        time.sleep(0.2)
        for k in range(150):
            attacker.sendto(rtp(k, 960 * k, 0xBAD, b"\xff" * 60), relay.ingest)
        # the same SSRC from another port is not the live stream either
        for k in range(20):
            attacker.sendto(rtp(1050 + k, 960 * (1050 + k), 0xA11CE, b"\xfe" * 60), relay.ingest)
        # nor does a BYE in its name from an address that is not the publisher's
        attacker.sendto(_bye(0xA11CE), relay.ingest)
        time.sleep(0.2)
        _stream(publisher, relay.ingest, 0xA11CE, 1050, 50, crowd)
        m = scrape(relay.admin)
        assert m["relay_takeovers_refused_total"] == 170
        assert m["relay_source_restarts_total"] == 0 and m["relay_publisher_byes_total"] == 0
        assert m['relay_room_packets_in_total{room="live"}'] == 100
        crowd.crowd.poll(200)
        totals = crowd.crowd.totals()
        assert totals["heard"] == 3 and totals["lost"] == 0, totals

        # the publisher ends with a BYE (as `relay publish` and our ffmpeg
        # command do): the next publisher takes the room at once
        publisher.sendto(_bye(0xA11CE), relay.ingest)
        _stream(successor, relay.ingest, 0x5EC0, 0, 25, crowd)
        m = scrape(relay.admin)
        assert m["relay_publisher_byes_total"] == 1 and m["relay_source_restarts_total"] == 1
        assert m["relay_takeovers_refused_total"] == 170

        # a publisher that vanished without a BYE: the operator releases the
        # room from the node's own machine, and the next stream takes it
        assert _post(relay.admin, f"/rooms/{relay.room}/release") == 200
        assert _post(relay.admin, "/rooms/nosuchroom/release") == 404
        _stream(next_one, relay.ingest, 0x7E57, 0, 25, crowd)
        m = scrape(relay.admin)
        assert m["relay_source_restarts_total"] == 2
        assert m['relay_room_packets_in_total{room="live"}'] == 150
        crowd.crowd.poll(200)
        totals = crowd.crowd.totals()
        assert totals["lost"] == 0, totals   # the numbering stayed continuous across both
        assert totals["received"] >= 3 * 150 - 3, totals
    finally:
        crowd.close()
        for s in (publisher, attacker, successor, next_one):
            s.close()
        assert stop(relay.proc) == 0
    text = relay.proc.stdout.read()
    assert "release the room (POST /rooms/live/release on the admin port)" in text
    # one line per log interval with the interval's count, never one per packet
    said = re.findall(r"(\d+) packets refused in the last \S+ s: a new publisher stream", text)
    assert 1 <= len(said) <= 2 and sum(map(int, said)) == 170, said


def test_the_release_endpoint_is_only_taken_over_loopback() -> None:
    released = []
    server = AdminServer(AdminViews(metrics=bytes, not_ready=str, rooms=list, quic=None,
                                    release=lambda room: released.append(room) or True))
    status = server.route("POST", "/rooms/hall/release", local=False)[0]
    assert status.startswith("403") and released == []
    assert server.route("POST", "/rooms/hall/release", local=True)[0].startswith("200")
    assert released == ["hall"]
    assert server.route("POST", "/metrics", local=True)[0].startswith("405")


def test_a_web_page_on_the_nodes_machine_cannot_release_a_room(tmp_path) -> None:
    """A cross-site POST, as any page open in a browser on the node's host
    can send (Origin: http://evil.example), is refused; the same POST from
    curl on that machine (no Origin) is taken."""
    import http.client
    relay = start_relay(tmp_path)
    try:
        def post(headers: dict) -> int:
            conn = http.client.HTTPConnection(*relay.admin, timeout=5)
            conn.request("POST", f"/rooms/{relay.room}/release", headers=headers)
            status = conn.getresponse().status
            conn.close()
            return status
        assert post({"Origin": "http://evil.example"}) == 403
        assert post({"Sec-Fetch-Site": "cross-site"}) == 403
        assert post({}) == 200
    finally:
        assert stop(relay.proc) == 0


KEY = os.urandom(30)
KEY_B64 = base64.b64encode(KEY).decode()


def _srtp_relay(tmp_path):
    return start_relay(tmp_path, room="secure", extra_room='srtp_key_env = "ROOM_SRTP_KEY"',
                       extra_env={"ROOM_SRTP_KEY": KEY_B64})


def _ffmpeg_srtp(relay, key_b64: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([need("ffmpeg"), "-hide_banner", "-loglevel", "error", "-nostdin", "-re",
                             "-f", "lavfi", "-i", f"sine=frequency={TONE_HZ}:sample_rate=48000", "-t", str(seconds),
                             "-ac", "2", "-c:a", "libopus", "-b:a", "64k", "-f", "rtp",
                             "-srtp_out_suite", "AES_CM_128_HMAC_SHA1_80", "-srtp_out_params", key_b64,
                             "-sdp_file", os.devnull, f"srtp://{relay.ingest[0]}:{relay.ingest[1]}?pkt_size=1200"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_an_srtp_room_hears_ffmpeg_and_nobody_without_the_key(tmp_path) -> None:
    relay = _srtp_relay(tmp_path)
    out = tmp_path / "heard.ogg"
    wrong = _ffmpeg_srtp(relay, base64.b64encode(os.urandom(30)).decode(), 8)
    time.sleep(1.0)   # the wrong key publishes first: none of it may reach the room
    right = _ffmpeg_srtp(relay, KEY_B64, 7)
    forger = _udp()
    try:
        listener = subprocess.run(
            relay.relay_cmd("listen", "--server", f"{relay.listen[0]}:{relay.listen[1]}", "--room", "secure",
                            "--out", str(out), "--duration", "4"),
            env=relay.env, capture_output=True, text=True, timeout=60)
        # plain RTP from the allowed address is not SRTP: refused
        for k in range(50):
            forger.sendto(rtp(k, 960 * k, 0xF0F0, OPUS[k]), relay.ingest)
        time.sleep(0.3)
        assert listener.returncode == 0, listener.stderr
        received = int(re.search(r"received (\d+) packets", listener.stderr).group(1))
        assert received >= 150, listener.stderr
        assert abs(dominant_hz(out) - TONE_HZ) < 3
        m = scrape(relay.admin)
        assert m['relay_srtp_drops_total{reason="auth"}'] >= 100         # 50 a second from the wrong key
        assert m['relay_srtp_drops_total{reason="auth"}'] + m['relay_srtp_drops_total{reason="malformed"}'] >= 150
        assert m["relay_source_restarts_total"] == 0   # the right key's stream was the only one
    finally:
        for p in (wrong, right):
            p.kill()
            p.wait()
        forger.close()
        assert stop(relay.proc) == 0


def test_an_srtp_room_hears_gstreamer_srtpenc(tmp_path) -> None:
    relay = _srtp_relay(tmp_path)
    out = tmp_path / "heard.ogg"
    # 48 kHz buffers of 20 ms, 350 of them: 7 s of a live tone
    gst = subprocess.Popen([need("gst-launch-1.0"), "-q", "audiotestsrc", "is-live=true", f"freq={TONE_HZ:g}",
                            "samplesperbuffer=960", "num-buffers=350", "!", "audio/x-raw,rate=48000,channels=2",
                            "!", "audioconvert", "!", "opusenc", "!", "rtpopuspay", "!",
                            "srtpenc", f"key={KEY.hex()}", "rtp-cipher=aes-128-icm", "rtp-auth=hmac-sha1-80",
                            "rtcp-cipher=aes-128-icm", "rtcp-auth=hmac-sha1-80", "!",
                            "udpsink", f"host={relay.ingest[0]}", f"port={relay.ingest[1]}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        listener = subprocess.run(
            relay.relay_cmd("listen", "--server", f"{relay.listen[0]}:{relay.listen[1]}", "--room", "secure",
                            "--out", str(out), "--duration", "4"),
            env=relay.env, capture_output=True, text=True, timeout=60)
        assert listener.returncode == 0, listener.stderr
        assert int(re.search(r"received (\d+) packets", listener.stderr).group(1)) >= 150, listener.stderr
        assert abs(dominant_hz(out) - TONE_HZ) < 3
        m = scrape(relay.admin)
        assert sum(v for k, v in m.items() if k.startswith("relay_srtp_drops_total")) == 0
    finally:
        gst.kill()
        gst.wait()
        assert stop(relay.proc) == 0


def test_srtp_replays_are_refused_and_a_key_holder_may_take_over(tmp_path) -> None:
    relay = _srtp_relay(tmp_path)
    crowd = LoopbackCrowd(2, relay.listen, "secure")
    first, second = _udp(), _udp()
    sender = Session(Policy(key=KEY, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
    sent: list[bytes] = []

    def protect(p: bytes) -> bytes:
        sent.append(sender.protect(p))
        return sent[-1]
    try:
        assert crowd.join().accepted == 2
        _stream(first, relay.ingest, 0x1111, 0, 50, crowd, protect)
        for p in sent[-30:]:          # an on-path attacker replays what it saw
            first.sendto(p, relay.ingest)
        time.sleep(0.3)               # a pause: another key holder may now take over
        _stream(second, relay.ingest, 0x2222, 7000, 50, crowd, protect)
        crowd.crowd.poll(200)
        m = scrape(relay.admin)
        assert m['relay_srtp_drops_total{reason="replay"}'] == 30
        assert m["relay_source_restarts_total"] == 1
        assert m['relay_room_packets_in_total{room="secure"}'] == 100
        totals = crowd.crowd.totals()
        assert totals["lost"] == 0 and totals["received"] >= 2 * 100 - 2, totals
    finally:
        crowd.close()
        first.close()
        second.close()
        assert stop(relay.proc) == 0


def test_an_oversized_datagram_into_an_srtp_room_is_counted_not_raised() -> None:
    """A datagram longer than libsrtp handles (over 1,500 bytes) from an
    allowed source: counted as malformed, never an exception per packet
    (each one was a traceback in the log and a stall for the room)."""
    from relay.ingest.srtp import SrtpIngest
    ingest = SrtpIngest(os.urandom(30))
    for size in (1501, 4000, 16384):
        assert ingest.open(b"\x80\x6f" + bytes(size)) is None
    assert ingest.drops["malformed"] == 3
