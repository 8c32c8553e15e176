# A listener's ring: its recent packets, of any length, laid end to end in
# `ring_bytes` bytes, with an index of `depth` entries (offset, length).
# Memory per listener is then the byte budget, and the room's bitrate
# decides how many packets of history that holds (at 64 kbit/s in 20 ms
# frames, 172-byte packets: all 16 of the default depth in 3,840 bytes),
# instead of every slot costing the largest packet.
#
# A packet never wraps: when it does not fit before the end it starts again
# at 0, so every packet is one iovec for sendmmsg. Room for a new packet is
# made by letting go of the oldest: a packet already sent was only NACK
# history and goes quietly; an unsent one is an overflow drop, counted.
# Included by relay/_core.pyx; runs without the GIL, with the shard's lock
# held.


cdef inline void ring_let_go(Listener *l, Shard *s) noexcept nogil:
    """Let go of the oldest packet in the ring."""
    if l.tail == l.sent:
        # it was never sent: live audio drops it
        l.sent += 1
        l.drop_overflow += 1
        s.drop_overflow += 1
    l.tail += 1


cdef inline uint8_t *ring_push(CoreState *c, Shard *s, int32_t i, uint32_t n) noexcept nogil:
    """Make room for an n-byte packet (n <= ring_bytes) at the head of
    listener i's ring, index it, and return where its bytes go."""
    cdef Listener *l = &c.ls[i]
    cdef size_t base = <size_t>i * <size_t>c.depth
    cdef uint32_t size = <uint32_t>c.ring_bytes
    cdef uint32_t at = l.wr
    cdef uint32_t need = n
    cdef int32_t held
    cdef size_t e
    if at + n > size:
        # it starts again at 0; the end it leaves unused stays taken until
        # the packets before it are let go
        need += size - at
        at = 0
    if l.head - l.tail >= <uint32_t>c.depth:
        ring_let_go(l, s)
    while l.tail != l.head:
        # the bytes held run from the oldest packet's offset round to wr
        held = <int32_t>l.wr - <int32_t>c.ring_off[base + (l.tail & c.mask)]
        if held <= 0:
            held += <int32_t>size
        if <uint32_t>held + need <= size:
            break
        ring_let_go(l, s)
    else:
        at = 0   # empty: start at the beginning
    e = base + (l.head & c.mask)
    c.ring_off[e] = <uint16_t>at
    c.ring_len[e] = <uint16_t>n
    l.wr = at + n
    l.head += 1
    return c.rings + <size_t>i * <size_t>c.ring_bytes + at


cdef inline uint8_t *ring_packet(CoreState *c, int32_t i, uint32_t j, uint16_t *n) noexcept nogil:
    """Packet j (tail <= j < head) of listener i's ring, and its length in n."""
    cdef size_t e = <size_t>i * <size_t>c.depth + (j & c.mask)
    n[0] = c.ring_len[e]
    return c.rings + <size_t>i * <size_t>c.ring_bytes + c.ring_off[e]
