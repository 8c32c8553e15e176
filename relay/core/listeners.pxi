# Joining and leaving: a listener takes a slot from its shard's free list
# and is linked into its room's per-shard list; leaving unlinks it and gives
# the slot back. The arena never grows or shrinks. Included by
# relay/_core.pyx; called with the shard's lock held.


cdef int _sockaddr_len_ok(bytes sockaddr):
    """A raw sockaddr the core may read: AF_INET needs 16 bytes, AF_INET6
    28 (the core compares the 16-byte address at offset 8)."""
    cdef Py_ssize_t n = len(sockaddr)
    if n < 16 or n > ADDR_MAX:
        return 0
    if (<const uint16_t *><const char *>sockaddr)[0] == AF_INET6:
        return n >= 28
    return 1


cdef int least_loaded_shard(CoreState *c) noexcept nogil:
    """The shard with a free slot and the fewest listeners, or -1 if full.
    n_free and listeners change only on the thread that joins and leaves."""
    cdef int k, best = -1
    for k in range(c.shards):
        if c.sh[k].n_free > 0 and (best < 0 or c.sh[k].listeners < c.sh[best].listeners):
            best = k
    return best


cdef int32_t listener_take(CoreState *c, int k, int room, const uint8_t *addr, uint8_t addrlen,
                           uint32_t ssrc, uint16_t seq_off, uint32_t ts_off) noexcept nogil:
    """Take a free slot of shard k for a listener of `room` (addrlen 0: a
    pull listener, drained by its transport instead of sendmmsg)."""
    cdef Shard *s = &c.sh[k]
    cdef int32_t i
    cdef Listener *l
    cdef uint8_t was_queued
    s.n_free -= 1
    i = s.free_list[s.n_free]
    l = &c.ls[i]
    # `queued` survives reuse on purpose: a stale queue entry for this slot
    # may still be waiting, and it now simply serves the new listener.
    was_queued = l.queued
    memset(l, 0, sizeof(Listener))
    l.queued = was_queued
    l.active = 1
    l.pull = 1 if addrlen == 0 else 0
    l.room = room
    l.shard = k
    l.ssrc = ssrc
    l.seq_off = seq_off
    l.ts_off = ts_off
    l.addrlen = addrlen
    memcpy(l.addr, addr, addrlen)
    listener_link(c, i)
    s.listeners += 1
    return i


cdef void listener_unlink(CoreState *c, int32_t slot) noexcept nogil:
    """Take the listener out of its room's list for its shard."""
    cdef Listener *l = &c.ls[slot]
    if l.prev >= 0:
        c.ls[l.prev].next = l.next
    else:
        c.rm[l.room].first[l.shard] = l.next
    if l.next >= 0:
        c.ls[l.next].prev = l.prev
    l.prev = l.next = -1


cdef void listener_link(CoreState *c, int32_t slot) noexcept nogil:
    """Put the listener at the head of its room's list for its shard."""
    cdef Listener *l = &c.ls[slot]
    cdef Room *r = &c.rm[l.room]
    l.prev = -1
    l.next = r.first[l.shard]
    if r.first[l.shard] >= 0:
        c.ls[r.first[l.shard]].prev = slot
    r.first[l.shard] = slot


cdef void listener_release(CoreState *c, int32_t slot) noexcept nogil:
    """Unlink the listener from its room and return its slot."""
    cdef Listener *l = &c.ls[slot]
    cdef int k = l.shard
    cdef Shard *s = &c.sh[k]
    if not l.held:
        listener_unlink(c, slot)
    l.held = 0
    l.active = 0
    l.head = l.sent = l.tail = l.wr = 0
    s.free_list[s.n_free] = slot
    s.n_free += 1
    s.listeners -= 1
