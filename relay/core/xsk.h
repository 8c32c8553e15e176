/* AF_XDP egress for the core, with raw system calls (no libxdp/libbpf):
 * one TX-only AF_XDP socket, its UMEM of preallocated frames, its TX and
 * completion rings, and the frame builder that puts Ethernet, IPv4 or IPv6
 * and UDP headers (with the UDP checksum) in front of a listener's RTP
 * packet. Included by relay/core/xdp.pxd; the Cython side (xdp.pxi) owns
 * when these run, and always with the shard's lock held.
 *
 * A TX-only socket needs no XDP program. The kernel still wants a fill ring
 * before it binds, so a small one is set up and never used. */
#ifndef RELAY_XSK_H
#define RELAY_XSK_H

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <linux/if_xdp.h>

#ifndef AF_XDP
#define AF_XDP 44
#endif
#ifndef SOL_XDP
#define SOL_XDP 283
#endif
/* Linux 6.17: how many descriptors one copy-mode sendto may send (default 32) */
#ifndef XDP_MAX_TX_SKB_BUDGET
#define XDP_MAX_TX_SKB_BUDGET 9
#endif

#define RELAY_XPATHS 256      /* next hops (and sources) the listeners may use */
#define RELAY_XSK_MAX 64      /* = MAX_SHARDS */

/* Where a listener's frames go, shared by every listener behind the same
 * next hop: the MACs, our source address and port, the link's MTU. The
 * destination IP and port come from the listener's own sockaddr. */
typedef struct relay_xpath {
    uint8_t dst_mac[6];
    uint8_t src_mac[6];
    uint8_t family;          /* 4 or 6; 0 = unused */
    uint8_t _pad;
    uint16_t src_port;       /* network order */
    uint16_t mtu;            /* the largest IP packet the link takes */
    uint8_t src_ip[16];
} relay_xpath;

typedef struct relay_xsk {
    int fd;
    int zerocopy;
    uint8_t *umem;
    size_t umem_len;
    uint32_t frame_size;
    uint32_t nframes;
    /* TX ring */
    void *tx_map;
    size_t tx_map_len;
    uint32_t *tx_prod;
    uint32_t *tx_cons;
    struct xdp_desc *tx_desc;
    uint32_t tx_mask;
    uint32_t tx_next;        /* our producer index, published by relay_xsk_submit */
    /* completion ring */
    void *cq_map;
    size_t cq_map_len;
    uint32_t *cq_prod;
    uint32_t *cq_cons;
    uint64_t *cq_addr;
    uint32_t cq_mask;
    /* fill ring: required by bind, unused by a TX-only socket */
    void *fq_map;
    size_t fq_map_len;
    /* free frames: a stack of UMEM offsets, in memory mapped with the UMEM */
    uint64_t *free_frames;
    uint32_t n_free;
    /* counters, read at scrape time under the shard's lock */
    uint64_t packets;
    uint64_t kicks;
    uint64_t kick_errors;
    uint64_t frames_exhausted;
    uint64_t too_large;      /* packets larger than a frame or the MTU: sent by sendto */
} relay_xsk;

typedef struct relay_xdp {
    relay_xpath paths[RELAY_XPATHS];
    relay_xsk *xsk[RELAY_XSK_MAX];
} relay_xdp;

static void *relay_xsk_ring(int fd, uint64_t pgoff, size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, (off_t)pgoff);
    return p == MAP_FAILED ? NULL : p;
}

/* Close whatever relay_xsk_open made (also after a failed open). */
static void relay_xsk_close(relay_xsk *x)
{
    if (x->tx_map) munmap(x->tx_map, x->tx_map_len);
    if (x->cq_map) munmap(x->cq_map, x->cq_map_len);
    if (x->fq_map) munmap(x->fq_map, x->fq_map_len);
    if (x->fd >= 0) close(x->fd);
    if (x->umem) munmap(x->umem, x->umem_len);
    memset(x, 0, sizeof(*x));
    x->fd = -1;
}

/* Open a TX-only AF_XDP socket on (ifindex, queue) with `nframes` frames
 * of `frame_size` bytes (powers of two). mode: 0 copy, 1 zero-copy.
 * Returns 0, or -errno with *step naming what the kernel refused
 * (1 socket, 2 UMEM, 3 rings, 4 mmap, 5 bind); x is then closed. */
static int relay_xsk_open(relay_xsk *x, int ifindex, uint32_t queue, uint32_t nframes,
                          uint32_t frame_size, int mode, int *step)
{
    struct xdp_umem_reg reg;
    struct xdp_mmap_offsets off;
    struct sockaddr_xdp sxdp;
    socklen_t optlen = sizeof(off);
    uint32_t fq_size = 64, budget = 256, i;
    int err;
    size_t stack_len = (size_t)nframes * sizeof(uint64_t);

    memset(x, 0, sizeof(*x));
    x->fd = -1;
    x->frame_size = frame_size;
    x->nframes = nframes;
    *step = 2;
    x->umem_len = (size_t)nframes * frame_size + stack_len;
    x->umem = mmap(NULL, x->umem_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (x->umem == MAP_FAILED) { x->umem = NULL; err = errno; goto fail; }
    /* the free-frame stack lives after the frames, outside what is registered */
    x->free_frames = (uint64_t *)(x->umem + (size_t)nframes * frame_size);
    for (i = 0; i < nframes; i++)
        x->free_frames[i] = (uint64_t)(nframes - 1 - i) * frame_size;
    x->n_free = nframes;

    *step = 1;
    x->fd = socket(AF_XDP, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (x->fd < 0) { err = errno; goto fail; }
    *step = 2;
    memset(&reg, 0, sizeof(reg));
    reg.addr = (uint64_t)(uintptr_t)x->umem;
    reg.len = (uint64_t)nframes * frame_size;
    reg.chunk_size = frame_size;
    if (setsockopt(x->fd, SOL_XDP, XDP_UMEM_REG, &reg, sizeof(reg))) { err = errno; goto fail; }
    *step = 3;
    if (setsockopt(x->fd, SOL_XDP, XDP_UMEM_FILL_RING, &fq_size, sizeof(fq_size)) ||
        setsockopt(x->fd, SOL_XDP, XDP_UMEM_COMPLETION_RING, &nframes, sizeof(nframes)) ||
        setsockopt(x->fd, SOL_XDP, XDP_TX_RING, &nframes, sizeof(nframes)) ||
        getsockopt(x->fd, SOL_XDP, XDP_MMAP_OFFSETS, &off, &optlen)) { err = errno; goto fail; }
    /* a larger copy-mode batch per kick where the kernel has the option (6.17+) */
    (void)setsockopt(x->fd, SOL_XDP, XDP_MAX_TX_SKB_BUDGET, &budget, sizeof(budget));
    *step = 4;
    x->tx_map_len = off.tx.desc + (size_t)nframes * sizeof(struct xdp_desc);
    x->tx_map = relay_xsk_ring(x->fd, XDP_PGOFF_TX_RING, x->tx_map_len);
    x->cq_map_len = off.cr.desc + (size_t)nframes * sizeof(uint64_t);
    x->cq_map = relay_xsk_ring(x->fd, XDP_UMEM_PGOFF_COMPLETION_RING, x->cq_map_len);
    x->fq_map_len = off.fr.desc + (size_t)fq_size * sizeof(uint64_t);
    x->fq_map = relay_xsk_ring(x->fd, XDP_UMEM_PGOFF_FILL_RING, x->fq_map_len);
    if (!x->tx_map || !x->cq_map || !x->fq_map) { err = errno; goto fail; }
    x->tx_prod = (uint32_t *)((uint8_t *)x->tx_map + off.tx.producer);
    x->tx_cons = (uint32_t *)((uint8_t *)x->tx_map + off.tx.consumer);
    x->tx_desc = (struct xdp_desc *)((uint8_t *)x->tx_map + off.tx.desc);
    x->tx_mask = nframes - 1;
    x->tx_next = *x->tx_prod;
    x->cq_prod = (uint32_t *)((uint8_t *)x->cq_map + off.cr.producer);
    x->cq_cons = (uint32_t *)((uint8_t *)x->cq_map + off.cr.consumer);
    x->cq_addr = (uint64_t *)((uint8_t *)x->cq_map + off.cr.desc);
    x->cq_mask = nframes - 1;
    *step = 5;
    memset(&sxdp, 0, sizeof(sxdp));
    sxdp.sxdp_family = AF_XDP;
    sxdp.sxdp_ifindex = (uint32_t)ifindex;
    sxdp.sxdp_queue_id = queue;
    sxdp.sxdp_flags = mode ? XDP_ZEROCOPY : XDP_COPY;
    if (bind(x->fd, (struct sockaddr *)&sxdp, sizeof(sxdp))) { err = errno; goto fail; }
    x->zerocopy = mode;
    *step = 0;
    return 0;
fail:
    relay_xsk_close(x);
    return -err;
}

/* Take completed frames back onto the free stack. */
static inline uint32_t relay_xsk_reclaim(relay_xsk *x)
{
    uint32_t prod = __atomic_load_n(x->cq_prod, __ATOMIC_ACQUIRE);
    uint32_t cons = *x->cq_cons, n = prod - cons;
    while (cons != prod)
        x->free_frames[x->n_free++] = x->cq_addr[cons++ & x->cq_mask] & ~(uint64_t)(x->frame_size - 1);
    __atomic_store_n(x->cq_cons, cons, __ATOMIC_RELEASE);
    return n;
}

/* Publish the descriptors written since the last call. */
static inline void relay_xsk_submit(relay_xsk *x)
{
    __atomic_store_n(x->tx_prod, x->tx_next, __ATOMIC_RELEASE);
}

/* Have the kernel send what is on the TX ring. Copy mode sends a bounded
 * batch per call and says EAGAIN while more is left, so call again until
 * the ring is empty or a call makes no progress. Returns the descriptors
 * still on the ring. */
static inline uint32_t relay_xsk_kick(relay_xsk *x)
{
    uint32_t before, left;
    int tries = 0;
    for (;;) {
        left = x->tx_next - __atomic_load_n(x->tx_cons, __ATOMIC_ACQUIRE);
        if (left == 0) break;
        before = left;
        x->kicks++;
        if (sendto(x->fd, NULL, 0, MSG_DONTWAIT, NULL, 0) < 0 && errno != EAGAIN &&
            errno != EBUSY && errno != ENOBUFS && errno != EINTR) {
            x->kick_errors++;
            break;
        }
        left = x->tx_next - __atomic_load_n(x->tx_cons, __ATOMIC_ACQUIRE);
        if (left == before && ++tries > 2) break;     /* the device is busy: come back later */
        if (x->zerocopy) break;                       /* the driver sends on its own */
    }
    relay_xsk_reclaim(x);
    return left;
}

/* A free frame's UMEM offset, or UINT64_MAX when all are in flight even
 * after a kick and a reclaim. */
static inline uint64_t relay_xsk_frame(relay_xsk *x)
{
    if (x->n_free == 0 && relay_xsk_reclaim(x) == 0) {
        relay_xsk_submit(x);
        relay_xsk_kick(x);
        if (x->n_free == 0) {
            x->frames_exhausted++;
            return UINT64_MAX;
        }
    }
    return x->free_frames[--x->n_free];
}

/* Put frame `addr` of `len` bytes on the TX ring (published by submit).
 * The ring has as many slots as there are frames, so it is never full
 * while a frame is free. */
static inline void relay_xsk_put(relay_xsk *x, uint64_t addr, uint32_t len)
{
    struct xdp_desc *d = &x->tx_desc[x->tx_next++ & x->tx_mask];
    d->addr = addr;
    d->len = len;
    d->options = 0;
    x->packets++;
}

/* Where frame `addr` starts in the UMEM. */
static inline uint8_t *relay_xsk_umem_at(relay_xsk *x, uint64_t addr)
{
    return x->umem + addr;
}

/* --------------------------------------------------------------- frames */

/* The Internet checksum's running sum over n bytes (RFC 1071), unfolded. */
static inline uint64_t relay_csum_add(uint64_t sum, const uint8_t *p, size_t n)
{
    uint32_t w;
    uint16_t h;
    while (n >= 4) { __builtin_memcpy(&w, p, 4); sum += w; p += 4; n -= 4; }
    if (n >= 2) { __builtin_memcpy(&h, p, 2); sum += h; p += 2; n -= 2; }
    if (n) sum += *p;     /* little-endian: the odd byte is the high half of a zero-padded word */
    return sum;
}

static inline uint16_t relay_csum_fold(uint64_t sum)
{
    sum = (sum & 0xffffffffu) + (sum >> 32);
    sum = (sum & 0xffffffffu) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* Length of the headers relay_xdp_frame puts before the payload. */
static inline uint32_t relay_xdp_headroom(const relay_xpath *p)
{
    return p->family == 6 ? 14 + 40 + 8 : 14 + 20 + 8;
}

/* Build one frame in f: Ethernet, IPv4 or IPv6, UDP (checksummed), then the
 * n payload bytes. `sa` is the listener's sockaddr_in or sockaddr_in6, of
 * the path's family. Returns the frame's length. */
static inline uint32_t relay_xdp_frame(uint8_t *f, const relay_xpath *p, const uint8_t *sa,
                                       const uint8_t *payload, uint32_t n)
{
    uint8_t *ip = f + 14, *udp;
    uint32_t ulen = 8 + n;
    uint64_t sum;
    uint16_t v, csum;
    __builtin_memcpy(f, p->dst_mac, 6);
    __builtin_memcpy(f + 6, p->src_mac, 6);
    if (p->family == 6) {
        f[12] = 0x86; f[13] = 0xdd;
        ip[0] = 0x60; ip[1] = 0; ip[2] = 0; ip[3] = 0;
        v = __builtin_bswap16((uint16_t)ulen); __builtin_memcpy(ip + 4, &v, 2);
        ip[6] = 17;                          /* UDP */
        ip[7] = 64;                          /* hop limit */
        __builtin_memcpy(ip + 8, p->src_ip, 16);
        __builtin_memcpy(ip + 24, sa + 8, 16);   /* sin6_addr */
        udp = ip + 40;
        sum = relay_csum_add(0, ip + 8, 32);     /* pseudo header: both addresses */
    } else {
        f[12] = 0x08; f[13] = 0x00;
        ip[0] = 0x45; ip[1] = 0;
        v = __builtin_bswap16((uint16_t)(20 + ulen)); __builtin_memcpy(ip + 2, &v, 2);
        ip[4] = 0; ip[5] = 0;                /* id: unused with DF */
        ip[6] = 0x40; ip[7] = 0;             /* DF */
        ip[8] = 64; ip[9] = 17;
        ip[10] = 0; ip[11] = 0;
        __builtin_memcpy(ip + 12, p->src_ip, 4);
        __builtin_memcpy(ip + 16, sa + 4, 4);    /* sin_addr */
        csum = relay_csum_fold(relay_csum_add(0, ip, 20));
        __builtin_memcpy(ip + 10, &csum, 2);
        udp = ip + 20;
        sum = relay_csum_add(0, ip + 12, 8);
    }
    sum += __builtin_bswap16(17) + __builtin_bswap16((uint16_t)ulen);   /* protocol, UDP length */
    __builtin_memcpy(udp, &p->src_port, 2);
    __builtin_memcpy(udp + 2, sa + 2, 2);        /* sin_port / sin6_port */
    v = __builtin_bswap16((uint16_t)ulen); __builtin_memcpy(udp + 4, &v, 2);
    udp[6] = 0; udp[7] = 0;
    memcpy(udp + 8, payload, n);
    csum = relay_csum_fold(relay_csum_add(sum, udp, ulen));
    if (csum == 0) csum = 0xffff;            /* 0 means "no checksum" (and is illegal in IPv6) */
    __builtin_memcpy(udp + 6, &csum, 2);
    return 14 + (uint32_t)(udp - ip) + ulen;
}

#endif
