"""TLS certificates for the QUIC endpoint.

A deployment configures a certificate a browser already trusts. For local
use the node makes its own: ECDSA P-256, valid for 10 days, because that is
what a browser accepts through WebTransport's `serverCertificateHashes`
(the W3C spec allows at most 14 days and an ECDSA secp256r1 key). The page
then pins the certificate's SHA-256 instead of trusting a CA.
"""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SELF_SIGNED_DAYS = 10
# a self-signed certificate is replaced when it has less than this left, so
# a page that fetched its hash a moment ago still connects
RENEW_BEFORE = datetime.timedelta(days=3)


@dataclass
class Credentials:
    chain: list[Any]          # cryptography x509.Certificate, leaf first
    key: Any                  # the leaf's private key
    self_signed: bool

    @property
    def not_after(self) -> datetime.datetime:
        return self.chain[0].not_valid_after_utc

    def due(self, now: datetime.datetime | None = None) -> bool:
        """A self-signed certificate close enough to its end to be replaced."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        return self.self_signed and self.not_after - now < RENEW_BEFORE

    @property
    def sha256(self) -> bytes:
        """SHA-256 of the leaf certificate's DER: what a client pins."""
        return hashlib.sha256(self.chain[0].public_bytes(serialization.Encoding.DER)).digest()


def self_signed(hosts: list[str], days: int = SELF_SIGNED_DAYS) -> Credentials:
    """A fresh key and certificate naming `hosts` (names or IP addresses)."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay (self-signed)")])
    # backdated a little so a client whose clock runs slightly behind accepts it
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(minutes=5)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return Credentials([cert], key, True)


class CertificateError(ValueError):
    """A configured certificate or key that cannot be used; one readable line."""


def fingerprint(cert_path: str, key_path: str) -> bytes:
    """A hash of the two files' contents, to see whether they changed."""
    h = hashlib.sha256()
    for path in (cert_path, key_path):
        try:
            with open(path, "rb") as f:
                h.update(f.read())
        except OSError:
            h.update(b"unreadable")
    return h.digest()


def load(cert_path: str, key_path: str) -> Credentials:
    """A configured PEM chain and key; raises CertificateError."""
    try:
        with open(cert_path, "rb") as f:
            chain = x509.load_pem_x509_certificates(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as e:
        raise CertificateError(f"cannot read {e.filename}: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        raise CertificateError(f"not a PEM certificate and unencrypted key: {e}") from None
    if not chain:
        raise CertificateError(f"{cert_path}: no certificate")
    return Credentials(chain, key, False)
