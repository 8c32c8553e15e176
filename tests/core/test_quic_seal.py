"""The first step of the core's QUIC path: the core seals QUIC 1-RTT
packets carrying audio DATAGRAMs in C (libcrypto), and a real QUIC stack
(aioquic's client) opens them: every cipher suite, a key update,
WebTransport's prefix, packet numbers reserved from the library's own
counter so both sides' packets stay one coherent sequence, and the peer's
ACKs of our packets harmless to the library. Not yet on the node's egress path."""
from __future__ import annotations

import ssl

import pytest
from aioquic import tls
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import derive_key_iv_hp
from aioquic.quic.events import ConnectionTerminated, DatagramFrameReceived
from aioquic.buffer import Buffer
from aioquic.tls import CipherSuite

from relay._core import QuicOpener, QuicSealer
from relay.listeners.quic.tls import self_signed

SERVER, CLIENT = ("127.0.0.1", 4433), ("127.0.0.2", 5000)
SUITES = [CipherSuite.AES_128_GCM_SHA256, CipherSuite.AES_256_GCM_SHA384, CipherSuite.CHACHA20_POLY1305_SHA256]


def _pair(suite: CipherSuite) -> tuple[QuicConnection, QuicConnection]:
    creds = self_signed(["localhost"])
    cconf = QuicConfiguration(is_client=True, alpn_protocols=["t"], max_datagram_frame_size=65536,
                              verify_mode=ssl.CERT_NONE, cipher_suites=[suite])
    sconf = QuicConfiguration(is_client=False, alpn_protocols=["t"], max_datagram_frame_size=65536,
                              cipher_suites=[suite])
    sconf.certificate, sconf.private_key = creds.chain[0], creds.key
    client = QuicConnection(configuration=cconf)
    client.connect(SERVER, now=1.0)
    server = QuicConnection(configuration=sconf,
                            original_destination_connection_id=client.original_destination_connection_id)
    _exchange(client, server)
    return client, server


def _exchange(client: QuicConnection, server: QuicConnection, rounds: int = 8) -> list:
    """Move packets both ways; the client's events."""
    events = []
    for _ in range(rounds):
        for data, _ in client.datagrams_to_send(now=1.0):
            server.receive_datagram(data, CLIENT, now=1.0)
        for data, _ in server.datagrams_to_send(now=1.0):
            client.receive_datagram(data, SERVER, now=1.0)
        while (e := client.next_event()) is not None:
            events.append(e)
        while (e := server.next_event()) is not None:
            assert not isinstance(e, ConnectionTerminated), e
    return events


def _sealer(server: QuicConnection, hp: bytes | None = None, prefix: bytes = b"") -> tuple[QuicSealer, bytes]:
    """The server's 1-RTT send keys, as the node will hand them to the core.
    Header protection keeps the first key phase's key (RFC 9001 6)."""
    send = server._cryptos[tls.Epoch.ONE_RTT].send
    key, iv, first_hp = derive_key_iv_hp(cipher_suite=send.cipher_suite, secret=send.secret, version=send.version)
    hp = hp or first_hp
    return QuicSealer(int(send.cipher_suite), key, iv, hp, server._peer_cid.cid, prefix, send.key_phase), hp


def _reserve(server: QuicConnection, n: int) -> range:
    """Packet numbers for the core: taken from the library's own counter,
    which moves past them, so no number is ever used twice."""
    start = server._packet_number
    server._packet_number += n
    return range(start, start + n)


def _received(client: QuicConnection, packets: list[bytes]) -> list[bytes]:
    for p in packets:
        client.receive_datagram(p, SERVER, now=1.0)
    out = []
    while (e := client.next_event()) is not None:
        if isinstance(e, DatagramFrameReceived):
            out.append(e.data)
    return out


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_a_real_quic_stack_opens_what_the_core_seals(suite: CipherSuite) -> None:
    client, server = _pair(suite)
    sealer, _ = _sealer(server)
    audio = [bytes([0x80, 111]) + bytes([n]) * 170 for n in range(5)]
    pns = _reserve(server, len(audio))
    assert _received(client, [sealer.seal(a, pn) for a, pn in zip(audio, pns, strict=True)]) == audio
    # a byte changed anywhere, and the same packet again: both refused
    forged = bytearray(sealer.seal(audio[0], _reserve(server, 1)[0]))
    forged[-3] ^= 1
    assert _received(client, [bytes(forged)]) == []
    assert _received(client, [sealer.seal(audio[1], pns[1])]) == []   # a packet number seen before
    # the library's own packets after ours, and the client's ACKs of ours
    # back at the library: one coherent connection
    server.send_datagram_frame(b"from the library")
    events = _exchange(client, server)
    assert [e.data for e in events if isinstance(e, DatagramFrameReceived)] == [b"from the library"]


def test_a_key_update_and_webtransport_s_prefix() -> None:
    client, server = _pair(CipherSuite.AES_128_GCM_SHA256)
    quarter_id = b"\x00"                   # the first WebTransport session's stream 0, as a varint
    sealer, hp = _sealer(server, prefix=quarter_id)
    stale, _ = _sealer(server, prefix=quarter_id)
    assert _received(client, [sealer.seal(b"before", _reserve(server, 1)[0])]) == [quarter_id + b"before"]
    # the library updates its keys; the core takes the new phase's keys
    server.request_key_update()
    server.send_datagram_frame(b"x")
    _exchange(client, server)
    send = server._cryptos[tls.Epoch.ONE_RTT].send
    assert send.key_phase == 1
    key, iv, _ = derive_key_iv_hp(cipher_suite=send.cipher_suite, secret=send.secret, version=send.version)
    sealer.update(int(send.cipher_suite), key, iv, hp, send.key_phase)
    assert _received(client, [sealer.seal(b"after", _reserve(server, 1)[0])]) == [quarter_id + b"after"]
    # keys of the phase the connection left are refused: the core must
    # follow every key update
    assert _received(client, [stale.seal(b"stale", _reserve(server, 1)[0])]) == []


def test_the_sealer_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="not one QUIC uses"):
        QuicSealer(0x1304, bytes(16), bytes(12), bytes(16), b"\x01" * 8)
    with pytest.raises(ValueError, match="at most 20 bytes"):
        QuicSealer(0x1301, bytes(16), bytes(12), bytes(16), b"\x01" * 21)
    sealer = QuicSealer(0x1301, bytes(16), bytes(12), bytes(16), b"\x01" * 8)
    with pytest.raises(ValueError, match="1,500"):
        sealer.seal(bytes(1480), 1)


def _opener(server: QuicConnection, client: QuicConnection) -> QuicOpener:
    """The keys the client sends with: what the core opens its ACKs with."""
    send = client._cryptos[tls.Epoch.ONE_RTT].send
    key, iv, hp = derive_key_iv_hp(cipher_suite=send.cipher_suite, secret=send.secret, version=send.version)
    return QuicOpener(int(send.cipher_suite), key, iv, hp, server.host_cid, send.key_phase)


def _expected(server: QuicConnection) -> int:
    return server._spaces[tls.Epoch.ONE_RTT].expected_packet_number


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_the_core_opens_the_listeners_acks_of_its_packets(suite: CipherSuite) -> None:
    client, server = _pair(suite)
    sealer, _ = _sealer(server)
    opener = _opener(server, client)
    pns = _reserve(server, 6)
    # every packet but the fourth arrives: the ACK has two ranges
    assert len(_received(client, [sealer.seal(b"audio", pn) for pn in pns if pn != pns[3]])) == 5
    answers = [d for d, _ in client.datagrams_to_send(now=1.1)]   # past its ACK delay
    opened = [opener.open(d, _expected(server)) for d in answers]
    acks = [o for o in opened if o[0] == "ack"]
    assert acks, opened
    what, pn, largest, delay, ranges = acks[-1]
    # (the lower range may reach further down, to the library's own packets before ours)
    assert largest == pns[-1] and ranges[0] == (pns[4], pns[5]), ranges
    assert ranges[1][1] == pns[2] and ranges[1][0] <= pns[0], ranges
    assert pn >= _expected(server)
    # the library reads the same packets without complaint (ours are not
    # among the packets it sent, so it only notes them)
    for d in answers:
        server.receive_datagram(d, CLIENT, now=1.0)
    while (e := server.next_event()) is not None:
        assert not isinstance(e, ConnectionTerminated), e
    # a changed byte, another connection's id, and a packet with more than
    # ACKs (a DATAGRAM from the client: the library's to handle)
    forged = bytearray(answers[-1])
    forged[-1] ^= 0x40
    assert opener.open(bytes(forged), _expected(server))[0] == "forged"
    other_cid = bytearray(answers[-1])
    other_cid[1] ^= 0xFF
    assert opener.open(bytes(other_cid), _expected(server))[0] == "not_ours"
    client.send_datagram_frame(b"from the listener")
    more = [opener.open(d, _expected(server))[0] for d, _ in client.datagrams_to_send(now=1.2)]
    assert "other" in more, more
    # the listener's next ACK, past its ACK delay, goes out beside its next
    # DATAGRAM: the library's packet, and the ACK in it read too
    _received(client, [sealer.seal(b"audio", pn) for pn in _reserve(server, 2)])
    client.send_datagram_frame(b"from the listener")
    beside = [opener.open(d, _expected(server)) for d, _ in client.datagrams_to_send(now=1.4)]
    assert [o[0] for o in beside] == ["other"] and beside[0][2] == server._packet_number - 1, beside


def _varints(*values: int) -> bytes:
    buf = Buffer(capacity=256)
    for v in values:
        buf.push_uint_var(v)
    return buf.data


def test_an_ack_is_read_beside_the_frames_the_library_reads() -> None:
    """Any frame of RFC 9000 or a DATAGRAM before or after the ACK is
    stepped over; the packet is still the library's ("other")."""
    keys = (0x1301, bytes(range(16)), bytes(range(12)), bytes(range(16, 32)), b"\x01" * 8)
    sealer, opener = QuicSealer(*keys), QuicOpener(*keys)
    ack = b"\x02" + _varints(100, 3, 1, 4, 1, 2)        # acknowledges 96-100 and 91-93
    ranges = [(96, 100), (91, 93)]
    frames = [
        b"\x10" + _varints(1 << 20),                    # MAX_DATA
        b"\x0e" + _varints(4, 1000, 3) + b"abc",         # STREAM with offset and length
        b"\x06" + _varints(0, 2) + b"hi",                # CRYPTO
        b"\x18" + _varints(3, 1) + b"\x08" + bytes(8) + bytes(16),   # NEW_CONNECTION_ID
        b"\x1a" + bytes(8),                              # PATH_CHALLENGE
        b"\x1d" + _varints(0, 3) + b"bye",               # CONNECTION_CLOSE
        b"\x11" + _varints(4, 5000),                     # MAX_STREAM_DATA
        b"\x19" + _varints(2) + b"\x1e",                  # RETIRE_CONNECTION_ID, HANDSHAKE_DONE
        b"\x31" + _varints(5) + b"voice",                # DATAGRAM with a length
        b"\x01\x00\x00",                                 # PING, PADDING
    ]
    pn = 7
    for k in range(len(frames) + 1):
        for tail in (b"", b"\x30 a DATAGRAM to the end", b"\x08" + _varints(0) + b"STREAM to the end"):
            pn += 1
            payload = b"".join(frames[:k]) + ack + b"".join(frames[k:]) + tail
            assert opener.open(sealer.seal(payload, pn, frames=True), pn) == ("other", pn, 100, 3, ranges)
    # only ACKs, PADDING and PING: the core's alone, as before
    assert opener.open(sealer.seal(ack + b"\x01\x00", 50, frames=True), 50) == ("ack", 50, 100, 3, ranges)
    # an ACK before a frame the core cannot step over (an extension's) is read;
    # one after it is not, and neither is a malformed one beside other frames
    unknown = b"\x40\xaf" + _varints(1, 2, 3)         # ACK_FREQUENCY
    assert opener.open(sealer.seal(ack + unknown, 51, frames=True), 51) == ("other", 51, 100, 3, ranges)
    assert opener.open(sealer.seal(unknown + ack, 52, frames=True), 52) == ("other", 52, None, None, [])
    broken = b"\x02" + _varints(5, 0, 1, 2, 9, 9)      # its second range runs below packet 0
    assert opener.open(sealer.seal(frames[0] + broken, 53, frames=True), 53) == ("other", 53, None, None, [])
    assert opener.open(sealer.seal(broken + frames[0], 54, frames=True), 54)[0] == "forged"
    # a frame cut short after the ACK: the ACK stands, the packet is the library's
    assert opener.open(sealer.seal(ack + b"\x0a" + _varints(4, 50) + b"abc", 55, frames=True), 55) \
        == ("other", 55, 100, 3, ranges)


def test_the_ack_reader_takes_any_bytes() -> None:
    opener = QuicOpener(0x1301, bytes(16), bytes(12), bytes(16), b"\x01" * 8)
    for n in range(0, 200, 7):
        for first in (0x40, 0x45, 0x5F, 0xC0, 0x00):
            assert opener.open(bytes([first]) + b"\x01" * 8 + bytes(n), 0)[0] in ("not_ours", "forged")
