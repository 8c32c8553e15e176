# A room's recent packets, read from Python: what a listener moving here
# from a dead node missed (the room history outlives a listener's ring: four
# ring depths of audio). Included at the end of relay/_core.pyx; runs on the
# event loop's thread, which is the thread that ingests, so no entry it
# reads is being written.


def room_history(Core core, int room, int after_seq, int max_packets, int64_t now_ns=-1):
    """The room packets numbered after `after_seq` (the room's numbering,
    mod 2^16) that its history still holds and that are fresh enough to burst,
    oldest first: at most the newest `max_packets` of them. Each is a clean
    room packet (SSRC 0, the room's sequence number and timestamp). `now_ns`:
    the monotonic time to judge freshness by (default: now)."""
    cdef CoreState *c = &core.st
    cdef Room *r = core._room(room)
    cdef uint32_t head, j, at, n
    cdef uint8_t *h
    cdef int64_t now = now_ns if now_ns >= 0 else monotonic_ns()
    out = []
    if max_packets <= 0 or not r.have_stream or now - r.last_rx_ns >= BURST_FRESH_NS:
        return out
    head = relay_load_acquire(&r.hist_head)
    # the oldest entries may be reused by the next packet in: keep clear of them
    n = c.hist_depth - c.depth
    if n > head:
        n = head
    for j in range(head - n, head):
        at = <uint32_t>room * c.hist_depth + (j & c.hist_mask)
        h = c.hist + <size_t>at * <size_t>c.ring_bytes
        if c.hist_len[at] and 0 < <uint16_t>(be16(h + 2) - <uint16_t>after_seq) < 0x8000:
            out.append(h[:c.hist_len[at]])
    return out[-max_packets:]
