# QUIC packet protection for the audio datagrams of an established
# connection (RFC 9001 section 5): a 1-RTT short-header packet carrying one
# DATAGRAM frame (RFC 9221), sealed with the connection's AEAD and then its
# header protection, through OpenSSL's libcrypto. The QUIC library keeps
# the handshake, the key schedule and everything else; it hands over the
# keys of the current key phase and a block of packet numbers (#15).
# Cipher contexts are made once per key phase and reused for every packet:
# only the nonce changes. Included by relay/_core.pyx.

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct EVP_CIPHER:
        pass
    EVP_CIPHER_CTX *EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx)
    const EVP_CIPHER *EVP_aes_128_gcm()
    const EVP_CIPHER *EVP_aes_256_gcm()
    const EVP_CIPHER *EVP_chacha20_poly1305()
    const EVP_CIPHER *EVP_aes_128_ecb()
    const EVP_CIPHER *EVP_aes_256_ecb()
    const EVP_CIPHER *EVP_chacha20()
    int EVP_EncryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, void *impl,
                           const unsigned char *key, const unsigned char *iv)
    int EVP_EncryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl, const unsigned char *inp, int inl)
    int EVP_EncryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl)
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr)
    int EVP_CIPHER_CTX_set_padding(EVP_CIPHER_CTX *ctx, int pad)
    int EVP_CTRL_AEAD_GET_TAG


cdef enum:
    QUIC_TAG = 16           # every QUIC AEAD's tag
    QUIC_SAMPLE = 16        # header protection samples 16 bytes of ciphertext
    QUIC_PN_LEN = 4         # packet numbers always go out in 4 bytes: no ambiguity after any gap
    QUIC_MAX_CID = 20
    QUIC_MAX_PREFIX = 9     # the DATAGRAM frame type, and WebTransport's quarter stream id (a varint)
    QUIC_DATAGRAM = 0x30    # a DATAGRAM frame without a length: it runs to the packet's end


# the cipher suites of TLS 1.3 that QUIC uses, by their TLS code points
cdef enum:
    SUITE_AES_128_GCM = 0x1301
    SUITE_AES_256_GCM = 0x1302
    SUITE_CHACHA20 = 0x1303


ctypedef struct QuicTx:
    EVP_CIPHER_CTX *aead      # key set; the nonce per packet
    EVP_CIPHER_CTX *hp        # header protection: AES-ECB, or ChaCha20 with the sample as its IV
    int chacha
    uint8_t iv[12]
    uint8_t key_phase
    uint8_t dcid_len
    uint8_t dcid[QUIC_MAX_CID]
    uint8_t prefix_len
    uint8_t prefix[QUIC_MAX_PREFIX]


cdef int quic_tx_keys(QuicTx *q, int suite, const uint8_t *key, const uint8_t *iv, const uint8_t *hp,
                      int key_phase) noexcept nogil:
    """Set (or replace, at a key update) the keys of the current key
    phase. 0 on success, -1 if libcrypto refused (an unknown suite)."""
    cdef const EVP_CIPHER *aead
    cdef const EVP_CIPHER *mask
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
    # a 12-byte IV is every one of these AEADs' default
    if EVP_EncryptInit_ex(q.aead, aead, NULL, key, NULL) != 1:
        return -1
    if EVP_EncryptInit_ex(q.hp, mask, NULL, hp, NULL) != 1:
        return -1
    EVP_CIPHER_CTX_set_padding(q.hp, 0)
    q.chacha = 1 if suite == SUITE_CHACHA20 else 0
    memcpy(q.iv, iv, 12)
    q.key_phase = <uint8_t>(key_phase & 1)
    return 0


cdef void quic_tx_free(QuicTx *q) noexcept nogil:
    if q.aead != NULL:
        EVP_CIPHER_CTX_free(q.aead)
    if q.hp != NULL:
        EVP_CIPHER_CTX_free(q.hp)
    q.aead = q.hp = NULL


cdef int quic_seal(QuicTx *q, const uint8_t *data, int n, uint64_t pn, uint8_t *out, int cap) noexcept nogil:
    """Write into `out` the protected 1-RTT packet number `pn` carrying one
    DATAGRAM frame of `data` (after the connection's prefix). Returns its
    length, or -1 if it does not fit `cap` or libcrypto failed."""
    cdef int hdr = 1 + q.dcid_len + QUIC_PN_LEN
    cdef int plain = 1 + q.prefix_len + n
    cdef int total = hdr + plain + QUIC_TAG
    cdef int outl = 0, k
    cdef uint8_t nonce[12]
    cdef uint8_t mask[QUIC_SAMPLE]
    cdef uint8_t *body
    if q.aead == NULL or total > cap or n < 0:
        return -1
    # the header: short form, fixed bit, key phase, a 4-byte packet number
    out[0] = <uint8_t>(0x40 | (q.key_phase << 2) | (QUIC_PN_LEN - 1))
    memcpy(out + 1, q.dcid, q.dcid_len)
    put32(out + 1 + q.dcid_len, <uint32_t>pn)   # its low 32 bits
    # the frame, then sealed in place
    body = out + hdr
    body[0] = QUIC_DATAGRAM
    memcpy(body + 1, q.prefix, q.prefix_len)
    memcpy(body + 1 + q.prefix_len, data, <size_t>n)
    memcpy(nonce, q.iv, 12)
    for k in range(8):
        nonce[11 - k] ^= <uint8_t>((pn >> (8 * k)) & 0xff)
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
    # header protection: a mask from the ciphertext 4 bytes past the packet
    # number's start, over the low 4 bits of the first byte and the number
    if q.chacha:
        if EVP_EncryptInit_ex(q.hp, NULL, NULL, NULL, out + hdr) != 1:
            return -1
        memset(mask, 0, 5)
        if EVP_EncryptUpdate(q.hp, mask, &outl, mask, 5) != 1:
            return -1
    elif EVP_EncryptUpdate(q.hp, mask, &outl, out + hdr, QUIC_SAMPLE) != 1:
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
        self.tx.dcid_len = <uint8_t>len(dcid)
        memcpy(self.tx.dcid, <const char *>dcid, len(dcid))
        self.tx.prefix_len = <uint8_t>len(prefix)
        memcpy(self.tx.prefix, <const char *>prefix, len(prefix))
        self.update(suite, key, iv, hp, key_phase)

    def update(self, int suite, bytes key, bytes iv, bytes hp, int key_phase):
        """New keys: a key update (RFC 9001 6), or the first ones."""
        if len(key) not in (16, 32) or len(hp) != len(key) or len(iv) != 12:
            raise ValueError("keys of 16 or 32 bytes and a 12-byte IV")
        if quic_tx_keys(&self.tx, suite, <const uint8_t *><const char *>key, <const uint8_t *><const char *>iv,
                        <const uint8_t *><const char *>hp, key_phase) != 0:
            raise ValueError(f"cipher suite {suite:#x} is not one QUIC uses")

    def seal(self, const uint8_t[:] data, uint64_t pn):
        """The protected packet number `pn` carrying `data` as one DATAGRAM."""
        cdef int n = <int>data.shape[0]
        cdef int out
        with nogil:
            out = quic_seal(&self.tx, &data[0] if n > 0 else <const uint8_t *>NULL, n, pn, self.buf, 1500)
        if out < 0:
            raise ValueError("the packet does not fit 1,500 bytes")
        return bytes(self.buf[:out])

    def __dealloc__(self):
        quic_tx_free(&self.tx)
