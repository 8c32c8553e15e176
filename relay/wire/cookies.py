"""Stateless address-validation cookies for the JOIN handshake
(docs/protocol.md, "Joining"): the node keeps nothing per JOIN."""
from __future__ import annotations

import hashlib
import hmac
import struct

from relay.wire.protocol import COOKIE_LEN


class CookieJar:
    """Stateless address-validation cookies, like QUIC's Retry token: the
    node keeps nothing per JOIN; the cookie proves the joiner can receive at
    the address it claims. Cookie = 4-byte issue time (s) + 16-byte
    HMAC-SHA256(secret, time | address)."""

    def __init__(self, secret: bytes, lifetime_s: float = 10.0) -> None:
        self._secret = secret
        self.lifetime_s = lifetime_s

    @property
    def secret(self) -> bytes:
        """The key, for the core's gate, which makes and checks the same cookies."""
        return self._secret

    def _mac(self, issued: int, addr: bytes) -> bytes:
        return hmac.new(self._secret, struct.pack("!I", issued) + addr, hashlib.sha256).digest()[:16]

    def make(self, addr: bytes, now: float) -> bytes:
        """A cookie for raw address bytes `addr` (see relay.wire.addr.to_sockaddr)."""
        issued = int(now) & 0xFFFFFFFF
        return struct.pack("!I", issued) + self._mac(issued, addr)

    def check(self, cookie: bytes, addr: bytes, now: float) -> bool:
        """True if the cookie was made by us for this address and is fresh."""
        if len(cookie) != COOKIE_LEN:
            return False
        (issued,) = struct.unpack_from("!I", cookie)
        age = (int(now) - issued) & 0xFFFFFFFF
        if age > self.lifetime_s:
            return False
        return hmac.compare_digest(cookie[4:], self._mac(issued, addr))
