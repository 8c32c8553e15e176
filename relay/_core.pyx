# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The fan-out core: packets in, per-listener rings, packets out, counters.

Data path (DESIGN.md):

    ingest fd --recvmmsg--> parse RTP, check source, rewrite numbering once per
    room --> memcpy into every listener's ring slot with that listener's SSRC,
    sequence and timestamp --> egress queue --sendmmsg, GIL released--> kernel

All memory is allocated when a Core is built: the listener arena, every ring,
the room table and the socket batches. Joining and leaving move slots through
a free list; nothing on the packet path allocates or touches a Python object.
Errors on that path are return codes and counters, never exceptions. Policy
(who may join, which source a room trusts, when to time a listener out) is the
caller's; the core only does what it is told.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int16_t, int32_t, int64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memcmp, memset
from libc.errno cimport errno, EAGAIN, ENOBUFS, EINTR
from posix.time cimport timespec, clock_gettime, CLOCK_MONOTONIC


cdef enum:
    TX_BATCH = 1024     # sendmmsg's own cap (UIO_MAXIOV)
    RX_BATCH = 32
    RX_BUF = 2048       # larger datagrams are truncated and dropped as oversized
    RX_ADDR = 128       # sizeof(struct sockaddr_storage)
    RX_ROUNDS = 8       # recvmmsg calls per ingest() before yielding to the loop
    HDR = 12            # the RTP header we emit: no CSRC, no extension, no padding
    PEND_MAX = 64       # packets whose fan-out latency is awaiting a complete flush
    BATCH_BUCKETS = 11  # sendmmsg batch sizes: <=1, <=2, <=4 ... <=1024
    OPUS_CLOCK = 48000  # RFC 7587: Opus RTP always runs at 48 kHz

# A new SSRC may take over a room only once the current one has been quiet
# this long; otherwise two publishers on one room would fight packet by packet.
cdef int64_t TAKEOVER_NS = 150000000
# Only recent audio is burst to a new listener; a stale burst is worse than none.
cdef int64_t BURST_FRESH_NS = 1000000000

# Upper bounds of the fan-out latency buckets, in nanoseconds (last is +Inf).
cdef int64_t LAT_BOUNDS_NS[LAT_BUCKETS]
LAT_BOUNDS_NS[:] = [10000, 25000, 50000, 100000, 250000, 500000, 1000000,
                    2500000, 5000000, 10000000, 25000000, 50000000, 100000000,
                    0x7fffffffffffffff]

# what became of one ingest datagram (also returned by feed())
cpdef enum Ingest:
    INGEST_OK = 0
    INGEST_NO_ROOM = 1
    INGEST_FOREIGN = 2
    INGEST_MALFORMED = 3
    INGEST_OVERSIZED = 4
    INGEST_LATE = 5
    INGEST_RTCP = 6

cdef uint64_t _allocs = 0
cdef uint64_t _frees = 0


cdef void *_alloc(size_t n, size_t size) except NULL:
    global _allocs
    cdef void *p = calloc(n if n > 0 else 1, size)
    if p == NULL:
        raise MemoryError()
    _allocs += 1
    return p


cdef void _free(void *p) noexcept:
    global _frees
    if p != NULL:
        free(p)
        _frees += 1


def allocation_balance():
    """(allocations, frees) made by every Core so far: a leak check for tests."""
    return _allocs, _frees


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline uint16_t _be16(const uint8_t *p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline uint32_t _be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void _put16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xff


cdef inline void _put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xff
    p[2] = (v >> 8) & 0xff
    p[3] = v & 0xff


cdef class Core:
    """One shard of a relay node: rooms, a listener arena and their rings.

    capacity: listeners this shard can hold (the arena is allocated once).
    rooms: room slots; rooms are numbered 0..rooms-1 by the caller.
    depth: ring depth in packets, a power of two (resend window and burst).
    slot_bytes: bytes per ring slot; larger RTP payloads are dropped as oversized.
    """

    cdef Listener *ls
    cdef Room *rm
    cdef uint8_t *rings
    cdef uint16_t *ring_len
    cdef uint8_t *hist
    cdef uint16_t *hist_len
    cdef int32_t *free_list
    cdef int32_t n_free
    cdef int32_t *queue
    cdef int32_t q_head
    cdef int32_t q_len
    cdef mmsghdr *tx
    cdef iovec *tx_iov
    cdef int32_t *tx_owner
    cdef mmsghdr *rx
    cdef iovec *rx_iov
    cdef uint8_t *rx_buf
    cdef uint8_t *rx_addr
    cdef int64_t pend_rx[PEND_MAX]
    cdef int pend_n

    cdef readonly int capacity
    cdef readonly int rooms
    cdef readonly int depth
    cdef readonly int slot_bytes
    cdef readonly int listeners
    cdef readonly int blocked
    cdef uint32_t mask

    # node-wide counters, read at scrape time
    cdef uint64_t c_rx_datagrams
    cdef uint64_t c_no_room
    cdef uint64_t c_rtcp_ignored
    cdef uint64_t c_packets_out
    cdef uint64_t c_bytes_out
    cdef uint64_t c_sendmmsg_calls
    cdef uint64_t c_sendmmsg_messages
    cdef uint64_t c_would_block
    cdef uint64_t c_drop_overflow
    cdef uint64_t c_drop_send_error
    cdef uint64_t c_resends
    cdef uint64_t batch_count[BATCH_BUCKETS]
    cdef uint64_t lat_count[LAT_BUCKETS]
    cdef uint64_t lat_sum_ns
    cdef uint64_t lat_dropped

    def __cinit__(self, int capacity, int rooms=16, int depth=16, int slot_bytes=480):
        if capacity < 1 or rooms < 1:
            raise ValueError("capacity and rooms must be at least 1")
        if depth < 2 or depth > 4096 or (depth & (depth - 1)) != 0:
            raise ValueError("depth must be a power of two between 2 and 4096")
        if slot_bytes < HDR + 1 or slot_bytes > RX_BUF:
            raise ValueError(f"slot_bytes must be between {HDR + 1} and {RX_BUF}")
        self.capacity = capacity
        self.rooms = rooms
        self.depth = depth
        self.mask = depth - 1
        self.slot_bytes = slot_bytes
        # calloc'd ring memory is only backed by pages once a listener writes
        # to it, so an idle arena costs address space, not resident memory.
        self.ls = <Listener *>_alloc(capacity, sizeof(Listener))
        self.rm = <Room *>_alloc(rooms, sizeof(Room))
        self.rings = <uint8_t *>_alloc(<size_t>capacity * depth, slot_bytes)
        self.ring_len = <uint16_t *>_alloc(<size_t>capacity * depth, sizeof(uint16_t))
        self.hist = <uint8_t *>_alloc(<size_t>rooms * depth, slot_bytes)
        self.hist_len = <uint16_t *>_alloc(<size_t>rooms * depth, sizeof(uint16_t))
        self.free_list = <int32_t *>_alloc(capacity, sizeof(int32_t))
        self.queue = <int32_t *>_alloc(capacity, sizeof(int32_t))
        self.tx = <mmsghdr *>_alloc(TX_BATCH, sizeof(mmsghdr))
        self.tx_iov = <iovec *>_alloc(TX_BATCH, sizeof(iovec))
        self.tx_owner = <int32_t *>_alloc(TX_BATCH, sizeof(int32_t))
        self.rx = <mmsghdr *>_alloc(RX_BATCH, sizeof(mmsghdr))
        self.rx_iov = <iovec *>_alloc(RX_BATCH, sizeof(iovec))
        self.rx_buf = <uint8_t *>_alloc(RX_BATCH, RX_BUF)
        self.rx_addr = <uint8_t *>_alloc(RX_BATCH, RX_ADDR)
        cdef int i
        # hand out low slots first so a small crowd stays in few pages
        for i in range(capacity):
            self.free_list[i] = capacity - 1 - i
        self.n_free = capacity
        for i in range(TX_BATCH):
            self.tx[i].msg_hdr.msg_iov = &self.tx_iov[i]
            self.tx[i].msg_hdr.msg_iovlen = 1
        for i in range(RX_BATCH):
            self.rx_iov[i].iov_base = self.rx_buf + <size_t>i * RX_BUF
            self.rx_iov[i].iov_len = RX_BUF
            self.rx[i].msg_hdr.msg_iov = &self.rx_iov[i]
            self.rx[i].msg_hdr.msg_iovlen = 1
        for i in range(rooms):
            self.rm[i].first = -1

    def __dealloc__(self):
        _free(self.ls)
        _free(self.rm)
        _free(self.rings)
        _free(self.ring_len)
        _free(self.hist)
        _free(self.hist_len)
        _free(self.free_list)
        _free(self.queue)
        _free(self.tx)
        _free(self.tx_iov)
        _free(self.tx_owner)
        _free(self.rx)
        _free(self.rx_iov)
        _free(self.rx_buf)
        _free(self.rx_addr)

    # ------------------------------------------------------------------ rooms

    cdef Room *_room(self, int room) except NULL:
        if room < 0 or room >= self.rooms:
            raise ValueError(f"room index {room} out of range 0..{self.rooms - 1}")
        return &self.rm[room]

    def room_open(self, int room, bint any_source=False):
        """Start accepting packets for `room`; sources must be allowed first
        unless `any_source` (open demo rooms)."""
        cdef Room *r = self._room(room)
        if r.active:
            raise ValueError(f"room {room} is already open")
        memset(r, 0, sizeof(Room))
        r.first = -1
        r.active = 1
        r.any_source = any_source

    def room_close(self, int room):
        """Stop the room. Its listeners must have been removed first."""
        cdef Room *r = self._room(room)
        if r.n_listeners:
            raise ValueError(f"room {room} still has {r.n_listeners} listeners")
        r.active = 0
        r.n_sources = 0

    def room_allow(self, int room, bytes sockaddr, bint any_port=True):
        """Lock the room to a source address (raw sockaddr bytes, see
        relay.addr.to_sockaddr); with any_port only the IP must match."""
        cdef Room *r = self._room(room)
        cdef const uint8_t *a = sockaddr
        cdef Source *s
        if r.n_sources >= MAX_SOURCES:
            raise ValueError(f"a room allows at most {MAX_SOURCES} sources")
        if len(sockaddr) < 16:
            raise ValueError("sockaddr too short")
        s = &r.sources[r.n_sources]
        memset(s, 0, sizeof(Source))
        family = (<const uint16_t *>a)[0]
        if family == AF_INET:
            memcpy(s.ip, a + 4, 4)
        elif family == AF_INET6 and len(sockaddr) >= 28:
            memcpy(s.ip, a + 8, 16)
        else:
            raise ValueError("sockaddr must be AF_INET or AF_INET6")
        s.family = family
        s.port = (<const uint16_t *>a)[1]
        s.any_port = any_port
        r.n_sources += 1

    def room_clear_sources(self, int room):
        """Forget the room's allowed sources (before allowing a new list)."""
        cdef Room *r = self._room(room)
        r.n_sources = 0

    cdef inline bint _source_ok(self, Room *r, const uint8_t *a) noexcept nogil:
        cdef int k
        cdef uint16_t family = (<const uint16_t *>a)[0]
        cdef uint16_t port = (<const uint16_t *>a)[1]
        cdef Source *s
        if r.any_source:
            return True
        for k in range(r.n_sources):
            s = &r.sources[k]
            if s.family != family or (not s.any_port and s.port != port):
                continue
            if family == AF_INET and memcmp(s.ip, a + 4, 4) == 0:
                return True
            if family == AF_INET6 and memcmp(s.ip, a + 8, 16) == 0:
                return True
        return False

    # -------------------------------------------------------------- listeners

    def listener_add(self, int room, bytes sockaddr, uint32_t ssrc, uint16_t seq_off,
                     uint32_t ts_off, bint pull=False, int burst=0, int64_t now_ns=-1):
        """Put a listener into `room`; returns its slot, or -1 if the arena is
        full. `sockaddr` is where sendmmsg sends (ignored for pull listeners).
        Up to `burst` recent room packets are queued at once so playback can
        start without waiting for the next packet."""
        cdef Room *r = self._room(room)
        cdef Listener *l
        cdef int32_t i
        cdef uint32_t k, n, start
        cdef uint8_t *src
        if not r.active:
            raise ValueError(f"room {room} is not open")
        if not pull and (len(sockaddr) < 16 or len(sockaddr) > ADDR_MAX):
            raise ValueError("sockaddr must be 16..28 bytes")
        if self.n_free == 0:
            return -1
        self.n_free -= 1
        i = self.free_list[self.n_free]
        l = &self.ls[i]
        # `queued` survives reuse on purpose: a stale queue entry for this slot
        # may still be waiting, and it now simply serves the new listener.
        k = l.queued
        memset(l, 0, sizeof(Listener))
        l.queued = k
        l.active = 1
        l.pull = pull
        l.room = room
        l.ssrc = ssrc
        l.seq_off = seq_off
        l.ts_off = ts_off
        if not pull:
            l.addrlen = len(sockaddr)
            memcpy(l.addr, <const uint8_t *>sockaddr, l.addrlen)
        l.prev = -1
        l.next = r.first
        if r.first >= 0:
            self.ls[r.first].prev = i
        r.first = i
        r.n_listeners += 1
        self.listeners += 1
        if now_ns < 0:
            now_ns = _now_ns()
        if burst > 0 and r.have_stream and now_ns - r.last_rx_ns < BURST_FRESH_NS:
            n = min(<uint32_t>burst, r.hist_head, <uint32_t>self.depth)
            start = r.hist_head - n
            for k in range(start, r.hist_head):
                src = self.hist + (<size_t>room * self.depth + (k & self.mask)) * self.slot_bytes
                self._write(i, src, self.hist_len[room * self.depth + (k & self.mask)])
        return i

    cdef Listener *_listener(self, int slot) except NULL:
        if slot < 0 or slot >= self.capacity or not self.ls[slot].active:
            raise ValueError(f"no listener in slot {slot}")
        return &self.ls[slot]

    def listener_remove(self, int slot):
        """Take the listener out of its room and return its slot to the free list."""
        cdef Listener *l = self._listener(slot)
        cdef Room *r = &self.rm[l.room]
        if l.prev >= 0:
            self.ls[l.prev].next = l.next
        else:
            r.first = l.next
        if l.next >= 0:
            self.ls[l.next].prev = l.prev
        r.n_listeners -= 1
        self.listeners -= 1
        l.active = 0
        l.head = l.sent = 0
        self.free_list[self.n_free] = slot
        self.n_free += 1

    # ------------------------------------------------------------- hot path

    cdef inline void _write(self, int32_t i, const uint8_t *src, uint16_t n) noexcept nogil:
        """Copy one room packet into listener i's ring with its own header."""
        cdef Listener *l = &self.ls[i]
        cdef size_t at
        cdef uint8_t *dst
        if l.head - l.sent >= <uint32_t>self.depth:
            # ring full of unsent packets: live audio drops the oldest
            l.sent += 1
            l.drop_overflow += 1
            self.c_drop_overflow += 1
        at = <size_t>i * self.depth + (l.head & self.mask)
        dst = self.rings + at * self.slot_bytes
        memcpy(dst, src, n)
        _put16(dst + 2, <uint16_t>(_be16(src + 2) + l.seq_off))
        _put32(dst + 4, _be32(src + 4) + l.ts_off)
        _put32(dst + 8, l.ssrc)
        self.ring_len[at] = n
        l.head += 1
        if not l.queued and not l.pull:
            l.queued = 1
            self.queue[(self.q_head + self.q_len) % self.capacity] = i
            self.q_len += 1

    cdef int _ingest_one(self, int room, const uint8_t *pkt, Py_ssize_t n,
                         const uint8_t *src, int64_t now) noexcept nogil:
        cdef Room *r
        cdef uint8_t b0, pt
        cdef Py_ssize_t off, end, plen, ext
        cdef uint16_t seq
        cdef uint32_t ts, ssrc
        cdef int16_t delta
        cdef uint8_t *h
        cdef int32_t i
        cdef uint16_t out_len
        if room < 0 or room >= self.rooms or not self.rm[room].active:
            self.c_no_room += 1
            return INGEST_NO_ROOM
        r = &self.rm[room]
        if not self._source_ok(r, src):
            r.drop_foreign += 1
            return INGEST_FOREIGN
        if n > RX_BUF:
            r.drop_oversized += 1
            return INGEST_OVERSIZED
        if n < HDR or (pkt[0] >> 6) != 2:
            r.drop_malformed += 1
            return INGEST_MALFORMED
        b0 = pkt[0]
        pt = pkt[1] & 0x7f
        if 72 <= pt <= 76:
            # RTCP sender reports multiplexed onto the ingest port (RFC 5761)
            self.c_rtcp_ignored += 1
            return INGEST_RTCP
        off = HDR + 4 * (b0 & 0x0f)
        if b0 & 0x10:
            if off + 4 > n:
                r.drop_malformed += 1
                return INGEST_MALFORMED
            ext = 4 * _be16(pkt + off + 2)
            off += 4 + ext
        end = n
        if b0 & 0x20:
            if pkt[n - 1] == 0:
                r.drop_malformed += 1
                return INGEST_MALFORMED
            end -= pkt[n - 1]
        if off >= end:
            r.drop_malformed += 1
            return INGEST_MALFORMED
        plen = end - off
        if plen + HDR > self.slot_bytes:
            r.drop_oversized += 1
            return INGEST_OVERSIZED
        seq = _be16(pkt + 2)
        ts = _be32(pkt + 4)
        ssrc = _be32(pkt + 8)
        if not r.have_stream:
            r.have_stream = 1
            r.seq_off = 0
            r.ts_off = 0
        else:
            delta = <int16_t>(seq - r.in_seq)
            if ssrc != r.in_ssrc:
                if now - r.last_rx_ns < TAKEOVER_NS:
                    r.drop_foreign += 1
                    return INGEST_FOREIGN
                self._restart(r, seq, ts, now)
            elif delta > 3000 or delta < -100:
                # same SSRC, numbering jumped: a restarted sender
                self._restart(r, seq, ts, now)
            elif delta <= 0:
                r.drop_late += 1
                return INGEST_LATE
        r.in_ssrc = ssrc
        r.in_seq = seq
        r.out_seq = <uint16_t>(seq + r.seq_off)
        r.out_ts = ts + r.ts_off
        r.last_rx_ns = now
        r.packets_in += 1
        r.bytes_in += n
        # the room packet: a clean 12-byte header (SSRC filled per listener)
        out_len = <uint16_t>(HDR + plen)
        i = room * self.depth + (r.hist_head & self.mask)
        h = self.hist + <size_t>i * self.slot_bytes
        h[0] = 0x80
        h[1] = pkt[1]
        _put16(h + 2, r.out_seq)
        _put32(h + 4, r.out_ts)
        _put32(h + 8, 0)
        memcpy(h + HDR, pkt + off, plen)
        self.hist_len[i] = out_len
        r.hist_head += 1
        i = r.first
        while i >= 0:
            self._write(i, h, out_len)
            i = self.ls[i].next
        if self.pend_n < PEND_MAX:
            self.pend_rx[self.pend_n] = now
            self.pend_n += 1
        else:
            self.lat_dropped += 1
        return INGEST_OK

    cdef void _restart(self, Room *r, uint16_t seq, uint32_t ts, int64_t now) noexcept nogil:
        """Continue the room's numbering across a new sender: next sequence
        number, and a timestamp advanced by the real time that passed."""
        cdef int64_t gap = (now - r.last_rx_ns) * OPUS_CLOCK // 1000000000
        if gap < 960:
            gap = 960
        elif gap > 0x7fffffff:
            gap = 0x7fffffff
        r.seq_off = <uint16_t>(r.out_seq + 1 - seq)
        r.ts_off = r.out_ts + <uint32_t>gap - ts
        r.source_restarts += 1

    cdef int _flush(self, int fd) noexcept nogil:
        """Send every queued ring packet; 0 when drained, 1 when the socket
        would block (call again once it is writable)."""
        cdef int32_t qi, i, k
        cdef int n, done, rc, err
        cdef uint32_t s, at
        cdef Listener *l
        while self.q_len > 0:
            n = 0
            qi = 0
            while qi < self.q_len and n < TX_BATCH:
                i = self.queue[(self.q_head + qi) % self.capacity]
                l = &self.ls[i]
                if l.active and not l.pull:
                    s = l.sent
                    while s != l.head and n < TX_BATCH:
                        at = i * self.depth + (s & self.mask)
                        self.tx_iov[n].iov_base = self.rings + <size_t>at * self.slot_bytes
                        self.tx_iov[n].iov_len = self.ring_len[at]
                        self.tx[n].msg_hdr.msg_name = l.addr
                        self.tx[n].msg_hdr.msg_namelen = l.addrlen
                        self.tx_owner[n] = i
                        n += 1
                        s += 1
                    if s != l.head:
                        break
                qi += 1
            done = 0
            while done < n:
                rc = sendmmsg(fd, self.tx + done, n - done, MSG_DONTWAIT)
                self.c_sendmmsg_calls += 1
                if rc > 0:
                    self.c_sendmmsg_messages += rc
                    self._observe_batch(rc)
                    for k in range(done, done + rc):
                        l = &self.ls[self.tx_owner[k]]
                        l.sent += 1
                        l.packets_out += 1
                        l.bytes_out += self.tx_iov[k].iov_len
                        self.c_bytes_out += self.tx_iov[k].iov_len
                    self.c_packets_out += rc
                    done += rc
                    continue
                err = errno
                if err == EINTR:
                    continue
                if err == EAGAIN or err == ENOBUFS:
                    self.c_would_block += 1
                    self._pop_sent()
                    self.blocked = 1
                    return 1
                # this one message failed on its own (e.g. unreachable
                # address): count it, skip it, resubmit the rest
                l = &self.ls[self.tx_owner[done]]
                l.sent += 1
                l.drop_send_error += 1
                self.c_drop_send_error += 1
                done += 1
            self._pop_sent()
        self.blocked = 0
        self._observe_latency()
        return 0

    cdef inline void _pop_sent(self) noexcept nogil:
        cdef Listener *l
        while self.q_len > 0:
            l = &self.ls[self.queue[self.q_head]]
            if l.active and not l.pull and l.sent != l.head:
                return
            l.queued = 0
            self.q_head = (self.q_head + 1) % self.capacity
            self.q_len -= 1

    cdef inline void _observe_batch(self, int n) noexcept nogil:
        # bucket b holds batches of at most 2**b messages
        cdef int b = 0
        while (1 << b) < n:
            b += 1
        self.batch_count[b] += 1

    cdef void _observe_latency(self) noexcept nogil:
        cdef int64_t now, d
        cdef int k, b
        if self.pend_n == 0:
            return
        now = _now_ns()
        for k in range(self.pend_n):
            d = now - self.pend_rx[k]
            b = 0
            while d > LAT_BOUNDS_NS[b]:
                b += 1
            self.lat_count[b] += 1
            self.lat_sum_ns += d
        self.pend_n = 0

    def ingest(self, int in_fd, int room, int out_fd, int budget=65536):
        """Drain `in_fd` (a room's RTP socket) with recvmmsg, fan every packet
        out and send it on `out_fd`. Returns the datagrams read. Stops after
        about `budget` listener-packets (at least one ingest batch) so a big
        room cannot starve the event loop: joins and keepalives get their
        turn, and the reader fires again for what is left. `blocked` tells
        whether the egress socket filled up."""
        cdef int rounds, got, k, batch
        cdef int total = 0
        cdef int64_t now
        cdef uint64_t start_out = self.c_packets_out
        cdef msghdr *m
        # flush between rounds, so a round must not overrun a ring
        batch = min(<int>RX_BATCH, self.depth // 2 if self.depth > 2 else 1)
        if room >= 0 and room < self.rooms and self.rm[room].n_listeners > 0:
            batch = max(1, min(batch, budget // self.rm[room].n_listeners))
        with nogil:
            for rounds in range(RX_ROUNDS):
                if self.c_packets_out - start_out >= <uint64_t>budget:
                    break
                for k in range(batch):
                    self.rx[k].msg_hdr.msg_name = self.rx_addr + k * RX_ADDR
                    self.rx[k].msg_hdr.msg_namelen = RX_ADDR
                    self.rx[k].msg_hdr.msg_flags = 0
                got = recvmmsg(in_fd, self.rx, batch, MSG_DONTWAIT, NULL)
                if got <= 0:
                    break
                now = _now_ns()
                total += got
                self.c_rx_datagrams += got
                for k in range(got):
                    m = &self.rx[k].msg_hdr
                    self._ingest_one(
                        room, self.rx_buf + k * RX_BUF,
                        RX_BUF + 1 if m.msg_flags & MSG_TRUNC else self.rx[k].msg_len,
                        self.rx_addr + k * RX_ADDR, now)
                if self._flush(out_fd):
                    break
                if got < batch:
                    break
        return total

    def flush(self, int fd):
        """Send what is queued; returns 1 if the socket would block."""
        cdef int rc
        with nogil:
            rc = self._flush(fd)
        return rc

    def feed(self, int room, const uint8_t[:] packet, bytes source, int64_t now_ns=-1):
        """Fan out one datagram as if it had arrived from `source` (raw
        sockaddr) at monotonic time `now_ns` (default: now). Returns an Ingest
        code. Nothing is sent until flush(). For tests and for relays that
        receive through Python (an upstream QUIC hop)."""
        if len(source) < 16:
            raise ValueError("source sockaddr too short")
        cdef Py_ssize_t n = packet.shape[0]
        cdef const uint8_t *p = &packet[0] if n > 0 else <const uint8_t *>b""
        self.c_rx_datagrams += 1
        return self._ingest_one(room, p, n, <const uint8_t *>source,
                                now_ns if now_ns >= 0 else _now_ns())

    # ------------------------------------------------------------ listener I/O

    def ring(self, int slot):
        """The packets still held in a listener's ring, oldest first (sent or
        not): what a NACK can be answered from."""
        cdef Listener *l = self._listener(slot)
        cdef uint32_t s, start
        cdef size_t at
        out = []
        start = l.head - min(l.head, <uint32_t>self.depth)
        for s in range(start, l.head):
            at = <size_t>slot * self.depth + (s & self.mask)
            out.append(self.rings[at * self.slot_bytes: at * self.slot_bytes + self.ring_len[at]])
        return out

    def pending(self, int slot):
        """Packets written to the listener's ring but not yet sent or pulled."""
        cdef Listener *l = self._listener(slot)
        return l.head - l.sent

    def pull(self, int slot, int max_packets=64):
        """Take up to `max_packets` unsent packets from a pull listener's ring
        (QUIC sessions drain their own pace; overflow has dropped the oldest)."""
        cdef Listener *l = self._listener(slot)
        cdef size_t at
        out = []
        while l.sent != l.head and len(out) < max_packets:
            at = <size_t>slot * self.depth + (l.sent & self.mask)
            out.append(self.rings[at * self.slot_bytes: at * self.slot_bytes + self.ring_len[at]])
            l.sent += 1
            l.packets_out += 1
            l.bytes_out += self.ring_len[at]
        return out

    def resend(self, int fd, int slot, int seq):
        """Send the ring packet with this listener-side sequence number again
        (a NACK). Returns 1 if sent, 0 if no longer in the ring or not yet
        sent, -1 if the socket refused it."""
        cdef Listener *l = self._listener(slot)
        cdef uint32_t s, start
        cdef size_t at
        cdef uint8_t *p
        cdef ssize_t rc
        start = l.head - min(l.head, <uint32_t>self.depth)
        for s in range(start, l.sent):
            at = <size_t>slot * self.depth + (s & self.mask)
            p = self.rings + at * self.slot_bytes
            if _be16(p + 2) == seq:
                if l.pull:
                    return 0
                rc = sendto(fd, p, self.ring_len[at], MSG_DONTWAIT, <const sockaddr *>l.addr, l.addrlen)
                if rc < 0:
                    return -1
                l.resends += 1
                self.c_resends += 1
                return 1
        return 0

    # --------------------------------------------------------------- counters

    def counters(self):
        """Node-wide counters, summed over rooms where they are per room."""
        cdef int k
        cdef uint64_t pin = 0, bin_ = 0, fo = 0, ma = 0, ov = 0, la = 0, rs = 0
        for k in range(self.rooms):
            pin += self.rm[k].packets_in
            bin_ += self.rm[k].bytes_in
            fo += self.rm[k].drop_foreign
            ma += self.rm[k].drop_malformed
            ov += self.rm[k].drop_oversized
            la += self.rm[k].drop_late
            rs += self.rm[k].source_restarts
        return {
            "rx_datagrams": self.c_rx_datagrams,
            "packets_in": pin,
            "bytes_in": bin_,
            "packets_out": self.c_packets_out,
            "bytes_out": self.c_bytes_out,
            "sendmmsg_calls": self.c_sendmmsg_calls,
            "sendmmsg_messages": self.c_sendmmsg_messages,
            "would_block": self.c_would_block,
            "resends": self.c_resends,
            "source_restarts": rs,
            "rtcp_ignored": self.c_rtcp_ignored,
            "drop_no_room": self.c_no_room,
            "drop_foreign": fo,
            "drop_malformed": ma,
            "drop_oversized": ov,
            "drop_late": la,
            "drop_overflow": self.c_drop_overflow,
            "drop_send_error": self.c_drop_send_error,
            "listeners": self.listeners,
            "queued": self.q_len,
        }

    def room_stats(self, int room):
        """Per-room counters and stream state."""
        cdef Room *r = self._room(room)
        return {
            "active": bool(r.active),
            "listeners": r.n_listeners,
            "packets_in": r.packets_in,
            "bytes_in": r.bytes_in,
            "drop_foreign": r.drop_foreign,
            "drop_malformed": r.drop_malformed,
            "drop_oversized": r.drop_oversized,
            "drop_late": r.drop_late,
            "source_restarts": r.source_restarts,
            "have_stream": bool(r.have_stream),
            "last_rx_ns": r.last_rx_ns,
        }

    def listener_stats(self, int slot):
        """Per-listener counters."""
        cdef Listener *l = self._listener(slot)
        return {
            "room": l.room,
            "ssrc": l.ssrc,
            "packets_out": l.packets_out,
            "bytes_out": l.bytes_out,
            "drop_overflow": l.drop_overflow,
            "drop_send_error": l.drop_send_error,
            "resends": l.resends,
            "pending": l.head - l.sent,
        }

    def latency_histogram(self):
        """(upper bounds in seconds, counts per bucket, sum in seconds) of
        ingest receive → last sendmmsg of that packet."""
        bounds = [LAT_BOUNDS_NS[k] / 1e9 for k in range(LAT_BUCKETS - 1)] + [float("inf")]
        counts = [self.lat_count[k] for k in range(LAT_BUCKETS)]
        return bounds, counts, self.lat_sum_ns / 1e9

    def batch_histogram(self):
        """(upper bounds, counts per bucket, sum) of messages per successful
        sendmmsg call; bounds are powers of two up to 1024."""
        bounds = [float(1 << k) for k in range(BATCH_BUCKETS)]
        counts = [self.batch_count[k] for k in range(BATCH_BUCKETS)]
        return bounds, counts, float(self.c_sendmmsg_messages)

    def memory_bytes(self):
        """Bytes the core allocated (address space; pages fill as used)."""
        return (self.capacity * (sizeof(Listener) + 2 * sizeof(int32_t)
                                 + self.depth * (self.slot_bytes + sizeof(uint16_t)))
                + self.rooms * (sizeof(Room) + self.depth * (self.slot_bytes + sizeof(uint16_t)))
                + TX_BATCH * (sizeof(mmsghdr) + sizeof(iovec) + sizeof(int32_t))
                + RX_BATCH * (sizeof(mmsghdr) + sizeof(iovec) + RX_BUF + RX_ADDR))
