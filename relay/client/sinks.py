"""Where `relay listen` puts what it hears: an Ogg Opus file, and an RTP
forward to a player (with the SDP that describes it)."""
from __future__ import annotations

import socket
import sys
from typing import BinaryIO, Callable

from relay.client.ogg import OggOpusWriter
from relay.client.publish import PAYLOAD_TYPE
from relay.client.sdp import sdp_for
from relay.wire.addr import parse_hostport


class SinkError(Exception):
    """A sink that cannot be opened: one line naming the flag and why."""


def payload(pkt: bytes) -> bytes:
    """An RTP packet's Opus payload: the relay always emits a bare 12-byte
    header (no CSRC, extension or padding)."""
    return pkt[12:]


def listen_sinks(out: str | None, forward: str | None, sdp: str | None
                 ) -> tuple[list[Callable[[bytes], None]], Callable[[], None]]:
    """The sinks for --out, --forward and --sdp, and what closes them at the
    end. Raises SinkError."""
    sinks: list[Callable[[bytes], None]] = []
    closers: list[Callable[[], None]] = []
    if sdp and not forward:
        raise SinkError("--sdp describes the stream --forward sends: give --forward HOST:PORT too")
    if out:
        try:
            out_file: BinaryIO = open(out, "wb")
        except OSError as e:
            raise SinkError(f"--out {out}: {e.strerror}") from None
        ogg = OggOpusWriter(out_file)
        sinks.append(lambda pkt: ogg.write(payload(pkt)))
        closers += [ogg.close, out_file.close]
    if forward:
        try:
            host, port = parse_hostport(forward)
        except ValueError as e:
            raise SinkError(f"--forward: {e}") from None
        fwd = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        fwd.connect((host, port))

        def send_on(pkt: bytes) -> None:
            # The relay passes on the publisher's payload type (ffmpeg sends
            # 97, GStreamer 96); the player decodes only what the SDP
            # declares, so what we forward carries the SDP's.
            if pkt[1] & 0x7F != PAYLOAD_TYPE:
                pkt = pkt[:1] + bytes([(pkt[1] & 0x80) | PAYLOAD_TYPE]) + pkt[2:]
            try:
                fwd.send(pkt)
            except OSError:
                pass  # the player is not up yet
        sinks.append(send_on)
        if sdp:
            with open(sdp, "w") as f:
                f.write(sdp_for(port, host, PAYLOAD_TYPE))
            print(f"play it live: ffplay -protocol_whitelist file,udp,rtp -i {sdp}", file=sys.stderr)

    def close() -> None:
        for c in closers:
            c()
    return sinks, close


