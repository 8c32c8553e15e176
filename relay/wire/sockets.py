"""The node's own UDP sockets: how one is made, and the error that names
the setting when it cannot be bound."""
from __future__ import annotations

import contextlib
import errno
import socket
from typing import Iterator

# the listener socket's kernel buffers: a burst of joins or a sender
# thread's batch must fit (deploy/sysctl raises the kernel's cap to match)
SOCKET_BUFFER = 8 << 20
# Linux's options that pass net.core.[rw]mem_max (CAP_NET_ADMIN)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


class BindError(OSError):
    """A socket the config names could not be bound; the message names the
    setting, the address and the fix."""


def udp_socket(host: str, port: int, sndbuf: int = 0, rcvbuf: int = 0, reuseport: bool = False) -> socket.socket:
    """A bound non-blocking UDP socket; raises OSError (e.g. port taken).
    With `reuseport`, one of a SO_REUSEPORT group (relay.listeners.steer)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        for force, opt, size in ((SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf),
                                 (SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)):
            if size:
                _set_buffer(sock, force, opt, size)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _set_buffer(sock: socket.socket, force: int, opt: int, size: int) -> None:
    """Ask for `size` bytes of kernel buffer. The plain option is capped at
    net.core.[rw]mem_max (208 KiB on a stock kernel: a join storm's burst
    overflows it while the loop is busy, and the joiners go unanswered), so
    a node with CAP_NET_ADMIN takes the size it asked for; others get the
    cap, which `relay check` tells the operator to raise."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)


@contextlib.contextmanager
def binding(setting: str, addr: tuple[str, int], flag: str) -> Iterator[None]:
    """Turn an OSError from binding `addr` into a BindError that names the
    config `setting`, the address and what to do (`flag` overrides it)."""
    try:
        yield
    except BindError:
        raise
    except OSError as e:
        hint = {errno.EADDRINUSE: f"another program has it: choose a free port ({setting.split(':')[0]} or {flag})",
                errno.EADDRNOTAVAIL: "this machine has no such address",
                errno.EACCES: "ports below 1024 need privileges"}.get(e.errno or 0, "")
        raise BindError(e.errno, f"{setting} {addr[0]}:{addr[1]}: {e.strerror or e}"
                        + (f"; {hint}" if hint else "")) from None
