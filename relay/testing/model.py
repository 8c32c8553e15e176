"""A slow, obvious Python model of the fan-out core: the test oracle.

It implements the same contract as `relay._core.Core` (rooms locked to
sources, RTP validation, room numbering that stays continuous across a new
sender, copies from two parents merged by sequence number, per-listener
rings of variable-length packets in a byte budget with their own
SSRC/sequence/timestamp, drop-oldest overflow, a burst of recent
packets on join) with lists and dicts, so the
property tests can compare the compiled core to it byte for byte.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from relay._core import Ingest

HDR = 12
TAKEOVER_NS = 150_000_000
BURST_FRESH_NS = 1_000_000_000
RX_BUF = 16384


def _source_key(sockaddr: bytes) -> tuple[int, bytes, int]:
    family = struct.unpack_from("=H", sockaddr)[0]
    port = struct.unpack_from("!H", sockaddr, 2)[0]
    ip = sockaddr[4:8] if len(sockaddr) == 16 else sockaddr[8:24]
    return family, ip, port


@dataclass
class ModelListener:
    room: int
    ssrc: int
    seq_off: int
    ts_off: int
    pull: bool
    written: list[bytes] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)  # (offset, end) of each written packet
    tail: int = 0       # written[tail:] are still held
    sent: int = 0
    wr: int = 0         # where the next packet would start
    drop_overflow: int = 0


@dataclass
class ModelRoom:
    any_source: bool
    sources: list[tuple[int, bytes, int, bool]] = field(default_factory=list)
    have_stream: bool = False
    in_ssrc: int = 0
    in_seq: int = 0
    seq_off: int = 0
    ts_off: int = 0
    out_seq: int = 0
    out_ts: int = 0
    last_rx_ns: int = 0
    history: list[bytes] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=dict)
    takeover_ns: int = TAKEOVER_NS
    pin_source: bool = False
    released: bool = False
    live: tuple[int, bytes, int] = (0, b"", 0)   # the live stream's source
    merge: bool = False
    taken: set[int] = field(default_factory=set)   # merge: sequence numbers taken, within 64 of in_seq
    duplicates: int = 0
    gap_fills: int = 0


class ModelCore:
    """The fan-out as a reader would write it first. Slots are handed out
    in the same order as the core's free list (lowest first, last freed
    first) so slot numbers can be compared too."""

    def __init__(self, capacity: int, rooms: int = 16, depth: int = 16, ring_bytes: int = 3840):
        self.capacity, self.depth, self.ring_bytes = capacity, depth, ring_bytes
        self.rooms: dict[int, ModelRoom] = {}
        self.n_rooms = rooms
        self.listeners: dict[int, ModelListener] = {}
        self.free = list(range(capacity - 1, -1, -1))

    def room_open(self, room: int, any_source: bool = False) -> None:
        self.rooms[room] = ModelRoom(any_source=any_source)

    def room_rules(self, room: int, takeover_s: float = 0.15, pin_source: bool = False,
                   merge: bool = False) -> None:
        r = self.rooms[room]
        r.takeover_ns = int(takeover_s * 1e9) if takeover_s >= 0 else -1
        r.pin_source = pin_source
        r.merge = merge

    def room_release(self, room: int) -> None:
        self.rooms[room].released = True

    def room_allow(self, room: int, sockaddr: bytes, any_port: bool = True) -> None:
        family, ip, port = _source_key(sockaddr)
        self.rooms[room].sources.append((family, ip, port, any_port))

    def listener_add(self, room: int, sockaddr: bytes, ssrc: int, seq_off: int, ts_off: int,
                     pull: bool = False, burst: int = 0, now_ns: int = 0) -> int:
        if not self.free:
            return -1
        slot = self.free.pop()
        lst = ModelListener(room, ssrc, seq_off, ts_off, pull)
        self.listeners[slot] = lst
        r = self.rooms[room]
        if burst > 0 and r.have_stream and now_ns - r.last_rx_ns < BURST_FRESH_NS:
            for pkt in r.history[-min(burst, self.depth - 1):]:
                self._write(lst, pkt)
        return slot

    def listener_remove(self, slot: int) -> None:
        del self.listeners[slot]
        self.free.append(slot)

    def _write(self, lst: ModelListener, room_pkt: bytes) -> None:
        seq, ts = struct.unpack_from("!HI", room_pkt, 2)
        pkt = (room_pkt[:2] + struct.pack("!HII", (seq + lst.seq_off) & 0xFFFF,
                                          (ts + lst.ts_off) & 0xFFFFFFFF, lst.ssrc)
               + room_pkt[HDR:])
        # a packet goes where the last one ended, or at 0 if it would run
        # past the end; the oldest held packets are let go until at most
        # depth - 1 remain and none of them overlaps the new one
        at = lst.wr if lst.wr + len(pkt) <= self.ring_bytes else 0
        end = at + len(pkt)
        while lst.tail < len(lst.written) and (
                len(lst.written) - lst.tail >= self.depth
                or any(a < end and at < b for a, b in lst.spans[lst.tail:])):
            if lst.tail == lst.sent:
                lst.sent += 1
                lst.drop_overflow += 1
            lst.tail += 1
        if lst.tail == len(lst.written):
            at, end = 0, len(pkt)
        lst.written.append(pkt)
        lst.spans.append((at, end))
        lst.wr = end

    def _allowed(self, r: ModelRoom, source: bytes) -> bool:
        if r.any_source:
            return True
        family, ip, port = _source_key(source)
        return any(f == family and i == ip and (any_port or p == port)
                   for f, i, p, any_port in r.sources)

    def feed(self, room: int, pkt: bytes, source: bytes, now_ns: int) -> Ingest:
        r = self.rooms.get(room)
        if r is None:
            return Ingest.INGEST_NO_ROOM
        if not self._allowed(r, source):
            return self._drop(r, Ingest.INGEST_FOREIGN)
        if len(pkt) > RX_BUF:
            return self._drop(r, Ingest.INGEST_OVERSIZED)
        if len(pkt) < HDR or pkt[0] >> 6 != 2:
            return self._drop(r, Ingest.INGEST_MALFORMED)
        if 72 <= (pkt[1] & 0x7F) <= 76:
            self._bye(r, pkt, source)
            return Ingest.INGEST_RTCP
        start = HDR + 4 * (pkt[0] & 0x0F)
        if pkt[0] & 0x10:
            if start + 4 > len(pkt):
                return self._drop(r, Ingest.INGEST_MALFORMED)
            start += 4 + 4 * struct.unpack_from("!H", pkt, start + 2)[0]
        end = len(pkt)
        if pkt[0] & 0x20:
            if pkt[-1] == 0:
                return self._drop(r, Ingest.INGEST_MALFORMED)
            end -= pkt[-1]
        if start >= end:
            return self._drop(r, Ingest.INGEST_MALFORMED)
        payload = pkt[start:end]
        if len(payload) + HDR > self.ring_bytes:
            return self._drop(r, Ingest.INGEST_OVERSIZED)
        seq, ts, ssrc = struct.unpack_from("!HII", pkt, 2)
        fill = False
        if not r.have_stream:
            r.have_stream = True
            r.live = _source_key(source)
            r.taken = {seq}
        else:
            delta = (seq - r.in_seq) & 0xFFFF
            delta = delta - 0x10000 if delta >= 0x8000 else delta
            if ssrc != r.in_ssrc or (r.pin_source and _source_key(source) != r.live):
                quiet_enough = r.takeover_ns >= 0 and now_ns - r.last_rx_ns >= r.takeover_ns
                if not (r.released or quiet_enough):
                    return self._drop(r, Ingest.INGEST_FOREIGN)
                self._restart(r, seq, ts, now_ns)
                r.live, r.released = _source_key(source), False
            elif r.merge and -64 < delta <= 0:
                if seq in r.taken:
                    r.duplicates += 1
                    return Ingest.INGEST_DUPLICATE
                r.taken.add(seq)
                r.gap_fills += 1
                fill = True
            elif delta > 3000 or delta < -100:
                if r.merge and now_ns - r.last_rx_ns < r.takeover_ns:
                    return self._drop(r, Ingest.INGEST_FOREIGN)
                self._restart(r, seq, ts, now_ns)
            elif delta <= 0:
                return self._drop(r, Ingest.INGEST_LATE)
        out_seq, out_ts = (seq + r.seq_off) & 0xFFFF, (ts + r.ts_off) & 0xFFFFFFFF
        if not fill:
            r.in_ssrc, r.in_seq = ssrc, seq
            r.out_seq, r.out_ts = out_seq, out_ts
            r.taken = {s for s in r.taken | {seq} if (seq - s) & 0xFFFF < 64}
        r.last_rx_ns = now_ns
        room_pkt = bytes([0x80, pkt[1]]) + struct.pack("!HII", out_seq, out_ts, 0) + payload
        r.history = (r.history + [room_pkt])[-self.depth:]
        for lst in self.listeners.values():
            if lst.room == room:
                self._write(lst, room_pkt)
        return Ingest.INGEST_OK

    @staticmethod
    def _bye(r: ModelRoom, pkt: bytes, source: bytes) -> None:
        """A BYE naming the live SSRC, from the live address (or the port
        above it), in a well-formed compound RTCP packet, releases the room."""
        family, ip, port = _source_key(source)
        if not r.have_stream or (r.pin_source and (family, ip) != r.live[:2]) \
                or (r.pin_source and port not in (r.live[2], r.live[2] + 1)):
            return
        off = 0
        while off + 8 <= len(pkt) and pkt[off] >> 6 == 2:
            size = 4 * (struct.unpack_from("!H", pkt, off + 2)[0] + 1)
            if off + size > len(pkt):
                return
            if pkt[off + 1] == 203 and pkt[off] & 0x1F and struct.unpack_from("!I", pkt, off + 4)[0] == r.in_ssrc:
                r.released = True
                return
            off += size

    @staticmethod
    def _restart(r: ModelRoom, seq: int, ts: int, now_ns: int) -> None:
        r.taken = {seq}
        if r.merge:
            r.seq_off = r.ts_off = 0
            return
        gap = (now_ns - r.last_rx_ns) * 48000 // 1_000_000_000
        gap = min(max(gap, 960), 0x7FFFFFFF)
        r.seq_off = (r.out_seq + 1 - seq) & 0xFFFF
        r.ts_off = (r.out_ts + gap - ts) & 0xFFFFFFFF

    @staticmethod
    def _drop(r: ModelRoom, why: Ingest) -> Ingest:
        r.drops[why.name] = r.drops.get(why.name, 0) + 1
        return why

    def ring(self, slot: int) -> list[bytes]:
        lst = self.listeners[slot]
        return lst.written[lst.tail:]

    def pending(self, slot: int) -> int:
        lst = self.listeners[slot]
        return len(lst.written) - lst.sent

    def mark_sent(self) -> list[tuple[int, bytes]]:
        """What a complete flush sends: (slot, packet) per unsent packet,
        listener by listener (order across listeners is not part of the
        contract)."""
        out = []
        for slot, lst in self.listeners.items():
            if lst.pull:
                continue
            out += [(slot, p) for p in lst.written[lst.sent:]]
            lst.sent = len(lst.written)
        return out


def _csum(data: bytes) -> int:
    """RFC 1071, the obvious way: 16-bit big-endian words, carries folded."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def xdp_frame(dst_mac: bytes, src_mac: bytes, src_ip: bytes, src_port: int, sockaddr: bytes,
              payload: bytes) -> bytes:
    """The AF_XDP egress's frame for `payload` to `sockaddr` (raw
    sockaddr_in/_in6), as RFC 791/8200/768 describe it: Ethernet, IPv4
    (DF, TTL 64, header checksum) or IPv6 (hop limit 64), UDP with its
    checksum over the pseudo header (0 sent as 0xFFFF)."""
    dst_port = struct.unpack_from("!H", sockaddr, 2)[0]
    ulen = 8 + len(payload)
    if len(src_ip) == 16:
        dst_ip = sockaddr[8:24]
        ip = struct.pack("!IHBB", 6 << 28, ulen, 17, 64) + src_ip + dst_ip
        pseudo = src_ip + dst_ip + struct.pack("!IxxxB", ulen, 17)
        ethertype = 0x86DD
    else:
        dst_ip = sockaddr[4:8]
        head = struct.pack("!BBHHHBBH", 0x45, 0, 20 + ulen, 0, 0x4000, 64, 17, 0) + src_ip + dst_ip
        ip = head[:10] + struct.pack("!H", _csum(head)) + head[12:]
        pseudo = src_ip + dst_ip + struct.pack("!xBH", 17, ulen)
        ethertype = 0x0800
    udp = struct.pack("!HHHH", src_port, dst_port, ulen, 0) + payload
    check = _csum(pseudo + udp) or 0xFFFF
    return dst_mac + src_mac + struct.pack("!H", ethertype) + ip + udp[:6] + struct.pack("!H", check) + udp[8:]
