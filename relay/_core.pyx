"""The fan-out core: packets in, per-listener rings, packets out, counters.

Data path (DESIGN.md), one included file per step:

    core/arena.pxi      the memory all of it runs over, allocated once
    core/listeners.pxi  join and leave: slots from a free list, room lists
    core/ingest.pxi     ingest fd --recvmmsg--> datagrams
    core/rtp.pxi        parse RTP, check source, rewrite numbering once per
                        room into the room's history
    core/rooms.pxi      the room table set up from Python: sources, takeover rules
    core/ring.pxi       a listener's ring: packets of any length end to end
                        in a byte budget, the oldest let go to make room
    core/fanout.pxi     memcpy into every listener's ring with that
                        listener's SSRC, sequence and timestamp
    core/egress.pxi     egress queue --sendmmsg, GIL released--> kernel;
                        NACK resends from the ring
    core/xdp.pxi        or --AF_XDP frames (xsk.h), GIL released--> the NIC
    core/shards.pxi     shard locks, wake-ups and the sender threads' loop
    core/stats.pxi      counters, read at scrape time
    core/quic.pxi       QUIC packet protection: seal audio, open ACKs
    core/quic_path.pxi  QUIC listeners sent in the sender threads' batches; ACKs, RTT, window
    core/quic_ingress.pxi  QUIC port --recvmmsg--> ACKs ended here (API: quic_api.pxi)
    core/gate.pxi       listener port --recvmmsg--> sessions' datagrams up; strangers'
                        answered (CHALLENGE) or counted and dropped here

This file is the shell: the Core's lifecycle (every allocation happens when
a Core is built and is freed with it) and its Python API. State lives in one
CoreState struct (core/state.pxd); the per-packet functions are module-level
nogil functions over it. Nothing on the packet path allocates or touches a
Python object, and errors there are return codes and counters, never
exceptions. Policy is the caller's; the core only does what it is told.

Threading: a Core is built inline (the caller's thread fans out and sends
in ingest()/flush()) or threaded (one sender thread per shard runs
run_shard()). Either way a shard's listeners, rings and queue are only
touched with the shard's lock held.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int16_t, int32_t, int64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memcmp, memset
from libc.errno cimport errno, EAGAIN, ENOBUFS, EINTR

from relay.core.clock cimport monotonic_ns
from relay.core.state cimport (CoreState, Listener, Room, Shard, Source, ADDR_MAX, MAX_SOURCES, LAT_BUCKETS,
    BATCH_BUCKETS, PEND_MAX, MAX_SHARDS, TX_BATCH, HIST_FACTOR, RX_BATCH, RX_BUF, MAX_RING, RX_ADDR, RX_ROUNDS,
    HDR, OPUS_CLOCK)
from relay.core.quic_state cimport *     # libcrypto, and the QUIC path's structs
from relay.core.syscalls cimport (
    sockaddr, iovec, msghdr, mmsghdr, sendmmsg, recvmmsg, sendto, MSG_DONTWAIT, MSG_TRUNC,
    AF_INET, AF_INET6, pthread_mutex_init, pthread_mutex_destroy, pthread_mutex_lock,
    pthread_mutex_trylock, pthread_mutex_unlock, eventfd, EFD_CLOEXEC, EFD_NONBLOCK,
    pollfd, poll, POLLIN, POLLOUT, read, write, close,
    relay_load_acquire, relay_store_release, relay_flag_get, relay_flag_set,
)

include "core/arena.pxi"
include "core/listeners.pxi"
include "core/ingest.pxi"
include "core/rtp.pxi"
include "core/rooms.pxi"
include "core/ring.pxi"
include "core/fanout.pxi"
include "core/egress.pxi"
include "core/xdp.pxi"
include "core/shards.pxi"
include "core/stats.pxi"
include "core/quic.pxi"
include "core/quic_path.pxi"
include "core/quic_ingress.pxi"

cdef class Core:
    """A relay node's data path: rooms, a listener arena and their rings.

    capacity: listeners the arena holds (allocated once).
    rooms: room slots; rooms are numbered 0..rooms-1 by the caller.
    depth: ring depth in packets, a power of two (resend window and burst).
    ring_bytes: bytes of each listener's ring, which holds up to `depth` packets
        of any length end to end; also the largest packet (RTP header
        included) a room takes: larger ones are dropped as oversized.
    shards: slices of the arena, each sent by one sender thread when threaded.
    threaded: True (the default with more than one shard): sender threads
        run run_shard() and ingest() only reads and wakes them. False: the
        caller's thread fans out and sends in ingest()/flush() (one shard).
    """

    def __cinit__(self, int capacity, int rooms=16, int depth=16, int ring_bytes=3840, int shards=1,
                  threaded=None):
        cdef CoreState *c = &self.st
        memset(c, 0, sizeof(CoreState))
        c.pull_fd = -1
        c.quic_fd = -1
        if capacity < 1 or rooms < 1:
            raise ValueError("capacity and rooms must be at least 1")
        if depth < 2 or depth > 4096 or (depth & (depth - 1)) != 0:
            raise ValueError("depth must be a power of two between 2 and 4096")
        if ring_bytes < HDR + 1 or ring_bytes > MAX_RING:
            raise ValueError(f"ring_bytes must be between {HDR + 1} and {MAX_RING}")
        if shards < 1 or shards > MAX_SHARDS or shards > capacity:
            raise ValueError(f"shards must be between 1 and {min(MAX_SHARDS, capacity)}")
        if threaded is None:
            threaded = shards > 1
        if not threaded and shards > 1:
            raise ValueError("more than one shard needs sender threads (threaded=True)")
        c.capacity = capacity
        c.rooms = rooms
        c.depth = depth
        c.mask = <uint32_t>depth - 1
        c.hist_depth = HIST_FACTOR * <uint32_t>depth
        c.hist_mask = HIST_FACTOR * <uint32_t>depth - 1
        c.ring_bytes = ring_bytes
        c.shards = shards
        c.threaded = 1 if threaded else 0
        # the shape, readable from Python (it never changes)
        self.capacity, self.rooms, self.depth, self.ring_bytes, self.shards = capacity, rooms, depth, ring_bytes, shards
        arena_build(c)

    def __dealloc__(self):
        arena_release(&self.st)     # AF_XDP sockets included

    # ------------------------------------------------------------- shape

    @property
    def threaded(self):
        """True when sender threads fan out and send (run_shard)."""
        return bool(self.st.threaded)

    @property
    def listeners(self):
        return self.st.listeners

    @property
    def pull_fd(self):
        """Readable when a pull (QUIC) listener has new packets in its ring."""
        return self.st.pull_fd

    # ------------------------------------------------------------------ rooms

    cdef Room *_room(self, int room) except NULL:
        if room < 0 or room >= self.st.rooms:
            raise ValueError(f"room index {room} out of range 0..{self.st.rooms - 1}")
        return &self.st.rm[room]

    def room_open(self, int room, bint any_source=False):
        """Start accepting packets for `room`; sources must be allowed first
        unless `any_source` (open demo rooms). The takeover rule starts as
        room_rules()' defaults."""
        if self._room(room).active:
            raise ValueError(f"room {room} is already open")
        lock_all_gil(&self.st)
        room_reset(&self.st, room, any_source)
        unlock_all(&self.st)

    def room_rules(self, int room, double takeover_s=0.15, bint pin_source=False, bint merge=False,
                   double max_pps=0, double max_bps=0):
        """Who may replace the live stream: a new SSRC (or, `pin_source`, address) after a BYE, a
        room_release() or `takeover_s` of silence (< 0: never). `merge`: copies from several parents,
        each taken once. `max_pps`, `max_bps`: the most it takes a second (0: no bound)."""
        room_set_rules(self._room(room), takeover_s, pin_source, merge, max_pps, max_bps)

    def room_release(self, int room):
        """Let the next stream take the room at once (the operator's word,
        for a publisher that went away without a BYE)."""
        cdef Room *r = self._room(room)
        if not r.active:
            raise ValueError(f"room {room} is not open")
        r.released = 1

    def room_close(self, int room):
        """Stop the room. Its listeners must have been removed first."""
        cdef Room *r = self._room(room)
        if r.n_listeners:
            raise ValueError(f"room {room} still has {r.n_listeners} listeners")
        r.active = 0
        r.n_sources = 0

    def room_listeners(self, int room):
        """Listeners in `room` (the count admission checks per join)."""
        return self._room(room).n_listeners

    def room_clear_sources(self, int room):
        """Forget the room's allowed sources (before allowing a new list)."""
        self._room(room).n_sources = 0

    def room_allow(self, int room, bytes sockaddr, bint any_port=True):
        """Lock the room to a source address (raw sockaddr bytes, see
        relay.wire.addr.to_sockaddr); with any_port only the IP must match."""
        cdef Room *r = self._room(room)
        if r.n_sources >= MAX_SOURCES:
            raise ValueError(f"a room allows at most {MAX_SOURCES} sources")
        if not _sockaddr_len_ok(sockaddr):
            raise ValueError("sockaddr must be 16 bytes (AF_INET) or 28 (AF_INET6)")
        if (<const uint16_t *><const uint8_t *>sockaddr)[0] not in (AF_INET, AF_INET6):
            raise ValueError("sockaddr must be AF_INET or AF_INET6")
        room_add_source(r, sockaddr, any_port)

    # -------------------------------------------------------------- listeners

    def listener_add(self, int room, bytes sockaddr, uint32_t ssrc, uint16_t seq_off,
                     uint32_t ts_off, bint pull=False, int burst=0, int64_t now_ns=-1):
        """Put a listener into `room` on the least loaded shard; returns its
        slot, or -1 if the arena is full. `sockaddr` is where sendmmsg sends
        (ignored for pull listeners). Up to `burst` recent room packets are
        queued at once so playback can start without waiting."""
        cdef CoreState *c = &self.st
        cdef Room *r = self._room(room)
        cdef int32_t i
        cdef int k, queued
        cdef const uint8_t *addr = <const uint8_t *>b""
        cdef uint8_t addrlen = 0
        if not r.active:
            raise ValueError(f"room {room} is not open")
        if not pull:
            if not _sockaddr_len_ok(sockaddr):
                raise ValueError("sockaddr must be 16 bytes (AF_INET) or 28 (AF_INET6)")
            addr, addrlen = <const uint8_t *>sockaddr, <uint8_t>len(sockaddr)
        k = least_loaded_shard(c)
        if k < 0:
            return -1
        if now_ns < 0:
            now_ns = monotonic_ns()
        lock_shard_gil(c, k)
        i = listener_take(c, k, room, addr, addrlen, ssrc, seq_off, ts_off)
        burst_recent(c, &c.sh[k], room, i, burst, now_ns)
        queued = c.sh[k].q_len
        unlock_shard(c, k)
        r.n_listeners += 1
        c.listeners += 1
        if c.threaded and queued:
            wake(c, k)
        return i

    cdef Listener *_listener(self, int slot) except NULL:
        if slot < 0 or slot >= self.st.capacity or not self.st.ls[slot].active:
            raise ValueError(f"no listener in slot {slot}")
        return &self.st.ls[slot]

    def listener_hold(self, int slot, bint hold):
        """Hold a listener out of the fan-out (True) or put it back (False).
        A held listener keeps its slot, session and ring, but gets no new
        packets and so counts no overflow: for a pull listener whose peer
        has stopped answering, whose backlog would otherwise be counted as
        egress drops until it is found gone."""
        cdef Listener *l = self._listener(slot)
        lock_shard_gil(&self.st, l.shard)
        if hold and not l.held:
            listener_unlink(&self.st, slot)
            l.held = 1
        elif not hold and l.held:
            listener_link(&self.st, slot)
            l.held = 0
        unlock_shard(&self.st, l.shard)

    def listener_remove(self, int slot):
        """Take the listener out of its room and return its slot to the free list."""
        cdef Listener *l = self._listener(slot)
        cdef int k = l.shard
        cdef Room *r = &self.st.rm[l.room]
        cdef QuicConn *q
        lock_shard_gil(&self.st, k)
        q = quic_detach(&self.st, slot)
        listener_release(&self.st, slot)
        unlock_shard(&self.st, k)
        quic_conn_free(q)
        r.n_listeners -= 1
        self.st.listeners -= 1

    # ------------------------------------------------------------- data path

    def ingest(self, int in_fd, int room, int out_fd, int budget=65536):
        """Drain `in_fd` (a room's RTP socket) with recvmmsg and accept each
        good packet into the room. Inline, the packets are also fanned out
        and sent on `out_fd` here; threaded, the shard threads are woken to
        do it. Returns the datagrams read. Stops after about `budget`
        listener-packets (at least one batch) so a big room cannot starve
        the event loop; `blocked` tells whether egress filled up."""
        cdef int total
        with nogil:
            total = ingest_batch(&self.st, in_fd, room, out_fd, budget)
        return total

    @property
    def blocked(self):
        """Inline mode: 1 if the egress socket filled up and flush() must be
        called again once it is writable. Always 0 when threaded (sender
        threads wait for writability themselves)."""
        return 0 if self.st.threaded or not self.st.sh[0].blocked else 1

    def flush(self, int fd):
        """Inline mode: fan out and send what is queued; returns 1 if the
        socket would block. Threaded, it only wakes the sender threads."""
        cdef int rc = 0
        cdef CoreState *c = &self.st
        if c.threaded:
            wake_all(c)
            return 0
        with nogil:
            lock_shard(c, 0)
            fanout_shard(c, 0)
            rc = flush_shard(c, 0, fd)
            unlock_shard(c, 0)
        return rc

    def feed(self, int room, const uint8_t[:] packet, bytes source, int64_t now_ns=-1):
        """Accept one datagram as if it had arrived from `source` (raw
        sockaddr) at monotonic time `now_ns` (default: now), and copy it into
        the rings (inline mode) or wake the shards. Returns an Ingest code.
        Nothing is sent until flush(). For tests and for relays that receive
        through Python (an upstream QUIC hop)."""
        cdef CoreState *c = &self.st
        if not _sockaddr_len_ok(source):
            raise ValueError("source must be a raw sockaddr: 16 bytes (AF_INET) or 28 (AF_INET6)")
        cdef Py_ssize_t n = packet.shape[0]
        cdef const uint8_t *p = &packet[0] if n > 0 else <const uint8_t *>b""
        cdef int rc
        c.c_rx_datagrams += 1
        rc = accept_packet(c, room, p, n, <const uint8_t *>source, now_ns if now_ns >= 0 else monotonic_ns())
        if c.threaded:
            wake_all(c)
        else:
            lock_shard_gil(c, 0)
            fanout_shard(c, 0)
            unlock_shard(c, 0)
        return rc

    # ----------------------------------------------------------- shard threads

    def run_shard(self, int k, int fd):
        """The body of shard k's sender thread: wait for new room packets,
        copy them into this shard's rings and send them on `fd`, until
        stop_shards(). Runs entirely without the GIL. Threaded Cores only."""
        cdef Shard *s
        if not self.st.threaded:
            raise RuntimeError("this Core fans out inline; build it with threaded=True")
        if k < 0 or k >= self.st.shards:
            raise ValueError(f"no shard {k}")
        s = &self.st.sh[k]
        if relay_flag_get(&s.running):
            raise RuntimeError(f"shard {k} is already running")
        relay_flag_set(&s.stop, 0)
        relay_flag_set(&s.running, 1)
        with nogil:
            shard_loop(&self.st, k, fd)
        relay_flag_set(&s.running, 0)
        return 0

    def stop_shards(self):
        """Ask every shard thread to return from run_shard()."""
        cdef int k
        for k in range(self.st.shards):
            relay_flag_set(&self.st.sh[k].stop, 1)
            wake(&self.st, k)

    def stop_shard(self, int k):
        """Ask one shard thread to return (tests use it to play a dead sender)."""
        if k < 0 or k >= self.st.shards:
            raise ValueError(f"no shard {k}")
        relay_flag_set(&self.st.sh[k].stop, 1)
        wake(&self.st, k)

    def settled(self):
        """True when every shard has fanned out every room packet and sent
        all it can: what tests wait for before comparing with the model."""
        cdef int k
        for k in range(self.st.shards):
            if not shard_settled(&self.st, k):
                return False
        return True

    def shard_running(self, int k):
        """True while shard k's thread is inside run_shard()."""
        if k < 0 or k >= self.st.shards:
            raise ValueError(f"no shard {k}")
        return bool(relay_flag_get(&self.st.sh[k].running))

    def shard_of(self, int slot):
        """The shard that owns a listener slot."""
        return self._listener(slot).shard

    # ------------------------------------------------------------ listener I/O

    cdef bytes _packet(self, int32_t slot, uint32_t j):
        cdef uint16_t n
        cdef uint8_t *p = ring_packet(&self.st, slot, j, &n)
        return p[:n]

    def ring(self, int slot):
        """The packets still held in a listener's ring, oldest first (sent or
        not): what a NACK can be answered from."""
        cdef Listener *l = self._listener(slot)
        cdef uint32_t j
        out = []
        lock_shard_gil(&self.st, l.shard)
        j = l.tail
        while j != l.head:
            out.append(self._packet(slot, j))
            j += 1
        unlock_shard(&self.st, l.shard)
        return out

    def pending(self, int slot):
        """Packets written to the listener's ring but not yet sent or pulled."""
        cdef Listener *l = self._listener(slot)
        cdef uint32_t n
        lock_shard_gil(&self.st, l.shard)
        n = l.head - l.sent
        unlock_shard(&self.st, l.shard)
        return n

    def pull(self, int slot, int max_packets=64):
        """Take up to `max_packets` unsent packets from a pull listener's ring
        (QUIC sessions drain their own pace; overflow has dropped the oldest)."""
        cdef CoreState *c = &self.st
        cdef Listener *l = self._listener(slot)
        cdef bytes pkt
        out = []
        if not l.pull:
            raise ValueError(f"slot {slot} is not a pull listener")
        lock_shard_gil(c, l.shard)
        if not c.threaded:
            fanout_shard(c, l.shard)
        while l.sent != l.head and len(out) < max_packets:
            pkt = self._packet(slot, l.sent)
            out.append(pkt)
            l.sent += 1
            l.packets_out += 1
            l.bytes_out += len(pkt)
        unlock_shard(c, l.shard)
        return out

    def resend(self, int fd, int slot, int seq):
        """Send the ring packet with this listener-side sequence number again
        (a NACK). Returns 1 if sent, 0 if no longer in the ring or not yet
        sent, -1 if the socket refused it."""
        cdef Listener *l = self._listener(slot)
        cdef int rc
        if l.pull or l.quic:
            return 0
        lock_shard_gil(&self.st, l.shard)
        rc = resend_seq(&self.st, fd, slot, <uint16_t>seq)
        unlock_shard(&self.st, l.shard)
        return rc

    def room_send(self, int room, int fd, const uint8_t[:] data):
        """Send one datagram to every listener of `room` that sendmmsg
        serves (QUIC listeners get theirs from their transport): a periodic
        room message such as who is speaking, never audio. Best effort:
        returns (sent, refused), refused being those a full socket or a
        failing address did not take."""
        cdef uint64_t refused = 0
        if room < 0 or room >= self.st.rooms or not self.st.rm[room].active:
            raise ValueError(f"room {room} is not open")
        if data.shape[0] < 1 or data.shape[0] > RX_BUF:
            raise ValueError(f"a room message is 1 to {RX_BUF} bytes")
        return broadcast_room(&self.st, room, fd, &data[0], <size_t>data.shape[0], &refused), int(refused)

    # --------------------------------------------------------------- counters

    def counters(self):
        """Node-wide counters, summed over rooms and shards."""
        return stats_counters(&self.st)

    def busy_ns(self):
        """Per shard: nanoseconds its sender thread has spent fanning out and
        sending. Its rate of change is the shard's duty cycle, the node's
        measure of how close it is to what one core can send."""
        return stats_per_shard(&self.st, 0)

    def shard_listeners(self):
        """Listeners per shard."""
        return stats_per_shard(&self.st, 1)

    def room_stats(self, int room):
        """Per-room counters and stream state."""
        return stats_room(self._room(room))

    def listener_stats(self, int slot):
        """Per-listener counters."""
        return stats_listener(&self.st, self._listener(slot))

    def latency_histogram(self):
        """(upper bounds in seconds, counts per bucket, sum in seconds) of
        ingest receive → last sendmmsg of that packet, over all shards."""
        cdef int b
        counts, total = stats_histogram(&self.st, 0)
        bounds = [LAT_BOUNDS_NS[b] / 1e9 for b in range(LAT_BUCKETS - 1)] + [float("inf")]
        return bounds, counts, total / 1e9

    def batch_histogram(self):
        """(upper bounds, counts per bucket, sum) of messages per sendmmsg call that sent; bounds: 2^0..2^10."""
        cdef int b
        counts, total = stats_histogram(&self.st, 1)
        return [float(1 << b) for b in range(BATCH_BUCKETS)], counts, float(total)

include "core/quic_api.pxi"
include "core/xdp_api.pxi"
include "core/history.pxi"
include "core/gate.pxi"
