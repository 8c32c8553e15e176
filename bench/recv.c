/* The bench's receivers: the least a crowd of listeners can do in user
 * space. Takes the listener sockets the bench opened (inherited fds), and
 * every INTERVAL_MS wakes, asks epoll which have datagrams, and drains each
 * with recvmmsg in batches. It sleeps between sweeps instead of blocking in
 * epoll_wait so that no datagram wakes it: a wake-up is paid in the
 * sender's context on loopback, and the sender's CPU is what is measured.
 *
 *   recv FD_FILE [INTERVAL_MS]
 *
 * FD_FILE holds one inherited fd number per line. SIGUSR1 prints
 * "received N" (so far); SIGTERM prints it and exits. Compiled by
 * bench/receivers.py; the bench pins it off the sender's core.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define EVENTS 1024
#define SLOT 2048

static volatile sig_atomic_t stop, report;
static void on_term(int sig) { (void)sig; stop = 1; }
static void on_usr1(int sig) { (void)sig; report = 1; }

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s FD_FILE [INTERVAL_MS]\n", argv[0]);
        return 2;
    }
    long interval_ms = argc > 2 ? atol(argv[2]) : 20;
    FILE *f = fopen(argv[1], "r");
    if (!f) { perror(argv[1]); return 1; }
    int ep = epoll_create1(0);
    if (ep < 0) { perror("epoll_create1"); return 1; }
    /* room for a sweep's worth of datagrams at the bench's highest rate per
       listener (500/s); the kernel doubles it and caps it at rmem_max */
    int rcvbuf = 256 * 1024;
    int fd, n = 0;
    while (fscanf(f, "%d", &fd) == 1) {
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) { perror("epoll_ctl"); return 1; }
        n++;
    }
    fclose(f);

    struct sigaction sa = {0};
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);

    static unsigned char bufs[BATCH][SLOT];
    static struct iovec iov[BATCH];
    static struct mmsghdr msgs[BATCH];
    static struct epoll_event events[EVENTS];
    unsigned long long received = 0;
    struct timespec nap = {.tv_sec = interval_ms / 1000, .tv_nsec = (interval_ms % 1000) * 1000000L};
    printf("ready %d\n", n);
    fflush(stdout);
    while (!stop) {
        int ready;
        do {
            ready = epoll_wait(ep, events, EVENTS, 0);
            for (int i = 0; i < ready; i++) {
                int got;
                do {
                    for (int j = 0; j < BATCH; j++) {
                        iov[j].iov_base = bufs[j];
                        iov[j].iov_len = SLOT;
                        memset(&msgs[j].msg_hdr, 0, sizeof msgs[j].msg_hdr);
                        msgs[j].msg_hdr.msg_iov = &iov[j];
                        msgs[j].msg_hdr.msg_iovlen = 1;
                    }
                    got = recvmmsg(events[i].data.fd, msgs, BATCH, MSG_DONTWAIT, NULL);
                    if (got > 0) received += (unsigned long long)got;
                } while (got == BATCH);
            }
        } while (ready == EVENTS && !stop);
        if (report) {
            report = 0;
            printf("received %llu\n", received);
            fflush(stdout);
        }
        nanosleep(&nap, NULL);  /* EINTR from a signal: the loop looks at the flags */
    }
    printf("received %llu\n", received);
    fflush(stdout);
    return 0;
}
