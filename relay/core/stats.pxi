# Counters, read at scrape time: the rooms' (written by the ingest thread,
# read on the same thread) and the shards' (written by whoever fans out for
# the shard, so each is read under the shard's lock). Included by
# relay/_core.pyx; called with the GIL held.


cdef dict stats_counters(CoreState *c):
    """Node-wide counters, summed over rooms and shards."""
    cdef int k
    cdef Shard *s
    cdef uint64_t pin = 0, bin_ = 0, fo = 0, ma = 0, ov = 0, la = 0, rs = 0, tr = 0, bye = 0
    cdef uint64_t po = 0, bo = 0, calls = 0, msgs = 0, wb = 0, dov = 0, dse = 0, lag = 0
    cdef int64_t queued = 0
    cdef uint64_t dup = 0, fill = 0, rate = 0
    cdef uint64_t qo[2]
    cdef uint64_t qb[2]
    cdef uint64_t qacks = 0, qacked = 0, qlost = 0, qlate = 0, qshut = 0, qforged = 0, qrep = 0, qblk = 0
    cdef uint64_t qbig[2]
    cdef uint32_t big_len = 0
    cdef int j
    qo[0] = qo[1] = qb[0] = qb[1] = qbig[0] = qbig[1] = 0
    for k in range(c.rooms):
        pin += c.rm[k].packets_in
        bin_ += c.rm[k].bytes_in
        fo += c.rm[k].drop_foreign
        ma += c.rm[k].drop_malformed
        ov += c.rm[k].drop_oversized
        la += c.rm[k].drop_late
        rs += c.rm[k].source_restarts
        tr += c.rm[k].takeovers_refused
        bye += c.rm[k].byes
        dup += c.rm[k].duplicates
        fill += c.rm[k].gap_fills
        rate += c.rm[k].drop_rate
    for k in range(c.shards):
        s = &c.sh[k]
        lock_shard_gil(c, k)
        po += s.packets_out
        bo += s.bytes_out
        calls += s.sendmmsg_calls
        msgs += s.sendmmsg_messages
        wb += s.would_block
        dov += s.drop_overflow
        dse += s.drop_send_error
        lag += s.drop_lag
        queued += s.q_len
        pthread_mutex_lock(&s.qlock)
        for j in range(2):
            qo[j] += s.q_out[j]
            qb[j] += s.q_bytes[j]
            qbig[j] += s.q_too_large[j]
        big_len = max(big_len, s.q_too_large_len)
        qacks += s.q_acks
        qacked += s.q_acked
        qlost += s.q_lost
        qlate += s.q_late
        qshut += s.q_shut
        qforged += s.q_forged
        qrep += s.q_replayed
        qblk += s.q_blocked
        pthread_mutex_unlock(&s.qlock)
        unlock_shard(c, k)
    return {
        "rx_datagrams": c.c_rx_datagrams, "packets_in": pin, "bytes_in": bin_,
        "packets_out": po, "bytes_out": bo, "sendmmsg_calls": calls, "sendmmsg_messages": msgs,
        "would_block": wb, "resends": c.c_resends, "source_restarts": rs,
        "takeovers_refused": tr, "publisher_byes": bye, "merge_duplicates": dup, "merge_gap_fills": fill,
        "rtcp_ignored": c.c_rtcp_ignored, "drop_no_room": c.c_no_room, "drop_foreign": fo,
        "drop_malformed": ma, "drop_oversized": ov, "drop_late": la, "drop_overflow": dov,
        "drop_send_error": dse, "drop_shard_lag": lag, "drop_rate": rate, "listeners": c.listeners, "queued": queued,
        # the QUIC path's (core/quic_path.pxi)
        "quic_datagrams": qo[0], "webtransport_datagrams": qo[1],
        "quic_bytes": qb[0], "webtransport_bytes": qb[1], "quic_acks": qacks, "quic_acked": qacked,
        "quic_lost": qlost, "quic_late_acked": qlate, "quic_window_shut": qshut, "quic_forged": qforged,
        "quic_replayed": qrep,
        "quic_blocked": qblk, "quic_too_large": qbig[0], "webtransport_too_large": qbig[1],
        "quic_too_large_len": big_len,
    }


cdef list stats_per_shard(CoreState *c, int field):
    """One figure of every shard: 0 = busy nanoseconds, 1 = listeners."""
    cdef int k
    cdef uint64_t v
    out = []
    for k in range(c.shards):
        lock_shard_gil(c, k)
        v = c.sh[k].busy_ns if field == 0 else <uint64_t>c.sh[k].listeners
        unlock_shard(c, k)
        out.append(v)
    return out


cdef tuple stats_histogram(CoreState *c, int which):
    """Bucket counts and sum over all shards: 0 = fan-out latency (ns),
    1 = sendmmsg batch sizes."""
    cdef int k, b, n = LAT_BUCKETS if which == 0 else BATCH_BUCKETS
    cdef uint64_t total = 0
    counts = [0] * n
    for k in range(c.shards):
        lock_shard_gil(c, k)
        for b in range(n):
            counts[b] += c.sh[k].lat_count[b] if which == 0 else c.sh[k].batch_count[b]
        total += c.sh[k].lat_sum_ns if which == 0 else c.sh[k].sendmmsg_messages
        unlock_shard(c, k)
    return counts, total


cdef dict stats_room(Room *r):
    """One room's counters and stream state (ingest-thread fields, read on it)."""
    return {
        "active": bool(r.active), "listeners": r.n_listeners, "packets_in": r.packets_in,
        "bytes_in": r.bytes_in, "drop_foreign": r.drop_foreign, "drop_malformed": r.drop_malformed,
        "drop_oversized": r.drop_oversized, "oversized_len": r.oversized_len, "drop_late": r.drop_late,
        "drop_rate": r.drop_rate, "source_restarts": r.source_restarts,
        "takeovers_refused": r.takeovers_refused, "byes": r.byes, "released": bool(r.released),
        "seq_gaps": r.seq_gaps, "gap_fills": r.gap_fills, "duplicates": r.duplicates,
        "have_stream": bool(r.have_stream), "last_rx_ns": r.last_rx_ns, "out_seq": r.out_seq,
    }


cdef dict stats_listener(CoreState *c, Listener *l):
    """One listener's counters, read under its shard's lock."""
    lock_shard_gil(c, l.shard)
    out = {
        "room": l.room, "shard": l.shard, "ssrc": l.ssrc, "packets_out": l.packets_out,
        "bytes_out": l.bytes_out, "drop_overflow": l.drop_overflow, "drop_send_error": l.drop_send_error,
        "resends": l.resends, "pending": l.head - l.sent,
    }
    unlock_shard(c, l.shard)
    return out
