# The arena: every byte the core uses, allocated when a Core is built and
# freed with it — listener slots, rings, the room table and its history,
# the shards' queues and sendmmsg batches, the ingest batch. Nothing on the
# packet path allocates. Every allocation is counted, so tests can check
# that Cores leave nothing behind. Included by relay/_core.pyx.

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


def listener_bytes(int depth, int ring_bytes):
    """What one listener slot reserves in the arena: its ring's bytes, the
    ring's index, the Listener struct, and its free-list and queue entries."""
    return ring_bytes + depth * 2 * sizeof(uint16_t) + sizeof(Listener) + 2 * sizeof(int32_t)


cdef int arena_build(CoreState *c) except -1:
    """Allocate everything for the shape already in `c` (capacity, rooms,
    depth, ring_bytes, shards). On failure, what was allocated stays in `c`
    for arena_release()."""
    cdef int i, k, per
    cdef Shard *s
    # calloc'd ring memory is only backed by pages once a listener writes
    # to it, so an idle arena costs address space, not resident memory.
    c.ls = <Listener *>_alloc(<size_t>c.capacity, sizeof(Listener))
    c.rm = <Room *>_alloc(<size_t>c.rooms, sizeof(Room))
    c.sh = <Shard *>_alloc(<size_t>c.shards, sizeof(Shard))
    c.rings = <uint8_t *>_alloc(<size_t>c.capacity, <size_t>c.ring_bytes)
    c.ring_off = <uint16_t *>_alloc(<size_t>c.capacity * <size_t>c.depth, sizeof(uint16_t))
    c.ring_len = <uint16_t *>_alloc(<size_t>c.capacity * <size_t>c.depth, sizeof(uint16_t))
    # the room history is four ring depths: shards read at most depth - 1
    # entries behind the head, so the ingest thread would have to accept
    # three depths more packets during one entry's fan-out before it could
    # overwrite the entry being read; the older entries are what a listener
    # resuming here from a dead node missed (core/history.pxi)
    c.hist = <uint8_t *>_alloc(<size_t>c.rooms * c.hist_depth, <size_t>c.ring_bytes)
    c.hist_len = <uint16_t *>_alloc(<size_t>c.rooms * c.hist_depth, sizeof(uint16_t))
    c.hist_rx = <int64_t *>_alloc(<size_t>c.rooms * c.hist_depth, sizeof(int64_t))
    c.rx = <mmsghdr *>_alloc(RX_BATCH, sizeof(mmsghdr))
    c.rx_iov = <iovec *>_alloc(RX_BATCH, sizeof(iovec))
    c.rx_buf = <uint8_t *>_alloc(RX_BATCH, RX_BUF)
    c.rx_addr = <uint8_t *>_alloc(RX_BATCH, RX_ADDR)
    c.qc = <QuicConn **>_alloc(<size_t>c.capacity, sizeof(QuicConn *))
    c.qplain = <uint8_t *>_alloc(1, QUIC_RX_MAX)
    c.qcid_mask = 1
    while c.qcid_mask < <uint32_t>c.capacity * 2:
        c.qcid_mask <<= 1
    c.qcid_key = <uint64_t *>_alloc(c.qcid_mask, sizeof(uint64_t))
    c.qcid_val = <int32_t *>_alloc(c.qcid_mask, sizeof(int32_t))
    memset(c.qcid_val, 0xff, c.qcid_mask * sizeof(int32_t))
    c.qcid_mask -= 1
    for k in range(c.shards):
        c.sh[k].efd = -1
    per = (c.capacity + c.shards - 1) // c.shards
    for k in range(c.shards):
        s = &c.sh[k]
        s.lo = min(k * per, c.capacity)
        s.hi = min(s.lo + per, c.capacity)
        s.free_list = <int32_t *>_alloc(<size_t>max(1, s.hi - s.lo), sizeof(int32_t))
        s.queue = <int32_t *>_alloc(<size_t>max(1, s.hi - s.lo), sizeof(int32_t))
        s.tx = <mmsghdr *>_alloc(TX_BATCH, sizeof(mmsghdr))
        s.tx_iov = <iovec *>_alloc(TX_BATCH, sizeof(iovec))
        s.tx_owner = <int32_t *>_alloc(TX_BATCH, sizeof(int32_t))
        s.hist_seen = <uint32_t *>_alloc(<size_t>c.rooms, sizeof(uint32_t))
        s.qtx = <mmsghdr *>_alloc(TX_BATCH, sizeof(mmsghdr))
        s.qtx_iov = <iovec *>_alloc(TX_BATCH, sizeof(iovec))
        s.qtx_owner = <int32_t *>_alloc(TX_BATCH, sizeof(int32_t))
        s.qtx_pn = <uint64_t *>_alloc(TX_BATCH, sizeof(uint64_t))
        s.qbuf = <uint8_t *>_alloc(TX_BATCH, QUIC_MTU)
        s.efd = eventfd(0, EFD_CLOEXEC)
        if s.efd < 0:
            raise OSError(errno, "eventfd failed")
        pthread_mutex_init(&s.lock, NULL)
        pthread_mutex_init(&s.qlock, NULL)
        # hand out low slots first so a small crowd stays in few pages
        for i in range(s.hi - s.lo):
            s.free_list[i] = s.hi - 1 - i
        s.n_free = s.hi - s.lo
        for i in range(TX_BATCH):
            s.tx[i].msg_hdr.msg_iov = &s.tx_iov[i]
            s.tx[i].msg_hdr.msg_iovlen = 1
            s.qtx[i].msg_hdr.msg_iov = &s.qtx_iov[i]
            s.qtx[i].msg_hdr.msg_iovlen = 1
            s.qtx_iov[i].iov_base = s.qbuf + <size_t>i * QUIC_MTU
    c.pull_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
    if c.pull_fd < 0:
        raise OSError(errno, "eventfd failed")
    for i in range(RX_BATCH):
        c.rx_iov[i].iov_base = c.rx_buf + <size_t>i * RX_BUF
        c.rx_iov[i].iov_len = RX_BUF
        c.rx[i].msg_hdr.msg_iov = &c.rx_iov[i]
        c.rx[i].msg_hdr.msg_iovlen = 1
    for i in range(c.rooms):
        for k in range(MAX_SHARDS):
            c.rm[i].first[k] = -1
    return 0


cdef void arena_release(CoreState *c) noexcept:
    """Free everything arena_build() allocated (also after a partial build)."""
    cdef int k
    if c.sh != NULL:
        for k in range(c.shards):
            _free(c.sh[k].free_list)
            _free(c.sh[k].queue)
            _free(c.sh[k].tx)
            _free(c.sh[k].tx_iov)
            _free(c.sh[k].tx_owner)
            _free(c.sh[k].hist_seen)
            _free(c.sh[k].qtx)
            _free(c.sh[k].qtx_iov)
            _free(c.sh[k].qtx_owner)
            _free(c.sh[k].qtx_pn)
            _free(c.sh[k].qbuf)
            if c.sh[k].efd >= 0:
                close(c.sh[k].efd)
                pthread_mutex_destroy(&c.sh[k].lock)
                pthread_mutex_destroy(&c.sh[k].qlock)
    if c.pull_fd >= 0:
        close(c.pull_fd)
    _free(c.ls)
    _free(c.rm)
    _free(c.sh)
    _free(c.rings)
    _free(c.ring_off)
    _free(c.ring_len)
    _free(c.hist)
    _free(c.hist_len)
    _free(c.hist_rx)
    _free(c.rx)
    _free(c.rx_iov)
    _free(c.rx_buf)
    _free(c.rx_addr)
    if c.qc != NULL:
        for k in range(c.capacity):
            quic_conn_free(c.qc[k])
    _free(c.qc)
    _free(c.qplain)
    _free(c.qcid_key)
    _free(c.qcid_val)
    xdp_release(c)
    memset(c, 0, sizeof(CoreState))
    c.pull_fd = -1
    c.quic_fd = -1
