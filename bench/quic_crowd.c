/* The QUIC crowd's listeners after their handshake: reads each listener's
 * 1-RTT packets, opens them (header protection and AEAD, libcrypto),
 * counts what arrived and the holes in the node's packet numbers, and
 * answers with ACK-only packets (and, in a silent room, a PING every 5 s),
 * as a browser's QUIC stack would, for
 * bench/quic.py. The handshake and JOIN are done in Python
 * (bench/peers/quic_c_crowd.py), which hands each joined listener over on
 * a SOCK_SEQPACKET socket: one struct handoff and the listener's socket.
 *
 *   quic_crowd CONTROL_FD SECONDS
 *
 * Every SWEEP_MS it wakes, asks epoll which sockets have packets and
 * drains them with recvmmsg: sleeping between sweeps keeps the node from
 * paying a wake-up per datagram. An ACK goes out for every second packet
 * (RFC 9000 13.2.2) and for a lone packet older than ACK_AFTER_MS, within
 * the 25 ms the listener announced. After SECONDS, or on SIGTERM, prints
 * one JSON line of totals: packets opened, audio received, audio lost (the
 * holes in its RTP sequence numbers from the handoff on), and the holes in
 * the packet numbers (informative: they may skip where the node's QUIC
 * library hands the sequence to its core).
 */
#define _GNU_SOURCE
#include <openssl/evp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SWEEP_MS 5
#define ACK_AFTER_MS 15
#define PING_AFTER_S 5.0
#define BATCH 32
#define EVENTS 1024
#define SLOT 1600

/* as bench/peers/quic_c_crowd.py packs it ("<HBBBBBxQQ32s12s32s32s12s32s20s20s") */
struct __attribute__((packed)) handoff {
    uint16_t suite;
    uint8_t key_len, rx_phase, tx_phase, host_cid_len, peer_cid_len, pad;
    uint64_t expected_pn, next_tx_pn;
    uint8_t rk[32], riv[12], rhp[32], sk[32], siv[12], shp[32], host_cid[20], peer_cid[20];
};

struct keys { EVP_CIPHER_CTX *aead, *hp; uint8_t iv[12]; int chacha; };

struct listener {
    int fd;
    struct keys rx, tx;
    uint8_t rx_phase, tx_phase, host_cid_len, peer_cid_len, peer_cid[20];
    int64_t largest, low;          /* highest packet number opened, and the bottom of its run */
    uint64_t next_tx_pn;
    int unacked;
    double first_unacked;
    unsigned long long received, audio, lost, holes, undecodable, acks, sent, pings;
    double last_tx;                /* when it last sent the node anything */
    long long late;                /* packets below the highest: holes filled late */
    int next_seq;                  /* the audio's next RTP sequence number, -1 before the first */
};

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int keys_set(struct keys *k, int suite, const uint8_t *key, const uint8_t *iv, const uint8_t *hp, int enc) {
    const EVP_CIPHER *aead, *mask;
    if (suite == 0x1301) { aead = EVP_aes_128_gcm(); mask = EVP_aes_128_ecb(); }
    else if (suite == 0x1302) { aead = EVP_aes_256_gcm(); mask = EVP_aes_256_ecb(); }
    else if (suite == 0x1303) { aead = EVP_chacha20_poly1305(); mask = EVP_chacha20(); }
    else return -1;
    k->aead = EVP_CIPHER_CTX_new();
    k->hp = EVP_CIPHER_CTX_new();
    k->chacha = suite == 0x1303;
    memcpy(k->iv, iv, 12);
    int ok = enc ? EVP_EncryptInit_ex(k->aead, aead, NULL, key, NULL)
                 : EVP_DecryptInit_ex(k->aead, aead, NULL, key, NULL);
    if (ok != 1 || EVP_EncryptInit_ex(k->hp, mask, NULL, hp, NULL) != 1) return -1;
    EVP_CIPHER_CTX_set_padding(k->hp, 0);
    return 0;
}

/* RFC 9001 5.4: five bytes of mask from a 16-byte sample */
static int hp_mask(struct keys *k, const uint8_t *sample, uint8_t *mask) {
    uint8_t out[32];
    int outl = 0;
    if (k->chacha) {
        static const uint8_t zero[5];
        if (EVP_EncryptInit_ex(k->hp, NULL, NULL, NULL, sample) != 1) return -1;
        if (EVP_EncryptUpdate(k->hp, out, &outl, zero, 5) != 1) return -1;
    } else if (EVP_EncryptUpdate(k->hp, out, &outl, sample, 16) != 1) return -1;
    memcpy(mask, out, 5);
    return 0;
}

static void nonce(const struct keys *k, uint64_t pn, uint8_t *n) {
    memcpy(n, k->iv, 12);
    for (int i = 0; i < 8; i++) n[11 - i] ^= (uint8_t)(pn >> (8 * i));
}

/* RFC 9000 A.3 */
static int64_t decode_pn(int64_t largest, uint64_t truncated, int bits) {
    int64_t expected = largest + 1, win = (int64_t)1 << bits, half = win / 2, mask = win - 1;
    int64_t candidate = (expected & ~mask) | (int64_t)truncated;
    if (candidate <= expected - half && candidate < ((int64_t)1 << 62) - win) return candidate + win;
    if (candidate > expected + half && candidate >= win) return candidate - win;
    return candidate;
}

static size_t put_varint(uint8_t *p, uint64_t v) {
    if (v < 64) { p[0] = (uint8_t)v; return 1; }
    if (v < 16384) { p[0] = (uint8_t)(0x40 | (v >> 8)); p[1] = (uint8_t)v; return 2; }
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * (3 - i)));
    p[0] = (uint8_t)((p[0] & 0x3f) | 0x80);
    return 4;      /* packet numbers here stay far below 2^30 */
}

/* one 1-RTT packet of these frames to the node */
static void send_frames(struct listener *l, const uint8_t *plain, size_t fl, double t) {
    uint8_t pkt[128], n[12];
    uint64_t pn = l->next_tx_pn++;
    size_t h = 0;
    pkt[h++] = (uint8_t)(0x40 | (l->tx_phase << 2) | 3);  /* short header, 4-byte packet number */
    memcpy(pkt + h, l->peer_cid, l->peer_cid_len);
    h += l->peer_cid_len;
    size_t pn_at = h;
    for (int i = 0; i < 4; i++) pkt[h++] = (uint8_t)(pn >> (8 * (3 - i)));
    nonce(&l->tx, pn, n);
    int outl = 0, fin = 0;
    if (EVP_EncryptInit_ex(l->tx.aead, NULL, NULL, NULL, n) != 1
        || EVP_EncryptUpdate(l->tx.aead, NULL, &outl, pkt, (int)h) != 1
        || EVP_EncryptUpdate(l->tx.aead, pkt + h, &outl, plain, (int)fl) != 1
        || EVP_EncryptFinal_ex(l->tx.aead, pkt + h + outl, &fin) != 1
        || EVP_CIPHER_CTX_ctrl(l->tx.aead, EVP_CTRL_AEAD_GET_TAG, 16, pkt + h + outl + fin) != 1)
        return;
    size_t len = h + (size_t)(outl + fin) + 16;
    uint8_t mask[5];
    if (hp_mask(&l->tx, pkt + pn_at + 4, mask) != 0) return;
    pkt[0] ^= mask[0] & 0x1f;
    for (int i = 0; i < 4; i++) pkt[pn_at + i] ^= mask[1 + i];
    if (send(l->fd, pkt, len, MSG_DONTWAIT) > 0) l->sent++;
    l->last_tx = t;
}

static void send_ack(struct listener *l, double t) {
    uint8_t plain[32];
    size_t fl = 0;
    plain[fl++] = 0x02;                                    /* ACK, one range, no delay */
    fl += put_varint(plain + fl, (uint64_t)l->largest);
    fl += put_varint(plain + fl, 0);
    fl += put_varint(plain + fl, 0);
    fl += put_varint(plain + fl, (uint64_t)(l->largest - l->low));
    send_frames(l, plain, fl, t);
    l->acks++;
    l->unacked = 0;
}

static void opened(struct listener *l, uint8_t *pkt, size_t len, double t) {
    size_t pn_at = 1 + (size_t)l->host_cid_len;
    uint8_t mask[5], n[12], plain[SLOT];
    if ((pkt[0] & 0x80) || len < pn_at + 4 + 16 || hp_mask(&l->rx, pkt + pn_at + 4, mask) != 0) {
        l->undecodable++;
        return;
    }
    pkt[0] ^= mask[0] & 0x1f;
    int pn_len = (pkt[0] & 3) + 1;
    uint64_t truncated = 0;
    for (int i = 0; i < pn_len; i++) {
        pkt[pn_at + i] ^= mask[1 + i];
        truncated = (truncated << 8) | pkt[pn_at + i];
    }
    if (((pkt[0] >> 2) & 1) != l->rx_phase) { l->undecodable++; return; }  /* a key update: not followed */
    int64_t pn = decode_pn(l->largest, truncated, 8 * pn_len);
    size_t h = pn_at + (size_t)pn_len;
    if (len < h + 16) { l->undecodable++; return; }
    nonce(&l->rx, (uint64_t)pn, n);
    int outl = 0, fin = 0;
    if (EVP_DecryptInit_ex(l->rx.aead, NULL, NULL, NULL, n) != 1
        || EVP_CIPHER_CTX_ctrl(l->rx.aead, EVP_CTRL_AEAD_SET_TAG, 16, pkt + len - 16) != 1
        || EVP_DecryptUpdate(l->rx.aead, NULL, &outl, pkt, (int)h) != 1
        || EVP_DecryptUpdate(l->rx.aead, plain, &outl, pkt + h, (int)(len - h - 16)) != 1
        || EVP_DecryptFinal_ex(l->rx.aead, plain + outl, &fin) != 1) {
        l->undecodable++;
        return;
    }
    l->received++;
    if (pn > l->largest) {
        if (pn > l->largest + 1) { l->holes += (unsigned long long)(pn - l->largest - 1); l->low = pn; }
        l->largest = pn;
    } else {
        l->late++;
    }
    /* the core's audio: one DATAGRAM frame (0x30) holding the RTP packet;
       loss is counted in its sequence numbers, because packet numbers may
       skip where the node's library and its core hand the sequence over */
    size_t plain_len = (size_t)(outl + fin);
    if (plain_len >= 13 && plain[0] == 0x30) {
        int seq = (plain[3] << 8) | plain[4];
        if (l->next_seq >= 0) {
            int gap = (seq - l->next_seq) & 0xffff;
            if (gap < 0x8000) l->lost += (unsigned long long)gap;
        }
        l->next_seq = (seq + 1) & 0xffff;
        l->audio++;
    }
    if (l->unacked++ == 0) l->first_unacked = t;
    if (l->unacked >= 2) send_ack(l, t);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s CONTROL_FD SECONDS\n", argv[0]);
        return 2;
    }
    int control = atoi(argv[1]);
    double end = now_s() + atof(argv[2]);
    struct sigaction sa = {0};
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    int ep = epoll_create1(0);
    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, control, &cev);

    size_t cap = 256, count = 0;
    struct listener **all = malloc(cap * sizeof *all);
    static uint8_t bufs[BATCH][SLOT];
    static struct iovec iov[BATCH];
    static struct mmsghdr msgs[BATCH];
    static struct epoll_event events[EVENTS];
    unsigned long long bad_handoffs = 0;
    struct timespec nap = {.tv_sec = 0, .tv_nsec = SWEEP_MS * 1000000L};
    int control_open = 1;
    while (!stop && now_s() < end) {
        int ready;
        do {
            ready = epoll_wait(ep, events, EVENTS, 0);
            double t = now_s();
            for (int i = 0; i < ready; i++) {
                struct listener *l = events[i].data.ptr;
                if (l == NULL) {   /* a listener handed over (or the joiner gone) */
                    struct handoff ho;
                    char cbuf[CMSG_SPACE(sizeof(int))];
                    struct iovec hv = {.iov_base = &ho, .iov_len = sizeof ho};
                    struct msghdr mh = {.msg_iov = &hv, .msg_iovlen = 1, .msg_control = cbuf,
                                        .msg_controllen = sizeof cbuf};
                    ssize_t got = recvmsg(control, &mh, MSG_DONTWAIT);
                    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
                    if (got == 0) { epoll_ctl(ep, EPOLL_CTL_DEL, control, NULL); control_open = 0; continue; }
                    if (got != (ssize_t)sizeof ho || c == NULL || c->cmsg_type != SCM_RIGHTS) { bad_handoffs++; continue; }
                    l = calloc(1, sizeof *l);
                    memcpy(&l->fd, CMSG_DATA(c), sizeof(int));
                    if (keys_set(&l->rx, ho.suite, ho.rk, ho.riv, ho.rhp, 0) != 0
                        || keys_set(&l->tx, ho.suite, ho.sk, ho.siv, ho.shp, 1) != 0) {
                        bad_handoffs++;
                        close(l->fd);
                        free(l);
                        continue;
                    }
                    l->rx_phase = ho.rx_phase;
                    l->tx_phase = ho.tx_phase;
                    l->host_cid_len = ho.host_cid_len;
                    l->peer_cid_len = ho.peer_cid_len;
                    memcpy(l->peer_cid, ho.peer_cid, 20);
                    l->largest = l->low = (int64_t)ho.expected_pn - 1;
                    l->next_tx_pn = ho.next_tx_pn;
                    l->next_seq = -1;
                    l->last_tx = now_s();
                    if (count == cap) all = realloc(all, (cap *= 2) * sizeof *all);
                    all[count++] = l;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = l};
                    epoll_ctl(ep, EPOLL_CTL_ADD, l->fd, &ev);
                    continue;
                }
                int got;
                do {
                    for (int j = 0; j < BATCH; j++) {
                        iov[j].iov_base = bufs[j];
                        iov[j].iov_len = SLOT;
                        memset(&msgs[j].msg_hdr, 0, sizeof msgs[j].msg_hdr);
                        msgs[j].msg_hdr.msg_iov = &iov[j];
                        msgs[j].msg_hdr.msg_iovlen = 1;
                    }
                    got = recvmmsg(l->fd, msgs, BATCH, MSG_DONTWAIT, NULL);
                    for (int j = 0; j < got; j++) opened(l, bufs[j], msgs[j].msg_len, t);
                } while (got == BATCH);
            }
        } while (ready == EVENTS);
        double t = now_s();
        for (size_t i = 0; i < count; i++) {
            struct listener *l = all[i];
            if (l->unacked && t - l->first_unacked > ACK_AFTER_MS / 1e3) send_ack(l, t);
            /* a silent room: a PING now and then, as a listener's stack
               would, so the node's idle timer does not end the connection */
            if (t - l->last_tx > PING_AFTER_S) {
                static const uint8_t ping[1] = {0x01};
                send_frames(l, ping, 1, t);
                l->pings++;
            }
        }
        (void)control_open;
        nanosleep(&nap, NULL);
    }
    unsigned long long received = 0, audio = 0, lost = 0, holes = 0, undecodable = 0, acks = 0, pings = 0;
    long long late = 0;
    for (size_t i = 0; i < count; i++) {
        received += all[i]->received;
        audio += all[i]->audio;
        holes += all[i]->holes;
        lost += all[i]->lost;
        undecodable += all[i]->undecodable;
        acks += all[i]->acks;
        pings += all[i]->pings;
        late += all[i]->late;
    }
    /* a packet that arrived below the highest filled a hole counted before */
    long long net_holes = (long long)holes - late;
    printf("{\"handed_over\": %zu, \"packets\": %llu, \"received\": %llu, \"lost\": %llu, "
           "\"packet_number_holes\": %lld, \"undecodable\": %llu, \"acks_sent\": %llu, "
           "\"pings_sent\": %llu, \"bad_handoffs\": %llu}\n", count, received, audio, lost,
           net_holes < 0 ? 0 : net_holes, undecodable, acks, pings, bad_handoffs);
    fflush(stdout);
    return 0;
}
