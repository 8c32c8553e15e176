# RTP checks and the room's continuous numbering: a publisher's datagram is
# validated (RFC 3550 header, RFC 7587 payload), checked against the room's
# allowed sources, renumbered once per room (across publisher restarts and
# takeovers) and written into the room's history with a clean 12-byte
# header. Included by relay/_core.pyx; runs without the GIL on the thread
# that reads ingest.

# The default takeover rule (Core.room_open): a new SSRC may take over a
# room once the current one has been quiet this long; sooner, two publishers
# on one room would fight packet by packet. The node sets each room's rule:
# authenticated (SRTP) rooms keep this, plain-RTP rooms wait for a BYE from
# the live stream or for the operator.
cdef int64_t TAKEOVER_NS = 150000000
# A silence this long or longer advances the timestamp by the most the
# 32-bit clock can carry (0x7fffffff ticks, about 12.4 hours at 48 kHz);
# comparing first keeps the multiplication below inside int64.
cdef int64_t GAP_CAP_NS = (<int64_t>0x7fffffff * 1000000000 + OPUS_CLOCK - 1) // OPUS_CLOCK


cdef inline uint16_t be16(const uint8_t *p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline uint32_t be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void put16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>(v & 0xff)


cdef inline void put32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>((v >> 16) & 0xff)
    p[2] = <uint8_t>((v >> 8) & 0xff)
    p[3] = <uint8_t>(v & 0xff)


cdef inline bint source_ok(Room *r, const uint8_t *a) noexcept nogil:
    """Is the raw sockaddr `a` one of the room's allowed publishers?"""
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


cdef inline void source_of(Source *s, const uint8_t *a) noexcept nogil:
    """Remember the raw sockaddr `a` as a source (address and port)."""
    memset(s, 0, sizeof(Source))
    s.family = <uint8_t>(<const uint16_t *>a)[0]
    s.port = (<const uint16_t *>a)[1]
    if s.family == AF_INET:
        memcpy(s.ip, a + 4, 4)
    else:
        memcpy(s.ip, a + 8, 16)


cdef inline bint same_source(Source *s, const uint8_t *a, int port_slack) noexcept nogil:
    """Is `a` the source `s`? With port_slack, also the port above it:
    RTCP's own port, by RFC 3550's convention, when it is not muxed."""
    cdef uint16_t port = be16(a + 2), live = be16(<const uint8_t *>&s.port)
    if s.family != (<const uint16_t *>a)[0] or not (port == live or (port_slack and port == live + 1)):
        return False
    if s.family == AF_INET:
        return memcmp(s.ip, a + 4, 4) == 0
    return memcmp(s.ip, a + 8, 16) == 0


cdef void check_bye(CoreState *c, Room *r, const uint8_t *pkt, Py_ssize_t n, const uint8_t *src) noexcept nogil:
    """A compound RTCP packet that carries a BYE for the live stream, from
    the live stream's own address, releases the room: the next stream may
    take it at once. Anything else is only counted as ignored RTCP."""
    cdef Py_ssize_t off = 0, size
    if not r.have_stream or (r.pin_source and not same_source(&r.live, src, 1)):
        return
    while off + 8 <= n and (pkt[off] >> 6) == 2:
        size = 4 * (<Py_ssize_t>be16(pkt + off + 2) + 1)
        if off + size > n:
            return
        # BYE (203) with at least one SSRC, the first being the live one
        if pkt[off + 1] == 203 and (pkt[off] & 0x1f) >= 1 and be32(pkt + off + 4) == r.in_ssrc:
            r.released = 1
            r.byes += 1
            return
        off += size


cdef int accept_packet(CoreState *c, int room, const uint8_t *pkt, Py_ssize_t n,
                       const uint8_t *src, int64_t now) noexcept nogil:
    """Check one ingest datagram and, if it is good, rewrite it into the
    room's history with the room's continuous numbering. Returns an Ingest
    code; every refusal is counted."""
    cdef Room *r
    cdef uint8_t b0
    cdef int pt
    cdef Py_ssize_t off, end, plen, ext
    cdef uint16_t seq
    cdef uint32_t ts, ssrc
    cdef int16_t delta
    cdef uint8_t *h
    cdef uint32_t i
    cdef bint fill = False
    cdef int shift = 0
    cdef uint16_t out_seq
    cdef uint32_t out_ts
    if room < 0 or room >= c.rooms or not c.rm[room].active:
        c.c_no_room += 1
        return INGEST_NO_ROOM
    r = &c.rm[room]
    if not source_ok(r, src):
        r.drop_foreign += 1
        return INGEST_FOREIGN
    if n > RX_BUF:
        r.drop_oversized += 1
        r.oversized_len = RX_BUF + 1
        return INGEST_OVERSIZED
    if n < HDR or (pkt[0] >> 6) != 2:
        r.drop_malformed += 1
        return INGEST_MALFORMED
    b0 = pkt[0]
    pt = pkt[1] & 0x7f
    if 72 <= pt <= 76:
        # RTCP multiplexed onto the ingest port (RFC 5761): sender reports
        # are ignored, a BYE from the live stream releases the room
        c.c_rtcp_ignored += 1
        check_bye(c, r, pkt, n, src)
        return INGEST_RTCP
    off = HDR + 4 * (b0 & 0x0f)
    if b0 & 0x10:
        if off + 4 > n:
            r.drop_malformed += 1
            return INGEST_MALFORMED
        ext = 4 * <Py_ssize_t>be16(pkt + off + 2)
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
    if plen + HDR > c.ring_bytes:
        r.drop_oversized += 1
        r.oversized_len = <uint32_t>(plen + HDR)
        return INGEST_OVERSIZED
    seq = be16(pkt + 2)
    ts = be32(pkt + 4)
    ssrc = be32(pkt + 8)
    if not r.have_stream:
        r.have_stream = 1
        r.seq_off = 0
        r.ts_off = 0
        r.seen = 1
        source_of(&r.live, src)
    else:
        delta = <int16_t>(seq - r.in_seq)
        if ssrc != r.in_ssrc or (r.pin_source and not same_source(&r.live, src, 0)):
            # a new stream: it may replace the live one only once that one
            # said BYE (or the operator released it), or was silent for
            # the room's takeover time
            if not r.released and (r.takeover_ns < 0 or now - r.last_rx_ns < r.takeover_ns):
                r.drop_foreign += 1
                r.takeovers_refused += 1
                return INGEST_FOREIGN
            restart(r, seq, ts, now)
            source_of(&r.live, src)
            r.released = 0
        elif r.merge and -64 < delta <= 0:
            # a copy from the other parent, or a hole it fills
            if (r.seen >> <int>(-delta)) & 1:
                r.duplicates += 1
                return INGEST_DUPLICATE
            r.seen |= (<uint64_t>1) << <int>(-delta)
            r.gap_fills += 1
            fill = True
        elif delta > 3000 or delta < -100:
            # same SSRC, numbering jumped: a restarted sender; in a merged
            # room only once the numbering it follows has gone quiet, so
            # two parents that disagree are never mixed
            if r.merge and now - r.last_rx_ns < r.takeover_ns:
                r.drop_foreign += 1
                r.takeovers_refused += 1
                return INGEST_FOREIGN
            restart(r, seq, ts, now)
        elif delta <= 0:
            r.drop_late += 1
            return INGEST_LATE
        else:
            shift = delta
            if delta > 1:
                r.seq_gaps += <uint64_t>(delta - 1)
    out_seq = <uint16_t>(seq + r.seq_off)
    out_ts = ts + r.ts_off
    if not fill:
        if shift:
            r.seen = (r.seen << shift) | 1 if shift < 64 else 1
        r.in_ssrc = ssrc
        r.in_seq = seq
        r.out_seq = out_seq
        r.out_ts = out_ts
    r.last_rx_ns = now
    if over_rate(r, n, now):
        # its numbering moves on: listeners see the packet as lost
        r.drop_rate += 1
        return INGEST_RATE
    r.packets_in += 1
    r.bytes_in += <uint64_t>n
    # the room packet: a clean 12-byte header (SSRC filled per listener)
    i = <uint32_t>room * c.hist_depth + (r.hist_head & c.hist_mask)
    h = c.hist + <size_t>i * <size_t>c.ring_bytes
    h[0] = 0x80
    h[1] = pkt[1]
    put16(h + 2, out_seq)
    put32(h + 4, out_ts)
    put32(h + 8, 0)
    memcpy(h + HDR, pkt + off, <size_t>plen)
    c.hist_len[i] = <uint16_t>(HDR + plen)
    c.hist_rx[i] = now
    relay_store_release(&r.hist_head, r.hist_head + 1)
    return INGEST_OK


cdef inline bint over_rate(Room *r, Py_ssize_t n, int64_t now) noexcept nogil:
    """Past the room's bound on packets or bytes a second? Token buckets a
    second deep: a publisher's jitter burst passes, a flood is cut to the
    bound (every listener would get each packet it sends)."""
    cdef double dt
    if r.max_pps == 0 and r.max_bytes == 0:
        return False
    dt = (now - r.rate_at) / 1e9 if r.rate_at else 1.0
    r.rate_at = now
    r.pkt_tokens = min(r.max_pps, r.pkt_tokens + dt * r.max_pps)
    r.byte_tokens = min(r.max_bytes, r.byte_tokens + dt * r.max_bytes)
    if (r.max_pps > 0 and r.pkt_tokens < 1) or (r.max_bytes > 0 and r.byte_tokens < <double>n):
        return True
    r.pkt_tokens -= 1
    r.byte_tokens -= <double>n
    return False


cdef void restart(Room *r, uint16_t seq, uint32_t ts, int64_t now) noexcept nogil:
    """Continue the room's numbering across a new sender: next sequence
    number, and a timestamp advanced by the real time that passed (at least
    one 20 ms frame, at most what 31 bits of the 48 kHz clock hold)."""
    cdef int64_t quiet = now - r.last_rx_ns
    cdef int64_t gap
    r.source_restarts += 1
    r.seen = 1
    if r.merge:
        # a merged room forwards its parents' numbering as it is: the
        # origin's, the same from every parent
        r.seq_off = 0
        r.ts_off = 0
        return
    if quiet >= GAP_CAP_NS:
        gap = 0x7fffffff
    else:
        gap = quiet * OPUS_CLOCK // 1000000000
        if gap < 960:
            gap = 960
    r.seq_off = <uint16_t>(r.out_seq + 1 - seq)
    r.ts_off = r.out_ts + <uint32_t>gap - ts
