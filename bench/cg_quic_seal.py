"""Callgrind workload: the core sealing QUIC audio datagrams (#15's first
step), to count instructions per packet against what the QUIC library
spends per datagram (bench/quic_libs.py, bench/cg_quic.py).

    valgrind --tool=callgrind .venv/bin/python bench/cg_quic_seal.py 0x1301 1000
    valgrind --tool=callgrind .venv/bin/python bench/cg_quic_seal.py 0x1301 3000

The difference over 2,000 is the cost of one 172-byte RTP packet framed as
a DATAGRAM, sealed (AEAD) and header-protected, including the Python call
that asks for it. Measured on the development VM: 6,871 instructions with
AES-128-GCM, 10,781 with ChaCha20-Poly1305, against aioquic's 354,880 per
datagram (bench/quic_libs.py) and the node's 506,556 per QUIC datagram
(bench/cg_quic.py).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay._core import QuicSealer  # noqa: E402


def main(suite: int, packets: int) -> None:
    size = 32 if suite == 0x1302 or suite == 0x1303 else 16
    sealer = QuicSealer(suite, os.urandom(size), os.urandom(12), os.urandom(size), os.urandom(8), b"\x00")
    rtp = bytes(172)
    for pn in range(packets):
        sealer.seal(rtp, pn)


if __name__ == "__main__":
    main(int(sys.argv[1], 0), int(sys.argv[2]))
