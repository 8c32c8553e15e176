# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The fan-out core: packets in, per-listener rings, packets out, counters.

Data path (DESIGN.md):

    ingest fd --recvmmsg--> parse RTP, check source, rewrite numbering once per
    room --> memcpy into every listener's ring slot with that listener's SSRC,
    sequence and timestamp --> egress queue --sendmmsg, GIL released--> kernel

With several shards, each shard is a sender thread that owns a slice of the
arena: the event-loop thread reads ingest and writes each room packet once
into the room's history, then wakes the shards (an eventfd write, from C);
every shard copies the new packets into its own listeners' rings and sends
them on the shared socket, GIL released throughout.

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
from posix.unistd cimport read, write, close


cdef enum:
    TX_BATCH = 1024     # sendmmsg's own cap (UIO_MAXIOV)
    HIST_FACTOR = 2     # room history entries per ring slot
    RX_BATCH = 32
    RX_BUF = 2048       # larger datagrams are truncated and dropped as oversized
    RX_ADDR = 128       # sizeof(struct sockaddr_storage)
    RX_ROUNDS = 8       # recvmmsg calls per ingest() before yielding to the loop
    HDR = 12            # the RTP header we emit: no CSRC, no extension, no padding
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
                    250000000, 1000000000,
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
    """A relay node's data path: rooms, a listener arena and their rings.

    capacity: listeners the arena holds (allocated once).
    rooms: room slots; rooms are numbered 0..rooms-1 by the caller.
    depth: ring depth in packets, a power of two (resend window and burst).
    slot_bytes: bytes per ring slot; larger RTP payloads are dropped as oversized.
    shards: 1 fans out inline in the caller's thread (ingest() sends); more
        splits the arena into shards, each sent by its own thread running
        run_shard() (ingest() then only reads and wakes them).
    """

    cdef Listener *ls
    cdef Room *rm
    cdef Shard *sh
    cdef uint8_t *rings
    cdef uint16_t *ring_len
    cdef uint8_t *hist
    cdef uint16_t *hist_len
    cdef int64_t *hist_rx
    cdef mmsghdr *rx
    cdef iovec *rx_iov
    cdef uint8_t *rx_buf
    cdef uint8_t *rx_addr

    cdef readonly int capacity
    cdef readonly int rooms
    cdef readonly int depth
    cdef readonly int slot_bytes
    cdef readonly int shards
    cdef readonly int listeners
    # readable when a pull (QUIC) listener has new packets in its ring
    cdef readonly int pull_fd
    cdef uint32_t mask
    cdef uint32_t hist_depth
    cdef uint32_t hist_mask

    # counters of the ingest side, read at scrape time
    cdef uint64_t c_rx_datagrams
    cdef uint64_t c_no_room
    cdef uint64_t c_rtcp_ignored
    cdef uint64_t c_resends

    def __cinit__(self, int capacity, int rooms=16, int depth=16, int slot_bytes=480, int shards=1):
        cdef int i, k, per
        cdef Shard *s
        if capacity < 1 or rooms < 1:
            raise ValueError("capacity and rooms must be at least 1")
        if depth < 2 or depth > 4096 or (depth & (depth - 1)) != 0:
            raise ValueError("depth must be a power of two between 2 and 4096")
        if slot_bytes < HDR + 1 or slot_bytes > RX_BUF:
            raise ValueError(f"slot_bytes must be between {HDR + 1} and {RX_BUF}")
        if shards < 1 or shards > MAX_SHARDS or shards > capacity:
            raise ValueError(f"shards must be between 1 and {min(MAX_SHARDS, capacity)}")
        self.capacity = capacity
        self.rooms = rooms
        self.depth = depth
        self.mask = depth - 1
        self.hist_depth = HIST_FACTOR * depth
        self.hist_mask = HIST_FACTOR * depth - 1
        self.slot_bytes = slot_bytes
        self.shards = shards
        # calloc'd ring memory is only backed by pages once a listener writes
        # to it, so an idle arena costs address space, not resident memory.
        self.ls = <Listener *>_alloc(capacity, sizeof(Listener))
        self.rm = <Room *>_alloc(rooms, sizeof(Room))
        self.pull_fd = -1
        self.sh = <Shard *>_alloc(shards, sizeof(Shard))
        self.rings = <uint8_t *>_alloc(<size_t>capacity * depth, slot_bytes)
        self.ring_len = <uint16_t *>_alloc(<size_t>capacity * depth, sizeof(uint16_t))
        # the room history is twice the ring depth: shards read at most
        # depth - 1 entries behind the head, so the ingest thread would have
        # to accept depth more packets during one entry's fan-out before it
        # could overwrite the entry being read
        self.hist = <uint8_t *>_alloc(<size_t>rooms * HIST_FACTOR * depth, slot_bytes)
        self.hist_len = <uint16_t *>_alloc(<size_t>rooms * HIST_FACTOR * depth, sizeof(uint16_t))
        self.hist_rx = <int64_t *>_alloc(<size_t>rooms * HIST_FACTOR * depth, sizeof(int64_t))
        self.rx = <mmsghdr *>_alloc(RX_BATCH, sizeof(mmsghdr))
        self.rx_iov = <iovec *>_alloc(RX_BATCH, sizeof(iovec))
        self.rx_buf = <uint8_t *>_alloc(RX_BATCH, RX_BUF)
        self.rx_addr = <uint8_t *>_alloc(RX_BATCH, RX_ADDR)
        per = (capacity + shards - 1) // shards
        for k in range(shards):
            s = &self.sh[k]
            s.efd = -1
            s.lo = min(k * per, capacity)
            s.hi = min(s.lo + per, capacity)
            s.free_list = <int32_t *>_alloc(max(1, s.hi - s.lo), sizeof(int32_t))
            s.queue = <int32_t *>_alloc(max(1, s.hi - s.lo), sizeof(int32_t))
            s.tx = <mmsghdr *>_alloc(TX_BATCH, sizeof(mmsghdr))
            s.tx_iov = <iovec *>_alloc(TX_BATCH, sizeof(iovec))
            s.tx_owner = <int32_t *>_alloc(TX_BATCH, sizeof(int32_t))
            s.hist_seen = <uint32_t *>_alloc(rooms, sizeof(uint32_t))
            pthread_mutex_init(&s.lock, NULL)
            s.efd = eventfd(0, EFD_CLOEXEC)
            if s.efd < 0:
                raise OSError(errno, "eventfd failed")
            # hand out low slots first so a small crowd stays in few pages
            for i in range(s.hi - s.lo):
                s.free_list[i] = s.hi - 1 - i
            s.n_free = s.hi - s.lo
            for i in range(TX_BATCH):
                s.tx[i].msg_hdr.msg_iov = &s.tx_iov[i]
                s.tx[i].msg_hdr.msg_iovlen = 1
        self.pull_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.pull_fd < 0:
            raise OSError(errno, "eventfd failed")
        for i in range(RX_BATCH):
            self.rx_iov[i].iov_base = self.rx_buf + <size_t>i * RX_BUF
            self.rx_iov[i].iov_len = RX_BUF
            self.rx[i].msg_hdr.msg_iov = &self.rx_iov[i]
            self.rx[i].msg_hdr.msg_iovlen = 1
        for i in range(rooms):
            for k in range(MAX_SHARDS):
                self.rm[i].first[k] = -1

    def __dealloc__(self):
        cdef int k
        if self.sh != NULL:
            for k in range(self.shards):
                _free(self.sh[k].free_list)
                _free(self.sh[k].queue)
                _free(self.sh[k].tx)
                _free(self.sh[k].tx_iov)
                _free(self.sh[k].tx_owner)
                _free(self.sh[k].hist_seen)
                if self.sh[k].efd >= 0:
                    close(self.sh[k].efd)
                    pthread_mutex_destroy(&self.sh[k].lock)
        if self.pull_fd >= 0:
            close(self.pull_fd)
        _free(self.ls)
        _free(self.rm)
        _free(self.sh)
        _free(self.rings)
        _free(self.ring_len)
        _free(self.hist)
        _free(self.hist_len)
        _free(self.hist_rx)
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
        cdef int k
        if r.active:
            raise ValueError(f"room {room} is already open")
        self._lock_all()
        memset(r, 0, sizeof(Room))
        for k in range(MAX_SHARDS):
            r.first[k] = -1
        for k in range(self.shards):
            self.sh[k].hist_seen[room] = 0
        r.active = 1
        r.any_source = any_source
        self._unlock_all()

    def room_close(self, int room):
        """Stop the room. Its listeners must have been removed first."""
        cdef Room *r = self._room(room)
        if r.n_listeners:
            raise ValueError(f"room {room} still has {r.n_listeners} listeners")
        r.active = 0
        r.n_sources = 0

    def room_listeners(self, int room):
        """Listeners in `room` (the count admission checks per join)."""
        return self._room(room).n_listeners

    def room_clear_sources(self, int room):
        """Forget the room's allowed sources (before allowing a new list)."""
        cdef Room *r = self._room(room)
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

    # ---------------------------------------------------------------- locking

    cdef inline void _lock(self, int k) noexcept nogil:
        pthread_mutex_lock(&self.sh[k].lock)

    cdef inline void _unlock(self, int k) noexcept nogil:
        pthread_mutex_unlock(&self.sh[k].lock)

    cdef void _lock_all(self) noexcept nogil:
        cdef int k
        for k in range(self.shards):
            pthread_mutex_lock(&self.sh[k].lock)

    cdef void _unlock_all(self) noexcept nogil:
        cdef int k
        for k in range(self.shards):
            pthread_mutex_unlock(&self.sh[k].lock)

    cdef inline void _wake(self, int k) noexcept nogil:
        cdef uint64_t one = 1
        write(self.sh[k].efd, &one, sizeof(one))

    # -------------------------------------------------------------- listeners

    def listener_add(self, int room, bytes sockaddr, uint32_t ssrc, uint16_t seq_off,
                     uint32_t ts_off, bint pull=False, int burst=0, int64_t now_ns=-1):
        """Put a listener into `room` on the least loaded shard; returns its
        slot, or -1 if the arena is full. `sockaddr` is where sendmmsg sends
        (ignored for pull listeners). Up to `burst` recent room packets are
        queued at once so playback can start without waiting."""
        cdef Room *r = self._room(room)
        cdef Listener *l
        cdef Shard *s
        cdef int32_t i
        cdef int k, best = -1
        cdef uint8_t was_queued
        cdef uint32_t j, n, start
        cdef uint8_t *src
        if not r.active:
            raise ValueError(f"room {room} is not open")
        if not pull and (len(sockaddr) < 16 or len(sockaddr) > ADDR_MAX):
            raise ValueError("sockaddr must be 16..28 bytes")
        for k in range(self.shards):
            if self.sh[k].n_free > 0 and (best < 0 or self.sh[k].listeners < self.sh[best].listeners):
                best = k
        if best < 0:
            return -1
        if now_ns < 0:
            now_ns = _now_ns()
        s = &self.sh[best]
        self._lock(best)
        s.n_free -= 1
        i = s.free_list[s.n_free]
        l = &self.ls[i]
        # `queued` survives reuse on purpose: a stale queue entry for this slot
        # may still be waiting, and it now simply serves the new listener.
        was_queued = l.queued
        memset(l, 0, sizeof(Listener))
        l.queued = was_queued
        l.active = 1
        l.pull = pull
        l.room = room
        l.shard = best
        l.ssrc = ssrc
        l.seq_off = seq_off
        l.ts_off = ts_off
        if not pull:
            l.addrlen = len(sockaddr)
            memcpy(l.addr, <const uint8_t *>sockaddr, l.addrlen)
        l.prev = -1
        l.next = r.first[best]
        if r.first[best] >= 0:
            self.ls[r.first[best]].prev = i
        r.first[best] = i
        s.listeners += 1
        if burst > 0 and r.have_stream and now_ns - r.last_rx_ns < BURST_FRESH_NS:
            # only what this shard has already fanned out: the rest reaches
            # the new listener through the shard's next fan-out
            n = min(<uint32_t>burst, s.hist_seen[room], <uint32_t>self.depth - 1)
            start = s.hist_seen[room] - n
            for j in range(start, s.hist_seen[room]):
                k = room * self.hist_depth + (j & self.hist_mask)
                src = self.hist + <size_t>k * self.slot_bytes
                self._write(s, i, src, self.hist_len[k], _be16(src + 2), _be32(src + 4))
        self._unlock(best)
        r.n_listeners += 1
        self.listeners += 1
        if s.running and s.q_len:
            self._wake(best)
        return i

    cdef Listener *_listener(self, int slot) except NULL:
        if slot < 0 or slot >= self.capacity or not self.ls[slot].active:
            raise ValueError(f"no listener in slot {slot}")
        return &self.ls[slot]

    def listener_remove(self, int slot):
        """Take the listener out of its room and return its slot to the free list."""
        cdef Listener *l = self._listener(slot)
        cdef Room *r = &self.rm[l.room]
        cdef int k = l.shard
        cdef Shard *s = &self.sh[k]
        self._lock(k)
        if l.prev >= 0:
            self.ls[l.prev].next = l.next
        else:
            r.first[k] = l.next
        if l.next >= 0:
            self.ls[l.next].prev = l.prev
        l.active = 0
        l.head = l.sent = 0
        s.free_list[s.n_free] = slot
        s.n_free += 1
        s.listeners -= 1
        self._unlock(k)
        r.n_listeners -= 1
        self.listeners -= 1

    # ------------------------------------------------------------- hot path

    cdef inline void _write(self, Shard *s, int32_t i, const uint8_t *src, uint16_t n,
                            uint16_t seq, uint32_t ts) noexcept nogil:
        """Copy one room packet (room numbering `seq`, `ts`) into listener
        i's ring with its own SSRC, sequence and timestamp."""
        cdef Listener *l = &self.ls[i]
        cdef size_t at
        cdef uint8_t *dst
        cdef int32_t tail
        if l.head - l.sent >= <uint32_t>self.depth:
            # ring full of unsent packets: live audio drops the oldest
            l.sent += 1
            l.drop_overflow += 1
            s.drop_overflow += 1
        at = <size_t>i * self.depth + (l.head & self.mask)
        dst = self.rings + at * self.slot_bytes
        memcpy(dst, src, n)
        relay_put_header(dst, <uint16_t>(seq + l.seq_off), ts + l.ts_off, l.ssrc)
        self.ring_len[at] = n
        l.head += 1
        if l.pull:
            s.pull_ready = 1
        elif not l.queued:
            l.queued = 1
            tail = s.q_head + s.q_len
            if tail >= s.hi - s.lo:
                tail -= s.hi - s.lo
            s.queue[tail] = i
            s.q_len += 1

    cdef int _accept(self, int room, const uint8_t *pkt, Py_ssize_t n,
                     const uint8_t *src, int64_t now) noexcept nogil:
        """Check one ingest datagram and, if it is good, rewrite it into the
        room's history with the room's continuous numbering."""
        cdef Room *r
        cdef uint8_t b0, pt
        cdef Py_ssize_t off, end, plen, ext
        cdef uint16_t seq
        cdef uint32_t ts, ssrc
        cdef int16_t delta
        cdef uint8_t *h
        cdef int32_t i
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
        i = room * self.hist_depth + (r.hist_head & self.hist_mask)
        h = self.hist + <size_t>i * self.slot_bytes
        h[0] = 0x80
        h[1] = pkt[1]
        _put16(h + 2, r.out_seq)
        _put32(h + 4, r.out_ts)
        _put32(h + 8, 0)
        memcpy(h + HDR, pkt + off, plen)
        self.hist_len[i] = <uint16_t>(HDR + plen)
        self.hist_rx[i] = now
        relay_store_release(&r.hist_head, r.hist_head + 1)
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

    cdef void _fanout(self, int k) noexcept nogil:
        """Copy every room packet shard k has not seen into its listeners'
        rings. Caller holds the shard's lock."""
        cdef Shard *s = &self.sh[k]
        cdef Room *r
        cdef int room, at
        cdef uint32_t head, h, ts
        cdef uint16_t seq, n
        cdef uint8_t *src
        cdef int32_t i
        for room in range(self.rooms):
            r = &self.rm[room]
            head = relay_load_acquire(&r.hist_head)
            h = s.hist_seen[room]
            if h == head:
                continue
            if head - h >= <uint32_t>self.depth:
                # this shard fell a whole history behind: those packets are
                # gone, and the oldest slot may be being rewritten right now
                s.drop_lag += head - h - (self.depth - 1)
                h = head - (self.depth - 1)
            while h != head:
                at = room * self.hist_depth + (h & self.hist_mask)
                src = self.hist + <size_t>at * self.slot_bytes
                n = self.hist_len[at]
                seq = _be16(src + 2)
                ts = _be32(src + 4)
                i = r.first[k]
                while i >= 0:
                    self._write(s, i, src, n, seq, ts)
                    i = self.ls[i].next
                if s.pend_n < PEND_MAX:
                    s.pend_rx[s.pend_n] = self.hist_rx[at]
                    s.pend_n += 1
                else:
                    s.lat_dropped += 1
                h += 1
            s.hist_seen[room] = head
        if s.pull_ready:
            s.pull_ready = 0
            self._wake_pull()

    cdef inline void _wake_pull(self) noexcept nogil:
        cdef uint64_t one = 1
        write(self.pull_fd, &one, sizeof(one))

    cdef int _flush(self, int k, int fd) noexcept nogil:
        """Send every queued ring packet of shard k; 0 when drained, 1 when
        the socket would block (call again once it is writable). Caller
        holds the shard's lock."""
        cdef Shard *s = &self.sh[k]
        cdef int32_t qi, i, j, qcap = s.hi - s.lo
        cdef int n, done, rc, err
        cdef uint32_t sent, at
        cdef Listener *l
        cdef uint8_t *base
        cdef uint16_t *lens
        cdef int32_t qpos
        while s.q_len > 0:
            n = 0
            qi = 0
            qpos = s.q_head
            while qi < s.q_len and n < TX_BATCH:
                i = s.queue[qpos]
                qpos += 1
                if qpos == qcap:
                    qpos = 0
                l = &self.ls[i]
                if l.active and not l.pull:
                    sent = l.sent
                    base = self.rings + <size_t>i * self.depth * self.slot_bytes
                    lens = self.ring_len + <size_t>i * self.depth
                    while sent != l.head and n < TX_BATCH:
                        at = sent & self.mask
                        s.tx_iov[n].iov_base = base + <size_t>at * self.slot_bytes
                        s.tx_iov[n].iov_len = lens[at]
                        s.tx[n].msg_hdr.msg_name = l.addr
                        s.tx[n].msg_hdr.msg_namelen = l.addrlen
                        s.tx_owner[n] = i
                        n += 1
                        sent += 1
                    if sent != l.head:
                        break
                qi += 1
            done = 0
            while done < n:
                rc = sendmmsg(fd, s.tx + done, n - done, MSG_DONTWAIT)
                s.sendmmsg_calls += 1
                if rc > 0:
                    s.sendmmsg_messages += rc
                    self._observe_batch(s, rc)
                    for j in range(done, done + rc):
                        l = &self.ls[s.tx_owner[j]]
                        l.sent += 1
                        l.packets_out += 1
                        l.bytes_out += s.tx_iov[j].iov_len
                        s.bytes_out += s.tx_iov[j].iov_len
                    s.packets_out += rc
                    done += rc
                    continue
                err = errno
                if err == EINTR:
                    continue
                if err == EAGAIN or err == ENOBUFS:
                    s.would_block += 1
                    self._pop_sent(s)
                    s.blocked = 1
                    return 1
                # this one message failed on its own (e.g. unreachable
                # address): count it, skip it, resubmit the rest
                l = &self.ls[s.tx_owner[done]]
                l.sent += 1
                l.drop_send_error += 1
                s.drop_send_error += 1
                done += 1
            self._pop_sent(s)
        s.blocked = 0
        self._observe_latency(s)
        return 0

    cdef inline void _pop_sent(self, Shard *s) noexcept nogil:
        cdef Listener *l
        while s.q_len > 0:
            l = &self.ls[s.queue[s.q_head]]
            if l.active and not l.pull and l.sent != l.head:
                return
            l.queued = 0
            s.q_head += 1
            if s.q_head == s.hi - s.lo:
                s.q_head = 0
            s.q_len -= 1

    cdef inline void _observe_batch(self, Shard *s, int n) noexcept nogil:
        # bucket b holds batches of at most 2**b messages
        cdef int b = 0
        while (1 << b) < n:
            b += 1
        s.batch_count[b] += 1

    cdef void _observe_latency(self, Shard *s) noexcept nogil:
        cdef int64_t now, d
        cdef int j, b
        if s.pend_n == 0:
            return
        now = _now_ns()
        for j in range(s.pend_n):
            d = now - s.pend_rx[j]
            b = 0
            while d > LAT_BOUNDS_NS[b]:
                b += 1
            s.lat_count[b] += 1
            s.lat_sum_ns += d
        s.pend_n = 0

    def ingest(self, int in_fd, int room, int out_fd, int budget=65536):
        """Drain `in_fd` (a room's RTP socket) with recvmmsg and accept each
        good packet into the room. With one shard the packets are also
        fanned out and sent on `out_fd` here; with more, the shard threads
        are woken to do it. Returns the datagrams read. Stops after about
        `budget` listener-packets (at least one batch) so a big room cannot
        starve the event loop; `blocked` tells whether egress filled up."""
        cdef int rounds, got, j, batch, k
        cdef int total = 0
        cdef int inline = not self.sh[0].running
        cdef int64_t now
        cdef uint64_t work = 0
        cdef msghdr *m
        cdef int n_listen = self.rm[room].n_listeners if 0 <= room < self.rooms else 0
        # an inline fan-out flushes between rounds, so a round must not overrun a ring
        batch = min(<int>RX_BATCH, self.depth // 2 if self.depth > 2 else 1)
        if n_listen > 0:
            batch = max(1, min(batch, budget // n_listen))
        with nogil:
            for rounds in range(RX_ROUNDS):
                if work >= <uint64_t>budget:
                    break
                for j in range(batch):
                    self.rx[j].msg_hdr.msg_name = self.rx_addr + j * RX_ADDR
                    self.rx[j].msg_hdr.msg_namelen = RX_ADDR
                    self.rx[j].msg_hdr.msg_flags = 0
                got = recvmmsg(in_fd, self.rx, batch, MSG_DONTWAIT, NULL)
                if got <= 0:
                    break
                now = _now_ns()
                total += got
                self.c_rx_datagrams += got
                for j in range(got):
                    m = &self.rx[j].msg_hdr
                    self._accept(room, self.rx_buf + j * RX_BUF,
                                 RX_BUF + 1 if m.msg_flags & MSG_TRUNC else self.rx[j].msg_len,
                                 self.rx_addr + j * RX_ADDR, now)
                work += <uint64_t>got * n_listen
                if inline:
                    self._fanout(0)
                    if self._flush(0, out_fd):
                        break
                else:
                    for k in range(self.shards):
                        self._wake(k)
                if got < batch:
                    break
        return total

    @property
    def blocked(self):
        """1 if the inline egress socket filled up and flush() must be
        called again once it is writable."""
        return self.sh[0].blocked

    def flush(self, int fd):
        """Inline mode: send what is queued; returns 1 if the socket would
        block. With shard threads running it only wakes them."""
        cdef int rc = 0, k
        if self.sh[0].running:
            for k in range(self.shards):
                self._wake(k)
            return 0
        with nogil:
            self._fanout(0)
            rc = self._flush(0, fd)
        return rc

    def feed(self, int room, const uint8_t[:] packet, bytes source, int64_t now_ns=-1):
        """Accept one datagram as if it had arrived from `source` (raw
        sockaddr) at monotonic time `now_ns` (default: now), and copy it into
        the rings (inline mode) or wake the shards. Returns an Ingest code.
        Nothing is sent until flush(). For tests and for relays that receive
        through Python (an upstream QUIC hop)."""
        if len(source) < 16:
            raise ValueError("source sockaddr too short")
        cdef Py_ssize_t n = packet.shape[0]
        cdef const uint8_t *p = &packet[0] if n > 0 else <const uint8_t *>b""
        cdef int rc, k
        self.c_rx_datagrams += 1
        rc = self._accept(room, p, n, <const uint8_t *>source, now_ns if now_ns >= 0 else _now_ns())
        if self.sh[0].running:
            for k in range(self.shards):
                self._wake(k)
        else:
            self._fanout(0)
        return rc

    # ----------------------------------------------------------- shard threads

    def run_shard(self, int k, int fd):
        """The body of shard k's sender thread: wait for new room packets,
        copy them into this shard's rings and send them on `fd`, until
        stop_shards(). Runs entirely without the GIL."""
        if k < 0 or k >= self.shards:
            raise ValueError(f"no shard {k}")
        cdef Shard *s = &self.sh[k]
        cdef pollfd pf[2]
        cdef uint64_t ticks
        cdef int64_t t0
        cdef int rc
        if s.running:
            raise RuntimeError(f"shard {k} is already running")
        s.stop = 0
        s.running = 1
        with nogil:
            while not s.stop:
                pf[0].fd = s.efd
                pf[0].events = POLLIN
                pf[0].revents = 0
                pf[1].fd = fd
                pf[1].events = POLLOUT if s.blocked else 0
                pf[1].revents = 0
                # the timeout is a safety net; wake-ups come from the eventfd
                rc = poll(pf, 2, 200)
                if pf[0].revents & POLLIN:
                    read(s.efd, &ticks, sizeof(ticks))
                t0 = _now_ns()
                self._lock(k)
                self._fanout(k)
                self._flush(k, fd)
                self._unlock(k)
                s.busy_ns += _now_ns() - t0
        s.running = 0
        return 0

    def stop_shards(self):
        """Ask every shard thread to return from run_shard()."""
        cdef int k
        for k in range(self.shards):
            self.sh[k].stop = 1
            self._wake(k)

    def stop_shard(self, int k):
        """Ask one shard thread to return (tests use it to play a dead sender)."""
        if k < 0 or k >= self.shards:
            raise ValueError(f"no shard {k}")
        self.sh[k].stop = 1
        self._wake(k)

    def settled(self):
        """True when every shard has fanned out every room packet and sent
        all it can: what tests wait for before comparing with the model."""
        cdef int k, room
        for k in range(self.shards):
            if self.sh[k].q_len:
                return False
            for room in range(self.rooms):
                if self.rm[room].active and self.sh[k].hist_seen[room] != relay_load_acquire(&self.rm[room].hist_head):
                    return False
        return True

    def shard_running(self, int k):
        """True while shard k's thread is inside run_shard()."""
        return bool(self.sh[k].running)

    def shard_of(self, int slot):
        """The shard that owns a listener slot."""
        return self._listener(slot).shard

    # ------------------------------------------------------------ listener I/O

    def ring(self, int slot):
        """The packets still held in a listener's ring, oldest first (sent or
        not): what a NACK can be answered from."""
        cdef Listener *l = self._listener(slot)
        cdef uint32_t j, start
        cdef size_t at
        out = []
        self._lock(l.shard)
        start = l.head - min(l.head, <uint32_t>self.depth)
        for j in range(start, l.head):
            at = <size_t>slot * self.depth + (j & self.mask)
            out.append(self.rings[at * self.slot_bytes: at * self.slot_bytes + self.ring_len[at]])
        self._unlock(l.shard)
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
        if not l.pull:
            raise ValueError(f"slot {slot} is not a pull listener")
        self._lock(l.shard)
        if not self.sh[l.shard].running:
            self._fanout(l.shard)
        while l.sent != l.head and len(out) < max_packets:
            at = <size_t>slot * self.depth + (l.sent & self.mask)
            out.append(self.rings[at * self.slot_bytes: at * self.slot_bytes + self.ring_len[at]])
            l.sent += 1
            l.packets_out += 1
            l.bytes_out += self.ring_len[at]
        self._unlock(l.shard)
        return out

    def resend(self, int fd, int slot, int seq):
        """Send the ring packet with this listener-side sequence number again
        (a NACK). Returns 1 if sent, 0 if no longer in the ring or not yet
        sent, -1 if the socket refused it."""
        cdef Listener *l = self._listener(slot)
        cdef uint32_t j, start
        cdef size_t at
        cdef uint8_t *p
        cdef ssize_t rc = 0
        cdef int found = 0
        if l.pull:
            return 0
        self._lock(l.shard)
        start = l.head - min(l.head, <uint32_t>self.depth)
        for j in range(start, l.sent):
            at = <size_t>slot * self.depth + (j & self.mask)
            p = self.rings + at * self.slot_bytes
            if _be16(p + 2) == seq:
                rc = sendto(fd, p, self.ring_len[at], MSG_DONTWAIT, <const sockaddr *>l.addr, l.addrlen)
                found = 1
                if rc >= 0:
                    l.resends += 1
                    self.c_resends += 1
                break
        self._unlock(l.shard)
        if not found:
            return 0
        return 1 if rc >= 0 else -1

    # --------------------------------------------------------------- counters

    def counters(self):
        """Node-wide counters, summed over rooms and shards."""
        cdef int k
        cdef uint64_t pin = 0, bin_ = 0, fo = 0, ma = 0, ov = 0, la = 0, rs = 0
        cdef uint64_t po = 0, bo = 0, calls = 0, msgs = 0, wb = 0, dov = 0, dse = 0, lag = 0
        cdef int64_t queued = 0
        for k in range(self.rooms):
            pin += self.rm[k].packets_in
            bin_ += self.rm[k].bytes_in
            fo += self.rm[k].drop_foreign
            ma += self.rm[k].drop_malformed
            ov += self.rm[k].drop_oversized
            la += self.rm[k].drop_late
            rs += self.rm[k].source_restarts
        for k in range(self.shards):
            po += self.sh[k].packets_out
            bo += self.sh[k].bytes_out
            calls += self.sh[k].sendmmsg_calls
            msgs += self.sh[k].sendmmsg_messages
            wb += self.sh[k].would_block
            dov += self.sh[k].drop_overflow
            dse += self.sh[k].drop_send_error
            lag += self.sh[k].drop_lag
            queued += self.sh[k].q_len
        return {
            "rx_datagrams": self.c_rx_datagrams,
            "packets_in": pin,
            "bytes_in": bin_,
            "packets_out": po,
            "bytes_out": bo,
            "sendmmsg_calls": calls,
            "sendmmsg_messages": msgs,
            "would_block": wb,
            "resends": self.c_resends,
            "source_restarts": rs,
            "rtcp_ignored": self.c_rtcp_ignored,
            "drop_no_room": self.c_no_room,
            "drop_foreign": fo,
            "drop_malformed": ma,
            "drop_oversized": ov,
            "drop_late": la,
            "drop_overflow": dov,
            "drop_send_error": dse,
            "drop_shard_lag": lag,
            "listeners": self.listeners,
            "queued": queued,
        }

    def busy_ns(self):
        """Per shard: nanoseconds its sender thread has spent fanning out and
        sending. Its rate of change is the shard's duty cycle, the node's
        measure of how close it is to what one core can send."""
        return [self.sh[k].busy_ns for k in range(self.shards)]

    def shard_listeners(self):
        """Listeners per shard."""
        return [self.sh[k].listeners for k in range(self.shards)]

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
            "shard": l.shard,
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
        ingest receive → last sendmmsg of that packet, over all shards."""
        cdef int k, b
        bounds = [LAT_BOUNDS_NS[b] / 1e9 for b in range(LAT_BUCKETS - 1)] + [float("inf")]
        counts = [sum(self.sh[k].lat_count[b] for k in range(self.shards)) for b in range(LAT_BUCKETS)]
        return bounds, counts, sum(self.sh[k].lat_sum_ns for k in range(self.shards)) / 1e9

    def batch_histogram(self):
        """(upper bounds, counts per bucket, sum) of messages per successful
        sendmmsg call; bounds are powers of two up to 1024."""
        cdef int k, b
        bounds = [float(1 << b) for b in range(BATCH_BUCKETS)]
        counts = [sum(self.sh[k].batch_count[b] for k in range(self.shards)) for b in range(BATCH_BUCKETS)]
        return bounds, counts, float(sum(self.sh[k].sendmmsg_messages for k in range(self.shards)))
