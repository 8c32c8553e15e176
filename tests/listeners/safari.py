"""A WebTransport client that does what Safari 26.4 does on the wire: its
HTTP/3 SETTINGS (no draft-02 ENABLE_WEBTRANSPORT; SETTINGS_WT_MAX_SESSIONS
and the WT flow-control settings instead), its refusal to open a session
to a server whose SETTINGS lack SETTINGS_WT_MAX_SESSIONS, and its extended
CONNECT with `:protocol = webtransport-h3`. Then it joins a room as the
page does and counts the audio datagrams."""
from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection, Setting
from aioquic.h3.events import DatagramReceived, HeadersReceived, WebTransportStreamDataReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent

from relay.wire.protocol import MAX_DATAGRAM_FRAME, WEBTRANSPORT_PATH, Accept, FrameReader, Join, Reject, frame

WT_MAX_SESSIONS = 0x14E9CD29
WT_MAX_SESSIONS_DRAFT = 0xC671706A
# draft-ietf-webtrans-http3's initial flow-control settings, which Safari sends
WT_INITIAL_MAX_STREAMS_UNI, WT_INITIAL_MAX_STREAMS_BIDI, WT_INITIAL_MAX_DATA = 0x2B64, 0x2B65, 0x2B61


class SafariH3(H3Connection):
    """The client side's SETTINGS as Safari 26.4 sends them."""

    def _get_local_settings(self) -> dict[int, int]:
        return {Setting.QPACK_MAX_TABLE_CAPACITY: 0, Setting.QPACK_BLOCKED_STREAMS: 0,
                Setting.H3_DATAGRAM: 1, WT_MAX_SESSIONS: 1,
                WT_INITIAL_MAX_STREAMS_UNI: 100, WT_INITIAL_MAX_STREAMS_BIDI: 100, WT_INITIAL_MAX_DATA: 1 << 20}


class SafariRefused(Exception):
    """What Safari reports as a WebTransportError."""


class _Conn(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = SafariH3(self._quic, enable_webtransport=True)
        self.events: asyncio.Queue = asyncio.Queue()
        self.datagrams = 0
        self.reader = FrameReader()

    def quic_event_received(self, event: QuicEvent) -> None:
        for ev in self.h3.handle_event(event):
            if isinstance(ev, DatagramReceived):
                self.datagrams += 1
            elif isinstance(ev, WebTransportStreamDataReceived):
                for msg in self.reader.feed(ev.data):
                    self.events.put_nowait(msg)
            elif isinstance(ev, HeadersReceived):
                self.events.put_nowait(dict(ev.headers))

    async def settings(self, timeout: float) -> dict[int, int]:
        deadline = asyncio.get_running_loop().time() + timeout
        while self.h3.received_settings is None:
            if asyncio.get_running_loop().time() > deadline:
                raise SafariRefused("the server sent no HTTP/3 SETTINGS")
            await asyncio.sleep(0.01)
        return self.h3.received_settings


async def listen_like_safari(host: str, port: int, room: str, seconds: float = 2.0,
                             protocol: bytes = b"webtransport-h3", path: str = WEBTRANSPORT_PATH) -> int:
    """Connect, check the server's SETTINGS as Safari does, CONNECT, join
    `room` and return how many audio datagrams came in `seconds`. Raises
    SafariRefused where Safari would fail the session."""
    conf = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, max_datagram_frame_size=MAX_DATAGRAM_FRAME,
                             server_name=host)
    conf.verify_mode = ssl.CERT_NONE     # the page pins the node's hash; the test trusts loopback
    async with connect(host, port, configuration=conf, create_protocol=_Conn) as conn:
        assert isinstance(conn, _Conn)
        settings = await conn.settings(5.0)
        if not settings.get(WT_MAX_SESSIONS) and not settings.get(WT_MAX_SESSIONS_DRAFT):
            raise SafariRefused(f"no SETTINGS_WT_MAX_SESSIONS in the server's SETTINGS {sorted(settings)}")
        if settings.get(Setting.ENABLE_CONNECT_PROTOCOL) != 1 or settings.get(Setting.H3_DATAGRAM) != 1:
            raise SafariRefused("the server does not take extended CONNECT with datagrams")
        session = conn._quic.get_next_available_stream_id()
        conn.h3.send_headers(session, [(b":method", b"CONNECT"), (b":scheme", b"https"),
                                       (b":authority", f"{host}:{port}".encode()), (b":path", path.encode()),
                                       (b":protocol", protocol), (b"origin", f"https://{host}".encode())])
        conn.transmit()
        headers = await asyncio.wait_for(conn.events.get(), 5.0)
        if headers.get(b":status") != b"200":
            raise SafariRefused(f"CONNECT answered {headers.get(b':status', b'?').decode()}")
        stream = conn.h3.create_webtransport_stream(session)
        # aioquic's client reads its own bidirectional WebTransport stream's
        # replies as HTTP/3 frames unless told what the stream is (a browser knows)
        with conn.h3._get_or_create_stream(stream) as state:
            state.frame_type, state.session_id = FrameType.WEBTRANSPORT_STREAM, session
        conn._quic.send_stream_data(stream, frame(Join(room, "")))
        conn.transmit()
        msg = await asyncio.wait_for(conn.events.get(), 5.0)
        if isinstance(msg, Reject) or not isinstance(msg, Accept):
            raise SafariRefused(f"join refused: {msg}")
        await asyncio.sleep(seconds)
        return conn.datagrams
