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


class BindError(OSError):
    """A socket the config names could not be bound; the message names the
    setting, the address and the fix."""


def udp_socket(host: str, port: int, sndbuf: int = 0, rcvbuf: int = 0) -> socket.socket:
    """A bound non-blocking UDP socket; raises OSError (e.g. port taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        for opt, size in ((socket.SO_SNDBUF, sndbuf), (socket.SO_RCVBUF, rcvbuf)):
            if size:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


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
