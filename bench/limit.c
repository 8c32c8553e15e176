/* The limit: the least a fan-out can do in user space. Receives each ingest
 * packet with recvmmsg and sends one copy to every destination with sendmmsg
 * (1024 per call), from one thread. No rings, no per-listener headers, no
 * policy: what is left is the kernel's cost of the datagrams.
 *
 *   limit INGEST_PORT DEST_FILE [SECONDS]
 *
 * DEST_FILE holds one "ip port" per line; LIMIT_FROM=IP sends from IP
 * (default 127.0.0.1). Runs until SECONDS pass (default
 * 3600) or SIGTERM, then prints "sent N" and exits. Compiled by bench/run.py.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 1024

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s INGEST_PORT DEST_FILE [SECONDS]\n", argv[0]);
        return 2;
    }
    double seconds = argc > 3 ? atof(argv[3]) : 3600.0;
    FILE *f = fopen(argv[2], "r");
    if (!f) { perror(argv[2]); return 1; }
    size_t cap = 1024, n = 0;
    struct sockaddr_in *dst = malloc(cap * sizeof *dst);
    char ip[64];
    int port;
    while (fscanf(f, "%63s %d", ip, &port) == 2) {
        if (n == cap) dst = realloc(dst, (cap *= 2) * sizeof *dst);
        memset(&dst[n], 0, sizeof dst[n]);
        dst[n].sin_family = AF_INET;
        dst[n].sin_port = htons((unsigned short)port);
        inet_pton(AF_INET, ip, &dst[n].sin_addr);
        n++;
    }
    fclose(f);

    int in = socket(AF_INET, SOCK_DGRAM, 0), out = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in bind_to = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &bind_to.sin_addr);
    int big = 8 << 20;
    setsockopt(out, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    setsockopt(in, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    if (bind(in, (struct sockaddr *)&bind_to, sizeof bind_to) < 0) { perror("bind"); return 1; }
    /* send from a bound loopback address, as the relay does: an unbound
       socket pays for source-address selection on every datagram */
    struct sockaddr_in from = {.sin_family = AF_INET, .sin_port = 0};
    const char *from_ip = getenv("LIMIT_FROM");   /* bench/xdp.py sends from a veth's address */
    inet_pton(AF_INET, from_ip ? from_ip : "127.0.0.1", &from.sin_addr);
    if (bind(out, (struct sockaddr *)&from, sizeof from) < 0) { perror("bind"); return 1; }
    struct timeval tv = {.tv_sec = 0, .tv_usec = 200000};
    setsockopt(in, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    signal(SIGTERM, on_term);

    /* LIMIT_PACKETS=P: fan out P synthetic packets and exit, no sockets read;
       the fixed workload valgrind counts instructions over */
    const char *fixed = getenv("LIMIT_PACKETS");
    long fixed_left = fixed ? atol(fixed) : -1;

    static struct mmsghdr msgs[BATCH];
    static struct iovec iov[BATCH];
    static unsigned char pkt[2048];
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    unsigned long long sent = 0;
    while (!stop) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - t0.tv_sec + (now.tv_nsec - t0.tv_nsec) / 1e9 > seconds) break;
        ssize_t len;
        if (fixed_left >= 0) {
            if (fixed_left-- == 0) break;
            len = 172;
            memset(pkt, 0x80, (size_t)len);
        } else {
            len = recv(in, pkt, sizeof pkt, 0);
            if (len <= 0) continue;
        }
        for (size_t at = 0; at < n; at += BATCH) {
            size_t k = n - at < BATCH ? n - at : BATCH;
            for (size_t j = 0; j < k; j++) {
                iov[j].iov_base = pkt;
                iov[j].iov_len = (size_t)len;
                msgs[j].msg_hdr.msg_iov = &iov[j];
                msgs[j].msg_hdr.msg_iovlen = 1;
                msgs[j].msg_hdr.msg_name = &dst[at + j];
                msgs[j].msg_hdr.msg_namelen = sizeof dst[0];
            }
            size_t done = 0;
            while (done < k) {
                int rc = sendmmsg(out, msgs + done, (unsigned)(k - done), 0);
                if (rc > 0) { done += (size_t)rc; sent += (unsigned long long)rc; continue; }
                if (errno == EINTR) continue;
                done++;  /* skip the failing one, as the relay does */
            }
        }
    }
    printf("sent %llu\n", sent);
    return 0;
}
