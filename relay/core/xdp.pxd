# AF_XDP egress, declared for Cython: the C side lives in relay/core/xsk.h
# (raw system calls, no libxdp), the per-packet use in xdp.pxi and the
# Core's API for it in xdp_api.pxi.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "core/xsk.h" nogil:
    enum:
        RELAY_XPATHS
        RELAY_XSK_MAX
    ctypedef struct relay_xpath:
        uint8_t dst_mac[6]
        uint8_t src_mac[6]
        uint8_t family
        uint16_t src_port
        uint16_t mtu
        uint8_t src_ip[16]
    ctypedef struct relay_xsk:
        int fd
        int zerocopy
        uint32_t frame_size
        uint32_t nframes
        uint32_t tx_next
        uint32_t *tx_prod
        uint32_t n_free
        uint64_t packets
        uint64_t kicks
        uint64_t kick_errors
        uint64_t frames_exhausted
        uint64_t too_large
    ctypedef struct relay_xdp:
        relay_xpath paths[RELAY_XPATHS]
        relay_xsk *xsk[RELAY_XSK_MAX]
    int relay_xsk_open(relay_xsk *x, int ifindex, uint32_t queue, uint32_t nframes,
                       uint32_t frame_size, int mode, int *step)
    void relay_xsk_close(relay_xsk *x)
    uint32_t relay_xsk_reclaim(relay_xsk *x)
    void relay_xsk_submit(relay_xsk *x)
    uint32_t relay_xsk_kick(relay_xsk *x)
    uint64_t relay_xsk_frame(relay_xsk *x)
    void relay_xsk_put(relay_xsk *x, uint64_t addr, uint32_t len)
    uint8_t *relay_xsk_umem "relay_xsk_umem_at"(relay_xsk *x, uint64_t addr)
    uint32_t relay_xdp_headroom(const relay_xpath *p)
    uint32_t relay_xdp_frame(uint8_t *f, const relay_xpath *p, const uint8_t *sa,
                             const uint8_t *payload, uint32_t n)
