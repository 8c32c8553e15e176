"""One listener's QUIC connection: plain QUIC ("relay-listen/1") or HTTP/3
with WebTransport ("h3"), its join stream, and what it may be sent.

The connection only reads and frames: joining, leaving and the audio it is
given are its endpoint's (endpoint.py).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DatagramReceived, H3Event, HeadersReceived, WebTransportStreamDataReceived
from aioquic.quic.events import (ConnectionTerminated, DatagramFrameReceived, HandshakeCompleted, QuicEvent,
                                 StreamDataReceived, StreamReset)

from relay.listeners.load import QuicLoad
from relay.listeners.quic.path import Link, first_hp
from relay.listeners.sessions import Session
from relay.wire.stage_msgs import Hand, Reaction
from relay.wire.protocol import (WEBTRANSPORT_PATH, Accept, FrameReader, Join, Keepalive, Leave, ProtocolError, Reject,
                                 frame)

# datagrams queued inside a connection before we stop pulling from its ring:
# enough to fill a congestion window's worth between two fan-outs, little
# enough that a stalled path loses old audio in the ring, not in aioquic
IN_FLIGHT = 8
log = logging.getLogger("relay.quic")

# SETTINGS_WT_MAX_SESSIONS (draft-ietf-webtrans-http3): Safari will not open
# a WebTransport session on a connection whose SETTINGS lack it. Both ids
# are sent: the registered one and the draft's, which older builds read.
SETTINGS_WT_MAX_SESSIONS = (0x14E9CD29, 0xC671706A)
WT_SESSIONS = 1                 # one listener session per connection
# the extended CONNECT's :protocol: "webtransport" (draft-02, Chromium and
# Firefox) and "webtransport-h3" (later drafts, Safari)
WEBTRANSPORT_PROTOCOLS = (b"webtransport", b"webtransport-h3")
REFUSED_LOG_EVERY_S = 10.0      # a refused request is logged at most this often (all are counted)
_refused_logged = [0.0]


class RelayH3(H3Connection):
    """aioquic's HTTP/3 with the SETTINGS every browser's WebTransport wants."""

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        for setting in SETTINGS_WT_MAX_SESSIONS:
            settings[setting] = WT_SESSIONS
        return settings


def refusal(headers: dict[bytes, bytes], path: str, has_session: bool) -> str:
    """Why an HTTP/3 request is not a WebTransport session we take ("" if it is one)."""
    method, protocol = headers.get(b":method", b""), headers.get(b":protocol")
    if method != b"CONNECT" or protocol is None:
        return f"{method.decode('latin-1') or 'no method'} is not an extended CONNECT"
    if protocol not in WEBTRANSPORT_PROTOCOLS:
        return f":protocol {protocol.decode('latin-1')!r} is not webtransport or webtransport-h3"
    if path != WEBTRANSPORT_PATH:
        return f"path {path!r} is not {WEBTRANSPORT_PATH}"
    if has_session:
        return "this connection already has its WebTransport session"
    return ""


# a healthy peer acknowledges within an RTT plus its ack delay (25 ms by
# default); a peer we have sent to for this long without hearing a packet
# back has stalled, and gets no more until it answers
STALL_S = 1.0


@dataclass
class QuicCounters:
    """What the QUIC port counts, read by the metrics collector."""
    connections: int = 0
    datagrams_sent: Counter = field(default_factory=Counter)    # by transport
    bytes_sent: Counter = field(default_factory=Counter)
    too_large: Counter = field(default_factory=Counter)         # audio packets over MAX_QUIC_AUDIO, by transport
    stream_errors: int = 0        # join streams that did not parse
    refused_requests: int = 0     # HTTP/3 requests that were not a WebTransport CONNECT
    refused_connections: int = 0  # new connections over the cap of ones that have not joined
    join_deadline: int = 0        # connections closed for not joining in time
    gone: int = 0                 # joined listeners that stopped answering, ended
    stray_datagrams: int = 0      # datagrams from connections that are not on a stage (listeners send none)


class Endpoint(Protocol):
    """What a connection asks of its endpoint (endpoint.py)."""
    counters: QuicCounters
    load: QuicLoad

    def join(self, conn: "ListenerConnection", msg: Join) -> Accept | Reject: ...

    def leave(self, conn: "ListenerConnection", why: str = "") -> None: ...

    def speaker_audio(self, conn: "ListenerConnection", data: bytes) -> None: ...

    def stage_message(self, conn: "ListenerConnection", msg: Hand | Reaction) -> None: ...

    def not_pending(self, conn: "ListenerConnection") -> None: ...


class ListenerConnection(QuicConnectionProtocol):
    """One QUIC connection: at most one listener session at a time."""

    def __init__(self, *args: Any, endpoint: Endpoint, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.endpoint = endpoint
        self.h3: H3Connection | None = None
        self.wt_session: int | None = None       # the WebTransport CONNECT stream
        self.join_stream: int | None = None
        self.readers: dict[int, FrameReader] = {}
        self.session: Session | None = None         # the listener session, once joined
        self.held = False                           # out of the fan-out while the peer is silent
        self.transport_name = "quic"
        self.last_ping = time.monotonic()          # last PING or audio sent
        self.unanswered_since: float | None = None   # first send since the peer last spoke
        self.hp: tuple[bytes, bytes] | None = None   # the first 1-RTT header-protection keys
        self.link: Link | None = None                 # its audio on the core's QUIC path

    # ---------------------------------------------------------------- events

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        t0 = time.perf_counter_ns()
        self.unanswered_since = None
        super().datagram_received(data, addr)
        if self.session is not None:
            # a session's steady cost (ACKs); handshakes are load, not per-session cost
            self.endpoint.load.busy_ns += time.perf_counter_ns() - t0

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self.endpoint.counters.connections += 1
            self.hp = first_hp(self._quic)
            if event.alpn_protocol in H3_ALPN:
                self.h3 = RelayH3(self._quic, enable_webtransport=True)
                self.transport_name = "webtransport"
        elif isinstance(event, ConnectionTerminated):
            self.endpoint.not_pending(self)
            # aioquic's own phrase for a peer that stopped answering
            self.endpoint.leave(self, "timeout" if event.reason_phrase == "Idle timeout" else "left")
            return
        if (isinstance(event, (StreamDataReceived, StreamReset)) and event.stream_id == self.wt_session
                and (isinstance(event, StreamReset) or event.end_stream)):
            # the page closed its WebTransport session (a closed tab): the
            # browser may keep the connection itself for a while
            self.endpoint.leave(self, "left")
            self._close("webtransport session closed")
            return
        if self.h3 is not None:
            for h3_event in self.h3.handle_event(event):
                self._h3_event(h3_event)
        elif isinstance(event, StreamDataReceived):
            self._stream_data(event.stream_id, event.data)
        elif isinstance(event, DatagramFrameReceived):
            self.endpoint.speaker_audio(self, event.data)

    def _h3_event(self, event: H3Event) -> None:
        assert self.h3 is not None
        if isinstance(event, HeadersReceived):
            headers = dict(event.headers)
            path = urlsplit(headers.get(b":path", b"").decode("latin-1")).path
            why = refusal(headers, path, self.wt_session is not None)
            if not why:
                self.wt_session = event.stream_id
                self.h3.send_headers(event.stream_id, [(b":status", b"200"),
                                                       (b"sec-webtransport-http3-draft", b"draft02")])
            else:
                self.endpoint.counters.refused_requests += 1
                self._log_refused(why)
                self.h3.send_headers(event.stream_id, [(b":status", b"404")], end_stream=True)
            self.transmit()
        elif isinstance(event, WebTransportStreamDataReceived):
            if event.session_id == self.wt_session:
                self._stream_data(event.stream_id, event.data)
        elif isinstance(event, DatagramReceived):
            if event.stream_id == self.wt_session:
                self.endpoint.speaker_audio(self, event.data)

    def _log_refused(self, why: str) -> None:
        now = time.monotonic()
        if now - _refused_logged[0] < REFUSED_LOG_EVERY_S:
            return
        _refused_logged[0] = now
        peer = self._quic._network_paths[0].addr if self._quic._network_paths else ("?", 0)
        log.warning("refused an HTTP/3 request from %s: %s (answered 404; relay_quic_requests_refused_total "
                    "counts them all)", peer[0], why)

    def _stream_data(self, stream_id: int, data: bytes) -> None:
        reader = self.readers.setdefault(stream_id, FrameReader())
        try:
            messages = reader.feed(data)
        except ProtocolError as e:
            self.endpoint.counters.stream_errors += 1
            self._close(f"bad control stream: {e}")
            return
        for msg in messages:
            if isinstance(msg, Join):
                self.join_stream = stream_id
                self.send(self.endpoint.join(self, msg))
            elif isinstance(msg, Leave):
                self.endpoint.leave(self, "left")
                self._close("leave")
            elif isinstance(msg, Keepalive) and stream_id == self.join_stream:
                # echoed, as over UDP: a page that hears no audio asks
                # whether the node is still there (a silent publisher) or
                # gone (time to move)
                self.send_framed(frame(msg))
            elif isinstance(msg, (Hand, Reaction)) and stream_id == self.join_stream and self.session is not None:
                self.endpoint.stage_message(self, msg)
            else:
                self.endpoint.counters.stream_errors += 1

    # ------------------------------------------------------------------ I/O

    def send(self, msg: Accept | Reject) -> None:
        """A control message on the join stream."""
        self.send_framed(frame(msg))

    def send_framed(self, data: bytes) -> None:
        """A framed control message, already encoded, on the join stream."""
        if self.join_stream is not None:
            self._quic.send_stream_data(self.join_stream, data)
            self.transmit()

    def _handle_timer(self) -> None:
        if self.link is not None:
            self.link.refresh_idle(self._loop.time())   # ACKs the core ended count as heard
        super()._handle_timer()

    def transmit(self) -> None:
        if self.link is None:
            super().transmit()
        else:
            self.link.around_send(super().transmit)

    def can_take(self, now: float) -> int:
        """How many more datagrams this connection should be given now: 0
        while aioquic holds IN_FLIGHT unsent (the congestion window is shut)
        or while the peer has stopped answering."""
        if self.unanswered_since is not None and now - self.unanswered_since > STALL_S:
            return 0
        return max(0, IN_FLIGHT - len(self._quic._datagrams_pending))

    def send_datagram(self, data: bytes) -> None:
        if self.h3 is not None and self.wt_session is not None:
            self.h3.send_datagram(self.wt_session, data)
        else:
            self._quic.send_datagram_frame(data)

    def keepalive_ping(self, now: float) -> None:
        """Keep an idle session alive while the listener still answers."""
        self.last_ping = now
        self._quic.send_ping(0)
        self.transmit()

    def _close(self, reason: str) -> None:
        self._quic.close(error_code=0, reason_phrase=reason)
        self.transmit()
