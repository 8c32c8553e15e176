# The AF_XDP egress's Python API (core/xdp.pxi): the node opens one socket
# per shard, sets the next hops and routes listeners through them. Which
# interface, queue and next hops is the caller's policy
# (relay/listeners/xdp.py). Included at the end of relay/_core.pyx.


cdef class XdpEgress:
    """The AF_XDP side of a Core: its sockets, next hops and routes."""

    cdef Core core
    cdef CoreState *st

    def __cinit__(self, Core core):
        self.core = core
        self.st = &core.st

    def open(self, int shard, int ifindex, int queue, int frames=4096, int frame_size=2048,
                 bint zerocopy=False):
        """Give shard `shard` a TX-only AF_XDP socket on (ifindex, queue) with
        `frames` UMEM frames of `frame_size` bytes. Returns (0, "") or
        (errno, step) naming what the kernel refused; the shard then keeps
        sendmmsg."""
        cdef CoreState *c = self.st
        cdef relay_xsk *x
        cdef int rc, step = 0
        if shard < 0 or shard >= c.shards:
            raise ValueError(f"no shard {shard}")
        if frames < 64 or frames & (frames - 1) or frame_size not in (2048, 4096):
            raise ValueError("frames: a power of two >= 64; frame_size: 2048 or 4096")
        if c.xdp == NULL:
            c.xdp = <relay_xdp *>_alloc(1, sizeof(relay_xdp))
        if c.xdp.xsk[shard] != NULL:
            raise ValueError(f"shard {shard} already has an AF_XDP socket")
        x = <relay_xsk *>_alloc(1, sizeof(relay_xsk))
        rc = relay_xsk_open(x, ifindex, <uint32_t>queue, <uint32_t>frames, <uint32_t>frame_size,
                            1 if zerocopy else 0, &step)
        if rc < 0:
            _free(x)
            return -rc, ("", "socket", "umem", "rings", "mmap", "bind")[step]
        lock_shard_gil(c, shard)
        c.xdp.xsk[shard] = x
        unlock_shard(c, shard)
        return 0, ""

    def close(self):
        """Close every shard's AF_XDP socket (its listeners go back to
        sendmmsg); the Core also does this when it is freed."""
        cdef CoreState *c = self.st
        cdef relay_xsk *x
        cdef int k
        for k in range(c.shards):
            x = shard_xsk(c, k)
            if x == NULL:
                continue
            lock_shard_gil(c, k)
            c.xdp.xsk[k] = NULL
            unlock_shard(c, k)
            relay_xsk_close(x)
            _free(x)

    def path(self, int index, bytes path):
        """Set next hop `index` (0..255) to a packed relay_xpath: the MACs,
        our source address and port, the MTU. Listeners routed through it
        use the new one from their next packet."""
        cdef CoreState *c = self.st
        if c.xdp == NULL:
            raise ValueError("no AF_XDP socket is open")
        if index < 0 or index >= RELAY_XPATHS or len(path) != sizeof(relay_xpath):
            raise ValueError(f"index 0..{RELAY_XPATHS - 1} and a {sizeof(relay_xpath)}-byte path")
        lock_all_gil(c)
        memcpy(&c.xdp.paths[index], <const uint8_t *>path, sizeof(relay_xpath))
        unlock_all(c)

    def route(self, int slot, int path, bytes sockaddr=None):
        """Send listener `slot` through next hop `path` (AF_XDP), or with
        sendmmsg (-1). With `sockaddr`, only if the slot still holds a
        listener at that address (one routed late, when its next hop's MAC
        turned up, may have left). Returns True if the route was set."""
        cdef CoreState *c = self.st
        cdef Listener *l
        if slot < 0 or slot >= c.capacity or not c.ls[slot].active:
            return False
        l = &c.ls[slot]
        if sockaddr is not None and (len(sockaddr) != l.addrlen or
                                     memcmp(<const uint8_t *>sockaddr, l.addr, l.addrlen) != 0):
            return False
        if path >= 0:
            if c.xdp == NULL or path >= RELAY_XPATHS or c.xdp.paths[path].family == 0:
                raise ValueError(f"no next hop {path}")
            if l.pull or l.quic or (c.xdp.paths[path].family == 6) != (l.addrlen == 28):
                raise ValueError(f"listener {slot} cannot go through next hop {path}")
        lock_shard_gil(c, l.shard)
        l.xpath = <uint16_t>(path + 1) if path >= 0 else 0
        unlock_shard(c, l.shard)
        return True

    def shards(self):
        """Per shard: True when it has an AF_XDP socket."""
        return [self.st.xdp != NULL and self.st.xdp.xsk[k] != NULL for k in range(self.st.shards)]

    def counters(self):
        """AF_XDP egress counters summed over shards: frames sent, kicks,
        kicks the kernel refused, waits for a free frame, packets too
        large for a frame (sent with sendto)."""
        cdef CoreState *c = self.st
        cdef relay_xsk *x
        cdef int k
        out = dict(packets=0, kicks=0, kick_errors=0, frames_exhausted=0, too_large=0)
        for k in range(c.shards):
            x = shard_xsk(c, k)
            if x == NULL:
                continue
            lock_shard_gil(c, k)
            out["packets"] += x.packets
            out["kicks"] += x.kicks
            out["kick_errors"] += x.kick_errors
            out["frames_exhausted"] += x.frames_exhausted
            out["too_large"] += x.too_large
            unlock_shard(c, k)
        return out
