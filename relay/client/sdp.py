"""An SDP file for a player that takes the audio `relay listen --forward` sends on."""
from __future__ import annotations


def sdp_for(port: int, host: str = "127.0.0.1", payload_type: int = 111) -> str:
    """An SDP file ffplay/ffmpeg can open to play RTP forwarded to `port`."""
    return (f"v=0\r\no=- 0 0 IN IP4 {host}\r\ns=relay\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP {payload_type}\r\n"
            f"a=rtpmap:{payload_type} opus/48000/2\r\n")
