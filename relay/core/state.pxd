# The core's state, declared once: the listener arena, the room table, the
# shards and the socket batches, all allocated when a Core is built. The
# per-packet functions (rtp, fanout, egress, shards .pxi) take a CoreState *
# and run without the GIL; relay/_core.pyx owns its lifecycle.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from relay.core.syscalls cimport mmsghdr, iovec, pthread_mutex_t
from relay.core.quic_state cimport QuicConn
from relay.core.xdp cimport relay_xdp


cdef enum:
    ADDR_MAX = 28       # longest socket address we store (sockaddr_in6)
    MAX_SOURCES = 8     # most allowed sources one room may lock to
    LAT_BUCKETS = 16    # fan-out latency histogram buckets, the last is +Inf
    BATCH_BUCKETS = 11  # sendmmsg batch sizes: <=1, <=2, <=4 ... <=1024
    PEND_MAX = 64       # packets whose fan-out latency is awaiting a complete flush
    MAX_SHARDS = 64
    TX_BATCH = 1024     # sendmmsg's own cap (UIO_MAXIOV)
    HIST_FACTOR = 4     # room history entries per ring slot (resumes read the older half)
    RX_BATCH = 32
    RX_BUF = 16384      # larger datagrams are truncated and dropped as oversized
    MAX_RING = 16384    # largest ring_bytes: the largest Opus packet (120 ms at 510 kbit/s, 7,650 B) twice
    RX_ADDR = 128       # sizeof(struct sockaddr_storage)
    RX_ROUNDS = 8       # recvmmsg calls per ingest() before yielding to the loop
    HDR = 12            # the RTP header we emit: no CSRC, no extension, no padding
    OPUS_CLOCK = 48000  # RFC 7587: Opus RTP always runs at 48 kHz


ctypedef struct Listener:
    uint8_t active
    uint8_t queued        # on the egress queue (at most once)
    uint8_t pull          # drained by Python (QUIC), never by sendmmsg
    uint8_t addrlen
    int32_t room
    int32_t shard         # the shard (sender thread) that owns this slot
    int32_t next          # room membership: per-shard intrusive doubly linked list
    int32_t prev
    uint32_t ssrc
    uint16_t seq_off      # listener seq = room seq + seq_off
    uint8_t held          # out of its room's list: the fan-out skips it (a stalled pull listener)
    uint8_t quic          # sent by the QUIC path (core/quic_path.pxi): 1 QUIC, 2 WebTransport
    uint8_t qshut         # QUIC: its window is shut; off the egress queue until its next packet
    uint16_t xpath        # 0: sendmmsg; p: AF_XDP frames through next hop p - 1 (core/xdp.pxi)
    uint32_t ts_off       # listener ts  = room ts  + ts_off
    uint32_t head         # packets written into the ring, ever
    uint32_t sent         # packets handed to the kernel (or pulled), ever
    uint32_t tail         # oldest packet still held (NACK history): tail <= sent <= head
    uint32_t wr           # byte offset in the ring where the next packet goes
    uint8_t addr[ADDR_MAX]
    uint64_t packets_out
    uint64_t bytes_out
    uint64_t drop_overflow
    uint64_t drop_send_error
    uint64_t resends


ctypedef struct Source:
    uint8_t family        # 0 = unused
    uint8_t any_port
    uint16_t port         # network byte order, as in sockaddr
    uint8_t ip[16]


ctypedef struct Room:
    uint8_t active
    uint8_t any_source    # accept every source address (open demo rooms only)
    uint8_t have_stream   # seen a packet since open
    uint8_t n_sources
    Source sources[MAX_SOURCES]
    # who may replace the live stream (set by the node's policy, rtp.pxi):
    # a new stream is a new SSRC or, when pinned, a new source address
    int64_t takeover_ns   # silence after which a new stream may take the room; < 0: never
    uint8_t pin_source    # the live stream is its SSRC and its source address
    uint8_t released      # the live stream said BYE, or the operator released it
    # copies of one stream from several parents (a cascade with two
    # upstreams): the parents' numbering is kept, each sequence number is
    # taken once, the first copy to arrive wins (rtp.pxi)
    uint8_t merge
    uint64_t seen         # merge: bit d set = in_seq - d was taken
    # the most the room takes from its publisher (0: no bound), as token
    # buckets a second deep: packets and bytes a second (rtp.pxi)
    double max_pps
    double max_bytes
    double pkt_tokens
    double byte_tokens
    int64_t rate_at
    uint64_t drop_rate
    Source live           # the live stream's source address (pinned rooms)
    int32_t first[MAX_SHARDS]   # head of each shard's listener list, -1 if empty
    int32_t n_listeners
    # input continuity: the room rewrites the publisher's numbering once,
    # listeners add their own offsets on top
    uint32_t in_ssrc
    uint16_t in_seq
    uint16_t seq_off
    uint32_t ts_off
    uint16_t out_seq      # last room seq emitted
    uint16_t _pad
    uint32_t out_ts       # last room ts emitted
    int64_t last_rx_ns
    # room history: the last `hist_depth` room packets, for a burst on join
    # and for the shard threads to fan out from
    uint32_t hist_head
    uint64_t packets_in
    uint64_t bytes_in
    uint64_t drop_foreign
    uint64_t drop_malformed
    uint64_t drop_oversized
    uint32_t oversized_len  # the last oversized packet's RTP size (RX_BUF + 1: larger than we read)
    uint64_t drop_late
    uint64_t source_restarts
    uint64_t takeovers_refused  # packets of a new stream refused while the live one holds the room
    uint64_t byes               # RTCP BYEs from the live stream, which release the room
    uint64_t seq_gaps     # sequence numbers the publisher skipped: loss on the way in
    uint64_t gap_fills    # merge: skipped numbers a second copy filled in later
    uint64_t duplicates   # merge: copies of packets already taken


ctypedef struct Shard:
    # slots [lo, hi) of the arena belong to this shard
    int32_t lo
    int32_t hi
    int32_t *free_list
    int32_t n_free
    int32_t listeners
    # egress queue: listeners with unsent packets, each at most once
    int32_t *queue
    int32_t q_head
    int32_t q_len
    mmsghdr *tx
    iovec *tx_iov
    int32_t *tx_owner
    uint32_t *hist_seen     # per room: history entries already fanned out
    int64_t pend_rx[PEND_MAX]
    int pend_n
    int blocked             # 1: the socket is full; 2: every AF_XDP frame is in flight
    # The lock guards this shard's listeners, rings, queue and counters.
    # Whoever fans out or sends for the shard holds it: its sender thread,
    # or in inline mode the event-loop thread. Other threads take it with
    # the GIL released (see shards.pxi).
    pthread_mutex_t lock
    # QUIC listeners' packets go out on the QUIC socket in a batch of their
    # own, sealed into qbuf. qlock guards the shard's QuicConns: the sender
    # thread seals under it (inside the shard lock), the event loop reads
    # ACKs under it alone, so an ACK never waits for a sendmmsg
    mmsghdr *qtx
    iovec *qtx_iov
    int32_t *qtx_owner
    uint64_t *qtx_pn
    uint8_t *qbuf
    pthread_mutex_t qlock
    uint64_t q_out[2]       # datagrams sent, QUIC and WebTransport
    uint64_t q_bytes[2]     # of RTP, as for UDP listeners
    uint64_t q_acks         # ACK-only packets read in the core
    uint64_t q_acked
    uint64_t q_lost         # final losses (QuicConn.lost)
    uint64_t q_late         # acknowledged after being declared lost
    uint64_t q_shut
    uint64_t q_forged
    uint64_t q_replayed
    uint64_t q_blocked      # sealed, but the QUIC socket was full
    uint64_t q_too_large[2]
    uint32_t q_too_large_len  # the last one's RTP size, for the operator's log line
    int efd                 # a sender thread waits on it
    int stop                # atomic: asks the sender thread to return
    int running             # atomic: a sender thread is inside run_shard()
    int pull_ready          # a pull listener got packets in this fan-out
    uint64_t packets_out
    uint64_t bytes_out
    uint64_t sendmmsg_calls
    uint64_t sendmmsg_messages
    uint64_t would_block
    uint64_t drop_overflow
    uint64_t drop_send_error
    uint64_t drop_lag        # history entries a slow shard never saw
    uint64_t busy_ns         # time spent fanning out and sending (lock held, so work only)
    uint64_t lat_count[LAT_BUCKETS]
    uint64_t lat_sum_ns
    uint64_t lat_dropped
    uint64_t batch_count[BATCH_BUCKETS]


ctypedef struct CoreState:
    Listener *ls
    Room *rm
    Shard *sh
    uint8_t *rings          # capacity x ring_bytes: each listener's packets, end to end (ring.pxi)
    uint16_t *ring_off      # capacity x depth: each held packet's offset and length
    uint16_t *ring_len
    uint8_t *hist           # rooms x hist_depth slots of ring_bytes (the largest packet)
    uint16_t *hist_len
    int64_t *hist_rx
    mmsghdr *rx             # the ingest batch (event-loop thread only)
    iovec *rx_iov
    uint8_t *rx_buf
    uint8_t *rx_addr
    int capacity
    int rooms
    int depth
    int ring_bytes
    int shards
    int listeners
    # fixed when the Core is built: 1 when sender threads run the fan-out
    # (run_shard), 0 when the caller's thread does it inline (ingest/flush)
    int threaded
    int pull_fd             # readable when a pull (QUIC) listener has new packets
    int quic_fd             # the QUIC port's socket, for the QUIC path's sendmmsg; -1 without one
    relay_xdp *xdp          # AF_XDP egress: next hops and one socket per shard; NULL when off
    QuicConn **qc           # capacity: a QUIC path listener's connection, else NULL
    uint8_t *qplain         # an opened packet's payload (event-loop thread only)
    uint64_t *qcid_key      # our connection id -> QUIC path slot (core/quic_ingress.pxi;
    int32_t *qcid_val       # event-loop thread only): -1 is empty
    uint32_t qcid_mask
    uint32_t mask           # depth - 1
    uint32_t hist_depth
    uint32_t hist_mask
    # counters of the ingest side, read at scrape time
    uint64_t c_rx_datagrams
    uint64_t c_no_room
    uint64_t c_rtcp_ignored
    uint64_t c_resends
