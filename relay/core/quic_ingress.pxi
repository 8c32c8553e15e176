# Packets in on the QUIC port: the core reads the socket with recvmmsg and
# ends the listeners' ACK-only packets itself (core/quic_path.pxi), finding
# each one's connection by our connection id in a small table; every other
# datagram (handshakes, stream data, a new key phase, a packet from an
# address the connection does not use) is handed up to the QUIC library.
# The table and the reads are the event-loop thread's alone. Included by
# relay/_core.pyx.

import socket as _socket

cdef enum:
    QUIC_CID_LEN = 8        # the connection ids the node issues (aioquic's default), the table's keys


cdef inline uint32_t cid_hash(uint64_t k) noexcept nogil:
    # the ids are random already; this only spreads a chosen one
    k ^= k >> 33
    k *= <uint64_t>0xff51afd7ed558ccdULL
    k ^= k >> 33
    return <uint32_t>k


cdef inline uint64_t cid_key(const uint8_t *cid) noexcept nogil:
    cdef uint64_t k
    memcpy(&k, cid, 8)
    return k


cdef int32_t cid_get(CoreState *c, uint64_t key) noexcept nogil:
    cdef uint32_t i = cid_hash(key) & c.qcid_mask
    while c.qcid_val[i] >= 0:
        if c.qcid_key[i] == key:
            return c.qcid_val[i]
        i = (i + 1) & c.qcid_mask
    return -1


cdef void cid_put(CoreState *c, uint64_t key, int32_t slot) noexcept nogil:
    """Map a connection id to a slot (the table holds twice the arena's
    slots, so it never fills)."""
    cdef uint32_t i = cid_hash(key) & c.qcid_mask
    while c.qcid_val[i] >= 0 and c.qcid_key[i] != key:
        i = (i + 1) & c.qcid_mask
    c.qcid_key[i] = key
    c.qcid_val[i] = slot


cdef void cid_drop(CoreState *c, uint64_t key) noexcept nogil:
    """Remove a connection id, shifting later entries of its probe run back
    so lookups never need tombstones."""
    cdef uint32_t i = cid_hash(key) & c.qcid_mask
    cdef uint32_t j, home
    while c.qcid_val[i] >= 0 and c.qcid_key[i] != key:
        i = (i + 1) & c.qcid_mask
    if c.qcid_val[i] < 0:
        return
    j = i
    while True:
        j = (j + 1) & c.qcid_mask
        if c.qcid_val[j] < 0:
            break
        home = cid_hash(c.qcid_key[j]) & c.qcid_mask
        # the entry at j may move to the hole at i unless its home lies cyclically in (i, j]
        if (i < j and i < home <= j) or (i > j and (home > i or home <= j)):
            continue
        c.qcid_key[i], c.qcid_val[i] = c.qcid_key[j], c.qcid_val[j]
        i = j
    c.qcid_val[i] = -1


cdef bint same_peer(const uint8_t *a, const uint8_t *b) noexcept nogil:
    """The same family, port and address (not IPv6 flow labels)."""
    cdef uint16_t fam = (<const uint16_t *>a)[0]
    if fam != (<const uint16_t *>b)[0] or memcmp(a + 2, b + 2, 2) != 0:
        return False
    if fam == AF_INET:
        return memcmp(a + 4, b + 4, 4) == 0
    return memcmp(a + 8, b + 8, 20) == 0      # the address and the scope


cdef bint quic_consume(CoreState *c, const uint8_t *buf, int n, const uint8_t *addr, int64_t now) noexcept nogil:
    """Is this datagram a QUIC path listener's, dealt with here? Its ACK is
    read; it is ended unless the library must have it too."""
    cdef int32_t slot
    cdef QuicConn *q
    cdef int verdict
    if n < 1 + QUIC_CID_LEN or buf[0] & 0x80:
        return False
    slot = cid_get(c, cid_key(buf + 1))
    if slot < 0 or c.qc[slot] == NULL or not same_peer(c.ls[slot].addr, addr):
        return False
    q = c.qc[slot]
    verdict = quic_receive(c, slot, buf, n, now)
    return verdict == QUIC_DROPPED or (verdict == QUIC_HANDLED and not q.library_waiting)


cdef object sockaddr_tuple(const uint8_t *a):
    """A raw sockaddr as the socket module writes addresses."""
    cdef uint16_t fam = (<const uint16_t *>a)[0]
    cdef uint32_t flow, scope
    if fam == AF_INET:
        return _socket.inet_ntop(_socket.AF_INET, a[4:8]), be16(a + 2)
    memcpy(&scope, a + 24, 4)
    return _socket.inet_ntop(_socket.AF_INET6, a[8:24]), be16(a + 2), be32(a + 4), scope
