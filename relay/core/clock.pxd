# The monotonic clock every compiled module stamps packets with.

from libc.stdint cimport int64_t
from posix.time cimport timespec, clock_gettime, CLOCK_MONOTONIC


cdef inline int64_t monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec
