# Packets in: one room's ingest socket drained with recvmmsg, each datagram
# checked and renumbered (rtp.pxi), then fanned out inline or handed to the
# sender threads. Included by relay/_core.pyx; runs without the GIL.

# what became of one ingest datagram (also returned by feed())
cpdef enum Ingest:
    INGEST_OK = 0
    INGEST_NO_ROOM = 1
    INGEST_FOREIGN = 2
    INGEST_MALFORMED = 3
    INGEST_OVERSIZED = 4
    INGEST_LATE = 5
    INGEST_RTCP = 6
    INGEST_DUPLICATE = 7
    INGEST_RATE = 8


cdef inline void rx_ready(CoreState *c, int batch) noexcept nogil:
    """Point the ingest batch's first `batch` messages at their buffers again."""
    cdef int j
    for j in range(batch):
        c.rx[j].msg_hdr.msg_name = c.rx_addr + j * RX_ADDR
        c.rx[j].msg_hdr.msg_namelen = RX_ADDR
        c.rx[j].msg_hdr.msg_flags = 0


cdef int ingest_batch(CoreState *c, int in_fd, int room, int out_fd, int budget) noexcept nogil:
    """Read `in_fd` until it is empty, RX_ROUNDS batches have been read, or
    about `budget` listener-packets of work were done. Returns datagrams read."""
    cdef int rounds, got, j, batch, k
    cdef int total = 0
    cdef int blocked
    cdef int64_t now
    cdef uint64_t work = 0
    cdef msghdr *m
    cdef int n_listen = c.rm[room].n_listeners if 0 <= room < c.rooms else 0
    # an inline fan-out flushes between rounds, so a round must not overrun a ring
    batch = RX_BATCH
    if c.depth // 2 < batch:
        batch = c.depth // 2    # depth is at least 2, so this is at least 1
    if n_listen > 0 and budget // n_listen < batch:
        batch = budget // n_listen if budget >= n_listen else 1
    for rounds in range(RX_ROUNDS):
        if work >= <uint64_t>budget:
            break
        rx_ready(c, batch)
        got = recvmmsg(in_fd, c.rx, <unsigned int>batch, MSG_DONTWAIT, NULL)
        if got <= 0:
            break
        now = monotonic_ns()
        total += got
        c.c_rx_datagrams += <uint64_t>got
        for j in range(got):
            m = &c.rx[j].msg_hdr
            accept_packet(c, room, c.rx_buf + j * RX_BUF,
                          RX_BUF + 1 if m.msg_flags & MSG_TRUNC else <Py_ssize_t>c.rx[j].msg_len,
                          c.rx_addr + j * RX_ADDR, now)
        work += <uint64_t>got * <uint64_t>n_listen
        if c.threaded:
            for k in range(c.shards):
                wake(c, k)
        else:
            lock_shard(c, 0)
            fanout_shard(c, 0)
            blocked = flush_shard(c, 0, out_fd)
            unlock_shard(c, 0)
            if blocked:
                break
        if got < batch:
            break
    return total
