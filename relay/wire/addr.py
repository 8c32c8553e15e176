"""Socket addresses as the core stores them: raw `struct sockaddr` bytes.

The core copies these into its listener arena and hands them to sendmmsg
as they are, so they are built once per listener here, not per packet.
"""
from __future__ import annotations

import ipaddress
import socket
import struct

Address = tuple  # (host, port) or (host, port, flowinfo, scope_id)


def to_sockaddr(addr: Address, family: int | None = None) -> bytes:
    """Encode a socket-module address tuple as raw sockaddr_in/sockaddr_in6."""
    host, port = addr[0], int(addr[1])
    ip = ipaddress.ip_address(host.split("%")[0])
    if family is None:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    if family == socket.AF_INET:
        if ip.version != 4:
            raise ValueError(f"{host} is not an IPv4 address")
        return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + ip.packed + bytes(8)
    if ip.version == 4:
        ip = ipaddress.IPv6Address("::ffff:" + str(ip))
    flow = int(addr[2]) if len(addr) > 2 else 0
    scope = int(addr[3]) if len(addr) > 3 else 0
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, flow)
            + ip.packed + struct.pack("=I", scope))


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split 'host:port', '[v6]:port' or a bare host; raises ValueError."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} needs a port (host:port)")
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port
