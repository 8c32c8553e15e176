"""Listeners over QUIC, against a real `relay serve`: ffmpeg publishes,
`relay listen --quic` processes receive the room as QUIC datagrams, the
tone is checked by frequency. A listener that stops reading loses only its
own oldest packets; sessions end on LEAVE, on idle timeout and on drain,
and survive a quiet room; bad input on the QUIC port is refused and
counted; a configured certificate is checked against a CA file; QUIC
admission keeps the loop thread under max_load."""
from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
from typing import Any

import pytest
from aioquic import tls

from relay.client.quic import QuicListenClient
from relay.testing.loadgen import free_port
from tests.conftest import start_relay, stop
from tests.conftest import TONE_HZ, dominant_hz
from tests.listeners.conftest import listen_quic, metric, publish, quic_relay, wait_metric


@pytest.mark.parametrize("workers", [1, 2])


def test_quic_listener_hears_the_ffmpeg_tone(tmp_path, workers: int) -> None:
    relay, server, cert = quic_relay(tmp_path, auth="jwt", workers=workers)
    publisher = publish(relay, 10)
    try:
        token = subprocess.run(relay.relay_cmd("token", "--room", relay.room), env=relay.env,
                               capture_output=True, text=True, check=True).stdout.strip()
        out = tmp_path / "quic.ogg"
        p = subprocess.run(listen_quic(relay, server, cert, "--token", token, "--out", str(out),
                                       "--duration", "4"),
                           env=relay.env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        m = re.search(r"received (\d+) packets .* lost (\d+)", p.stderr)
        assert m and int(m.group(1)) >= 150 and int(m.group(2)) == 0, p.stderr
        hz = dominant_hz(out)
        assert abs(hz - TONE_HZ) < 3, f"heard {hz:.1f} Hz over QUIC, sent {TONE_HZ} Hz"
        metrics = relay.get("/metrics")[1]
        assert metric(metrics, 'relay_quic_datagrams_sent_total{transport="quic"}') >= int(m.group(1))
        # on the core's QUIC path: its ACKs read in the core, none forged, none lost
        assert metric(metrics, "relay_quic_acks_total") >= 50
        assert metric(metrics, 'relay_quic_dropped_total{reason="forged"}') == 0
        assert metric(metrics, "relay_quic_lost_total") == 0
        assert metric(metrics, "relay_leaves_total") == 1   # the client said LEAVE
        assert metric(metrics, f'relay_listeners{{room="{relay.room}",transport="quic"}}') == 0
        # a forged token is refused with its reason; so is a certificate that is not the pinned one
        bad = subprocess.run(listen_quic(relay, server, cert, "--token", "forged", "--duration", "1"),
                             env=relay.env, capture_output=True, text=True, timeout=30)
        assert bad.returncode == 3 and "bad_token" in bad.stderr, bad.stderr
        wrong = subprocess.run(listen_quic(relay, server, "00" * 32, "--token", token, "--duration", "1"),
                               env=relay.env, capture_output=True, text=True, timeout=30)
        assert wrong.returncode == 3 and "does not match" in wrong.stderr, wrong.stderr
    finally:
        publisher.kill()
        publisher.wait()
        assert stop(relay.proc) == 0


def test_audio_too_large_for_a_quic_datagram_is_skipped_not_stuck(tmp_path) -> None:
    """A QUIC DATAGRAM cannot span packets, so a 1,400-byte Opus packet can
    never be sent to a QUIC listener. It used to wait at the head of the
    connection's queue forever, and the listener heard nothing more. Now it
    is skipped and counted, and the packets that fit keep flowing."""
    import socket
    import threading
    from tests.rtp import rtp
    relay, server, cert = quic_relay(tmp_path)
    stop_publishing = threading.Event()

    def publish_mixed() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as pub:
            for seq in range(400):   # 8 s at most
                if stop_publishing.is_set():
                    return
                # the largest packet a QUIC datagram carries (MAX_QUIC_AUDIO), and one too large
                size = 1400 if seq % 2 else 1152 - 12
                pub.sendto(rtp(seq, seq * 960, 0xB16, bytes([seq & 0xFF]) * size), relay.ingest)
                time.sleep(0.02)

    publisher = threading.Thread(target=publish_mixed)
    publisher.start()
    try:
        p = subprocess.run(listen_quic(relay, server, cert, "--duration", "3"),
                           env=relay.env, capture_output=True, text=True, timeout=60)
        m = re.search(r"received (\d+) packets \((\d+) bytes\)", p.stderr)
        assert p.returncode == 0 and m, p.stderr
        received, nbytes = int(m.group(1)), int(m.group(2))
        # 25 packets a second that fit, for 3 s
        assert received >= 50 and nbytes == received * 1152, p.stderr
        too_large = metric(relay.get("/metrics")[1], 'relay_quic_too_large_total{transport="quic"}')
        assert too_large >= 50
        assert stop(relay.proc) == 0
        assert "QUIC listeners cannot be sent 1412-byte audio packets" in relay.proc.stdout.read()
    finally:
        stop_publishing.set()
        publisher.join()
        assert stop(relay.proc) == 0


def test_stalled_quic_listener_drops_only_its_own_audio(tmp_path) -> None:
    """One QUIC listener stops answering (SIGSTOP: no ACKs, as a killed
    process or a lost network). Within a second it is held out of the
    fan-out, so its backlog is not counted as egress drops for long, and
    after three seconds of silence its session ends (not at the idle
    timeout). The healthy listener beside it loses nothing."""
    relay, server, cert = quic_relay(tmp_path)
    publisher = publish(relay, 14)
    out = tmp_path / "healthy.ogg"
    healthy = subprocess.Popen(listen_quic(relay, server, cert, "--out", str(out), "--duration", "7"),
                               env=relay.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stalled = subprocess.Popen(listen_quic(relay, server, cert, "--duration", "30"),
                               env=relay.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    listeners = f'relay_listeners{{room="{relay.room}",transport="quic"}}'
    overflow = 'relay_drops_total{reason="overflow"}'
    try:
        assert wait_metric(relay, listeners, lambda v: v == 2) == 2
        time.sleep(1.0)
        stalled.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        # gone after about 3 s of silence, well before the 4 s idle timeout would
        # have counted it (and its audio backlog, about 50 packets a second)
        assert wait_metric(relay, listeners, lambda v: v == 1) == 1
        text = relay.get("/metrics")[1]
        assert metric(text, "relay_quic_listeners_gone_total") == 1
        assert metric(text, "relay_timeouts_total") == 1
        dropped = metric(text, overflow)
        assert dropped <= 60, dropped      # at most what piled up before it was held
        time.sleep(max(0.0, stopped_at + 5.0 - time.monotonic()))
        assert metric(relay.get("/metrics")[1], overflow) == dropped
        err = healthy.communicate(timeout=30)[1]
        assert healthy.returncode == 0, err
        m = re.search(r"received (\d+) packets .* lost (\d+)", err)
        assert m and int(m.group(1)) >= 250 and int(m.group(2)) == 0, err
        assert abs(dominant_hz(out) - TONE_HZ) < 3
    finally:
        stalled.send_signal(signal.SIGCONT)
        stalled.kill()
        stalled.wait()
        publisher.kill()
        publisher.wait()
        if healthy.poll() is None:
            healthy.kill()
        assert stop(relay.proc) == 0


def test_drain_tells_quic_listeners(tmp_path) -> None:
    relay, server, cert = quic_relay(tmp_path)
    publisher = publish(relay, 10)
    listener = subprocess.Popen(listen_quic(relay, server, cert, "--duration", "20"),
                                env=relay.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        listeners = f'relay_listeners{{room="{relay.room}",transport="quic"}}'
        assert wait_metric(relay, listeners, lambda v: v == 1) == 1
        assert stop(relay.proc) == 0
        err = listener.communicate(timeout=20)[1]
        assert "node says draining" in err, err
        assert listener.returncode == 0, err
    finally:
        publisher.kill()
        publisher.wait()
        if listener.poll() is None:
            listener.kill()


def test_bad_input_on_the_quic_port(tmp_path) -> None:
    """Garbage datagrams, a malformed control stream and a JOIN for a room
    that does not exist: each has its outcome, and a listener beside them
    keeps hearing the room."""
    import asyncio
    import socket
    import ssl

    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration

    from relay.wire.protocol import FrameReader, Join, Reject, frame
    from relay.wire.protocol import ALPN_QUIC, MAX_DATAGRAM_FRAME

    relay, server, cert = quic_relay(tmp_path)
    host, port = server.rsplit(":", 1)
    publisher = publish(relay, 10)
    listener = subprocess.Popen(listen_quic(relay, server, cert, "--duration", "5"),
                                env=relay.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for n in (0, 1, 7, 1200, 1500):
                s.sendto(bytes([0xC0]) + bytes(n), (host, int(port)))   # long-header garbage
                s.sendto(bytes(n + 1), (host, int(port)))

        async def raw(payload: bytes) -> tuple[list, str]:
            conf = QuicConfiguration(is_client=True, alpn_protocols=[ALPN_QUIC], verify_mode=ssl.CERT_NONE,
                                     max_datagram_frame_size=MAX_DATAGRAM_FRAME)
            async with connect(host, int(port), configuration=conf) as conn:
                got = asyncio.get_running_loop().create_future()
                reader = FrameReader()
                closed = ""

                def on_event(ev) -> None:
                    nonlocal closed
                    name = type(ev).__name__
                    if name == "StreamDataReceived" and not got.done():
                        got.set_result(reader.feed(ev.data))
                    elif name == "ConnectionTerminated":
                        closed = ev.reason_phrase
                        if not got.done():
                            got.set_result([])
                conn.quic_event_received = on_event
                sid = conn._quic.get_next_available_stream_id()
                conn._quic.send_stream_data(sid, payload)
                conn.transmit()
                msgs = await asyncio.wait_for(got, 5)
                # the node made us prove our address with a Retry before any key exchange
                assert conn._quic._retry_count == 1
                await asyncio.sleep(0.2)
                return msgs, closed

        msgs, closed = asyncio.run(raw(b"\x00\x05\x0b\x01\x63\x00\x00"))   # a frame of an unknown type
        assert msgs == [] and "bad control stream" in closed, (msgs, closed)
        msgs, _ = asyncio.run(raw(frame(Join("no-such-room", ""))))
        assert len(msgs) == 1 and isinstance(msgs[0], Reject) and msgs[0].reason.name == "UNKNOWN_ROOM", msgs
        metrics = relay.get("/metrics")[1]
        assert metric(metrics, "relay_quic_stream_errors_total") == 1
        assert metric(metrics, 'relay_rejections_total{reason="unknown_room"}') == 1
        assert relay.get("/healthz")[0] == 200
        err = listener.communicate(timeout=30)[1]
        m = re.search(r"received (\d+) packets .* lost (\d+)", err)
        assert listener.returncode == 0 and m and int(m.group(1)) >= 150 and int(m.group(2)) == 0, err
    finally:
        publisher.kill()
        publisher.wait()
        if listener.poll() is None:
            listener.kill()
        assert stop(relay.proc) == 0


def test_configured_certificate_is_verified_by_ca(tmp_path) -> None:
    """A deployed node's own certificate: /quic.json pins nothing, and the
    client checks it against a CA file instead (here the certificate itself)."""
    from cryptography.hazmat.primitives import serialization

    from relay.listeners.quic import tls as certs

    creds = certs.self_signed(["127.0.0.1"])
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(creds.chain[0].public_bytes(serialization.Encoding.PEM))
    key.write_bytes(creds.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    port = free_port()
    relay = start_relay(tmp_path, extra_node=f'quic = "127.0.0.1:{port}"\nquic_cert = "{cert}"\n'
                                             f'quic_key = "{key}"\n')
    publisher = publish(relay, 8)
    try:
        info = json.loads(relay.get("/quic.json")[1])
        assert info["cert_sha256"] is None      # nothing to pin: browsers trust the configured chain
        p = subprocess.run(relay.relay_cmd("listen", "--quic", "--server", f"127.0.0.1:{port}", "--room",
                                           relay.room, "--cafile", str(cert), "--duration", "2"),
                           env=relay.env, capture_output=True, text=True, timeout=60)
        m = re.search(r"received (\d+) packets", p.stderr)
        assert p.returncode == 0 and m and int(m.group(1)) >= 50, p.stderr
        # without the CA the same node is not trusted
        p = subprocess.run(relay.relay_cmd("listen", "--quic", "--server", f"127.0.0.1:{port}", "--room",
                                           relay.room, "--duration", "1"),
                           env=relay.env, capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    finally:
        publisher.kill()
        publisher.wait()
        assert stop(relay.proc) == 0


def test_quic_admission_keeps_the_loop_below_max_load() -> None:
    """QUIC sessions cost the event-loop thread; joins stop before it fills:
    measured load plus each session admitted since the measurement."""
    from relay.listeners.load import SESSION_COST_GUESS, QuicLoad

    q = QuicLoad()
    assert not q.full(0, 0.8)                       # idle: admit
    q.load = 0.8 - SESSION_COST_GUESS / 2           # unmeasured sessions cost the guess
    assert q.full(0, 0.8)
    q.busy_ns = 300_000_000                         # QUIC took 0.3 of the 1 s interval: 0.003 each
    q.note(0.5, 1_000_000_000, 100)
    assert abs(q.cost_per_session - 0.003) < 1e-9
    assert not q.full(100, 0.8)                     # 0.5 + 0.003
    assert not q.full(198, 0.8)                     # 0.5 + 99 * 0.003 = 0.797
    assert q.full(200, 0.8)                         # 0.5 + 101 * 0.003 = 0.803
    assert not q.full(200, 0)                       # off


def test_quiet_room_keeps_quic_sessions(tmp_path) -> None:
    """No publisher for longer than the idle timeout: the node's PINGs keep
    a listener that still answers, and it hears the room once audio starts."""
    relay, server, cert = quic_relay(tmp_path)
    listener = subprocess.Popen(listen_quic(relay, server, cert, "--duration", "9"),
                                env=relay.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    publisher = None
    try:
        listeners = f'relay_listeners{{room="{relay.room}",transport="quic"}}'
        assert wait_metric(relay, listeners, lambda v: v == 1) == 1
        time.sleep(5.0)   # past session_timeout = 4 s with nothing to send
        metrics = relay.get("/metrics")[1]
        assert metric(metrics, listeners) == 1 and metric(metrics, "relay_timeouts_total") == 0
        publisher = publish(relay, 5)
        err = listener.communicate(timeout=30)[1]
        m = re.search(r"received (\d+) packets", err)
        assert listener.returncode == 0 and m and int(m.group(1)) >= 50, err
    finally:
        if publisher is not None:
            publisher.kill()
            publisher.wait()
        if listener.poll() is None:
            listener.kill()
        assert stop(relay.proc) == 0


def test_a_key_update_mid_stream_keeps_the_audio(tmp_path) -> None:
    """The listener updates its 1-RTT keys mid-stream (RFC 9001 6). The
    node's QUIC library follows; the core gets the new keys before the
    library sends again, and the audio goes on in the new phase. (aioquic's
    client drops its old keys at once, where RFC 9001 6.5 says to keep them
    a while, so an audio packet already in flight at that instant may be
    lost; tests/core/test_quic_path.py checks the exact sequence in-process.)"""
    relay, server, cert = quic_relay(tmp_path)
    publisher = publish(relay, 12)

    async def run() -> tuple[int, Any, int]:
        client = QuicListenClient(server, relay.room, cert_sha256=cert)
        task = asyncio.create_task(client.listen(7.0))
        await asyncio.sleep(3.0)
        conn = client._conn
        assert conn is not None
        before = client.stats.received
        conn._quic.request_key_update()
        conn._quic.send_ping(1)
        conn.transmit()
        stats = await task
        phase = conn._quic._cryptos[tls.Epoch.ONE_RTT].recv.key_phase
        await client.aclose()
        return before, stats, phase

    try:
        before, stats, phase = asyncio.run(run())
        assert before >= 50 and phase == 1
        assert stats.received - before >= 150, stats     # 4 s more of audio, in the new phase
        assert stats.lost <= 1, stats
        metrics = relay.get("/metrics")[1]
        assert metric(metrics, 'relay_quic_dropped_total{reason="forged"}') == 0
        assert metric(metrics, "relay_quic_acks_total") >= 100
    finally:
        publisher.kill()
        publisher.wait()
        assert stop(relay.proc) == 0


def test_a_keepalive_on_the_control_stream_is_echoed(tmp_path) -> None:
    """A listener that hears no audio asks whether the node is there: the
    node echoes its KEEPALIVE, as over UDP (the page moves on no echo)."""
    from relay.wire.protocol import Keepalive, frame
    relay, server, cert = quic_relay(tmp_path)

    async def probe() -> object:
        client = QuicListenClient(server, relay.room, cert_sha256=cert)
        try:
            acc = await client.join()
            conn = client._conn
            assert conn is not None
            conn._quic.send_stream_data(client._stream, frame(Keepalive(acc.session_id)))
            conn.transmit()
            return await asyncio.wait_for(conn.control.get(), 5)
        finally:
            await client.aclose()
    try:
        echo = asyncio.run(probe())
        assert isinstance(echo, Keepalive), echo
        assert metric(relay.get("/metrics")[1], "relay_quic_stream_errors_total") == 0
    finally:
        assert stop(relay.proc) == 0
