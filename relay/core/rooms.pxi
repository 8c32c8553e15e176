# The room table, set up from Python: a room opened empty, the sources it
# takes packets from, and who may replace its live stream. These run on the
# loop thread, which is also the one that reads ingest; opening a room
# also resets what the shards have seen of it, so its caller holds every
# shard's lock. Included by relay/_core.pyx after rtp.pxi, whose source_of
# it shares.


cdef void room_reset(CoreState *c, int room, bint any_source) noexcept nogil:
    """An empty, active room with the default takeover rule."""
    cdef Room *r = &c.rm[room]
    cdef int k
    memset(r, 0, sizeof(Room))
    for k in range(MAX_SHARDS):
        r.first[k] = -1
    for k in range(c.shards):
        c.sh[k].hist_seen[room] = 0
    r.active = 1
    r.any_source = 1 if any_source else 0
    r.takeover_ns = TAKEOVER_NS


cdef void room_set_rules(Room *r, double takeover_s, bint pin_source, bint merge,
                         double max_pps, double max_bps) noexcept nogil:
    """See Core.room_rules."""
    r.takeover_ns = <int64_t>(takeover_s * 1e9) if takeover_s >= 0 else -1
    r.pin_source = 1 if pin_source else 0
    r.merge = 1 if merge else 0
    r.max_pps = max_pps if max_pps > 0 else 0
    r.max_bytes = max_bps / 8 if max_bps > 0 else 0
    r.pkt_tokens = r.max_pps
    r.byte_tokens = r.max_bytes


cdef void room_add_source(Room *r, const uint8_t *a, bint any_port) noexcept nogil:
    """Allow the raw sockaddr `a` (AF_INET or AF_INET6, checked by the
    caller) to publish; with any_port only its address must match."""
    cdef Source *s = &r.sources[r.n_sources]
    source_of(s, a)
    s.any_port = 1 if any_port else 0
    r.n_sources += 1
