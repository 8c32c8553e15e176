# QUIC packet protection for the audio datagrams of an established
# connection (RFC 9001 section 5): a 1-RTT short-header packet carrying one
# DATAGRAM frame (RFC 9221), sealed with the connection's AEAD and then its
# header protection, through OpenSSL's libcrypto. The QUIC library keeps
# the handshake, the key schedule and everything else; it hands over the
# keys of the current key phase and a block of packet numbers
# (docs/quic-fast-path.md).
# Cipher contexts are made once per key phase and reused for every packet:
# only the nonce changes. Included by relay/_core.pyx.


cdef int quic_keys_set(QuicKeys *q, int suite, const uint8_t *key, const uint8_t *iv, const uint8_t *hp,
                       int key_phase, bint sending) noexcept nogil:
    """Set (or replace, at a key update) the keys of the current key
    phase. 0 on success, -1 if libcrypto refused (an unknown suite)."""
    cdef const EVP_CIPHER *aead
    cdef const EVP_CIPHER *mask
    cdef int ok
    if suite == SUITE_AES_128_GCM:
        aead, mask = EVP_aes_128_gcm(), EVP_aes_128_ecb()
    elif suite == SUITE_AES_256_GCM:
        aead, mask = EVP_aes_256_gcm(), EVP_aes_256_ecb()
    elif suite == SUITE_CHACHA20:
        aead, mask = EVP_chacha20_poly1305(), EVP_chacha20()
    else:
        return -1
    if q.aead == NULL:
        q.aead = EVP_CIPHER_CTX_new()
        q.hp = EVP_CIPHER_CTX_new()
        if q.aead == NULL or q.hp == NULL:
            return -1
    # a 12-byte IV is every one of these AEADs' default; the header
    # protection mask is an encryption either way
    if sending:
        ok = EVP_EncryptInit_ex(q.aead, aead, NULL, key, NULL)
    else:
        ok = EVP_DecryptInit_ex(q.aead, aead, NULL, key, NULL)
    if ok != 1 or EVP_EncryptInit_ex(q.hp, mask, NULL, hp, NULL) != 1:
        return -1
    EVP_CIPHER_CTX_set_padding(q.hp, 0)
    q.chacha = 1 if suite == SUITE_CHACHA20 else 0
    memcpy(q.iv, iv, 12)
    q.key_phase = <uint8_t>(key_phase & 1)
    return 0


cdef void quic_keys_free(QuicKeys *q) noexcept nogil:
    if q.aead != NULL:
        EVP_CIPHER_CTX_free(q.aead)
    if q.hp != NULL:
        EVP_CIPHER_CTX_free(q.hp)
    q.aead = q.hp = NULL


cdef int quic_mask(QuicKeys *q, const uint8_t *sample, uint8_t *mask) noexcept nogil:
    """Header protection's 5-byte mask from a 16-byte ciphertext sample
    (RFC 9001 5.4); 0, or -1 if libcrypto failed."""
    cdef int outl = 0
    if q.chacha:
        memset(mask, 0, 5)
        if EVP_EncryptInit_ex(q.hp, NULL, NULL, NULL, sample) != 1:
            return -1
        return 0 if EVP_EncryptUpdate(q.hp, mask, &outl, mask, 5) == 1 else -1
    return 0 if EVP_EncryptUpdate(q.hp, mask, &outl, sample, QUIC_SAMPLE) == 1 else -1


cdef inline void quic_nonce(QuicKeys *q, uint64_t pn, uint8_t *nonce) noexcept nogil:
    """The AEAD nonce of packet `pn`: the IV with the number XORed in."""
    cdef int k
    memcpy(nonce, q.iv, 12)
    for k in range(8):
        nonce[11 - k] ^= <uint8_t>((pn >> (8 * k)) & 0xff)


cdef int quic_seal(QuicTx *t, const uint8_t *data, int n, uint64_t pn, uint8_t *out, int cap,
                   bint frames=False) noexcept nogil:
    """Write into `out` the protected 1-RTT packet number `pn` carrying one
    DATAGRAM frame of `data` (after the connection's prefix); with
    `frames`, `data` is the whole payload, frames already encoded (the
    bench's listeners send their ACKs so). Returns its length, or -1 if it
    does not fit `cap` or libcrypto failed."""
    cdef QuicKeys *q = &t.k
    cdef int hdr = 1 + q.dcid_len + QUIC_PN_LEN
    cdef int head = 1 + <int>t.prefix_len
    cdef int plain = head + n
    cdef int total = hdr + plain + QUIC_TAG
    cdef int outl = 0, k
    cdef uint8_t nonce[12]
    cdef uint8_t mask[QUIC_SAMPLE]
    cdef uint8_t *body
    if frames:
        head = 0
        plain = n
        total = hdr + plain + QUIC_TAG
    if q.aead == NULL or total > cap or n < 0:
        return -1
    # the header: short form, fixed bit, key phase, a 4-byte packet number
    out[0] = <uint8_t>(0x40 | (q.key_phase << 2) | (QUIC_PN_LEN - 1))
    memcpy(out + 1, q.dcid, q.dcid_len)
    put32(out + 1 + q.dcid_len, <uint32_t>pn)   # its low 32 bits
    # the frame, then sealed in place
    body = out + hdr
    if not frames:
        body[0] = QUIC_DATAGRAM
        memcpy(body + 1, t.prefix, t.prefix_len)
    memcpy(body + head, data, <size_t>n)
    quic_nonce(q, pn, nonce)
    if EVP_EncryptInit_ex(q.aead, NULL, NULL, NULL, nonce) != 1:
        return -1
    if EVP_EncryptUpdate(q.aead, NULL, &outl, out, hdr) != 1:           # the header is the AAD
        return -1
    if EVP_EncryptUpdate(q.aead, body, &outl, body, plain) != 1:
        return -1
    if EVP_EncryptFinal_ex(q.aead, body + outl, &outl) != 1:
        return -1
    if EVP_CIPHER_CTX_ctrl(q.aead, EVP_CTRL_AEAD_GET_TAG, QUIC_TAG, body + plain) != 1:
        return -1
    # header protection: the sample starts 4 bytes past the packet number's start
    if quic_mask(q, out + hdr, mask) != 0:
        return -1
    out[0] ^= mask[0] & 0x1f        # a short header protects its low five bits
    for k in range(QUIC_PN_LEN):
        out[1 + q.dcid_len + k] ^= mask[1 + k]
    return total


cdef class QuicSealer:
    """One connection's sending side for audio datagrams, as the core will
    hold it per QUIC listener; from Python, for tests and the bench.

    suite: the TLS cipher suite (0x1301, 0x1302, 0x1303); key, iv, hp: the
    1-RTT send keys of the current key phase (RFC 9001 5.1); dcid: the
    peer's connection id; prefix: bytes before the audio in the DATAGRAM
    frame (WebTransport's quarter stream id; empty for plain QUIC)."""

    cdef QuicTx tx
    cdef uint8_t buf[1500]

    def __cinit__(self):
        memset(&self.tx, 0, sizeof(QuicTx))

    def __init__(self, int suite, bytes key, bytes iv, bytes hp, bytes dcid, bytes prefix=b"", int key_phase=0):
        if len(dcid) > QUIC_MAX_CID or len(prefix) > QUIC_MAX_PREFIX or len(iv) != 12:
            raise ValueError("a connection id is at most 20 bytes, a prefix 9, an IV 12")
        self.tx.k.dcid_len = <uint8_t>len(dcid)
        memcpy(self.tx.k.dcid, <const char *>dcid, len(dcid))
        self.tx.prefix_len = <uint8_t>len(prefix)
        memcpy(self.tx.prefix, <const char *>prefix, len(prefix))
        self.update(suite, key, iv, hp, key_phase)

    def update(self, int suite, bytes key, bytes iv, bytes hp, int key_phase):
        """New keys: a key update (RFC 9001 6), or the first ones."""
        if len(key) not in (16, 32) or len(hp) != len(key) or len(iv) != 12:
            raise ValueError("keys of 16 or 32 bytes and a 12-byte IV")
        if quic_keys_set(&self.tx.k, suite, <const uint8_t *><const char *>key, <const uint8_t *><const char *>iv,
                         <const uint8_t *><const char *>hp, key_phase, True) != 0:
            raise ValueError(f"cipher suite {suite:#x} is not one QUIC uses")

    def seal(self, const uint8_t[:] data, uint64_t pn, bint frames=False):
        """The protected packet number `pn` carrying `data` as one DATAGRAM
        (with `frames`: `data` is the payload's frames, already encoded)."""
        cdef int n = <int>data.shape[0]
        cdef int out
        with nogil:
            out = quic_seal(&self.tx, &data[0] if n > 0 else <const uint8_t *>NULL, n, pn, self.buf, 1500, frames)
        if out < 0:
            raise ValueError("the packet does not fit 1,500 bytes")
        return bytes(self.buf[:out])

    def __dealloc__(self):
        quic_keys_free(&self.tx.k)


# --- the other way: a listener's ACKs, opened in C

# what became of a packet offered to quic_open (the library gets all but ACK_ONLY)
cdef enum:
    QOPEN_ACK_ONLY = 0      # ACK, PADDING and PING frames only: handled here
    QOPEN_OTHER = 1         # opened, but it carries other frames: for the QUIC library
    QOPEN_NOT_OURS = 2      # a long header, another connection id, another key phase
    QOPEN_FORGED = 3        # did not authenticate (or malformed): dropped
    QUIC_MAX_RANGES = 32    # ACK ranges read; more are the library's to read


ctypedef struct QuicAck:
    uint64_t pn             # the packet's own number
    uint64_t largest        # largest acknowledged
    uint64_t delay          # ACK delay, in the peer's units (ack_delay_exponent)
    int eliciting           # a PING came with it: the library must answer it
    int plain_len           # the opened payload's length
    int n_ranges            # [lo, hi] pairs, highest first
    uint64_t lo[QUIC_MAX_RANGES]
    uint64_t hi[QUIC_MAX_RANGES]


ctypedef struct QuicRx:
    QuicKeys k
    uint8_t plain[QUIC_RX_MAX]     # the opened payload


cdef inline int varint(const uint8_t *p, int n, int *at, uint64_t *v) noexcept nogil:
    """A QUIC variable-length integer (RFC 9000 16) at p[*at]; -1 past n."""
    cdef int size, k
    if at[0] >= n:
        return -1
    size = 1 << (p[at[0]] >> 6)
    if at[0] + size > n:
        return -1
    v[0] = p[at[0]] & 0x3f
    for k in range(1, size):
        v[0] = (v[0] << 8) | p[at[0] + k]
    at[0] += size
    return 0


cdef inline int ack_malformed(QuicAck *ack, int other) noexcept nogil:
    """An ACK frame that does not parse: the packet is forged if it held
    only ACKs so far; beside other frames it is the library's (which will
    close the connection), and no ACK of it is read here."""
    ack.n_ranges = 0
    return QOPEN_OTHER if other else QOPEN_FORGED


cdef inline int skip_varints(const uint8_t *p, int n, int *at, int k) noexcept nogil:
    cdef uint64_t v
    while k > 0:
        if varint(p, n, at, &v):
            return -1
        k -= 1
    return 0


cdef int skip_frame(const uint8_t *p, int n, int *at, uint64_t t) noexcept nogil:
    """Step over one frame of type t (its type byte read) that is neither
    ACK, PADDING nor PING (RFC 9000 19, RFC 9221): 0, or -1 for a type the
    core does not know (an extension's) or a frame that does not parse."""
    cdef uint64_t v, length
    cdef int fields = 0
    if t == 0x30 or (0x08 <= t <= 0x0f and not t & 0x02):
        # DATAGRAM or STREAM without a length: to the packet's end
        if t != 0x30 and (varint(p, n, at, &v) or (t & 0x04 and varint(p, n, at, &v))):
            return -1
        at[0] = n
        return 0
    if 0x08 <= t <= 0x0f:                   # STREAM: id, [offset], then a length and data
        fields = 2 if t & 0x04 else 1
    elif t == 0x06:                         # CRYPTO: offset, then a length and data
        fields = 1
    elif t == 0x1c:                         # CONNECTION_CLOSE: error, frame type, reason
        fields = 2
    elif t == 0x1d:                         # (the application's): error, reason
        fields = 1
    elif t == 0x07 or t == 0x31:            # NEW_TOKEN, DATAGRAM with a length
        fields = 0
    elif t == 0x1e:                         # HANDSHAKE_DONE
        return 0
    elif t == 0x1a or t == 0x1b:            # PATH_CHALLENGE, PATH_RESPONSE: 8 bytes
        if at[0] + 8 > n:
            return -1
        at[0] += 8
        return 0
    elif t == 0x18:                         # NEW_CONNECTION_ID: sequence, retire, cid, reset token
        if varint(p, n, at, &v) or varint(p, n, at, &v) or at[0] >= n or at[0] + 1 + p[at[0]] + 16 > n:
            return -1
        at[0] += 1 + p[at[0]] + 16
        return 0
    elif t == 0x04:                         # RESET_STREAM
        return skip_varints(p, n, at, 3)
    elif t == 0x05 or t == 0x11 or t == 0x15:   # STOP_SENDING, MAX_STREAM_DATA, STREAM_DATA_BLOCKED
        return skip_varints(p, n, at, 2)
    elif 0x10 <= t <= 0x19:                 # MAX_DATA, MAX_STREAMS, (STREAM)S_BLOCKED, DATA_BLOCKED, RETIRE_CONNECTION_ID
        return skip_varints(p, n, at, 1)
    else:
        return -1
    # `fields` varints, then a length and that many bytes
    if skip_varints(p, n, at, fields) or varint(p, n, at, &length) or length > <uint64_t>(n - at[0]):
        return -1
    at[0] += <int>length
    return 0


cdef int parse_ack_only(const uint8_t *p, int n, QuicAck *ack) noexcept nogil:
    """Is the payload only ACK, PADDING and PING frames? Fills `ack` from
    the (last) ACK frame. QOPEN_ACK_ONLY, QOPEN_OTHER, or QOPEN_FORGED for
    an ACK frame that does not parse (a peer whose tag verified but whose
    frames are malformed: the library will close the connection for it).
    The other frames the core knows are stepped over, so that an ACK beside
    them is read too: for QOPEN_OTHER, ack.n_ranges > 0 when it was (an ACK
    in a packet for the library, which the peer will not report again once
    the library has acknowledged that packet, RFC 9000 13.2.4)."""
    cdef int at = 0, k, other = 0
    cdef uint64_t t, largest, delay, count, first, gap, length, ecn, lo
    ack.n_ranges = 0
    ack.eliciting = 0
    while at < n:
        t = p[at]
        if t == 0x00 or t == 0x01:          # PADDING, PING
            if t == 0x01:
                ack.eliciting = 1
            at += 1
            continue
        at += 1
        if t != 0x02 and t != 0x03:
            other = 1
            if skip_frame(p, n, &at, t):
                break                       # the library's to read; an ACK before it stands
            continue
        if varint(p, n, &at, &largest) or varint(p, n, &at, &delay) or varint(p, n, &at, &count) \
                or varint(p, n, &at, &first) or first > largest:
            return ack_malformed(ack, other)
        ack.largest, ack.delay = largest, delay
        lo = largest - first
        ack.lo[0], ack.hi[0] = lo, largest
        ack.n_ranges = 1
        for k in range(<int>count if count < 0x7fffffff else 0x7fffffff):
            if varint(p, n, &at, &gap) or varint(p, n, &at, &length) or gap + 2 > lo or length > lo - gap - 2:
                return ack_malformed(ack, other)
            # the next range ends gap + 2 below this one's smallest (RFC 9000 19.3.1)
            largest = lo - gap - 2
            lo = largest - length
            if ack.n_ranges < QUIC_MAX_RANGES:
                ack.lo[ack.n_ranges], ack.hi[ack.n_ranges] = lo, largest
                ack.n_ranges += 1
        if t == 0x03:
            for k in range(3):
                if varint(p, n, &at, &ecn):
                    return ack_malformed(ack, other)
    if other:
        return QOPEN_OTHER
    return QOPEN_ACK_ONLY if ack.n_ranges else QOPEN_OTHER


cdef int quic_open(QuicKeys *q, uint8_t *plain, const uint8_t *pkt, int n, uint64_t expected,
                   QuicAck *ack) noexcept nogil:
    """Open one datagram from a listener's address: header protection off,
    packet number decoded against `expected` (the next one the connection
    expects), payload authenticated and decrypted into `plain` (QUIC_RX_MAX
    bytes at least), frames read. Returns a QOPEN_ code; ack.pn is set for
    every packet that authenticated, the rest of `ack` for QOPEN_ACK_ONLY,
    and for QOPEN_OTHER when ack.n_ranges > 0 (an ACK beside other frames)."""
    cdef int pn_off = 1 + q.dcid_len
    cdef int pn_len, k, outl = 0, body, plain_len
    cdef uint8_t mask[QUIC_SAMPLE]
    cdef uint8_t hdr[1 + QUIC_MAX_CID + 4]
    cdef uint8_t nonce[12]
    cdef uint64_t truncated = 0, win, hwin, candidate
    if q.aead == NULL or n < 1 or (pkt[0] & 0xc0) != 0x40:
        return QOPEN_NOT_OURS
    if n < pn_off + 4 + QUIC_SAMPLE or memcmp(pkt + 1, q.dcid, q.dcid_len) != 0:
        return QOPEN_NOT_OURS
    if quic_mask(q, pkt + pn_off + 4, mask) != 0:
        return QOPEN_FORGED
    hdr[0] = pkt[0] ^ (mask[0] & 0x1f)
    if ((hdr[0] >> 2) & 1) != q.key_phase or (hdr[0] & 0x18) != 0:
        return QOPEN_NOT_OURS           # a key update (or reserved bits set): the library decides
    pn_len = (hdr[0] & 3) + 1
    memcpy(hdr + 1, pkt + 1, q.dcid_len)
    for k in range(pn_len):
        hdr[pn_off + k] = pkt[pn_off + k] ^ mask[1 + k]
        truncated = (truncated << 8) | hdr[pn_off + k]
    # RFC 9000 A.3: the number closest to `expected` with these low bits
    win = (<uint64_t>1) << (8 * pn_len)
    hwin = win >> 1
    candidate = (expected & ~(win - 1)) | truncated
    if candidate + hwin <= expected and candidate < ((<uint64_t>1) << 62) - win:
        candidate += win
    elif candidate > expected + hwin and candidate >= win:
        candidate -= win
    body = pn_off + pn_len
    plain_len = n - body - QUIC_TAG
    if plain_len > QUIC_RX_MAX:
        return QOPEN_NOT_OURS           # no ACK is this large: the library's
    if plain_len < 1:
        return QOPEN_FORGED
    quic_nonce(q, candidate, nonce)
    if EVP_DecryptInit_ex(q.aead, NULL, NULL, NULL, nonce) != 1:
        return QOPEN_FORGED
    if EVP_DecryptUpdate(q.aead, NULL, &outl, hdr, body) != 1:
        return QOPEN_FORGED
    if EVP_DecryptUpdate(q.aead, plain, &outl, pkt + body, plain_len) != 1:
        return QOPEN_FORGED
    if EVP_CIPHER_CTX_ctrl(q.aead, EVP_CTRL_AEAD_SET_TAG, QUIC_TAG, <void *>(pkt + n - QUIC_TAG)) != 1:
        return QOPEN_FORGED
    if EVP_DecryptFinal_ex(q.aead, plain + outl, &outl) != 1:
        return QOPEN_FORGED
    ack.pn = candidate
    ack.plain_len = plain_len
    return parse_ack_only(plain, plain_len, ack)


cdef class QuicOpener:
    """A connection's receiving side for its listener's ACK-only packets,
    as the core will hold it per QUIC listener; from Python, for tests, the
    fuzzer and the bench. suite, key, iv, hp: the 1-RTT keys the peer sends
    with; dcid_len: the length of our connection ids."""

    cdef QuicRx rx
    cdef QuicAck ack

    def __cinit__(self):
        memset(&self.rx, 0, sizeof(QuicRx))

    def __init__(self, int suite, bytes key, bytes iv, bytes hp, bytes dcid, int key_phase=0):
        if len(dcid) > QUIC_MAX_CID or len(iv) != 12 or len(key) not in (16, 32) or len(hp) != len(key):
            raise ValueError("a connection id is at most 20 bytes, keys 16 or 32, an IV 12")
        self.rx.k.dcid_len = <uint8_t>len(dcid)
        memcpy(self.rx.k.dcid, <const char *>dcid, len(dcid))
        if quic_keys_set(&self.rx.k, suite, <const uint8_t *><const char *>key, <const uint8_t *><const char *>iv,
                         <const uint8_t *><const char *>hp, key_phase, False) != 0:
            raise ValueError(f"cipher suite {suite:#x} is not one QUIC uses")

    def open(self, const uint8_t[:] packet, uint64_t expected):
        """("ack", packet number, largest acked, ack delay, [(lo, hi), ...])
        for an ACK-only packet; ("other", packet number, ...) when opened but
        for the QUIC library, with the ACK read beside its other frames (or
        None, None, []); ("not_ours", None, ...) or ("forged", None, ...)
        otherwise."""
        cdef int n = <int>packet.shape[0]
        cdef int rc
        with nogil:
            rc = quic_open(&self.rx.k, self.rx.plain, &packet[0] if n > 0 else <const uint8_t *>NULL, n,
                           expected, &self.ack)
        what = ("ack", "other", "not_ours", "forged")[rc]
        if rc == QOPEN_OTHER and self.ack.n_ranges == 0:
            return what, self.ack.pn, None, None, []
        if rc != QOPEN_ACK_ONLY and rc != QOPEN_OTHER:
            return what, None, None, None, []
        return (what, self.ack.pn, self.ack.largest, self.ack.delay,
                [(self.ack.lo[k], self.ack.hi[k]) for k in range(self.ack.n_ranges)])

    def payload(self, const uint8_t[:] packet, uint64_t expected):
        """(packet number, decrypted payload) of any 1-RTT packet with our
        connection id and key phase, or None: the bench's listeners read
        their audio so."""
        cdef int n = <int>packet.shape[0]
        cdef int rc
        with nogil:
            rc = quic_open(&self.rx.k, self.rx.plain, &packet[0] if n > 0 else <const uint8_t *>NULL, n,
                           expected, &self.ack)
        if rc != QOPEN_ACK_ONLY and rc != QOPEN_OTHER:
            return None
        return self.ack.pn, bytes(self.rx.plain[:self.ack.plain_len])

    def __dealloc__(self):
        quic_keys_free(&self.rx.k)
