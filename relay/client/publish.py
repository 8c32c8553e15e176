"""`relay publish`: send RTP/Opus to a room's ingest port at real time.

Either a generated test tone encoded with opuslib (no files needed), or any
file ffmpeg can read, handed to ffmpeg's own RTP muxer, so what we test
against is what operators will run.
"""
from __future__ import annotations

import array
import asyncio
import contextlib
import math
import os
import shutil
import socket
import struct
import subprocess
import time

import opuslib

from relay.client.signals import passed_on

FRAME = 960          # 20 ms at 48 kHz
RATE = 48000
PAYLOAD_TYPE = 111


def tone_frames(freq: float, channels: int = 2, amplitude: float = 0.3, frame: int = FRAME):
    """Endless frames of `frame` samples of a sine tone as 16-bit PCM bytes."""
    n = 0
    step = 2 * math.pi * freq / RATE
    while True:
        samples = array.array("h")
        for i in range(n, n + frame):
            v = int(32767 * amplitude * math.sin(step * i))
            samples.extend([v] * channels)
        n += frame
        yield samples.tobytes()


def encode_tone(freq: float, seconds: float, bitrate: int = 64000, channels: int = 2) -> list[bytes]:
    """Opus packets for `seconds` of a tone (what the tone publisher sends)."""
    enc = opuslib.Encoder(RATE, channels, opuslib.APPLICATION_AUDIO)
    enc.bitrate = bitrate
    frames = tone_frames(freq, channels)
    return [enc.encode(next(frames), FRAME) for _ in range(int(seconds * RATE / FRAME))]


class RtpPacketizer:
    """RTP headers for an Opus stream (RFC 7587): PT 111, 48 kHz clock."""

    def __init__(self, ssrc: int | None = None) -> None:
        rnd = os.urandom(10)
        self.ssrc = ssrc if ssrc is not None else int.from_bytes(rnd[:4], "big")
        self.seq = int.from_bytes(rnd[4:6], "big")
        self.ts = int.from_bytes(rnd[6:10], "big")

    def packet(self, payload: bytes, samples: int = FRAME) -> bytes:
        out = struct.pack("!BBHII", 0x80, PAYLOAD_TYPE, self.seq, self.ts, self.ssrc) + payload
        self.seq = (self.seq + 1) & 0xFFFF
        self.ts = (self.ts + samples) & 0xFFFFFFFF
        return out

    def bye(self) -> bytes:
        """The RTCP BYE that ends this stream (RFC 3550 6.6): it lets the
        relay give the room to the next publisher at once. RFC 3550 wants a
        report first in every compound packet: an empty receiver report."""
        return struct.pack("!BBHI", 0x80, 201, 1, self.ssrc) + struct.pack("!BBHI", 0x81, 203, 1, self.ssrc)


async def publish_tone(to: Address | list[Address], freq: float = 440.0, duration: float | None = None,
                       bitrate: int = 64000, progress=None, frame_ms: int = 20) -> int:
    """Send a tone as RTP/Opus in real time, one `frame_ms` frame per packet,
    the same packets to every address in `to` (an origin pair takes one
    stream at both origins). Returns packets sent."""
    if frame_ms not in (10, 20, 40, 60):
        raise ValueError("frame_ms must be 10, 20, 40 or 60")
    frame = RATE * frame_ms // 1000
    socks = []
    for dest in to if isinstance(to, list) else [to]:
        sock = socket.socket(socket.AF_INET6 if ":" in dest[0] else socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(dest)
        socks.append(sock)
    enc = opuslib.Encoder(RATE, 2, opuslib.APPLICATION_AUDIO)
    enc.bitrate = bitrate
    frames = tone_frames(freq, frame=frame)
    rtp = RtpPacketizer()
    start = time.monotonic()
    sent = 0
    try:
        while duration is None or sent * frame / RATE < duration:
            packet = rtp.packet(enc.encode(next(frames), frame), frame)
            for sock in socks:
                try:
                    sock.send(packet)
                except ConnectionRefusedError:
                    pass  # nobody on that ingest port yet; keep real time anyway
            sent += 1
            if progress is not None and sent % 50 == 0:
                progress(sent)
            # pace against the start time so sleep overshoot does not drift
            delay = start + sent * frame / RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.send(rtp.bye())
            sock.close()
    return sent


Address = tuple[str, int]


def ffmpeg_command(source: str, to: Address | list[Address], bitrate: str = "64k",
                   lavfi: bool = False, duration: float | None = None) -> list[str]:
    """The ffmpeg command that publishes `source` (a file, or a lavfi graph
    such as 'sine=frequency=440') to a room as RTP/Opus in real time. To
    several ingest addresses (an origin pair), one encode goes to each
    through ffmpeg's tee muxer."""
    dests = to if isinstance(to, list) else [to]
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise FileNotFoundError("ffmpeg is not installed (Debian: apt-get install ffmpeg)")
    cmd = [ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin", "-re"]
    if lavfi:
        cmd += ["-f", "lavfi"]
    cmd += ["-i", source]
    if duration is not None:
        cmd += ["-t", str(duration)]
    cmd += ["-vn", "-ac", "2", "-ar", "48000", "-c:a", "libopus", "-b:a", bitrate,
            "-frame_duration", "20", "-application", "audio"]
    # send_bye: a BYE at the end releases the room for the next publisher;
    # rtcpport: to the ingest port itself (it comes from the RTP port + 1)
    urls = [f"rtp://{f'[{h}]' if ':' in h else h}:{port}?pkt_size=1200&rtcpport={port}" for h, port in dests]
    if len(urls) == 1:
        return cmd + ["-f", "rtp", "-payload_type", str(PAYLOAD_TYPE), "-rtpflags", "send_bye", urls[0]]
    # the tee's outputs each pick their own SSRC and bases; the payloads are
    # the same bytes, which is what an origin pair matches on
    tee = "|".join(f"[f=rtp:payload_type={PAYLOAD_TYPE}:rtpflags=send_bye]{u}" for u in urls)
    return cmd + ["-map", "0:a", "-f", "tee", tee]


def publish_with_ffmpeg(source: str, to: Address | list[Address], duration: float | None = None,
                        lavfi: bool = False) -> int:
    """Run ffmpeg to publish; returns its exit code, or 0 when a stop signal
    (SIGINT, SIGTERM, SIGHUP) ended it and it finished cleanly."""
    with subprocess.Popen(ffmpeg_command(source, to, lavfi=lavfi, duration=duration),
                          stdout=subprocess.DEVNULL) as ffmpeg, passed_on(ffmpeg) as stopped:
        code = ffmpeg.wait()
    # ffmpeg exits 255 after a signal even when it ended cleanly (BYE sent)
    return 0 if stopped and code == 255 else code
