# AF_XDP egress: a listener whose next hop is known (xpath != 0) has its
# queued ring packets built into frames of its shard's UMEM (Ethernet, IP,
# UDP and the RTP packet, relay_xdp_frame in xsk.h) and put on the shard's
# AF_XDP TX ring instead of a sendmmsg batch. Completed frames come back
# from the completion ring onto a free stack: nothing is allocated per
# packet. Everything else (resends, room messages, QUIC, control) stays on
# the ordinary sockets. Included by relay/_core.pyx; runs without the GIL,
# with the shard's lock held.

from relay.core.xdp cimport *

# frames put on the TX ring between two kicks: copy mode sends up to the
# socket's budget (32 before Linux 6.17, 256 where we may raise it) per kick
cdef uint32_t XDP_KICK_BATCH = 256


cdef inline relay_xsk *shard_xsk(CoreState *c, int k) noexcept nogil:
    """Shard k's AF_XDP socket, or NULL when it sends with sendmmsg only."""
    if c.xdp == NULL:
        return NULL
    return c.xdp.xsk[k]


cdef int xdp_take(CoreState *c, Shard *s, relay_xsk *x, int32_t i, int fd) noexcept nogil:
    """Put listener i's unsent ring packets on the shard's TX ring. 0 when
    all are placed, 1 when the UMEM has no free frame left (the caller
    waits, as for a full socket). A packet too large for a frame or the
    link goes by sendto on `fd`, so the listener still gets it, in order."""
    cdef Listener *l = &c.ls[i]
    cdef relay_xpath *p = &c.xdp.paths[l.xpath - 1]
    cdef uint32_t room_for = x.frame_size - relay_xdp_headroom(p)
    cdef uint32_t mtu_for = p.mtu - (relay_xdp_headroom(p) - 14)
    cdef uint64_t addr
    cdef uint16_t n
    cdef uint8_t *pkt
    if mtu_for < room_for:
        room_for = mtu_for
    while l.sent != l.head:
        pkt = ring_packet(c, i, l.sent, &n)
        if n > room_for:
            x.too_large += 1
            if sendto(fd, pkt, n, MSG_DONTWAIT, <const sockaddr *>l.addr, l.addrlen) < 0:
                l.drop_send_error += 1
                s.drop_send_error += 1
                l.sent += 1
                continue
        else:
            addr = relay_xsk_frame(x)
            if addr == <uint64_t>-1:
                return 1
            relay_xsk_put(x, addr, relay_xdp_frame(relay_xsk_umem(x, addr), p, l.addr, pkt, n))
            if x.tx_next - x.tx_prod[0] >= XDP_KICK_BATCH:
                relay_xsk_submit(x)
                relay_xsk_kick(x)
        l.sent += 1
        l.packets_out += 1
        l.bytes_out += n
        s.packets_out += 1
        s.bytes_out += n
    return 0


cdef void xdp_push(relay_xsk *x) noexcept nogil:
    """Publish and send what is on the TX ring; take back finished frames."""
    relay_xsk_submit(x)
    relay_xsk_kick(x)


cdef void xdp_release(CoreState *c) noexcept:
    """Close every AF_XDP socket and free the egress state (Core teardown)."""
    cdef int k
    if c.xdp == NULL:
        return
    for k in range(RELAY_XSK_MAX):
        if c.xdp.xsk[k] != NULL:
            relay_xsk_close(c.xdp.xsk[k])
            _free(c.xdp.xsk[k])
    _free(c.xdp)
    c.xdp = NULL


def xdp_frame(bytes path, bytes sockaddr, bytes payload):
    """The frame the AF_XDP egress builds for `payload` to `sockaddr`
    through `path` (a packed relay_xpath, see relay/listeners/xdp.py): what
    the model test compares with its own header writer."""
    cdef relay_xpath p
    cdef uint8_t buf[2048]
    cdef uint32_t n
    if len(path) != sizeof(relay_xpath):
        raise ValueError(f"a path is {sizeof(relay_xpath)} bytes")
    if not _sockaddr_len_ok(sockaddr) or len(payload) > 2048 - 62:
        raise ValueError("bad sockaddr or payload too long")
    memcpy(&p, <const uint8_t *>path, sizeof(relay_xpath))
    if p.family not in (4, 6) or (p.family == 6) != ((<const uint16_t *><const char *>sockaddr)[0] == AF_INET6):
        raise ValueError("path and sockaddr families differ")
    n = relay_xdp_frame(buf, &p, <const uint8_t *>sockaddr, <const uint8_t *>payload, <uint32_t>len(payload))
    return buf[:n]
