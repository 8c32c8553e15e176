# The compiled core's class: one CoreState (relay/core/state.pxd) that the
# per-packet functions of relay/core/*.pxi work on.

from libc.stdint cimport int32_t, uint32_t
from relay.core.state cimport CoreState, Listener, Room


cdef class Core:
    cdef CoreState st
    cdef readonly int capacity, rooms, depth, ring_bytes, shards
    cdef Room *_room(self, int room) except NULL
    cdef Listener *_listener(self, int slot) except NULL
    cdef bytes _packet(self, int32_t slot, uint32_t j)
