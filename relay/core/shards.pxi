# Shards and their sender threads. Each shard owns a slice of the listener
# arena, its rings and its egress queue, guarded by the shard's mutex. In
# threaded mode a sender thread spends its life in shard_loop() without the
# GIL: wait on the shard's eventfd, fan out, send. In inline mode the
# caller's thread does the same work, taking the same lock, so the two modes
# never touch a shard without it. Included by relay/_core.pyx.


cdef inline void lock_shard(CoreState *c, int k) noexcept nogil:
    pthread_mutex_lock(&c.sh[k].lock)


cdef inline void unlock_shard(CoreState *c, int k) noexcept nogil:
    pthread_mutex_unlock(&c.sh[k].lock)


cdef void lock_shard_gil(CoreState *c, int k) noexcept:
    """Take shard k's lock from a thread that holds the GIL. A sender thread
    may hold the lock across a sendmmsg of 1024 messages; waiting for it
    with the GIL held would stall every Python thread for that long, so the
    GIL is released unless the lock is free at once."""
    if pthread_mutex_trylock(&c.sh[k].lock) != 0:
        with nogil:
            pthread_mutex_lock(&c.sh[k].lock)


cdef void lock_all_gil(CoreState *c) noexcept:
    cdef int k
    for k in range(c.shards):
        lock_shard_gil(c, k)


cdef void unlock_all(CoreState *c) noexcept nogil:
    cdef int k
    for k in range(c.shards):
        pthread_mutex_unlock(&c.sh[k].lock)


cdef inline void wake(CoreState *c, int k) noexcept nogil:
    """Tell shard k's sender thread there is work (new room packets or a burst)."""
    cdef uint64_t one = 1
    write(c.sh[k].efd, &one, sizeof(one))


cdef inline void wake_pull(CoreState *c) noexcept nogil:
    """Tell the event loop a pull (QUIC) listener has new packets."""
    cdef uint64_t one = 1
    write(c.pull_fd, &one, sizeof(one))


cdef void wake_all(CoreState *c) noexcept nogil:
    cdef int k
    for k in range(c.shards):
        wake(c, k)


cdef void shard_loop(CoreState *c, int k, int fd) noexcept nogil:
    """The body of shard k's sender thread, until its stop flag is set."""
    cdef Shard *s = &c.sh[k]
    cdef pollfd pf[2]
    cdef uint64_t ticks
    cdef int64_t t0
    while not relay_flag_get(&s.stop):
        pf[0].fd = s.efd
        pf[0].events = POLLIN
        pf[0].revents = 0
        pf[1].fd = fd
        # blocked is only written by this thread once it runs
        pf[1].events = POLLOUT if s.blocked == 1 else 0
        pf[1].revents = 0
        # the timeout is a safety net; wake-ups come from the eventfd. A
        # shard waiting for AF_XDP frames (blocked 2) has nothing to poll
        # for (the listener socket is writable all along): it looks again
        # after a millisecond instead of spinning, e.g. on a link that is down
        poll(pf, 2, 1 if s.blocked == 2 else 200)
        if pf[0].revents & POLLIN:
            read(s.efd, &ticks, sizeof(ticks))
        lock_shard(c, k)
        # timed with the lock held: the duty cycle admission reads is work
        # done, not time spent waiting for a join or a scrape to let go
        t0 = monotonic_ns()
        fanout_shard(c, k)
        flush_shard(c, k, fd)
        s.busy_ns += <uint64_t>(monotonic_ns() - t0)
        unlock_shard(c, k)


cdef bint shard_settled(CoreState *c, int k):
    """Has shard k fanned out every room packet and sent all it can?"""
    cdef int room
    cdef bint done
    lock_shard_gil(c, k)
    done = c.sh[k].q_len == 0
    for room in range(c.rooms):
        if c.rm[room].active and c.sh[k].hist_seen[room] != relay_load_acquire(&c.rm[room].hist_head):
            done = False
    unlock_shard(c, k)
    return done
