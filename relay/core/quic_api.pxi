# The QUIC path's Python API (core/quic_path.pxi): the node's QUIC
# endpoint hands an established connection's audio to the core, keeps its
# keys and packet numbers coherent with the QUIC library, and passes it the
# listener's datagrams. Included at the end of relay/_core.pyx.


cdef class QuicPath:
    """The QUIC path of a Core: QUIC and WebTransport listeners whose audio
    the sender threads seal and send, and whose ACKs the core reads."""

    cdef Core core
    cdef CoreState *st

    def __cinit__(self, Core core):
        self.core = core
        self.st = &core.st

    cdef QuicConn *_quic(self, int slot) except NULL:
        cdef Listener *l = self.core._listener(slot)
        if not l.quic or self.st.qc[slot] == NULL:
            raise ValueError(f"slot {slot} is not on the QUIC path")
        return self.st.qc[slot]

    def socket(self, int fd):
        """The QUIC port's socket (non-blocking), which the QUIC path sends
        on; -1 before it closes. Set with every shard locked, so no sender
        thread is still using the old one when this returns."""
        lock_all_gil(self.st)
        self.st.quic_fd = fd
        unlock_all(self.st)

    def attach(self, int slot, int kind, bytes sockaddr, bytes peer_cid, bytes our_cid, bytes prefix,
               int ack_delay_exponent, double max_ack_delay_s):
        """Move a pull listener onto the QUIC path: from now on the sender
        threads seal and send its audio. kind: 1 QUIC, 2 WebTransport;
        sockaddr: the peer's validated address; peer_cid: the connection id
        we send to; our_cid: the one it sends to us; prefix: what precedes
        the audio in each DATAGRAM frame. Nothing is sent before keys() and
        resume()."""
        cdef CoreState *c = self.st
        cdef Listener *l = self.core._listener(slot)
        cdef QuicConn *q
        cdef Shard *s = &c.sh[l.shard]
        if not l.pull:
            raise ValueError(f"slot {slot} is not a pull listener")
        if kind not in (1, 2) or not _sockaddr_len_ok(sockaddr):
            raise ValueError("kind is 1 or 2; sockaddr 16 bytes (AF_INET) or 28 (AF_INET6)")
        if len(peer_cid) > QUIC_MAX_CID or len(our_cid) > QUIC_MAX_CID or len(prefix) > QUIC_MAX_PREFIX:
            raise ValueError("connection ids are at most 20 bytes, a prefix 9")
        if not 0 <= ack_delay_exponent <= 20 or not 0 <= max_ack_delay_s < 16.384:
            raise ValueError("ack_delay_exponent is at most 20, max_ack_delay under 2^14 ms (RFC 9000 18.2)")
        q = quic_conn_new()
        q.tx.k.dcid_len = <uint8_t>len(peer_cid)
        memcpy(q.tx.k.dcid, <const char *>peer_cid, len(peer_cid))
        q.rx.dcid_len = <uint8_t>len(our_cid)
        memcpy(q.rx.dcid, <const char *>our_cid, len(our_cid))
        q.tx.prefix_len = <uint8_t>len(prefix)
        memcpy(q.tx.prefix, <const char *>prefix, len(prefix))
        q.ack_exp = <uint8_t>ack_delay_exponent
        q.max_ack_delay_ns = <int64_t>(max_ack_delay_s * 1e9)
        lock_shard_gil(c, l.shard)
        pthread_mutex_lock(&s.qlock)
        if len(our_cid) == QUIC_CID_LEN:
            cid_put(c, cid_key(<const uint8_t *><const char *>our_cid), slot)
        c.qc[slot] = q
        l.pull = 0
        l.quic = <uint8_t>kind
        l.addrlen = <uint8_t>len(sockaddr)
        memcpy(l.addr, <const char *>sockaddr, len(sockaddr))
        pthread_mutex_unlock(&s.qlock)
        unlock_shard(c, l.shard)

    def keys(self, int slot, int suite, bytes send_key, bytes send_iv, bytes send_hp, int send_phase,
             bytes recv_key, bytes recv_iv, bytes recv_hp, int recv_phase):
        """The 1-RTT keys of the current key phase, both ways (RFC 9001
        5.1): at attach, and again whenever the library's phase changes."""
        cdef QuicConn *q = self._quic(slot)
        cdef Shard *s = &self.st.sh[self.st.ls[slot].shard]
        cdef int rc
        for k in (send_key, send_hp, recv_key, recv_hp):
            if len(k) not in (16, 32):
                raise ValueError("keys are 16 or 32 bytes")
        if len(send_iv) != 12 or len(recv_iv) != 12:
            raise ValueError("IVs are 12 bytes")
        pthread_mutex_lock(&s.qlock)
        rc = quic_keys_set(&q.tx.k, suite, <const uint8_t *><const char *>send_key,
                           <const uint8_t *><const char *>send_iv, <const uint8_t *><const char *>send_hp,
                           send_phase, True)
        if rc == 0:
            rc = quic_keys_set(&q.rx, suite, <const uint8_t *><const char *>recv_key,
                               <const uint8_t *><const char *>recv_iv, <const uint8_t *><const char *>recv_hp,
                               recv_phase, False)
        pthread_mutex_unlock(&s.qlock)
        if rc != 0:
            raise ValueError(f"cipher suite {suite:#x} is not one QUIC uses")

    def pause(self, int slot):
        """Stop sealing for this connection and return the next packet
        number the core would have used: the library sends from there."""
        cdef QuicConn *q = self._quic(slot)
        cdef Shard *s = &self.st.sh[self.st.ls[slot].shard]
        cdef uint64_t pn
        pthread_mutex_lock(&s.qlock)
        q.pn_end = q.pn_next
        pn = q.pn_next
        pthread_mutex_unlock(&s.qlock)
        return pn

    def resume(self, int slot, uint64_t pn):
        """Seal again, from packet number `pn` (the library's next), so both
        sides' packets form one increasing sequence."""
        cdef QuicConn *q = self._quic(slot)
        cdef Shard *s = &self.st.sh[self.st.ls[slot].shard]
        pthread_mutex_lock(&s.qlock)
        q.pn_next = max(q.pn_next, pn)
        q.pn_end = (<uint64_t>1) << 62
        pthread_mutex_unlock(&s.qlock)

    def expected(self, int slot):
        """The packet number the core expects next from the listener: the
        library's expected number must not fall behind it."""
        cdef QuicConn *q = self._quic(slot)
        cdef Shard *s = &self.st.sh[self.st.ls[slot].shard]
        cdef uint64_t pn
        pthread_mutex_lock(&s.qlock)
        pn = q.rx_largest + 1 if q.rx_any else 0
        pthread_mutex_unlock(&s.qlock)
        return pn

    def path(self, int slot, bytes sockaddr, bytes peer_cid):
        """The peer moved (a new address, or a new connection id to send to)."""
        cdef Listener *l = self.core._listener(slot)
        cdef QuicConn *q = self._quic(slot)
        cdef Shard *s = &self.st.sh[l.shard]
        if not _sockaddr_len_ok(sockaddr) or len(peer_cid) > QUIC_MAX_CID:
            raise ValueError("sockaddr 16 or 28 bytes, a connection id at most 20")
        lock_shard_gil(self.st, l.shard)
        pthread_mutex_lock(&s.qlock)
        l.addrlen = <uint8_t>len(sockaddr)
        memcpy(l.addr, <const char *>sockaddr, len(sockaddr))
        q.tx.k.dcid_len = <uint8_t>len(peer_cid)
        memcpy(q.tx.k.dcid, <const char *>peer_cid, len(peer_cid))
        pthread_mutex_unlock(&s.qlock)
        unlock_shard(self.st, l.shard)

    def state(self, int slot):
        """The connection's audio path: window, flight, RTT and counters
        (lost: declared lost and final; late: acknowledged after being
        declared lost; lost_pending: declared lost, not yet final)."""
        cdef QuicConn *q = self._quic(slot)
        cdef Shard *s = &self.st.sh[self.st.ls[slot].shard]
        cdef int64_t now = monotonic_ns()
        cdef uint32_t j, pending = 0
        pthread_mutex_lock(&s.qlock)
        for j in range(q.s_len):
            pending += quic_sent_at(q, j).live == QS_LOST
        out = {"cwnd": q.cwnd, "in_flight": q.in_flight, "srtt_s": q.srtt / 1e9, "min_rtt_s": q.min_rtt / 1e9,
               "next_pn": q.pn_next, "largest_acked": q.largest_acked if q.any_acked else None,
               "quiet_s": (now - q.unanswered_ns) / 1e9 if q.unanswered_ns else 0.0,
               "acks": q.acks, "acked": q.acked, "lost": q.lost, "late": q.late, "lost_pending": pending,
               "window_shut": q.window_shut,
               "forged": q.forged, "replayed": q.replayed,
               "send_phase": q.tx.k.key_phase, "recv_phase": q.rx.key_phase}
        pthread_mutex_unlock(&s.qlock)
        return out

    def quiet(self, int slot):
        """(seconds since the first packet sent after the listener was last
        heard from, 0.0 if it has answered everything since; seconds since
        the last packet sent, None if none has been)."""
        cdef QuicConn *q = self._quic(slot)
        cdef Shard *s = &self.st.sh[self.st.ls[slot].shard]
        cdef int64_t since, last, now = monotonic_ns()
        pthread_mutex_lock(&s.qlock)
        since, last = q.unanswered_ns, q.last_tx_ns
        pthread_mutex_unlock(&s.qlock)
        return (now - since) / 1e9 if since else 0.0, (now - last) / 1e9 if last else None

    def waiting(self, int slot, bint waiting):
        """Whether the library has packets of its own in flight: while it
        has, the listener's ACKs reach it too (ingest() hands them up)."""
        self._quic(slot).library_waiting = 1 if waiting else 0

    def heard(self, int slot):
        """Seconds since the core last opened a packet from the listener
        (None if never): the library's idle timer follows it."""
        cdef QuicConn *q = self._quic(slot)
        cdef Shard *s = &self.st.sh[self.st.ls[slot].shard]
        cdef int64_t last
        pthread_mutex_lock(&s.qlock)
        last = q.last_rx_ns
        pthread_mutex_unlock(&s.qlock)
        return (monotonic_ns() - last) / 1e9 if last else None

    def ingest(self, int fd):
        """Read the QUIC port until it is empty (or RX_ROUNDS batches): the
        QUIC path listeners' ACKs are ended here; returns the datagrams for
        the library, as (data, address) pairs."""
        cdef CoreState *c = self.st
        cdef int rounds, got, j, n
        cdef int64_t now
        cdef msghdr *m
        cdef uint8_t *buf
        out = []
        for rounds in range(RX_ROUNDS):
            rx_ready(c, RX_BATCH)
            with nogil:
                got = recvmmsg(fd, c.rx, RX_BATCH, MSG_DONTWAIT, NULL)
            if got <= 0:
                break
            now = monotonic_ns()
            for j in range(got):
                m = &c.rx[j].msg_hdr
                n = <int>c.rx[j].msg_len
                buf = c.rx_buf + j * RX_BUF
                if m.msg_flags & MSG_TRUNC or quic_consume(c, buf, n, c.rx_addr + j * RX_ADDR, now):
                    continue    # (a truncated one is larger than any QUIC datagram: dropped)
                out.append((buf[:n], sockaddr_tuple(c.rx_addr + j * RX_ADDR)))
            if got < RX_BATCH:
                break
        return out
