"""A crowd of listener sockets drained in C: the load side of the demo,
the benchmarks and the large loopback tests.

A Python receiver cannot keep up with tens of thousands of listeners at
50 packets/s each, so the crowd reads with epoll + recvmmsg outside the GIL
and only keeps per-listener counters (packets, bytes, sequence span for
loss). Control-protocol replies are handed back to Python in a bounded
list, because the handshake is policy and lives in relay.protocol.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int16_t, int32_t, int64_t
from libc.stdlib cimport calloc, free
from libc.errno cimport errno, EINTR
from relay.core.clock cimport monotonic_ns
from relay.core.syscalls cimport mmsghdr, msghdr, iovec, recvmmsg, MSG_DONTWAIT, close


cdef extern from "<sys/epoll.h>" nogil:
    cdef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    int EPOLLIN
    int EPOLL_CTL_ADD
    int EPOLL_CLOEXEC


cdef enum:
    EVENTS = 1024
    BATCH = 16
    BUF = 2048
    CONTROL_MAX = 65536   # control replies kept for Python between takes


ctypedef struct Member:
    int fd
    uint8_t started
    uint32_t ssrc
    int64_t first_ext     # extended sequence numbers (RFC 3550 A.1 style)
    int64_t high_ext
    uint64_t received
    uint64_t bytes
    uint64_t duplicates_or_late
    int64_t prior_expected  # sequence spans of earlier sessions (a rejoin brings a new SSRC)
    int64_t first_rx_ns
    int64_t last_rx_ns


cdef class Crowd:
    """Counts what each of many UDP sockets receives. `fds` must be
    non-blocking UDP sockets that stay open while the crowd is used."""

    cdef Member *m
    cdef readonly int size
    cdef int ep
    cdef epoll_event *events
    cdef mmsghdr *msgs
    cdef iovec *iov
    cdef uint8_t *buf
    cdef list _control
    cdef readonly uint64_t packets
    cdef readonly uint64_t control_dropped

    def __cinit__(self, fds):
        cdef int i
        cdef epoll_event ev
        self.size = <int>len(fds)
        self.m = <Member *>calloc(max(self.size, 1), sizeof(Member))
        self.events = <epoll_event *>calloc(EVENTS, sizeof(epoll_event))
        self.msgs = <mmsghdr *>calloc(BATCH, sizeof(mmsghdr))
        self.iov = <iovec *>calloc(BATCH, sizeof(iovec))
        self.buf = <uint8_t *>calloc(BATCH, BUF)
        if not (self.m and self.events and self.msgs and self.iov and self.buf):
            raise MemoryError()
        self.ep = epoll_create1(EPOLL_CLOEXEC)
        if self.ep < 0:
            raise OSError(errno, "epoll_create1 failed")
        self._control = []
        for i in range(BATCH):
            self.iov[i].iov_base = self.buf + i * BUF
            self.iov[i].iov_len = BUF
            self.msgs[i].msg_hdr.msg_iov = &self.iov[i]
            self.msgs[i].msg_hdr.msg_iovlen = 1
        for i, fd in enumerate(fds):
            self.m[i].fd = fd
            ev.events = EPOLLIN
            ev.data.u64 = i
            if epoll_ctl(self.ep, EPOLL_CTL_ADD, fd, &ev) < 0:
                raise OSError(errno, f"epoll_ctl failed for fd {fd}")

    def __dealloc__(self):
        if self.ep > 0:
            close(self.ep)
        free(self.m)
        free(self.events)
        free(self.msgs)
        free(self.iov)
        free(self.buf)

    cdef void _count(self, Member *mb, const uint8_t *p, unsigned int n, int64_t now) noexcept nogil:
        cdef uint16_t seq = (p[2] << 8) | p[3]
        cdef int16_t delta
        cdef int64_t ext
        cdef uint32_t ssrc = (<uint32_t>p[8] << 24) | (<uint32_t>p[9] << 16) | (<uint32_t>p[10] << 8) | p[11]
        mb.received += 1
        mb.bytes += n
        mb.last_rx_ns = now
        if mb.started and ssrc != mb.ssrc:
            # a new session: its numbering starts afresh
            mb.prior_expected += mb.high_ext - mb.first_ext + 1
            mb.started = 0
        if not mb.started:
            mb.started = 1
            mb.first_ext = mb.high_ext = seq
            if mb.first_rx_ns == 0:
                mb.first_rx_ns = now
            mb.ssrc = ssrc
            return
        delta = <int16_t>(seq - <uint16_t>(mb.high_ext & 0xffff))
        ext = mb.high_ext + delta
        if delta > 0:
            mb.high_ext = ext
        else:
            mb.duplicates_or_late += 1
            if ext < mb.first_ext:
                mb.first_ext = ext

    def poll(self, int timeout_ms=100, int max_rounds=64):
        """Wait up to `timeout_ms` for traffic and drain what arrives, for at
        most `max_rounds` epoll rounds. Returns RTP packets counted."""
        cdef int rounds, ne, e, got, k, fd, to
        cdef uint64_t before = self.packets
        cdef Member *mb
        cdef const uint8_t *p
        cdef int64_t now
        cdef list pending = []
        to = timeout_ms
        for rounds in range(max_rounds):
            with nogil:
                ne = epoll_wait(self.ep, self.events, EVENTS, to)
            if ne <= 0:
                break
            to = 0
            for e in range(ne):
                mb = &self.m[self.events[e].data.u64]
                fd = mb.fd
                while True:
                    with nogil:
                        for k in range(BATCH):
                            self.msgs[k].msg_hdr.msg_name = NULL
                            self.msgs[k].msg_hdr.msg_namelen = 0
                        got = recvmmsg(fd, self.msgs, BATCH, MSG_DONTWAIT, NULL)
                        now = monotonic_ns()
                        if got > 0:
                            for k in range(got):
                                p = self.buf + k * BUF
                                if self.msgs[k].msg_len >= 12 and (p[0] >> 6) == 2 and not (72 <= (p[1] & 0x7f) <= 76):
                                    self._count(mb, p, self.msgs[k].msg_len, now)
                                    self.packets += 1
                    if got <= 0:
                        break
                    for k in range(got):
                        p = self.buf + k * BUF
                        if not (self.msgs[k].msg_len >= 12 and (p[0] >> 6) == 2):
                            if len(self._control) < CONTROL_MAX:
                                self._control.append(
                                    (<int>self.events[e].data.u64, p[:self.msgs[k].msg_len]))
                            else:
                                self.control_dropped += 1
                    if got < BATCH:
                        break
        return self.packets - before

    def take_control(self):
        """Control-protocol datagrams received since the last call, as
        (member index, bytes), in arrival order."""
        out = self._control
        self._control = []
        return out

    def member(self, int i):
        """Counters of member i: received, bytes, expected (by sequence span),
        lost, late/duplicate, ssrc, first and last arrival (monotonic ns)."""
        if i < 0 or i >= self.size:
            raise IndexError(i)
        cdef Member *mb = &self.m[i]
        expected = mb.prior_expected + ((mb.high_ext - mb.first_ext + 1) if mb.started else 0)
        return {
            "received": mb.received,
            "bytes": mb.bytes,
            "expected": expected,
            "lost": max(0, expected - <int64_t>mb.received),
            "late_or_duplicate": mb.duplicates_or_late,
            "ssrc": mb.ssrc,
            "first_rx_ns": mb.first_rx_ns,
            "last_rx_ns": mb.last_rx_ns,
        }

    def totals(self):
        """Sums over the crowd: members that got audio, packets, expected, lost."""
        cdef int i
        cdef int64_t expected = 0, lost = 0, e
        cdef uint64_t received = 0, nbytes = 0
        cdef int heard = 0
        for i in range(self.size):
            if self.m[i].started:
                heard += 1
                e = self.m[i].prior_expected + self.m[i].high_ext - self.m[i].first_ext + 1
                expected += e
                received += self.m[i].received
                nbytes += self.m[i].bytes
                if e > <int64_t>self.m[i].received:
                    lost += e - <int64_t>self.m[i].received
        return {"members": self.size, "heard": heard, "received": received,
                "bytes": nbytes, "expected": expected, "lost": lost}
