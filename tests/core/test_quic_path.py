"""The core's QUIC path, in one process. A threaded Core's sender
threads seal listeners' audio and send it on a real QUIC socket on
loopback; aioquic's own client connection opens what arrives, and its ACKs
come back through the node's Link, which keeps packet numbers and keys
coherent with the server side's aioquic connection. The library's own
packets interleave with the core's, a key update happens mid-stream,
forged and replayed ACKs are dropped and counted, and a listener that
stops answering loses only its own audio. An ACK beside frames for the
library is read too; a packet acknowledged after the core declared it
lost counts as late, and one never acknowledged as lost once final. Runs
under ASan and TSan too."""
from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field

import pytest
from aioquic import tls
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, DatagramFrameReceived, PingAcknowledged

from relay._core import Core, QuicPath
from relay.listeners.quic.tls import self_signed
from relay.listeners.quic.path import Link, first_hp
from relay.listeners.senders import SenderThreads
from relay.wire.addr import to_sockaddr

SERVER = ("127.0.0.1", 4433)    # what the client believes; the core's real socket is elsewhere
SOURCE = to_sockaddr(("127.0.0.1", 40000))
CREDS = self_signed(["localhost"])


def rtp(seq: int) -> bytes:
    header = bytes([0x80, 111]) + seq.to_bytes(2, "big") + (seq * 960).to_bytes(4, "big") + b"SSRC"
    return header + bytes([seq % 251]) * 160


@dataclass
class Listener:
    """One aioquic client on a loopback socket, and the node side of its connection."""
    client: QuicConnection
    server: QuicConnection
    sock: socket.socket
    link: Link | None = None
    audio: list[bytes] = field(default_factory=list)
    library: list[bytes] = field(default_factory=list)
    verdicts: list[int] = field(default_factory=list)

    @property
    def addr(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def now(self) -> float:
        return time.monotonic()

    def to_client(self, datagrams: list[bytes]) -> None:
        for d in datagrams:
            self.client.receive_datagram(d, SERVER, now=self.now())
        while (e := self.client.next_event()) is not None:
            assert not isinstance(e, ConnectionTerminated), e
            if isinstance(e, DatagramFrameReceived):
                (self.library if e.data.startswith(b"library") else self.audio).append(e.data)

    def library_sends(self, later: float = 0.0) -> None:
        """What the server's aioquic has to send (`later` seconds on: past
        its ACK delay), through the Link's pause."""
        def transmit() -> None:
            self.to_client([d for d, _ in self.server.datagrams_to_send(now=self.now() + later)])
        assert self.link is not None
        self.link.around_send(transmit)

    def receive(self, want: int, timeout: float = 5.0) -> None:
        """Read the core's datagrams until `want` audio packets have arrived."""
        deadline = time.monotonic() + timeout
        while len(self.audio) < want and time.monotonic() < deadline:
            try:
                self.to_client([self.sock.recv(2048)])
            except BlockingIOError:
                time.sleep(0.002)

    def datagrams(self, want: int, timeout: float = 5.0) -> list[bytes]:
        """The core's next `want` datagrams as they arrive, not yet given to
        the client (a test decides which reach it, and when)."""
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            try:
                got.append(self.sock.recv(2048))
            except BlockingIOError:
                time.sleep(0.002)
        return got

    def ack(self, node: "Node") -> int:
        """The client's ACKs (past its ACK delay) sent to the node's QUIC
        socket, which the core reads; what it hands up goes on to the
        server's aioquic, as the node does. Returns how many it handed up."""
        for d, _ in self.client.datagrams_to_send(now=self.now() + 0.03):
            self.sock.sendto(d, node.quic.getsockname())
        return node.ingest()


def handshake(sock: socket.socket) -> tuple[QuicConnection, QuicConnection]:
    cconf = QuicConfiguration(is_client=True, alpn_protocols=["t"], max_datagram_frame_size=65536,
                              verify_mode=ssl.CERT_NONE)
    sconf = QuicConfiguration(is_client=False, alpn_protocols=["t"], max_datagram_frame_size=65536)
    sconf.certificate, sconf.private_key = CREDS.chain[0], CREDS.key
    client = QuicConnection(configuration=cconf)
    client.connect(SERVER, now=time.monotonic())
    server = QuicConnection(configuration=sconf,
                            original_destination_connection_id=client.original_destination_connection_id)
    addr = sock.getsockname()
    for _ in range(8):
        for d, _ in client.datagrams_to_send(now=time.monotonic()):
            server.receive_datagram(d, addr, now=time.monotonic())
        for d, _ in server.datagrams_to_send(now=time.monotonic()):
            client.receive_datagram(d, SERVER, now=time.monotonic())
    while server.next_event() is not None:
        pass
    while client.next_event() is not None:
        pass
    return client, server


class Node:
    """A threaded Core with its QUIC path on a real loopback socket."""

    def __init__(self) -> None:
        self.core = Core(capacity=8, rooms=1, depth=64, ring_bytes=16384, shards=2, threaded=True)
        self.core.room_open(0, any_source=True)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.quic = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.quic.bind(("127.0.0.1", 0))
        self.quic.setblocking(False)
        self.path = QuicPath(self.core)
        self.path.socket(self.quic.fileno())
        self.senders = SenderThreads(self.core)
        self.senders.start(self.udp.fileno())
        self.seq = 0
        self.listeners: list[Listener] = []

    def listener(self, prefix: bytes = b"") -> Listener:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setblocking(False)
        client, server = handshake(sock)
        slot = self.core.listener_add(0, b"", 7, 0, 0, pull=True)
        hp = first_hp(server)
        assert slot >= 0 and hp is not None and Link.possible(server, hp, prefix)
        lis = Listener(client, server, sock)
        lis.link = Link(self.path, slot, server, hp, "webtransport" if prefix else "quic", prefix)
        self.listeners.append(lis)
        return lis

    def ingest(self) -> int:
        """What the QUIC port holds, read by the core; the datagrams it hands
        up reach their connection's aioquic (after the Link's bookkeeping)."""
        time.sleep(0.005)
        up = self.path.ingest(self.quic.fileno())
        for data, addr in up:
            lis = next(x for x in self.listeners if x.addr == addr)
            assert lis.link is not None
            lis.link.to_library()
            lis.server.receive_datagram(data, addr, now=time.monotonic())
        return len(up)

    def publish(self, n: int) -> None:
        """n packets into the room, then until every shard has fanned them
        out (a live room's pace; a shard a whole history behind loses packets)."""
        for _ in range(n):
            self.seq += 1
            assert self.core.feed(0, rtp(self.seq), SOURCE) == 0
        deadline = time.monotonic() + 5.0
        while not self.core.settled() and time.monotonic() < deadline:
            time.sleep(0.001)

    def close(self) -> None:
        self.path.socket(-1)
        self.senders.stop()
        for lis in self.listeners:
            lis.sock.close()
        self.udp.close()
        self.quic.close()


@pytest.fixture
def node():
    n = Node()
    yield n
    n.close()


def test_the_sender_threads_send_what_a_real_quic_client_opens(node: Node) -> None:
    plain, wt = node.listener(), node.listener(prefix=b"\x00")
    for batch in range(10):
        node.publish(10)
        for lis in (plain, wt):
            lis.receive(10 * (batch + 1))
            assert lis.ack(node) <= 1
    for lis, prefix in ((plain, b""), (wt, b"\x00")):
        # every packet, in order, with the listener's own numbering, and the payload untouched
        assert [p[len(prefix) + 12:] for p in lis.audio] == [rtp(s)[12:] for s in range(1, 101)]
        assert all(p[:len(prefix)] == prefix for p in lis.audio)
        seqs = [int.from_bytes(p[len(prefix) + 2:len(prefix) + 4], "big") for p in lis.audio]
        assert seqs == [(seqs[0] + k) % 65536 for k in range(100)]
        st = node.path.state(lis.link.slot)   # type: ignore[union-attr]
        assert st["acked"] >= 95 and st["lost"] == 0 and st["srtt_s"] > 0, st
        assert st["acks"] >= 10 and st["in_flight"] < 2 * 220, st
    c = node.core.counters()
    assert c["quic_datagrams"] == 100 and c["webtransport_datagrams"] == 100, c
    assert c["quic_bytes"] == sum(len(rtp(s)) for s in range(1, 101)), c


def test_the_library_s_packets_and_the_core_s_form_one_sequence(node: Node) -> None:
    lis = node.listener()
    for round_ in range(5):
        node.publish(5)
        lis.receive(5 * (round_ + 1))
        # the library sends between the core's packets: a DATAGRAM and a PING
        lis.server.send_datagram_frame(b"library %d" % round_)
        lis.server.send_ping(round_)
        lis.library_sends()
        assert lis.ack(node) >= 1      # the ACK of the library's PING reaches the library too
    assert len(lis.audio) == 25 and lis.library == [b"library %d" % r for r in range(5)]
    # the library heard the ACKs of its own packets (the Link passes ACKs
    # on while it waits for them), so nothing of its is left in flight
    acked = []
    while (e := lis.server.next_event()) is not None:
        if isinstance(e, PingAcknowledged):
            acked.append(e.uid)
    assert acked == list(range(5))
    assert lis.server._spaces[tls.Epoch.ONE_RTT].ack_eliciting_in_flight == 0
    assert node.path.state(lis.link.slot)["acked"] >= 20   # type: ignore[union-attr]


def test_a_key_update_mid_stream(node: Node) -> None:
    lis = node.listener()
    node.publish(10)
    lis.receive(10)
    lis.ack(node)
    # the listener updates its keys and says so with a PING in the new phase
    lis.client.request_key_update()
    lis.client.send_ping(1)
    assert lis.ack(node) == 1       # another key phase: handed up to the library
    assert lis.server._cryptos[tls.Epoch.ONE_RTT].send.key_phase == 1
    lis.library_sends()             # the library answers; the core has the new keys first
    assert node.path.state(lis.link.slot)["send_phase"] == 1   # type: ignore[union-attr]
    node.publish(10)
    lis.receive(20)
    assert len(lis.audio) == 20     # the client, on the new keys only, opened them all
    lis.ack(node)
    st = node.path.state(lis.link.slot)   # type: ignore[union-attr]
    assert st["recv_phase"] == 1 and st["acked"] >= 18 and st["forged"] == 0, st


def test_forged_and_replayed_acks_are_dropped_and_counted(node: Node) -> None:
    lis = node.listener()
    node.publish(5)
    lis.receive(5)
    acks = [d for d, _ in lis.client.datagrams_to_send(now=lis.now() + 0.03)]
    assert acks
    forged = bytearray(acks[0])
    forged[-2] ^= 0x10
    # the ACK, the same packet again, a changed byte, and a short header of nothing
    for d in (acks[0], acks[0], bytes(forged)):
        lis.sock.sendto(d, node.quic.getsockname())
    assert node.ingest() == 0       # all ended in the core
    # garbage behind our connection id: forged, or (if its unmasked key phase is
    # not ours) left to the library, which drops it; the connection goes on
    lis.sock.sendto(b"\x40" + lis.server.host_cid + bytes(30), node.quic.getsockname())
    assert node.ingest() <= 1
    c = node.core.counters()
    assert c["quic_replayed"] == 1 and c["quic_forged"] >= 1, c
    # and the connection goes on
    node.publish(5)
    lis.receive(10)
    assert len(lis.audio) == 10


def test_a_listener_that_stops_acking_loses_only_its_own_audio(node: Node) -> None:
    healthy, silent = node.listener(), node.listener()
    for batch in range(30):
        node.publish(10)
        healthy.receive(10 * (batch + 1))
        healthy.ack(node)
        while True:                 # the silent one reads, but never answers
            try:
                silent.sock.recv(2048)
            except BlockingIOError:
                break
    assert len(healthy.audio) == 300
    h = node.path.state(healthy.link.slot)   # type: ignore[union-attr]
    s = node.path.state(silent.link.slot)    # type: ignore[union-attr]
    assert h["lost"] == 0 and h["window_shut"] == 0, h
    # its window shut after the initial window's worth, and stayed shut
    assert s["window_shut"] > 0 and s["acked"] == 0 and s["in_flight"] <= s["cwnd"], s
    sent = node.core.listener_stats(silent.link.slot)["packets_out"]   # type: ignore[union-attr]
    assert 40 <= sent <= 80, sent   # 12,000 bytes of 206-byte datagrams
    assert node.core.listener_stats(silent.link.slot)["drop_overflow"] > 0   # type: ignore[union-attr]
    assert node.core.listener_stats(healthy.link.slot)["drop_overflow"] == 0   # type: ignore[union-attr]
    assert s["quiet_s"] > 0 and node.path.quiet(silent.link.slot)[0] > 0   # type: ignore[union-attr]


def test_an_ack_beside_frames_for_the_library_is_read_too(node: Node) -> None:
    """Chromium sends some of its ACKs in a packet with another frame (a
    MAX_DATA): that packet is the library's, which acknowledges it, and
    from then on the listener's ACK-only packets no longer report what it
    acknowledged (RFC 9000 13.2.4). The core reads that ACK too, so none of
    those packets is taken for lost."""
    lis = node.listener()
    slot = lis.link.slot   # type: ignore[union-attr]
    node.publish(5)
    lis.receive(5)
    lis.ack(node)
    node.publish(5)
    lis.receive(10)
    # the listener's ACK of those five goes out beside a DATAGRAM of its own
    lis.client.send_datagram_frame(b"from the listener")
    assert lis.ack(node) == 1       # not ACK-only: handed up to the library
    lis.library_sends(later=0.03)   # the library acknowledges that packet
    node.publish(5)
    lis.receive(15)
    assert lis.ack(node) == 0       # ACK-only, and reporting only the newest five
    st = node.path.state(slot)
    assert st["lost"] == 0 and st["acked"] == 15 and st.get("lost_pending") == 0, st
    assert node.core.counters()["quic_lost"] == 0


def _declare_the_fourth_lost(node: Node, lis: Listener) -> list[bytes]:
    """Ten packets, the fourth held back on the way; the listener's ACK of
    the other nine has the core declare it lost (the packet threshold).
    Returns the ten datagrams."""
    slot = lis.link.slot   # type: ignore[union-attr]
    node.publish(5)
    lis.receive(5)
    lis.ack(node)                   # an RTT sample
    cwnd = node.path.state(slot)["cwnd"]
    node.publish(10)
    held = lis.datagrams(10)
    assert len(held) == 10
    lis.to_client(held[:3] + held[4:])
    assert lis.ack(node) == 0
    st = node.path.state(slot)
    # declared lost at once, for congestion control: out of flight, the window halved ...
    assert st["acked"] == 14 and st["in_flight"] == 0 and st["cwnd"] < cwnd, st
    # ... but not counted lost yet: an ACK may still come
    assert st["lost"] == 0 and st.get("lost_pending") == 1, st
    return held


def test_a_packet_acknowledged_after_it_was_declared_lost_is_late_not_lost(node: Node) -> None:
    lis = node.listener()
    slot = lis.link.slot   # type: ignore[union-attr]
    held = _declare_the_fourth_lost(node, lis)
    lis.to_client([held[3]])        # it arrives after all
    assert len(lis.audio) == 15
    assert lis.ack(node) == 0
    st = node.path.state(slot)
    assert st["lost"] == 0 and st["late"] == 1 and st["lost_pending"] == 0 and st["acked"] == 14, st
    c = node.core.counters()
    assert c["quic_lost"] == 0 and c["quic_late_acked"] == 1, c
    # the stream goes on, and the late packet is never counted again
    for round_ in range(8):
        node.publish(10)
        lis.receive(15 + 10 * (round_ + 1))
        lis.ack(node)
    st = node.path.state(slot)
    assert len(lis.audio) == 95 and st["lost"] == 0 and st["late"] == 1 and st["acked"] == 94, st


def test_a_packet_never_acknowledged_is_counted_lost_once_final(node: Node) -> None:
    lis = node.listener()
    slot = lis.link.slot   # type: ignore[union-attr]
    _declare_the_fourth_lost(node, lis)
    # the stream goes on without it: more packets than the sent records hold
    # (a record declared lost makes room when it must), so its loss becomes
    # final, by age or to make room, and it never blocks the window
    for round_ in range(8):
        node.publish(10)
        lis.receive(14 + 10 * (round_ + 1))
        lis.ack(node)
    st = node.path.state(slot)
    assert st["lost"] == 1 and st["late"] == 0 and st["lost_pending"] == 0, st
    assert len(lis.audio) == 94 and st["acked"] == 94 and st["window_shut"] == 0, st
    assert node.core.counters()["quic_lost"] == 1
