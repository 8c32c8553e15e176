# The system calls the compiled modules batch, declared once for the core
# and the load-test crowd: sockets (sendmmsg/recvmmsg), threads, eventfd, poll.

from libc.stdint cimport uint32_t
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
    int pthread_mutex_trylock(pthread_mutex_t *m)
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


cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t n)
    ssize_t write(int fd, const void *buf, size_t n)
    int close(int fd)


cdef extern from *:
    """
    /* Flags and counters shared between the event-loop thread and the
       sender threads go through these, so the compiler and ThreadSanitizer
       both see the ordering we rely on: the ingest thread publishes a
       room's history head with release order, shard threads read it with
       acquire order; stop/running flags are plain relaxed atomics. */
    static inline uint32_t relay_load_acquire(uint32_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void relay_store_release(uint32_t *p, uint32_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline int relay_flag_get(int *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void relay_flag_set(int *p, int v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    """
    uint32_t relay_load_acquire(uint32_t *p) nogil
    void relay_store_release(uint32_t *p, uint32_t v) nogil
    int relay_flag_get(int *p) nogil
    void relay_flag_set(int *p, int v) nogil
