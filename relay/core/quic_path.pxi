# The QUIC path: a QUIC or WebTransport listener whose connection is
# established is sent like a UDP listener. The sender thread seals its ring
# packets as 1-RTT packets carrying one DATAGRAM each (core/quic.pxi) into
# the shard's QUIC batch and sends them with sendmmsg on the QUIC socket, in
# the same wake-up as the UDP listeners. The listener's ACKs come back here
# from the event loop (QuicPath.ingest): opened, replay-checked, and read
# into the connection's RTT and NewReno congestion window (RFC 9002). A
# listener whose window is shut gets nothing more: its ring overflows and
# only it loses audio. A packet declared lost is counted lost only once
# final; an ACK of it before then counts it late. docs/quic-fast-path.md
# says which side owns which part of the connection. Included by
# relay/_core.pyx.

cdef enum:
    QUIC_INIT_CWND = 12000      # RFC 9002 7.2: ten 1,200-byte datagrams
    QUIC_MIN_CWND = 2400        # and two
    QUIC_MAX_CWND = 76800       # the sent records' worth of full datagrams (audio never needs more)
    QUIC_PKT_THRESHOLD = 3      # RFC 9002 6.1.1
    QUIC_MAX_BACKOFF = 6        # probe timeouts double at most this many times

# what became of one datagram from a QUIC path listener (quic_receive)
cdef enum QuicVerdict:
    QUIC_HANDLED = 0            # ACK-only: read here, nothing for the library
    QUIC_LIBRARY = 1            # the library's: not opened here (another key phase, a long header...),
                                # or opened and its ACK read but carrying frames (or a PING) for it
    QUIC_DROPPED = 2            # forged, malformed or replayed: counted and dropped

cdef int64_t QUIC_INITIAL_RTT_NS = 333000000    # RFC 9002 6.2.2
cdef int64_t QUIC_GRANULARITY_NS = 1000000
# a full QUIC socket is waited on this long, once, before the batch's rest is dropped
cdef int QUIC_BLOCKED_WAIT_MS = 2


cdef QuicConn *quic_conn_new() except NULL:
    cdef QuicConn *q = <QuicConn *>_alloc(1, sizeof(QuicConn))
    q.cwnd = QUIC_INIT_CWND
    q.ssthresh = 0xffffffff
    return q


cdef void quic_conn_free(QuicConn *q) noexcept:
    if q != NULL:
        quic_keys_free(&q.tx.k)
        quic_keys_free(&q.rx)
        _free(q)


cdef QuicConn *quic_detach(CoreState *c, int32_t slot) noexcept nogil:
    """Take slot's connection off the QUIC path (the listener leaves);
    returns it for quic_conn_free. What it has declared lost and not seen
    acknowledged is lost. Called with the shard's lock held."""
    cdef QuicConn *q = c.qc[slot]
    cdef Shard *s = &c.sh[c.ls[slot].shard]
    cdef uint32_t j
    if q != NULL:
        if q.rx.dcid_len == QUIC_CID_LEN and cid_get(c, cid_key(q.rx.dcid)) == slot:
            cid_drop(c, cid_key(q.rx.dcid))
        pthread_mutex_lock(&s.qlock)
        for j in range(q.s_len):
            if quic_sent_at(q, j).live == QS_LOST:
                quic_lost_final(s, q, quic_sent_at(q, j))
        c.qc[slot] = NULL
        c.ls[slot].quic = 0
        pthread_mutex_unlock(&s.qlock)
    return q


cdef inline int quic_overhead(QuicTx *t) noexcept nogil:
    """Bytes a sealed audio datagram adds to its RTP packet: the short
    header, the DATAGRAM frame's type and prefix, the AEAD tag."""
    return 1 + t.k.dcid_len + QUIC_PN_LEN + 1 + t.prefix_len + QUIC_TAG


cdef inline int64_t quic_pto_ns(QuicConn *q) noexcept nogil:
    """RFC 9002 6.2.1: smoothed RTT, four deviations, the peer's ACK delay."""
    cdef int64_t srtt = q.srtt if q.srtt else QUIC_INITIAL_RTT_NS
    cdef int64_t var = q.rttvar if q.srtt else QUIC_INITIAL_RTT_NS // 2
    return srtt + max(4 * var, QUIC_GRANULARITY_NS) + q.max_ack_delay_ns


cdef inline QuicSent *quic_sent_at(QuicConn *q, uint32_t j) noexcept nogil:
    return &q.sent[(q.s_head + j) % QUIC_WINDOW]


cdef inline int64_t quic_final_ns(QuicConn *q) noexcept nogil:
    """How long after its send a packet declared lost may still be
    acknowledged late: three probe timeouts, after which quic_timeout gives
    up on everything in flight. Then its loss is final."""
    return 3 * quic_pto_ns(q)


cdef inline void quic_lost_final(Shard *s, QuicConn *q, QuicSent *e) noexcept nogil:
    """A packet declared lost was not acknowledged in time: it is lost."""
    e.live = QS_DONE
    q.lost += 1
    s.q_lost += 1


cdef void quic_trim(Shard *s, QuicConn *q, int64_t now) noexcept nogil:
    """Forget the oldest records that are done: acknowledged, or declared
    lost and older than quic_final_ns (counted lost as they go). A record
    in flight, or declared lost more recently, stops it."""
    cdef QuicSent *e
    cdef int64_t final_ns = -1
    while q.s_len > 0:
        e = &q.sent[q.s_head]
        if e.live == QS_LOST:
            if final_ns < 0:
                final_ns = quic_final_ns(q)
            if now - e.at_ns < final_ns:
                break
            quic_lost_final(s, q, e)
        elif e.live != QS_DONE:
            break
        q.s_head = (q.s_head + 1) % QUIC_WINDOW
        q.s_len -= 1


cdef bint quic_make_room(Shard *s, QuicConn *q, int64_t now) noexcept nogil:
    """The sent records are full. A record declared lost at their head
    leaves them, its loss final (a late ACK could not be told from none
    any more); one in flight keeps its place. True if there is room now."""
    if q.sent[q.s_head].live == QS_LOST:
        quic_lost_final(s, q, &q.sent[q.s_head])
        quic_trim(s, q, now)
    return q.s_len < QUIC_WINDOW


cdef void quic_lose(Shard *s, QuicConn *q, QuicSent *e) noexcept nogil:
    """One packet declared lost: out of flight at once, and the window
    halved once per round of packets (NewReno: losses of packets sent
    before the last reduction do not reduce it again). It is counted lost
    only once final (quic_trim, quic_make_room): an ACK before then counts
    it late."""
    e.live = QS_LOST
    q.in_flight -= e.size
    if e.pn >= q.recovery_pn:
        q.recovery_pn = q.pn_next
        q.ssthresh = <uint32_t>max(q.cwnd // 2, <uint32_t>QUIC_MIN_CWND)
        q.cwnd = q.ssthresh


cdef void quic_timeout(Shard *s, QuicConn *q, int64_t now) noexcept nogil:
    """Nothing acknowledged for three probe timeouts (doubled for every
    timeout since the last ACK): all in flight is declared lost and the
    window is at its minimum, as after persistent congestion (RFC 9002
    7.6). The next audio packet is the probe; a listener that has stalled
    gets ever fewer."""
    cdef uint32_t j
    cdef QuicSent *e
    cdef int64_t limit
    if q.s_len == 0:
        return
    e = &q.sent[q.s_head]
    if e.live != QS_FLIGHT:
        # records declared lost at the head: final ones go; the oldest in flight decides
        quic_trim(s, q, now)
        for j in range(q.s_len):
            e = quic_sent_at(q, j)
            if e.live == QS_FLIGHT:
                break
        else:
            return
    limit = (3 * quic_pto_ns(q)) << min(<int>q.pto_count, <int>QUIC_MAX_BACKOFF)
    if now - e.at_ns < limit:
        return
    for j in range(q.s_len):
        e = quic_sent_at(q, j)
        if e.live == QS_FLIGHT:
            e.live = QS_LOST
            q.in_flight -= e.size
    q.cwnd = QUIC_MIN_CWND
    q.recovery_pn = q.pn_next
    q.pto_count += 1
    quic_trim(s, q, now)    # the oldest are final at once: older than three probe timeouts


cdef int quic_take(CoreState *c, Shard *s, int32_t i, int m, int64_t now) noexcept nogil:
    """Seal listener i's unsent ring packets into the shard's QUIC batch
    from entry m on, as many as its window allows; returns the new m. Sets
    l.qshut when the window (or a pause for the library's own sending)
    stops it. Called with the shard's lock held."""
    cdef Listener *l = &c.ls[i]
    cdef QuicConn *q = c.qc[i]
    cdef uint8_t *p
    cdef uint16_t n
    cdef int size, over
    cdef QuicSent *e
    l.qshut = 0
    if q == NULL or c.quic_fd < 0:
        l.qshut = 1
        return m
    pthread_mutex_lock(&s.qlock)
    quic_timeout(s, q, now)
    over = quic_overhead(&q.tx)
    while l.sent != l.head and m < TX_BATCH:
        p = ring_packet(c, i, l.sent, &n)
        size = n + over
        if size > QUIC_MTU:
            # it would never fit a datagram: dropped, not left to stall the rest
            l.sent += 1
            s.q_too_large[l.quic - 1] += 1
            s.q_too_large_len = n
            continue
        if q.pn_next >= q.pn_end or (q.s_len >= QUIC_WINDOW and not quic_make_room(s, q, now)) \
                or q.in_flight + <uint32_t>size > q.cwnd:
            l.qshut = 1
            q.window_shut += 1
            s.q_shut += 1
            break
        size = quic_seal(&q.tx, p, n, q.pn_next, s.qbuf + <size_t>m * QUIC_MTU, QUIC_MTU)
        l.sent += 1
        if size < 0:
            l.drop_send_error += 1
            s.drop_send_error += 1
            continue
        e = quic_sent_at(q, q.s_len)
        e.pn, e.at_ns, e.size, e.live = q.pn_next, now, <uint16_t>size, <uint8_t>QS_FLIGHT
        q.s_len += 1
        q.in_flight += <uint32_t>size
        if q.unanswered_ns == 0:
            q.unanswered_ns = now
        q.last_tx_ns = now
        s.qtx_iov[m].iov_len = <size_t>size
        s.qtx[m].msg_hdr.msg_name = l.addr
        s.qtx[m].msg_hdr.msg_namelen = l.addrlen
        s.qtx_owner[m] = i
        s.qtx_pn[m] = q.pn_next
        q.pn_next += 1
        m += 1
    pthread_mutex_unlock(&s.qlock)
    return m


cdef void quic_unsend(CoreState *c, Shard *s, int j, int64_t now) noexcept nogil:
    """Batch entry j was sealed but never left: out of flight, and neither
    acknowledged nor lost (its packet number stays used). Called with qlock
    held."""
    cdef QuicConn *q = c.qc[s.qtx_owner[j]]
    cdef uint32_t k
    cdef QuicSent *e
    if q == NULL:
        return
    for k in range(q.s_len):
        e = quic_sent_at(q, q.s_len - 1 - k)
        if e.pn == s.qtx_pn[j]:
            if e.live == QS_FLIGHT:
                q.in_flight -= e.size
            e.live = QS_DONE
            break
    quic_trim(s, q, now)


cdef void quic_send_batch(CoreState *c, Shard *s, int m) noexcept nogil:
    """Send the shard's QUIC batch on the QUIC socket. A full socket is
    waited on once, briefly; what it still refuses is dropped and counted
    (to the listener it is loss on the path). A message that fails on its
    own is skipped."""
    cdef int done = 0, rc, err, j, waited = 0
    cdef int64_t now
    cdef size_t rtp
    cdef Listener *l
    cdef QuicConn *q
    cdef pollfd pf
    while done < m:
        rc = sendmmsg(c.quic_fd, s.qtx + done, <unsigned int>(m - done), MSG_DONTWAIT)
        if rc > 0:
            s.sendmmsg_calls += 1
            for j in range(done, done + rc):
                l = &c.ls[s.qtx_owner[j]]
                q = c.qc[s.qtx_owner[j]]
                rtp = s.qtx_iov[j].iov_len - <size_t>quic_overhead(&q.tx)
                l.packets_out += 1
                l.bytes_out += rtp
                s.q_out[l.quic - 1] += 1
                s.q_bytes[l.quic - 1] += rtp
            done += rc
            continue
        err = errno
        if err == EINTR:
            continue
        if (err == EAGAIN or err == ENOBUFS) and not waited:
            waited = 1
            pf.fd, pf.events, pf.revents = c.quic_fd, POLLOUT, 0
            poll(&pf, 1, QUIC_BLOCKED_WAIT_MS)
            continue
        pthread_mutex_lock(&s.qlock)
        now = monotonic_ns()
        if err == EAGAIN or err == ENOBUFS:
            for j in range(done, m):
                quic_unsend(c, s, j, now)
            s.q_blocked += <uint64_t>(m - done)
            pthread_mutex_unlock(&s.qlock)
            return
        quic_unsend(c, s, done, now)
        pthread_mutex_unlock(&s.qlock)
        c.ls[s.qtx_owner[done]].drop_send_error += 1
        s.drop_send_error += 1
        done += 1


cdef void quic_rtt_sample(QuicConn *q, int64_t latest, uint64_t ack_delay) noexcept nogil:
    """RFC 9002 5.3, with the peer's ACK delay capped at its max_ack_delay."""
    cdef int64_t delay, adjusted, dev
    q.latest_rtt = latest
    if q.srtt == 0:
        q.min_rtt = q.srtt = latest
        q.rttvar = latest // 2
        return
    q.min_rtt = min(q.min_rtt, latest)
    delay = q.max_ack_delay_ns
    if ack_delay < (<uint64_t>1 << 32):
        delay = min(delay, <int64_t>((ack_delay << q.ack_exp) * 1000))
    adjusted = latest - delay if latest - delay >= q.min_rtt else latest
    dev = q.srtt - adjusted if q.srtt > adjusted else adjusted - q.srtt
    q.rttvar = (3 * q.rttvar + dev) // 4
    q.srtt = (7 * q.srtt + adjusted) // 8


cdef inline bint quic_in_ranges(QuicAck *ack, uint64_t pn) noexcept nogil:
    cdef int r
    for r in range(ack.n_ranges):
        if ack.lo[r] <= pn <= ack.hi[r]:
            return True
    return False


cdef void quic_on_ack(Shard *s, QuicConn *q, QuicAck *ack, int64_t now) noexcept nogil:
    """Our packets an ACK acknowledges leave flight and grow the window; the
    newest gives an RTT sample; older ones it passes over are declared lost
    by the packet or the time threshold (RFC 9002 6.1). One it acknowledges
    after it was declared lost is late, not lost (its window reduction
    stands: the path did reorder or delay it). Packets the library sent are
    its own business: they are not in our records."""
    cdef uint32_t j
    cdef QuicSent *e
    cdef int64_t loss_delay
    q.pto_count = 0
    for j in range(q.s_len):
        e = quic_sent_at(q, j)
        if e.pn > ack.largest:
            break
        if e.live == QS_DONE or not quic_in_ranges(ack, e.pn):
            continue
        if e.live == QS_LOST:
            e.live = QS_DONE
            q.late += 1
            s.q_late += 1
            continue
        e.live = QS_DONE
        q.in_flight -= e.size
        q.acked += 1
        s.q_acked += 1
        if e.pn == ack.largest:
            quic_rtt_sample(q, now - e.at_ns, ack.delay)
        if not q.any_acked or e.pn > q.largest_acked:
            q.largest_acked, q.any_acked = e.pn, 1
        if e.pn >= q.recovery_pn:
            if q.cwnd < q.ssthresh:
                q.cwnd += e.size
            else:
                q.cwnd += <uint32_t>(QUIC_MTU * e.size // q.cwnd)
            q.cwnd = min(q.cwnd, <uint32_t>QUIC_MAX_CWND)
    if q.any_acked:
        loss_delay = max(9 * max(q.srtt, q.latest_rtt) // 8, QUIC_GRANULARITY_NS)
        for j in range(q.s_len):
            e = quic_sent_at(q, j)
            if e.pn >= q.largest_acked:
                break
            if e.live == QS_FLIGHT and (q.largest_acked - e.pn >= QUIC_PKT_THRESHOLD
                                        or now - e.at_ns >= loss_delay):
                quic_lose(s, q, e)
    quic_trim(s, q, now)


cdef bint quic_replayed(QuicConn *q, uint64_t pn) noexcept nogil:
    """Has this packet number been opened already (or is it too old to
    tell)? Marks it opened otherwise."""
    cdef uint64_t d
    if not q.rx_any:
        q.rx_any, q.rx_largest, q.rx_seen = 1, pn, 1
        return False
    if pn > q.rx_largest:
        d = pn - q.rx_largest
        q.rx_seen = (q.rx_seen << d) | 1 if d < 64 else 1
        q.rx_largest = pn
        return False
    d = q.rx_largest - pn
    if d >= 64 or (q.rx_seen >> d) & 1:
        return True
    q.rx_seen |= (<uint64_t>1) << d
    return False


cdef int quic_receive(CoreState *c, int32_t slot, const uint8_t *pkt, int n, int64_t now) noexcept nogil:
    """One datagram from a QUIC path listener's address: a QuicVerdict."""
    cdef QuicConn *q = c.qc[slot]
    cdef Shard *s = &c.sh[c.ls[slot].shard]
    cdef QuicAck ack
    cdef int rc
    pthread_mutex_lock(&s.qlock)
    rc = quic_open(&q.rx, c.qplain, pkt, n, q.rx_largest + 1 if q.rx_any else 0, &ack)
    if rc == QOPEN_NOT_OURS:
        pthread_mutex_unlock(&s.qlock)
        return QUIC_LIBRARY
    if rc == QOPEN_FORGED or quic_replayed(q, ack.pn):
        if rc == QOPEN_FORGED:
            q.forged += 1
            s.q_forged += 1
        else:
            q.replayed += 1
            s.q_replayed += 1
        pthread_mutex_unlock(&s.qlock)
        return QUIC_DROPPED
    q.unanswered_ns = 0
    q.last_rx_ns = now
    if rc == QOPEN_ACK_ONLY or ack.n_ranges:
        # (an ACK beside frames for the library is read here too: once the
        # library acknowledges that packet, the peer reports it no more)
        quic_on_ack(s, q, &ack, now)
    if rc == QOPEN_ACK_ONLY:
        q.acks += 1
        s.q_acks += 1
    pthread_mutex_unlock(&s.qlock)
    return QUIC_HANDLED if rc == QOPEN_ACK_ONLY and not ack.eliciting else QUIC_LIBRARY
