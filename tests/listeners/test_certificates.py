"""QUIC certificates change without a restart: SIGHUP takes configured
files whose contents changed, and a self-signed certificate is replaced
before it expires; listeners already connected keep listening."""
from __future__ import annotations

import asyncio
import datetime
import re
import signal
import subprocess
import time

from cryptography.hazmat.primitives import serialization

from relay.listeners.quic import tls as certs
from relay.testing.loadgen import free_port
from tests.conftest import stop
from tests.conftest import start_relay
from tests.listeners.conftest import publish


def _write(creds: certs.Credentials, cert, key) -> None:
    cert.write_bytes(creds.chain[0].public_bytes(serialization.Encoding.PEM))
    key.write_bytes(creds.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))


def _listen(relay, port: int, cafile, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(relay.relay_cmd("listen", "--quic", "--server", f"127.0.0.1:{port}", "--room",
                                            relay.room, "--cafile", str(cafile), "--duration", str(seconds)),
                            env=relay.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sighup_takes_new_certificate_files_and_keeps_listeners(tmp_path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    old_ca, new_ca = tmp_path / "old.pem", tmp_path / "new.pem"
    first, second = certs.self_signed(["127.0.0.1"]), certs.self_signed(["127.0.0.1"])
    _write(first, cert, key)
    old_ca.write_bytes(cert.read_bytes())
    port = free_port()
    relay = start_relay(tmp_path, extra_node=f'quic = "127.0.0.1:{port}"\nquic_cert = "{cert}"\nquic_key = "{key}"\n')
    pub = publish(relay, 12)
    early = _listen(relay, port, old_ca, 7)
    try:
        time.sleep(2.0)
        _write(second, cert, key)
        new_ca.write_bytes(cert.read_bytes())
        relay.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        late = _listen(relay, port, new_ca, 2)
        err = late.communicate(timeout=30)[1]
        assert late.returncode == 0 and int(re.search(r"received (\d+)", err).group(1)) >= 50, err
        stale = _listen(relay, port, old_ca, 2)
        err = stale.communicate(timeout=30)[1]
        assert stale.returncode == 3 and "not trusted" in err, err
        # the listener connected before the change heard the whole time
        err = early.communicate(timeout=30)[1]
        assert early.returncode == 0 and int(re.search(r"received (\d+)", err).group(1)) >= 300, err
    finally:
        for p in (pub, early):
            if p.poll() is None:
                p.kill()
            p.wait()
        assert stop(relay.proc) == 0
    assert "quic_cert: reloaded" in relay.proc.stdout.read()


def test_a_self_signed_certificate_is_renewed_before_it_expires() -> None:
    from relay._core import Core
    from relay.listeners.quic.endpoint import QuicEndpoint
    from relay.listeners.sessions import RoomState, Sessions
    from relay.wire.config import NodeConfig
    from relay.wire.tokens import Auth

    async def scenario() -> None:
        core = Core(4, rooms=1)
        core.room_open(0, True)
        sessions = Sessions(core, NodeConfig(quic=("127.0.0.1", free_port())), {"r": RoomState("r", 0, 0)},
                            Auth("open"))
        endpoint = QuicEndpoint(core, sessions)
        await endpoint.start()
        try:
            before = endpoint.describe()["cert_sha256"]
            now = datetime.datetime.now(datetime.timezone.utc)
            assert not endpoint.renew_if_due(now)                           # 10 days left
            assert endpoint.renew_if_due(now + datetime.timedelta(days=8))  # 2 days left
            after = endpoint.describe()["cert_sha256"]
            assert after != before and endpoint.creds.not_after - now > datetime.timedelta(days=9)
            # new connections get the new certificate
            assert endpoint.server is not None
            leaf = endpoint.server._configuration.certificate
            assert leaf.public_bytes(serialization.Encoding.DER) == endpoint.creds.chain[0].public_bytes(
                serialization.Encoding.DER)
        finally:
            endpoint.close()

    asyncio.run(scenario())
