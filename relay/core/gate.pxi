# The listener port's front door: the core drains the socket with recvmmsg
# and sorts each datagram before Python sees it, cheapest check first, so
# strangers' traffic costs a few hundred nanoseconds and never delays a
# session's own messages (docs/protocol.md "Threat model"):
#
#   1. from an address with a session (a table Python keeps): up, always;
#   2. anything else: its first bytes say what it is; RTP, RTCP, LEAVE and
#      node-to-listener types from a stranger are counted and dropped;
#   3. per source address (IPv4, or an IPv6 /64), a rate bound, then a
#      node-wide one: over either, counted and dropped;
#   4. a JOIN without a valid cookie is answered here with a CHALLENGE
#      (the stateless cookie of relay.wire.protocol.CookieJar, made with the
#      same secret), the way a kernel answers a SYN with a SYN cookie, and a
#      KEEPALIVE for no session with REJECT unknown_session (its listener
#      rejoins), both under a node-wide bound on replies;
#   5. a JOIN whose cookie checks out (or a speaker's key exchange, another
#      version) goes up to the policy, under its own node-wide bound.
# Packets in, packets out, counters: which addresses have sessions and how
# fast strangers may go are the caller's to say. Included by relay/_core.pyx.

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_MD_CTX:
        pass
    ctypedef struct EVP_MD:
        pass
    EVP_MD_CTX *EVP_MD_CTX_new()
    void EVP_MD_CTX_free(EVP_MD_CTX *ctx)
    const EVP_MD *EVP_sha256()
    int EVP_DigestInit_ex(EVP_MD_CTX *ctx, const EVP_MD *md, void *impl)
    int EVP_DigestUpdate(EVP_MD_CTX *ctx, const void *d, size_t n)
    int EVP_DigestFinal_ex(EVP_MD_CTX *ctx, unsigned char *md, unsigned int *n)
    int EVP_MD_CTX_copy_ex(EVP_MD_CTX *out, const EVP_MD_CTX *inp)

cdef enum:
    G_BATCH = 64            # datagrams per recvmmsg
    G_BUF = 4097            # a slot: any control message (MAX_CONTROL) or speaker's SRTP, +1 to see truncation
    G_MAGIC = 0x0B
    G_MIN_JOIN = 128        # relay.wire.protocol.MIN_JOIN: shorter JOINs are malformed
    G_COOKIE = 20           # 4-byte issue time + 16 bytes of MAC
    G_CHALLENGE = 25        # header, cookie length, cookie
    G_BUCKET_BITS = 18      # per-source rate cells: 2^18 of them, each source charged to two
    G_KNOWN_MIN = 1024
    G_KNOWN_MAX = 1 << 24   # sessions: the table's size (2x, a power of two) stays in uint32
    # verdicts
    G_UP = 0
    G_ANSWERED = 1
    G_DROPPED = 2
    # counters
    GC_KNOWN = 0            # from a session's address: up
    GC_JOINS = 1            # JOINs with a valid cookie: up
    GC_OTHER = 2            # strangers' datagrams only the policy can answer: up
    GC_CHALLENGES = 3       # CHALLENGEs sent from here
    GC_STALE = 4            # JOINs whose cookie did not check out (challenged again)
    GC_SOURCE_RATE = 5      # dropped: over the per-source bound
    GC_NODE_RATE = 6        # dropped: over a node-wide bound
    GC_NOT_SESSION = 7      # dropped: RTP, RTCP or LEAVE from an address without a session
    GC_MALFORMED = 8        # dropped: not ours, truncated, or a type only the node sends
    GC_UNSENT = 9           # replies the kernel would not take
    GC_ENDED = 10           # KEEPALIVEs for no session, answered REJECT unknown_session from here
    GC_N = 11

GATE_COUNTERS = ("known", "joins", "other", "challenges", "stale_cookies", "source_rate", "node_rate",
                 "not_session", "malformed", "unsent", "unknown_session")


cdef inline uint64_t g_mix(uint64_t k) noexcept nogil:
    k ^= k >> 33
    k *= <uint64_t>0xff51afd7ed558ccdULL
    k ^= k >> 33
    k *= <uint64_t>0xc4ceb9fe1a85ec53ULL
    k ^= k >> 33
    return k


cdef inline bint g_peer(const uint8_t *a, int alen, uint8_t *ip16, uint16_t *port) noexcept nogil:
    """A sockaddr as 16 address bytes (IPv4 mapped) and its port; False if neither family."""
    cdef uint16_t fam
    if alen < 4:                         # the family and port are not all there: read nothing
        return False
    fam = (<const uint16_t *>a)[0]
    memcpy(port, a + 2, 2)
    if fam == AF_INET and alen >= 8:
        memset(ip16, 0, 10)
        ip16[10] = 0xFF
        ip16[11] = 0xFF
        memcpy(ip16 + 12, a + 4, 4)
        return True
    if fam == AF_INET6 and alen >= 24:
        memcpy(ip16, a + 8, 16)
        return True
    return False


cdef inline int64_t g_span(double ns) noexcept nogil:
    """Nanoseconds as a GCRA interval or window, clamped (NaN or below 0:
    0; at most 1e18, so arrival times stay in int64) before the cast, which
    C leaves undefined out of range."""
    if not ns > 0:
        return 0
    return <int64_t>(ns if ns < 1e18 else 1e18)


cdef inline int64_t g_window(int64_t interval, double arrivals) noexcept nogil:
    """A node-wide bound's window: `arrivals` whole intervals, at least one."""
    if interval <= 0:
        return 0
    if not arrivals >= 1:
        arrivals = 1
    return g_span(<double>interval * <double><int64_t>(arrivals if arrivals < 1e18 else 1e18))


cdef inline bint g_allow(int64_t *tat, int64_t now, int64_t interval, int64_t window) noexcept nogil:
    """GCRA: one more arrival fits if the cell's theoretical arrival time is
    no further ahead of now than the burst window."""
    if interval <= 0:
        return True
    if tat[0] - now > window:
        return False
    tat[0] = (tat[0] if tat[0] > now else now) + interval
    return True


cdef class ControlGate:
    """The listener socket's drain and sorter (core/gate.pxi). `capacity`:
    sessions whose addresses it knows at most; `secret`: the CookieJar's;
    `seed`: 16 random bytes for its hashes. Its memory comes from the
    core's counted arena (allocation_balance), freed with it."""

    cdef uint8_t *buf
    cdef uint8_t *names
    cdef mmsghdr *rx
    cdef iovec *rx_iov
    cdef mmsghdr *tx
    cdef iovec *tx_iov
    cdef uint8_t *tx_buf
    cdef uint8_t *verdict
    cdef int64_t *cells
    cdef uint8_t *known_key      # 18 bytes an entry: address and port
    cdef uint8_t *known_used
    cdef uint32_t known_mask
    cdef readonly int known      # entries in the table (written only by known_add and known_drop)
    cdef EVP_MD_CTX *inner
    cdef EVP_MD_CTX *outer
    cdef EVP_MD_CTX *work
    cdef uint64_t seed1, seed2
    cdef int64_t src_interval, src_window, up_tat, up_interval, up_window, ch_tat, ch_interval, ch_window
    cdef uint32_t lifetime_s
    cdef uint64_t n[GC_N]
    cdef int reply_len           # of the reply _sort just wrote

    def __cinit__(self, int capacity, bytes secret not None, bytes seed not None, double lifetime_s=10.0):
        cdef uint32_t size = G_KNOWN_MIN
        cdef uint8_t pad[64]
        cdef int j
        cdef Py_ssize_t i
        cdef EVP_MD_CTX *ctx
        cdef const uint8_t *key = <const uint8_t *>secret
        if len(seed) < 16 or len(secret) > 64:
            raise ValueError("seed: 16 bytes; secret: at most 64")
        # bounds that keep the table's size and the clock's casts in range
        if capacity > G_KNOWN_MAX or not 0 <= lifetime_s < 2.0 ** 31:
            raise ValueError(f"capacity: at most {G_KNOWN_MAX}; lifetime_s: 0 to 2^31 s")
        while size < 2 * <uint32_t>max(capacity, 1):
            size <<= 1
        self.known_mask = size - 1
        self.buf = <uint8_t *>_alloc(G_BATCH, G_BUF)
        self.names = <uint8_t *>_alloc(G_BATCH, RX_ADDR)
        self.rx = <mmsghdr *>_alloc(G_BATCH, sizeof(mmsghdr))
        self.rx_iov = <iovec *>_alloc(G_BATCH, sizeof(iovec))
        self.tx = <mmsghdr *>_alloc(G_BATCH, sizeof(mmsghdr))
        self.tx_iov = <iovec *>_alloc(G_BATCH, sizeof(iovec))
        self.tx_buf = <uint8_t *>_alloc(G_BATCH, G_CHALLENGE)
        self.verdict = <uint8_t *>_alloc(G_BATCH, 1)
        self.cells = <int64_t *>_alloc(<size_t>1 << G_BUCKET_BITS, sizeof(int64_t))
        self.known_key = <uint8_t *>_alloc(size, 18)
        self.known_used = <uint8_t *>_alloc(size, 1)
        self.inner, self.outer, self.work = EVP_MD_CTX_new(), EVP_MD_CTX_new(), EVP_MD_CTX_new()
        if not self.inner or not self.outer or not self.work:
            raise MemoryError()
        memcpy(&self.seed1, <const uint8_t *>seed, 8)
        memcpy(&self.seed2, (<const uint8_t *>seed) + 8, 8)
        # HMAC-SHA256's two keyed prefixes, hashed once: a cookie then costs
        # two compressions and two context copies
        for j in range(2):
            memset(pad, 0x36 if j == 0 else 0x5c, 64)
            for i in range(len(secret)):
                pad[i] ^= key[i]
            ctx = self.inner if j == 0 else self.outer
            EVP_DigestInit_ex(ctx, EVP_sha256(), NULL)
            EVP_DigestUpdate(ctx, pad, 64)
        self.lifetime_s = <uint32_t>lifetime_s
        self.limits()

    def __dealloc__(self):
        # _free skips what a failed __cinit__ never allocated
        _free(self.buf); _free(self.names); _free(self.rx); _free(self.rx_iov); _free(self.tx); _free(self.tx_iov)
        _free(self.tx_buf); _free(self.verdict); _free(self.cells); _free(self.known_key); _free(self.known_used)
        EVP_MD_CTX_free(self.inner); EVP_MD_CTX_free(self.outer); EVP_MD_CTX_free(self.work)

    def limits(self, double per_source=50.0, double per_source_burst=50.0, double up_rate=4000.0,
               double challenge_rate=200000.0):
        """Strangers' bounds, per second: all they send per source address,
        what goes up to the policy node-wide, replies (CHALLENGEs, REJECTs)
        node-wide (0: none)."""
        self.src_interval = g_span(1e9 / per_source) if per_source > 0 else 0
        self.src_window = g_span(per_source_burst * <double>self.src_interval)
        self.up_interval = g_span(1e9 / up_rate) if up_rate > 0 else 0
        self.up_window = g_window(self.up_interval, up_rate / 4)
        self.ch_interval = g_span(1e9 / challenge_rate) if challenge_rate > 0 else 0
        self.ch_window = g_window(self.ch_interval, challenge_rate / 10)

    # ----------------------------------------------------------- sessions

    cdef int _slot(self, const uint8_t *key) noexcept nogil:
        cdef uint64_t h
        cdef uint32_t i
        memcpy(&h, key + 8, 8)
        i = <uint32_t>g_mix(h ^ self.seed1 ^ (<uint64_t>key[16] << 8 | key[17])) & self.known_mask
        while self.known_used[i] and memcmp(self.known_key + i * 18, key, 18) != 0:
            i = (i + 1) & self.known_mask
        return <int>i

    cdef bint _key(self, bytes sockaddr, uint8_t *key):
        cdef uint16_t port
        if not g_peer(<const uint8_t *>sockaddr, <int>len(sockaddr), key, &port):
            return False
        memcpy(key + 16, &port, 2)
        return True

    def known_add(self, bytes sockaddr not None):
        """A session now lives at this address (raw sockaddr bytes)."""
        cdef uint8_t key[18]
        cdef int i
        if not self._key(sockaddr, key) or <uint32_t>self.known * 2 >= self.known_mask:
            return
        i = self._slot(key)
        if not self.known_used[i]:
            memcpy(self.known_key + i * 18, key, 18)
            self.known_used[i] = 1
            self.known += 1

    def known_drop(self, bytes sockaddr not None):
        """No session lives at this address any more."""
        cdef uint8_t key[18]
        cdef uint32_t i, j, home
        cdef uint64_t h
        if not self._key(sockaddr, key):
            return
        i = <uint32_t>self._slot(key)
        if not self.known_used[i]:
            return
        # shift later entries of the probe run back: lookups need no tombstones
        j = i
        while True:
            j = (j + 1) & self.known_mask
            if not self.known_used[j]:
                break
            memcpy(&h, self.known_key + j * 18 + 8, 8)
            home = <uint32_t>g_mix(h ^ self.seed1 ^ (<uint64_t>self.known_key[j * 18 + 16] << 8
                                                      | self.known_key[j * 18 + 17])) & self.known_mask
            if (i < j and i < home <= j) or (i > j and (home > i or home <= j)):
                continue
            memcpy(self.known_key + i * 18, self.known_key + j * 18, 18)
            i = j
        self.known_used[i] = 0
        self.known -= 1

    def counters(self):
        """What the gate did, by GATE_COUNTERS name, since it was made."""
        return {name: self.n[k] for k, name in enumerate(GATE_COUNTERS)}

    def cookie(self, bytes sockaddr not None, uint32_t issued):
        """The cookie this gate makes for `sockaddr` at `issued` (seconds): the test oracle's."""
        cdef uint8_t out[G_COOKIE]
        self._cookie(<const uint8_t *>sockaddr, <int>len(sockaddr), issued, out)
        return out[:G_COOKIE]

    # ----------------------------------------------------------- per datagram

    cdef void _cookie(self, const uint8_t *addr, int alen, uint32_t issued, uint8_t *out) noexcept nogil:
        """CookieJar's cookie: issue time, then HMAC-SHA256(secret, time | sockaddr)[:16]."""
        cdef uint8_t d[32]
        cdef unsigned int dn
        out[0] = <uint8_t>(issued >> 24)
        out[1] = <uint8_t>(issued >> 16)
        out[2] = <uint8_t>(issued >> 8)
        out[3] = <uint8_t>issued
        EVP_MD_CTX_copy_ex(self.work, self.inner)
        EVP_DigestUpdate(self.work, out, 4)
        EVP_DigestUpdate(self.work, addr, <size_t>alen)
        EVP_DigestFinal_ex(self.work, d, &dn)
        EVP_MD_CTX_copy_ex(self.work, self.outer)
        EVP_DigestUpdate(self.work, d, 32)
        EVP_DigestFinal_ex(self.work, d, &dn)
        memcpy(out + 4, d, 16)

    cdef bint _cookie_ok(self, const uint8_t *cookie, const uint8_t *addr, int alen, int64_t now) noexcept nogil:
        cdef uint32_t issued = be32(cookie)
        cdef uint8_t want[G_COOKIE]
        cdef uint8_t diff = 0
        cdef int k
        cdef uint32_t age
        # the free test first: a cookie older than its lifetime costs no hash
        age = <uint32_t>(now // 1000000000) - issued     # modulo 2^32, as CookieJar
        if age > self.lifetime_s:
            return False
        self._cookie(addr, alen, issued, want)
        for k in range(4, G_COOKIE):     # in constant time, like hmac.compare_digest
            diff |= want[k] ^ cookie[k]
        return diff == 0

    cdef bint _source_ok(self, const uint8_t *key, int64_t now) noexcept nogil:
        """The per-source bound, charged to two cells: a source that shares
        one cell with a flooder still has its own in the other."""
        cdef uint64_t h
        cdef uint32_t mask = (<uint32_t>1 << G_BUCKET_BITS) - 1
        cdef int64_t *a
        cdef int64_t *b
        if self.src_interval <= 0:
            return True
        if key[10] == 0xFF and key[11] == 0xFF:
            h = be32(key + 12)           # IPv4: the address
        else:
            memcpy(&h, key, 8)           # IPv6: its /64, as the join limiter counts
        a = &self.cells[g_mix(h ^ self.seed1) & mask]
        b = &self.cells[g_mix(h ^ self.seed2) & mask]
        if a[0] - now > self.src_window and b[0] - now > self.src_window:
            return False
        a[0] = (a[0] if a[0] > now else now) + self.src_interval
        b[0] = (b[0] if b[0] > now else now) + self.src_interval
        return True

    cdef int _up(self, int64_t now, int counter) noexcept nogil:
        if not g_allow(&self.up_tat, now, self.up_interval, self.up_window):
            self.n[GC_NODE_RATE] += 1
            return G_DROPPED
        self.n[counter] += 1
        return G_UP

    cdef int _ended(self, const uint8_t *p, int n, int64_t now, uint8_t *reply) noexcept nogil:
        """A KEEPALIVE for no session: REJECT unknown_session with its session
        id as proof (what the policy answers), never longer than it."""
        if n < 12:
            self.n[GC_MALFORMED] += 1
            return G_DROPPED
        if not g_allow(&self.ch_tat, now, self.ch_interval, self.ch_window):
            self.n[GC_NODE_RATE] += 1
            return G_DROPPED
        reply[0] = G_MAGIC
        reply[1] = 1
        reply[2] = 4                     # REJECT
        reply[3] = 0
        reply[4] = 10                    # Reason.UNKNOWN_SESSION
        reply[5] = 0                     # no redirect
        self.reply_len = 6
        if n >= 14:
            memcpy(reply + 6, p + 4, 8)
            self.reply_len = 14
        self.n[GC_ENDED] += 1
        return G_ANSWERED

    cdef int _sort(self, const uint8_t *p, int n, bint truncated, const uint8_t *addr, int alen, int64_t now,
                   uint8_t *reply) noexcept nogil:
        """One datagram's fate: G_UP, G_ANSWERED (`reply` holds a CHALLENGE) or G_DROPPED."""
        cdef uint8_t key[18]
        cdef uint16_t port
        cdef int i, cl
        cdef uint8_t kind
        if not g_peer(addr, alen, key, &port):
            self.n[GC_MALFORMED] += 1
            return G_DROPPED
        memcpy(key + 16, &port, 2)
        if self.known and self.known_used[self._slot(key)]:
            self.n[GC_KNOWN] += 1
            return G_UP
        if truncated or n < 4 or p[0] != G_MAGIC:
            # RFC 5761/7983: 128..191 opens RTP or RTCP, a session's only
            self.n[GC_NOT_SESSION if n >= 2 and 128 <= p[0] <= 191 else GC_MALFORMED] += 1
            return G_DROPPED
        kind = p[2]
        if p[1] == 1 and kind == 6:      # a LEAVE for no session: nothing to end
            self.n[GC_NOT_SESSION] += 1
            return G_DROPPED
        if p[1] == 1 and kind != 1 and kind != 5:
            self.n[GC_MALFORMED] += 1    # CHALLENGE, ACCEPT, REJECT, SPEAKERS: the node's to send
            return G_DROPPED
        if not self._source_ok(key, now):
            self.n[GC_SOURCE_RATE] += 1
            return G_DROPPED
        if p[1] != 1:
            return self._up(now, GC_OTHER)   # another version: the policy REJECTs it
        if kind == 5:
            return self._ended(p, n, now, reply)
        if n < G_MIN_JOIN or p[4] > 64:
            self.n[GC_MALFORMED] += 1
            return G_DROPPED
        i = 5 + p[4]
        if i + 2 > n or be16(p + i) > 2048 or i + 2 + be16(p + i) + 1 > n:
            self.n[GC_MALFORMED] += 1
            return G_DROPPED
        i += 2 + be16(p + i)
        cl = p[i]
        i += 1
        if cl and i + cl <= n:
            if cl == G_COOKIE and self._cookie_ok(p + i, addr, alen, now):
                return self._up(now, GC_JOINS)
            self.n[GC_STALE] += 1        # forged, stale or another address's: asked again
        if p[3] & 0x08:
            # a speaker's key exchange: its CHALLENGE carries the node's key,
            # which only the policy has
            return self._up(now, GC_OTHER)
        if not g_allow(&self.ch_tat, now, self.ch_interval, self.ch_window):
            self.n[GC_NODE_RATE] += 1
            return G_DROPPED
        reply[0] = G_MAGIC
        reply[1] = 1
        reply[2] = 2                     # CHALLENGE
        reply[3] = 0
        reply[4] = G_COOKIE
        self._cookie(addr, alen, <uint32_t>(now // 1000000000), reply + 5)
        self.reply_len = G_CHALLENGE
        self.n[GC_CHALLENGES] += 1
        return G_ANSWERED

    def drain(self, int fd, int rounds=64):
        """Read the listener socket until it is empty or `rounds` batches
        were read. Strangers' datagrams are answered or dropped here; the
        rest are returned for the policy as (data, address) pairs."""
        cdef int r, j, got, ntx, sent, got_tx
        cdef int64_t now
        cdef msghdr *m
        out = []
        for r in range(rounds):
            for j in range(G_BATCH):
                self.rx_iov[j].iov_base = self.buf + j * G_BUF
                self.rx_iov[j].iov_len = G_BUF
                m = &self.rx[j].msg_hdr
                m.msg_name = self.names + j * RX_ADDR
                m.msg_namelen = RX_ADDR
                m.msg_iov = &self.rx_iov[j]
                m.msg_iovlen = 1
                m.msg_control = NULL
                m.msg_controllen = 0
                m.msg_flags = 0
            with nogil:
                got = recvmmsg(fd, self.rx, G_BATCH, MSG_DONTWAIT, NULL)
                ntx = 0
                now = monotonic_ns()
                for j in range(got if got > 0 else 0):
                    m = &self.rx[j].msg_hdr
                    self.verdict[j] = <uint8_t>self._sort(
                        self.buf + j * G_BUF, <int>self.rx[j].msg_len,
                        (m.msg_flags & MSG_TRUNC) != 0 or self.rx[j].msg_len >= G_BUF,
                        self.names + j * RX_ADDR, <int>m.msg_namelen, now, self.tx_buf + ntx * G_CHALLENGE)
                    if self.verdict[j] == G_ANSWERED:
                        self.tx_iov[ntx].iov_base = self.tx_buf + ntx * G_CHALLENGE
                        self.tx_iov[ntx].iov_len = <size_t>self.reply_len
                        self.tx[ntx].msg_hdr.msg_name = m.msg_name
                        self.tx[ntx].msg_hdr.msg_namelen = m.msg_namelen
                        self.tx[ntx].msg_hdr.msg_iov = &self.tx_iov[ntx]
                        self.tx[ntx].msg_hdr.msg_iovlen = 1
                        ntx += 1
                sent = 0
                while sent < ntx:
                    # sendmmsg stops at the first message the kernel refuses: skip it, go on
                    got_tx = sendmmsg(fd, self.tx + sent, <unsigned int>(ntx - sent), MSG_DONTWAIT)
                    if got_tx < 0:
                        self.n[GC_UNSENT] += 1
                        got_tx = 1
                    sent += got_tx
            if got <= 0:
                break
            for j in range(got):
                if self.verdict[j] == G_UP:
                    out.append(((self.buf + j * G_BUF)[:min(<int>self.rx[j].msg_len, G_BUF)],
                                sockaddr_tuple(self.names + j * RX_ADDR)))
            if got < G_BATCH:
                break
        return out
