"""The QUIC library's own cost per audio datagram, aioquic against qh3 (a
Rust state machine behind an aioquic-shaped API), on the same workload:
L server connections, each handshaken in memory with a client of the same
library, then P rounds of one 172-byte DATAGRAM frame per connection, the
packets built and sealed (`datagrams_to_send`), and the clients' ACKs read
back. For choosing the library behind the core's QUIC path: it measures the library alone, not the
node's code around it.

Only the server side is counted: it runs inside a ctypes callback, and
callgrind runs with --toggle-collect='ffi_call*'. Run with P=0 and P>0;
the difference over L*P is the server's cost of one datagram.

    python bench/quic_libs.py aioquic|qh3 L P [--handshake]
    valgrind --tool=callgrind --toggle-collect='ffi_call*' python bench/quic_libs.py qh3 20 200

With --handshake, the server's side of L handshakes is what is counted
(run with L=0 and L>0): what the library still does per listener once the
core's QUIC path carries the audio and its ACKs.

Measured on the development VM (20 connections, 200 and 100 rounds): aioquic
1.7.2 354,880 instructions per datagram, qh3 2.1.0 52,599 (6.7x fewer).
Per handshake, server side (--handshake, 10 and 0 connections): aioquic
9,088,464, qh3 7,154,782 (1.27x fewer; the key exchange and the signature
are most of both). With the core's QUIC path carrying the audio and its
ACKs, the handshake is what the library still costs per listener, so the
relay keeps aioquic: 21 % of a handshake does not pay for a second QUIC
stack to test against Chromium. qh3 is not a dependency of the relay:
install it to run this.
"""
from __future__ import annotations

import ctypes
import datetime
import importlib
import importlib.util
import ssl
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SERVER, CLIENT = ("127.0.0.1", 4433), ("127.0.0.2", 5000)
ALPN = ["relay-bench"]


def certificate(tmp: Path) -> tuple[str, str]:
    """A self-signed P-256 certificate and key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=2))
            .sign(key, hashes.SHA256()))
    (tmp / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return str(tmp / "c.pem"), str(tmp / "k.pem")


def main(lib: str, listeners: int, rounds: int, handshake: bool = False) -> None:
    if importlib.util.find_spec(lib) is None:
        sys.exit(f"{lib} is not installed: .venv/bin/pip install {lib}")
    conf_mod = importlib.import_module(f"{lib}.quic.configuration")
    conn_mod = importlib.import_module(f"{lib}.quic.connection")
    events = importlib.import_module(f"{lib}.quic.events")
    tmp = Path(tempfile.mkdtemp(prefix="quic-libs-"))
    cert, key = certificate(tmp)
    clock = [1000.0]
    pairs = []
    to_server: list[bytes] = []
    to_client: list[bytes] = []
    current: list = [None]

    def server_handshake_step() -> None:
        # the server's part of one handshake round: the client's packets in, its own out
        server = current[0]
        for data in to_server:
            server.receive_datagram(data, CLIENT, now=clock[0])
        to_server.clear()
        while server.next_event() is not None:
            pass
        to_client.extend(d for d, _ in server.datagrams_to_send(now=clock[0]))

    hs_step = ctypes.CFUNCTYPE(None)(server_handshake_step)
    for _ in range(listeners):
        cconf = conf_mod.QuicConfiguration(is_client=True, alpn_protocols=ALPN, max_datagram_frame_size=65536,
                                           verify_mode=ssl.CERT_NONE)
        client = conn_mod.QuicConnection(configuration=cconf)
        client.connect(SERVER, now=clock[0])

        def new_server(odcid: bytes = client.original_destination_connection_id) -> None:
            sconf = conf_mod.QuicConfiguration(is_client=False, alpn_protocols=ALPN, max_datagram_frame_size=65536)
            sconf.load_cert_chain(cert, key)
            current[0] = conn_mod.QuicConnection(configuration=sconf, original_destination_connection_id=odcid)
        made = ctypes.CFUNCTYPE(None)(new_server)
        (made if handshake else new_server)()
        server = current[0]
        for _ in range(10):
            to_server.extend(d for d, _ in client.datagrams_to_send(now=clock[0]))
            (hs_step if handshake else server_handshake_step)()
            for data in to_client:
                client.receive_datagram(data, SERVER, now=clock[0])
            to_client.clear()
            while client.next_event() is not None:
                pass
            clock[0] += 0.001
        assert server._handshake_complete if hasattr(server, "_handshake_complete") else True
        pairs.append((client, server, []))
    if handshake:
        print(f"{lib}: {len(pairs)} handshakes", file=sys.stderr)
        return
    payload = bytes(172)
    out: list[list[bytes]] = [[] for _ in pairs]

    def server_step() -> None:
        # the server's part of one round: ACKs in, one DATAGRAM each, packets out
        for (_, server, acks), sent in zip(pairs, out, strict=True):
            for data in acks:
                server.receive_datagram(data, CLIENT, now=clock[0])
            acks.clear()
            while server.next_event() is not None:
                pass
            server.send_datagram_frame(payload)
            sent.extend(d for d, _ in server.datagrams_to_send(now=clock[0]))

    step = ctypes.CFUNCTYPE(None)(server_step)
    delivered = 0
    for _ in range(rounds):
        clock[0] += 0.02
        step()
        for (client, _, acks), sent in zip(pairs, out, strict=True):
            for data in sent:
                client.receive_datagram(data, SERVER, now=clock[0])
            sent.clear()
            while (ev := client.next_event()) is not None:
                delivered += isinstance(ev, events.DatagramFrameReceived)
            acks.extend(d for d, _ in client.datagrams_to_send(now=clock[0] + 0.01))
    print(f"{lib}: delivered {delivered} of {listeners * rounds}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), "--handshake" in sys.argv[4:])
