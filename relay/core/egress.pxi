# Egress: the queued ring packets of one shard handed to the kernel with
# sendmmsg, up to TX_BATCH per call (or as AF_XDP frames, xdp.pxi), resubmitting after a message that fails
# on its own and stopping (to wait for POLLOUT) when the socket is full;
# QUIC listeners' packets sealed into a batch of their own for the QUIC
# socket in the same pass (quic_path.pxi); NACK resends straight from a
# listener's ring. Included by relay/_core.pyx; runs without the GIL, with
# the shard's lock held.

# Upper bounds of the fan-out latency buckets, in nanoseconds (last is +Inf).
cdef int64_t LAT_BOUNDS_NS[LAT_BUCKETS]
LAT_BOUNDS_NS[:] = [10000, 25000, 50000, 100000, 250000, 500000, 1000000,
                    2500000, 5000000, 10000000, 25000000, 50000000, 100000000,
                    250000000, 1000000000,
                    0x7fffffffffffffff]


cdef int flush_shard(CoreState *c, int k, int fd) noexcept nogil:
    """Send every queued ring packet of shard k; 0 when drained, 1 when
    the socket would block (call again once it is writable)."""
    cdef Shard *s = &c.sh[k]
    cdef int32_t qi, i, qcap = s.hi - s.lo
    cdef int n, done, rc, err, j
    cdef uint32_t sent
    cdef uint16_t len
    cdef Listener *l
    cdef int32_t qpos
    cdef int m, xfull = 0
    cdef int64_t now
    cdef relay_xsk *x = shard_xsk(c, k)
    while s.q_len > 0:
        n = m = 0
        qi = 0
        qpos = s.q_head
        now = monotonic_ns()
        while qi < s.q_len and n < TX_BATCH:
            i = s.queue[qpos]
            qpos += 1
            if qpos == qcap:
                qpos = 0
            l = &c.ls[i]
            if l.active and l.quic:
                m = quic_take(c, s, i, m, now)
                if l.sent != l.head and not l.qshut:
                    break       # the QUIC batch is full
            elif l.active and not l.pull and l.xpath and x != NULL:
                if xdp_take(c, s, x, i, fd):
                    xfull = 1   # every UMEM frame is in flight
                    break
            elif l.active and not l.pull:
                sent = l.sent
                while sent != l.head and n < TX_BATCH:
                    s.tx_iov[n].iov_base = ring_packet(c, i, sent, &len)
                    s.tx_iov[n].iov_len = len
                    s.tx[n].msg_hdr.msg_name = l.addr
                    s.tx[n].msg_hdr.msg_namelen = l.addrlen
                    s.tx_owner[n] = i
                    n += 1
                    sent += 1
                if sent != l.head:
                    break
            qi += 1
        if x != NULL:
            xdp_push(x)
        if m:
            # first: a full QUIC socket never leaves its batch waiting for the UDP one
            quic_send_batch(c, s, m)
        done = 0
        while done < n:
            rc = sendmmsg(fd, s.tx + done, <unsigned int>(n - done), MSG_DONTWAIT)
            s.sendmmsg_calls += 1
            if rc > 0:
                s.sendmmsg_messages += <uint64_t>rc
                observe_batch(s, rc)
                for j in range(done, done + rc):
                    l = &c.ls[s.tx_owner[j]]
                    l.sent += 1
                    l.packets_out += 1
                    l.bytes_out += s.tx_iov[j].iov_len
                    s.bytes_out += s.tx_iov[j].iov_len
                s.packets_out += <uint64_t>rc
                done += rc
                continue
            err = errno
            if err == EINTR:
                continue
            if err == EAGAIN or err == ENOBUFS:
                s.would_block += 1
                pop_sent(c, s)
                s.blocked = 1
                return 1
            # this one message failed on its own (e.g. unreachable
            # address): count it, skip it, resubmit the rest
            l = &c.ls[s.tx_owner[done]]
            l.sent += 1
            l.drop_send_error += 1
            s.drop_send_error += 1
            done += 1
        pop_sent(c, s)
        if xfull:
            s.would_block += 1
            s.blocked = 2       # waiting for AF_XDP frames, not for the socket
            return 1
    s.blocked = 0
    observe_latency(s)
    return 0


cdef inline void pop_sent(CoreState *c, Shard *s) noexcept nogil:
    """Take listeners with nothing left to send off the front of the queue."""
    cdef Listener *l
    while s.q_len > 0:
        l = &c.ls[s.queue[s.q_head]]
        if l.active and not l.pull and l.sent != l.head and not l.qshut:
            return
        l.queued = 0
        s.q_head += 1
        if s.q_head == s.hi - s.lo:
            s.q_head = 0
        s.q_len -= 1


cdef inline void observe_batch(Shard *s, int n) noexcept nogil:
    # bucket b holds batches of at most 2**b messages
    cdef int b = 0
    while (1 << b) < n:
        b += 1
    s.batch_count[b] += 1


cdef void observe_latency(Shard *s) noexcept nogil:
    """Every packet fanned out since the last complete flush is now sent."""
    cdef int64_t now, d
    cdef int j, b
    if s.pend_n == 0:
        return
    now = monotonic_ns()
    for j in range(s.pend_n):
        d = now - s.pend_rx[j]
        b = 0
        while d > LAT_BOUNDS_NS[b]:
            b += 1
        s.lat_count[b] += 1
        s.lat_sum_ns += <uint64_t>d
    s.pend_n = 0


cdef int resend_seq(CoreState *c, int fd, int32_t slot, uint16_t seq) noexcept nogil:
    """Send the ring packet with this listener-side sequence number again.
    1 if sent, 0 if no longer in the ring (or not sent yet), -1 if the
    socket refused it."""
    cdef Listener *l = &c.ls[slot]
    cdef uint32_t j
    cdef uint16_t n
    cdef uint8_t *p
    j = l.tail
    while j != l.sent:
        p = ring_packet(c, slot, j, &n)
        j += 1
        if be16(p + 2) == seq:
            if sendto(fd, p, n, MSG_DONTWAIT, <const sockaddr *>l.addr, l.addrlen) < 0:
                return -1
            l.resends += 1
            c.c_resends += 1
            return 1
    return 0


cdef int broadcast_shard(CoreState *c, int k, int room, int fd, const uint8_t *data, size_t n,
                         uint64_t *refused) noexcept nogil:
    """Send one datagram (a periodic room message, not audio) to every
    listener of `room` in shard k that sendmmsg serves as UDP: not pull or
    QUIC listeners, not held ones. The shard's batch arrays are scratch between flushes, so
    the caller holds the shard's lock. Best effort, like the message: a full
    socket ends the round and what was not sent is counted in `refused`.
    Returns how many the kernel took."""
    cdef Shard *s = &c.sh[k]
    cdef int32_t i = c.rm[room].first[k]
    cdef int m, done, rc, sent = 0
    cdef Listener *l
    while i >= 0:
        m = 0
        while i >= 0 and m < TX_BATCH:
            l = &c.ls[i]
            i = l.next
            if l.pull or l.quic or not l.active:
                continue
            s.tx_iov[m].iov_base = <void *>data
            s.tx_iov[m].iov_len = n
            s.tx[m].msg_hdr.msg_name = l.addr
            s.tx[m].msg_hdr.msg_namelen = l.addrlen
            m += 1
        done = 0
        while done < m:
            rc = sendmmsg(fd, s.tx + done, <unsigned int>(m - done), MSG_DONTWAIT)
            if rc > 0:
                done += rc
                sent += rc
            elif errno == EINTR:
                continue
            elif errno == EAGAIN or errno == ENOBUFS:
                refused[0] += <uint64_t>(m - done)
                while i >= 0:       # and the rest of the room, unsent
                    if not c.ls[i].pull and not c.ls[i].quic:
                        refused[0] += 1
                    i = c.ls[i].next
                return sent
            else:
                refused[0] += 1     # this address alone failed
                done += 1
    return sent


cdef int broadcast_room(CoreState *c, int room, int fd, const uint8_t *data, size_t n,
                        uint64_t *refused) noexcept:
    """broadcast_shard over every shard, each under its lock (see Core.room_send)."""
    cdef int k, sent = 0
    for k in range(c.shards):
        lock_shard_gil(c, k)
        sent += broadcast_shard(c, k, room, fd, data, n, refused)
        unlock_shard(c, k)
    return sent
