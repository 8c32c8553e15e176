# Fan-out: every room packet a shard has not seen yet is copied from the
# room's history into each of the shard's listeners' rings, with that
# listener's SSRC, sequence and timestamp written into the header. A ring
# that is full of unsent packets drops its oldest (counted). Included by
# relay/_core.pyx; runs without the GIL, with the shard's lock held.

# Only recent audio is burst to a new listener; a stale burst is worse than none.
cdef int64_t BURST_FRESH_NS = 1000000000


cdef extern from *:
    """
    /* the per-listener header rewrite: seq, ts and SSRC in network order,
       written as three unaligned stores instead of byte by byte */
    static inline void relay_put_header(uint8_t *dst, uint16_t seq, uint32_t ts, uint32_t ssrc) {
        uint16_t s = __builtin_bswap16(seq);
        uint32_t t = __builtin_bswap32(ts), c = __builtin_bswap32(ssrc);
        __builtin_memcpy(dst + 2, &s, 2);
        __builtin_memcpy(dst + 4, &t, 4);
        __builtin_memcpy(dst + 8, &c, 4);
    }
    """
    void relay_put_header(uint8_t *dst, uint16_t seq, uint32_t ts, uint32_t ssrc) nogil


cdef inline void write_slot(CoreState *c, Shard *s, int32_t i, const uint8_t *src, uint16_t n,
                            uint16_t seq, uint32_t ts) noexcept nogil:
    """Copy one room packet (room numbering `seq`, `ts`) into listener i's
    ring with its own SSRC, sequence and timestamp, and queue it for egress."""
    cdef Listener *l = &c.ls[i]
    cdef uint8_t *dst = ring_push(c, s, i, n)
    memcpy(dst, src, n)
    relay_put_header(dst, <uint16_t>(seq + l.seq_off), ts + l.ts_off, l.ssrc)
    if l.pull:
        s.pull_ready = 1
    else:
        enqueue(s, l, i)


cdef inline void enqueue(Shard *s, Listener *l, int32_t i) noexcept nogil:
    """Put listener i on its shard's egress queue, unless it is there."""
    cdef int32_t end
    if not l.queued:
        l.queued = 1
        end = s.q_head + s.q_len
        if end >= s.hi - s.lo:
            end -= s.hi - s.lo
        s.queue[end] = i
        s.q_len += 1


cdef void fanout_shard(CoreState *c, int k) noexcept nogil:
    """Copy every room packet shard k has not seen into its listeners' rings."""
    cdef Shard *s = &c.sh[k]
    cdef Room *r
    cdef int room
    cdef uint32_t head, h, ts, at
    cdef uint16_t seq, n
    cdef uint8_t *src
    cdef int32_t i
    for room in range(c.rooms):
        r = &c.rm[room]
        head = relay_load_acquire(&r.hist_head)
        h = s.hist_seen[room]
        if h == head:
            continue
        if head - h >= <uint32_t>c.depth:
            # this shard fell a whole history behind: those packets are
            # gone, and the oldest slot may be being rewritten right now
            s.drop_lag += head - h - <uint32_t>(c.depth - 1)
            h = head - <uint32_t>(c.depth - 1)
        while h != head:
            at = <uint32_t>room * c.hist_depth + (h & c.hist_mask)
            src = c.hist + <size_t>at * <size_t>c.ring_bytes
            n = c.hist_len[at]
            seq = be16(src + 2)
            ts = be32(src + 4)
            i = r.first[k]
            while i >= 0:
                write_slot(c, s, i, src, n, seq, ts)
                i = c.ls[i].next
            if s.pend_n < PEND_MAX:
                s.pend_rx[s.pend_n] = c.hist_rx[at]
                s.pend_n += 1
            else:
                s.lat_dropped += 1
            h += 1
        s.hist_seen[room] = head
    if s.pull_ready:
        s.pull_ready = 0
        wake_pull(c)


cdef void burst_recent(CoreState *c, Shard *s, int room, int32_t i, int packets, int64_t now) noexcept nogil:
    """Queue up to `packets` recent room packets for a new listener so its
    playback starts at once. Only what this shard has already fanned out:
    the rest reaches the listener through the shard's next fan-out."""
    cdef Room *r = &c.rm[room]
    cdef uint32_t j, n, start, at
    cdef uint8_t *src
    if packets <= 0 or not r.have_stream or now - r.last_rx_ns >= BURST_FRESH_NS:
        return
    n = <uint32_t>packets
    if n > s.hist_seen[room]:
        n = s.hist_seen[room]
    if n > <uint32_t>c.depth - 1:
        n = <uint32_t>c.depth - 1
    start = s.hist_seen[room] - n
    for j in range(start, s.hist_seen[room]):
        at = <uint32_t>room * c.hist_depth + (j & c.hist_mask)
        src = c.hist + <size_t>at * <size_t>c.ring_bytes
        write_slot(c, s, i, src, c.hist_len[at], be16(src + 2), be32(src + 4))
