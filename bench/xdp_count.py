"""The cheap receiver every contender of bench/xdp.py sends to: an XDP
program on the peer veth that counts each frame and drops it, so the
receive side costs the same small amount per packet whoever sends.

Loaded with raw bpf() system calls (no clang, no libbpf: this kernel has no
BTF, and a plain program needs none): a per-CPU array map of one counter,
eleven instructions, attached with a BPF link. Run inside the namespace:

    ip netns exec NS python bench/xdp_count.py IFACE

prints "ready MODE", then answers every line on stdin with the frames
counted so far; on EOF it exits and the link (and program) go with it.
"""
from __future__ import annotations

import ctypes
import os
import socket
import struct
import sys

SYS_BPF = 321                    # x86_64
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_PROG_LOAD, BPF_LINK_CREATE = 0, 1, 5, 28
BPF_MAP_TYPE_PERCPU_ARRAY, BPF_PROG_TYPE_XDP, BPF_XDP = 6, 6, 37
XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 1 << 1, 1 << 2
ATTR = 144                       # sizeof(union bpf_attr) here

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr.ljust(ATTR, b"\0"), ATTR)
    rc = _libc.syscall(SYS_BPF, cmd, buf, ATTR)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return rc


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def program(map_fd: int) -> bytes:
    """counter[0] += 1 on this CPU; return XDP_DROP."""
    return b"".join([
        insn(0x62, dst=10, off=-4, imm=0),          # *(u32 *)(r10 - 4) = 0       the key
        insn(0xBF, dst=2, src=10),                  # r2 = r10
        insn(0x07, dst=2, imm=-4),                  # r2 += -4
        insn(0x18, dst=1, src=1, imm=map_fd),       # r1 = the map (ld_imm64, pseudo map fd)
        insn(0x00),
        insn(0x85, imm=1),                          # r0 = bpf_map_lookup_elem(r1, r2)
        insn(0x15, dst=0, off=3, imm=0),            # if r0 == 0 goto drop
        insn(0x79, dst=1, src=0),                   # r1 = *(u64 *)r0
        insn(0x07, dst=1, imm=1),                   # r1 += 1
        insn(0x7B, dst=0, src=1),                   # *(u64 *)r0 = r1   (per-CPU: no atomics needed)
        insn(0xB7, dst=0, imm=1),                   # drop: r0 = XDP_DROP
        insn(0x95),                                 # exit
    ])


def cpus() -> int:
    with open("/sys/devices/system/cpu/possible") as f:
        return int(f.read().strip().split("-")[-1]) + 1


class Counter:
    """The program loaded and attached to one interface."""

    def __init__(self, iface: str) -> None:
        self.ncpu = cpus()
        self.map_fd = bpf(BPF_MAP_CREATE, struct.pack("=IIII", BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 1))
        code = program(self.map_fd)
        self._code = ctypes.create_string_buffer(code, len(code))
        self._license = ctypes.create_string_buffer(b"GPL")
        attr = struct.pack("=IIQQ", BPF_PROG_TYPE_XDP, len(code) // 8, ctypes.addressof(self._code),
                           ctypes.addressof(self._license))
        self.prog_fd = bpf(BPF_PROG_LOAD, attr)
        ifindex = socket.if_nametoindex(iface)
        self.mode = ""
        for flags, mode in ((XDP_FLAGS_DRV_MODE, "native"), (XDP_FLAGS_SKB_MODE, "generic")):
            try:
                self.link_fd = bpf(BPF_LINK_CREATE, struct.pack("=IIII", self.prog_fd, ifindex, BPF_XDP, flags))
                self.mode = mode
                break
            except OSError:
                continue
        if not self.mode:
            raise OSError(f"could not attach XDP to {iface}")

    def count(self) -> int:
        """Frames counted so far, over every CPU."""
        key = ctypes.create_string_buffer(4)
        value = ctypes.create_string_buffer(8 * self.ncpu)
        bpf(BPF_MAP_LOOKUP_ELEM, struct.pack("=IxxxxQQQ", self.map_fd, ctypes.addressof(key),
                                             ctypes.addressof(value), 0))
        return sum(struct.unpack(f"={self.ncpu}Q", value.raw))


def main() -> None:
    c = Counter(sys.argv[1])
    print("ready", c.mode, flush=True)
    for _ in sys.stdin:
        print(c.count(), flush=True)


if __name__ == "__main__":
    main()
