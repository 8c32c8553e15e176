# The QUIC path's state, declared once: libcrypto's cipher contexts, one
# direction's keys, and a QUIC listener's connection as the core holds it
# (its packet numbers, what it has in flight, its congestion window). The
# functions over it are core/quic.pxi (packet protection) and
# core/quic_path.pxi (egress, ACKs, congestion).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t


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
    int EVP_DecryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, void *impl,
                           const unsigned char *key, const unsigned char *iv)
    int EVP_DecryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl, const unsigned char *inp, int inl)
    int EVP_DecryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl)
    int EVP_CTRL_AEAD_SET_TAG


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


ctypedef struct QuicKeys:
    # one direction of one connection, current key phase
    EVP_CIPHER_CTX *aead      # key set; the nonce per packet
    EVP_CIPHER_CTX *hp        # header protection: AES-ECB, or ChaCha20 with the sample as its IV
    int chacha
    uint8_t iv[12]
    uint8_t key_phase
    uint8_t dcid_len          # sending: the peer's connection id; receiving: ours
    uint8_t dcid[QUIC_MAX_CID]


ctypedef struct QuicTx:
    QuicKeys k
    uint8_t prefix_len
    uint8_t prefix[QUIC_MAX_PREFIX]


cdef enum:
    QUIC_WINDOW = 64        # packets a connection may have in flight: its sent records
    QUIC_MTU = 1200         # the largest datagram we send: QUIC's minimum, so every path carries it
    QUIC_RX_MAX = 1500      # the largest payload the core opens; larger packets go to the library


cdef enum:
    QS_DONE = 0             # a sent record acknowledged, or its loss final: forgotten once at the head
    QS_FLIGHT = 1           # in flight: neither acknowledged nor declared lost
    QS_LOST = 2             # declared lost (out of flight, the window answered), not yet final:
                            # an ACK of it now is late; unacknowledged until it must leave
                            # the records or grows old (quic_final_ns), it is counted lost


ctypedef struct QuicSent:
    uint64_t pn
    int64_t at_ns
    uint16_t size
    uint8_t live            # QS_DONE, QS_FLIGHT or QS_LOST


ctypedef struct QuicConn:
    # a QUIC listener's audio path; the QUIC library owns all the rest of
    # the connection (docs/quic-fast-path.md has who owns what, and why)
    QuicTx tx               # sending: keys, the peer's connection id, the DATAGRAM prefix
    QuicKeys rx             # receiving the listener's ACKs: keys, our connection id
    uint64_t pn_next        # packet numbers [pn_next, pn_end) are ours to use; the
    uint64_t pn_end         # library's counter is synced to pn_next before it sends
    uint64_t rx_largest     # the largest packet number opened here
    uint64_t rx_seen        # replay window: bit k set = rx_largest - k was opened
    uint8_t rx_any
    uint8_t ack_exp         # the peer's ack_delay_exponent
    uint8_t pto_count       # timeouts since the last ACK: each doubles the next
    int64_t max_ack_delay_ns
    # RFC 9002 congestion control (NewReno), in bytes
    uint32_t cwnd
    uint32_t ssthresh
    uint32_t in_flight
    uint64_t recovery_pn    # losses of packets below this were already answered
    uint64_t largest_acked  # the largest of our packets acknowledged
    uint8_t any_acked
    int64_t srtt            # ns; 0 until the first sample
    int64_t rttvar
    int64_t min_rtt
    int64_t latest_rtt
    int64_t unanswered_ns   # the first send since the peer was last heard; 0 once heard
    int64_t last_tx_ns      # the last send
    int64_t last_rx_ns      # the last packet opened: the library's idle timer follows it
    uint8_t library_waiting # the library has packets of its own in flight: it sees the ACKs too
    uint32_t s_head         # sent records: a ring in packet-number order
    uint32_t s_len
    QuicSent sent[QUIC_WINDOW]
    # counters
    uint64_t acks           # ACK-only packets handled here
    uint64_t acked          # our packets they acknowledged
    uint64_t lost           # declared lost and never acknowledged: final
    uint64_t late           # acknowledged after they were declared lost
    uint64_t window_shut    # times a send waited for the window
    uint64_t forged         # failed authentication (or malformed frames)
    uint64_t replayed
