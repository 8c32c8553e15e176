"""A speaker's keys, agreed on the wire without sending them: an ephemeral
X25519 exchange in the JOIN handshake (RFC 7748), HKDF-SHA256 (RFC 5869)
for the keys, ChaCha20-Poly1305 (RFC 8439) to seal the speaker's token.

    speaker                                   node
    JOIN (speaker, sealed)          ->
                                    <-        CHALLENGE cookie, node's public key
    JOIN cookie, speaker's public key,
         token sealed               ->
                                    <-        ACCEPT (speaker)
    SRTP with the derived key, KEEPALIVE and LEAVE with a MAC

The node keeps no state between CHALLENGE and JOIN (a flood of first JOINs
must cost it nothing to remember): its private key for the exchange is
derived from its cookie secret and the cookie, so the JOIN that brings the
cookie back brings the key back too. A passive observer sees two public
keys and a sealed token: not the token (which would let it join as the
speaker), not the SRTP key (which would let it inject audio), not the
control key (which would let it end the session). An active attacker who
can rewrite the handshake is not stopped by this: nothing authenticates
the node's public key.
"""
from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

PUBLIC_LEN = 32
SRTP_KEY_LEN = 30         # AES_CM_128_HMAC_SHA1_80: a 16-byte key and a 14-byte salt
MAC_LEN = 16              # a speaker's KEEPALIVE and LEAVE carry this much HMAC-SHA256
INFO = b"relay speaker keys v1"
NONCE = bytes(12)         # each token-sealing key seals exactly one token


class SealError(ValueError):
    """A sealed token that does not open (wrong key, tampered, truncated)."""


class Keys:
    """What one exchange yields: the token's sealing key, the speaker's SRTP
    master key and salt, and the key of its control messages' MACs."""

    def __init__(self, shared: bytes, cookie: bytes) -> None:
        okm = HKDF(hashes.SHA256(), 32 + SRTP_KEY_LEN + 32, salt=cookie, info=INFO).derive(shared)
        self.token_key, self.srtp_key, self.control_key = okm[:32], okm[32:62], okm[62:]
        self.aad = cookie

    def seal(self, token: str) -> bytes:
        """The token, sealed to the node for this handshake."""
        return ChaCha20Poly1305(self.token_key).encrypt(NONCE, token.encode(), self.aad)

    def open(self, sealed: bytes) -> str:
        """The token sealed in the JOIN; raises SealError."""
        try:
            return ChaCha20Poly1305(self.token_key).decrypt(NONCE, sealed, self.aad).decode()
        except (InvalidTag, UnicodeDecodeError, ValueError):
            raise SealError("the sealed token does not open") from None


def mac(control_key: bytes, kind: int, session_id: bytes, counter: int) -> bytes:
    """The MAC of a speaker's KEEPALIVE or LEAVE: its type, session id and
    counter (which must grow, so a copy is worth nothing)."""
    msg = bytes([kind]) + session_id + struct.pack("!I", counter)
    return hmac.new(control_key, msg, hashlib.sha256).digest()[:MAC_LEN]


def _public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def node_private(secret: bytes, cookie: bytes) -> X25519PrivateKey:
    """The node's private key for the exchange begun with `cookie`: derived,
    not stored (the node keeps no state between CHALLENGE and JOIN)."""
    return X25519PrivateKey.from_private_bytes(hmac.new(secret, b"keyx:" + cookie, hashlib.sha256).digest())


def node_public(secret: bytes, cookie: bytes) -> bytes:
    """The public key the node's CHALLENGE carries with `cookie`."""
    return _public(node_private(secret, cookie))


def node_keys(secret: bytes, cookie: bytes, speaker_public: bytes) -> Keys:
    """The node's side: the keys, from the cookie and the speaker's public key."""
    try:
        peer = X25519PublicKey.from_public_bytes(speaker_public)
        shared = node_private(secret, cookie).exchange(peer)
    except ValueError:
        raise SealError("not an X25519 public key") from None
    return Keys(shared, cookie)


def speaker_keys(cookie: bytes, node_pub: bytes) -> tuple[bytes, Keys]:
    """The speaker's side: a fresh key pair; returns its public key and the keys."""
    private = X25519PrivateKey.generate()
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(node_pub))
    except ValueError:
        raise SealError("the node's public key is not an X25519 key") from None
    return _public(private), Keys(shared, cookie)
