"""Sessions' own socket: the listener port as a SO_REUSEPORT pair, steered
by a small eBPF program, so strangers' datagrams cannot fill the queue a
session's KEEPALIVEs wait in.

The kernel runs the program for every datagram to the port, before either
socket's queue: an IPv4 datagram whose source address and port are in the
sessions map goes to the session socket; everything else (strangers, IPv6,
IPv4 with options) to the stranger socket. Both are drained by the core's
gate; a flood can fill only the stranger socket's queue. The session
table keeps the map (one bpf() call per session start or end, never per
packet).

Needs CAP_BPF or root and Linux >= 4.19 (no BTF, no compiler: the program
is eleven instructions written here). Without them the port is one socket,
as before, and `Steering.attach` says why.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_BPF = 321                      # x86_64
BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_PROG_LOAD = 0, 2, 3, 5
BPF_MAP_TYPE_HASH, BPF_PROG_TYPE_SOCKET_FILTER = 1, 1
SO_ATTACH_REUSEPORT_EBPF = 52
SKF_NET_OFF = -0x100000             # LD_ABS offsets from the network header
STRANGERS, SESSIONS = 0, 1          # the sockets' places in the group: their order of binding


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def program(map_fd: int) -> bytes:
    """The steering program: SESSIONS for a known IPv4 source, else
    STRANGERS (which is also what a failed load returns)."""
    return b"".join((
        _insn(0xBF, 6, 1),                              # r6 = skb (LD_ABS reads through it)
        _insn(0x30, imm=SKF_NET_OFF),                   # r0 = first byte of the IP header
        _insn(0x55, 0, off=12, imm=0x45),               # not IPv4 without options: strangers
        _insn(0x20, imm=SKF_NET_OFF + 12),              # r0 = source address (host order)
        _insn(0x63, 10, 0, off=-8),                     # key[0:4]
        _insn(0x28, imm=SKF_NET_OFF + 20),              # r0 = source port (the UDP header)
        _insn(0x63, 10, 0, off=-4),                     # key[4:8]
        _insn(0x18, 1, 1, imm=map_fd), _insn(0),        # r1 = the sessions map
        _insn(0xBF, 2, 10),                             # r2 = &key
        _insn(0x07, 2, imm=-8),
        _insn(0x85, imm=1),                             # bpf_map_lookup_elem
        _insn(0x15, 0, off=2, imm=0),                   # not there: strangers
        _insn(0xB7, 0, imm=SESSIONS),
        _insn(0x95),
        _insn(0xB7, 0, imm=STRANGERS),
        _insn(0x95),
    ))


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    rc = _libc.syscall(_SYS_BPF, cmd, buf, 128)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(rc)


def key(addr: tuple) -> bytes | None:
    """The map's key for a socket-module address: the IPv4 source address
    and port as LD_ABS loads them (host order); None for IPv6 sources."""
    ip = ipaddress.ip_address(addr[0].split("%")[0])
    if ip.version == 6:
        if ip.ipv4_mapped is None:
            return None
        ip = ip.ipv4_mapped
    return struct.pack("=II", int(ip), int(addr[1]))


class Steering:
    """The eBPF program and the sessions map of one listener port."""

    def __init__(self, map_fd: int, prog_fd: int) -> None:
        self.map_fd, self.prog_fd = map_fd, prog_fd
        self.errors = 0           # map updates the kernel refused (the map is full)

    @classmethod
    def attach(cls, sock: socket.socket, capacity: int) -> Steering | str:
        """Load the program with a map of `capacity` sessions and attach it
        to `sock`'s reuseport group; the reason as a string if it cannot be."""
        try:
            map_fd = _bpf(BPF_MAP_CREATE, struct.pack("=IIII", BPF_MAP_TYPE_HASH, 8, 4, max(capacity, 1)))
        except OSError as e:
            return f"no sessions map ({e.strerror})"
        code = program(map_fd)
        insns = ctypes.create_string_buffer(code, len(code))
        lic = ctypes.create_string_buffer(b"GPL")
        log = ctypes.create_string_buffer(4096)
        try:
            prog_fd = _bpf(BPF_PROG_LOAD, struct.pack(
                "=IIQQIIQ", BPF_PROG_TYPE_SOCKET_FILTER, len(code) // 8, ctypes.addressof(insns),
                ctypes.addressof(lic), 1, len(log), ctypes.addressof(log)))
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, struct.pack("=i", prog_fd))
        except OSError as e:
            os.close(map_fd)
            return f"no steering program ({e.strerror}{': ' + log.value.decode()[-200:] if log.value else ''})"
        return cls(map_fd, prog_fd)

    def _update(self, cmd: int, k: bytes) -> None:
        kbuf = ctypes.create_string_buffer(k, 8)
        vbuf = ctypes.create_string_buffer(b"\x01\x00\x00\x00", 4)
        # a delete's attributes end at the key: the kernel wants the rest zero
        value = ctypes.addressof(vbuf) if cmd == BPF_MAP_UPDATE_ELEM else 0
        try:
            _bpf(cmd, struct.pack("=IIQQQ", self.map_fd, 0, ctypes.addressof(kbuf), value, 0))
        except OSError:
            self.errors += 1   # full, or (delete) not there: the gate still sorts what comes in

    def session(self, addr: tuple, live: bool) -> None:
        """A UDP session started (`live`) or ended at `addr`."""
        k = key(addr)
        if k is not None:
            self._update(BPF_MAP_UPDATE_ELEM if live else BPF_MAP_DELETE_ELEM, k)

    def close(self) -> None:
        """Free the program and the map (the sockets keep nothing of them)."""
        for fd in (self.prog_fd, self.map_fd):
            os.close(fd)
