/* The flood bench's attacker: unknown traffic at the listener port, as fast
 * as one core sends it or at a set rate, from many source addresses.
 *
 *   flood HOST PORT RATE SOURCES SECONDS [MIX]
 *
 * HOST is an IPv4 address (loopback in the bench); RATE is datagrams per
 * second (0: as fast as it goes); SOURCES distinct addresses 127.3.0.1,
 * 127.3.0.2, ... are written into the IP header of a raw socket, so one
 * process looks like that many hosts without binding a socket for each.
 * MIX is a string of letters, one datagram kind each, sent in turn:
 *   j  a JOIN without a cookie, bad token (the node answers a CHALLENGE)
 *   c  a JOIN with a forged cookie, bad token
 *   k  a KEEPALIVE with a random session id
 *   g  garbage (random bytes, first byte anything)
 * Default "jckg". Prints "sent N seconds S" at the end (or on SIGTERM).
 * The node's replies go to ports 20000..20015 of the source addresses,
 * where this process holds sockets it never reads: they are dropped there,
 * as at a real attacker's host, instead of each costing the node's core an
 * ICMP port-unreachable (loopback delivers in the sender's context).
 * Compiled by bench/flood.py; needs CAP_NET_RAW (the bench runs as root).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 256
#define PAYLOAD_MAX 256
#define MIN_JOIN 128          /* the protocol pads a JOIN to this (no amplification) */

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static uint64_t rng = 0x9E3779B97F4A7C15ULL;
static uint64_t next_random(void) {   /* xorshift64*: fast, and not what is measured */
    rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27;
    return rng * 0x2545F4914F6CDD1DULL;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* one control datagram of kind `k` into p; returns its length */
static size_t payload(char k, uint8_t *p) {
    size_t n = 0;
    uint64_t r = next_random();
    switch (k) {
    case 'j': case 'c': {
        static const char room[] = "town";
        static const char token[] = "eyJhbGciOiJIUzI1NiJ9.bad.token";
        p[n++] = 0x0B; p[n++] = 1; p[n++] = 1; p[n++] = 0;     /* magic, version, JOIN, flags */
        p[n++] = sizeof room - 1; memcpy(p + n, room, sizeof room - 1); n += sizeof room - 1;
        p[n++] = 0; p[n++] = sizeof token - 1; memcpy(p + n, token, sizeof token - 1); n += sizeof token - 1;
        if (k == 'c') {
            p[n++] = 20;
            for (int i = 0; i < 20; i += 8) { uint64_t x = next_random(); memcpy(p + n + i, &x, i + 8 <= 20 ? 8 : 4); }
            n += 20;
        } else {
            p[n++] = 0;
        }
        memset(p + n, 0, MIN_JOIN - n); n = MIN_JOIN;
        break;
    }
    case 'k':
        p[n++] = 0x0B; p[n++] = 1; p[n++] = 5; p[n++] = 0;
        memcpy(p + n, &r, 8); n += 8;
        memset(p + n, 0, 4); n += 4;                             /* the KEEPALIVE's padding */
        break;
    default:
        n = 16 + r % 200;
        for (size_t i = 0; i < n; i += 8) { uint64_t x = next_random(); memcpy(p + i, &x, 8); }
        break;
    }
    return n;
}

int main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s HOST PORT RATE SOURCES SECONDS [MIX]\n", argv[0]);
        return 2;
    }
    struct in_addr dst;
    if (inet_pton(AF_INET, argv[1], &dst) != 1) { fprintf(stderr, "bad host %s\n", argv[1]); return 2; }
    int port = atoi(argv[2]);
    double rate = atof(argv[3]), seconds = atof(argv[5]);
    long sources = atol(argv[4]);
    const char *mix = argc > 6 ? argv[6] : "jckg";
    size_t nmix = strlen(mix);
    if (sources < 1 || sources > 65000 || nmix == 0) { fprintf(stderr, "bad sources or mix\n"); return 2; }

    for (int i = 0; i < 16; i++) {
        int sink = socket(AF_INET, SOCK_DGRAM, 0), small = 4096;
        struct sockaddr_in any = {.sin_family = AF_INET, .sin_port = htons((uint16_t)(20000 + i))};
        setsockopt(sink, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
        if (sink < 0 || bind(sink, (struct sockaddr *)&any, sizeof any) < 0)
            perror("reply sink (the node's replies will cost it ICMP errors)");
    }
    int fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);   /* IPPROTO_RAW implies IP_HDRINCL */
    if (fd < 0) { perror("socket(SOCK_RAW)"); return 1; }
    int sndbuf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    struct sigaction sa = {0};
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    static uint8_t frames[BATCH][sizeof(struct iphdr) + sizeof(struct udphdr) + PAYLOAD_MAX];
    static struct mmsghdr msgs[BATCH];
    static struct iovec iov[BATCH];
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_addr = dst};
    uint64_t sent = 0, k = 0;
    double t0 = now_s(), end = t0 + seconds;
    while (!stop) {
        double t = now_s();
        if (t >= end) break;
        int want = BATCH;
        if (rate > 0) {   /* paced: never ahead of rate * elapsed */
            double due = rate * (t - t0) - (double)sent;
            if (due < 1) { usleep(200); continue; }
            if (due < want) want = (int)due;
        }
        for (int i = 0; i < want; i++, k++) {
            uint8_t *f = frames[i];
            struct iphdr *ip = (struct iphdr *)f;
            struct udphdr *udp = (struct udphdr *)(f + sizeof *ip);
            size_t n = payload(mix[k % nmix], f + sizeof *ip + sizeof *udp);
            uint32_t src = 0x7F030001u + (uint32_t)(k % (uint64_t)sources);   /* 127.3.0.1 + i */
            memset(ip, 0, sizeof *ip);
            ip->ihl = 5; ip->version = 4; ip->ttl = 64; ip->protocol = IPPROTO_UDP;
            ip->saddr = htonl(src); ip->daddr = dst.s_addr;
            ip->tot_len = htons((uint16_t)(sizeof *ip + sizeof *udp + n));
            udp->source = htons((uint16_t)(20000 + (k / (uint64_t)sources) % 16));
            udp->dest = htons((uint16_t)port);
            udp->len = htons((uint16_t)(sizeof *udp + n));
            udp->check = 0;                                  /* none: allowed on IPv4 */
            iov[i].iov_base = f; iov[i].iov_len = sizeof *ip + sizeof *udp + n;
            msgs[i].msg_hdr = (struct msghdr){.msg_name = &to, .msg_namelen = sizeof to,
                                              .msg_iov = &iov[i], .msg_iovlen = 1};
        }
        int got = sendmmsg(fd, msgs, (unsigned)want, 0);
        if (got > 0) sent += (uint64_t)got;
        else usleep(100);   /* a full buffer: let the kernel catch up */
    }
    printf("sent %llu seconds %.3f\n", (unsigned long long)sent, now_s() - t0);
    return 0;
}
