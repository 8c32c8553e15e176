"""Callgrind workload: the core sealing QUIC audio datagrams and opening
a listener's ACKs of them (the first step of the core's QUIC path), to count instructions per
packet against what the QUIC library spends per datagram
(bench/quic_libs.py, bench/cg_quic.py).

    valgrind --tool=callgrind .venv/bin/python bench/cg_quic_seal.py seal 0x1301 1000
    valgrind --tool=callgrind .venv/bin/python bench/cg_quic_seal.py seal 0x1301 3000

The difference over 2,000 is the cost of one 172-byte RTP packet framed as
a DATAGRAM, sealed (AEAD) and header-protected (`seal`), or of one ACK-only
packet opened and its ACK frame read (`open`), each including the Python
call that asks for it. Measured on the development VM: sealing 6,837
instructions with AES-128-GCM, 10,765 with ChaCha20-Poly1305; opening an
ACK 6,313 (AES-128-GCM); against aioquic's 354,880 per datagram, its ACK
handling included (bench/quic_libs.py), and the node's 506,556 per QUIC
datagram (bench/cg_quic.py).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay._core import QuicOpener, QuicSealer  # noqa: E402

SUITES = {0x1301: "AES_128_GCM_SHA256", 0x1302: "AES_256_GCM_SHA384", 0x1303: "CHACHA20_POLY1305_SHA256"}


def main(what: str, suite: int, packets: int) -> None:
    size = 32 if suite == 0x1302 or suite == 0x1303 else 16
    if what == "seal":
        sealer = QuicSealer(suite, os.urandom(size), os.urandom(12), os.urandom(size), os.urandom(8), b"\x00")
        rtp = bytes(172)
        for pn in range(packets):
            sealer.seal(rtp, pn)
        return
    # an ACK of two ranges, as a listener sends it, sealed by aioquic (the peer)
    from aioquic.quic.crypto import CryptoContext, derive_key_iv_hp
    from aioquic.tls import CipherSuite
    cid, secret = os.urandom(8), os.urandom(48 if suite == 0x1302 else 32)
    peer = CryptoContext()
    peer.setup(cipher_suite=CipherSuite[SUITES[suite]], secret=secret, version=1)
    ack = bytes([0x02, 0x40, 100, 0x05, 0x01, 0x03, 0x01, 0x10])   # largest 100, two ranges
    packet = peer.encrypt_packet(bytes([0x41]) + cid + (7).to_bytes(2, "big"), ack + bytes(4), 7)
    opener = QuicOpener(suite, *derive_key_iv_hp(cipher_suite=CipherSuite[SUITES[suite]], secret=secret,
                                                 version=1), cid)
    assert opener.open(packet, 7)[0] == "ack"
    for _ in range(packets):
        opener.open(packet, 7)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3]))
