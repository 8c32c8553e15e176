# C declarations for the fan-out core: the socket calls it batches, and the
# layout of the listener arena and room table it keeps in preallocated memory.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from posix.time cimport timespec


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        unsigned short sa_family
    struct iovec:
        void *iov_base
        size_t iov_len
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int sendmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags)
    int recvmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags, timespec *timeout)
    ssize_t sendto(int fd, const void *buf, size_t n, int flags, const sockaddr *addr, socklen_t alen)
    int MSG_DONTWAIT
    int MSG_TRUNC
    int AF_INET
    int AF_INET6


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_CLOEXEC
    int EFD_NONBLOCK


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN
    short POLLOUT


cdef extern from *:
    """
    /* the ingest thread publishes a room's history head with release order,
       shard threads read it with acquire order */
    static inline uint32_t relay_load_acquire(uint32_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void relay_store_release(uint32_t *p, uint32_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
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
    uint32_t relay_load_acquire(uint32_t *p) nogil
    void relay_store_release(uint32_t *p, uint32_t v) nogil
    void relay_put_header(uint8_t *dst, uint16_t seq, uint32_t ts, uint32_t ssrc) nogil


cdef enum:
    ADDR_MAX = 28       # longest socket address we store (sockaddr_in6)
    MAX_SOURCES = 8     # most allowed sources one room may lock to
    LAT_BUCKETS = 16    # fan-out latency histogram buckets, the last is +Inf
    BATCH_BUCKETS = 11  # sendmmsg batch sizes: <=1, <=2, <=4 ... <=1024
    PEND_MAX = 64       # packets whose fan-out latency is awaiting a complete flush
    MAX_SHARDS = 64


ctypedef struct Listener:
    uint8_t active
    uint8_t queued        # on the egress queue (at most once)
    uint8_t pull          # drained by Python (QUIC), never by sendmmsg
    uint8_t addrlen
    int32_t room
    int32_t shard         # the shard (sender thread) that owns this slot
    int32_t next          # room membership: per-shard intrusive doubly linked list
    int32_t prev
    uint32_t ssrc
    uint16_t seq_off      # listener seq = room seq + seq_off
    uint16_t _pad
    uint32_t ts_off       # listener ts  = room ts  + ts_off
    uint32_t head         # packets written into the ring, ever
    uint32_t sent         # packets handed to the kernel (or pulled), ever
    uint8_t addr[ADDR_MAX]
    uint64_t packets_out
    uint64_t bytes_out
    uint64_t drop_overflow
    uint64_t drop_send_error
    uint64_t resends


ctypedef struct Source:
    uint8_t family        # 0 = unused
    uint8_t any_port
    uint16_t port         # network byte order, as in sockaddr
    uint8_t ip[16]


ctypedef struct Room:
    uint8_t active
    uint8_t any_source    # accept every source address (open demo rooms only)
    uint8_t have_stream   # seen a packet since open
    uint8_t n_sources
    Source sources[MAX_SOURCES]
    int32_t first[MAX_SHARDS]   # head of each shard's listener list, -1 if empty
    int32_t n_listeners
    # input continuity: the room rewrites the publisher's numbering once,
    # listeners add their own offsets on top
    uint32_t in_ssrc
    uint16_t in_seq
    uint16_t seq_off
    uint32_t ts_off
    uint16_t out_seq      # last room seq emitted
    uint16_t _pad
    uint32_t out_ts       # last room ts emitted
    int64_t last_rx_ns
    # room history: the last `depth` room packets, for a burst on join and
    # for the shard threads to fan out from
    uint32_t hist_head
    uint64_t packets_in
    uint64_t bytes_in
    uint64_t drop_foreign
    uint64_t drop_malformed
    uint64_t drop_oversized
    uint64_t drop_late
    uint64_t source_restarts


ctypedef struct Shard:
    # slots [lo, hi) of the arena belong to this shard
    int32_t lo
    int32_t hi
    int32_t *free_list
    int32_t n_free
    int32_t listeners
    # egress queue: listeners with unsent packets, each at most once
    int32_t *queue
    int32_t q_head
    int32_t q_len
    mmsghdr *tx
    iovec *tx_iov
    int32_t *tx_owner
    uint32_t *hist_seen     # per room: history entries already fanned out
    int64_t pend_rx[PEND_MAX]
    int pend_n
    int blocked
    # a sender thread waits on efd; the lock guards this shard's listeners,
    # rings and queue against the event-loop thread (joins, leaves, resends)
    pthread_mutex_t lock
    int efd
    int stop
    int running
    int pull_ready          # a pull listener got packets in this fan-out
    uint64_t packets_out
    uint64_t bytes_out
    uint64_t sendmmsg_calls
    uint64_t sendmmsg_messages
    uint64_t would_block
    uint64_t drop_overflow
    uint64_t drop_send_error
    uint64_t drop_lag        # history entries a slow shard never saw
    uint64_t busy_ns         # time spent fanning out and sending
    uint64_t lat_count[LAT_BUCKETS]
    uint64_t lat_sum_ns
    uint64_t lat_dropped
    uint64_t batch_count[BATCH_BUCKETS]
