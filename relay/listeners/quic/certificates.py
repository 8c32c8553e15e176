"""The QUIC port's certificate, for relay.listeners.quic.endpoint's endpoint: the
configured files or a self-signed one, taken again on SIGHUP when the files
changed, renewed before a self-signed one expires, and the aioquic server
configuration that carries it. New connections get the new certificate;
open ones keep theirs (their keys no longer depend on it)."""
from __future__ import annotations

import logging
from typing import Any

from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration

from relay.listeners.quic import tls as certs
from relay.listeners.quic.server import QuicServer
from relay.listeners.sessions import Sessions
from relay.wire.protocol import ALPN_QUIC, MAX_DATAGRAM_FRAME

log = logging.getLogger("relay.quic")


class QuicCertificates:
    """The certificate side of the QUIC endpoint."""

    addr: tuple[str, int]
    files: bytes
    creds: certs.Credentials
    server: QuicServer | None
    sessions: Sessions

    def _self_signed(self) -> certs.Credentials:
        return certs.self_signed(["localhost", "127.0.0.1", "::1", self.addr[0]])

    def _use(self, creds: certs.Credentials) -> None:
        """New connections get `creds`; connections already open keep
        theirs (their keys do not depend on the certificate any more)."""
        self.creds = creds
        if self.server is not None:
            self.server._configuration = self.configuration()

    def reload_certificate(self, cert_path: str, key_path: str) -> str:
        """SIGHUP: take the configured files again if their contents changed.
        Returns a line for the reload log ("" if nothing changed); a file
        that no longer loads keeps the certificate in use."""
        if not cert_path:
            return ""
        now = certs.fingerprint(cert_path, key_path)
        if now == self.files:
            return ""
        try:
            creds = certs.load(cert_path, key_path)
        except certs.CertificateError as e:
            return f"quic_cert: {e}; kept the certificate in use"
        self.files = now
        self._use(creds)
        return f"quic_cert: reloaded {cert_path} (valid until {creds.not_after:%Y-%m-%d})"

    def renew_if_due(self, now: Any = None) -> bool:
        """Replace a self-signed certificate before it expires. /quic.json
        gives the new hash at once; open sessions are not touched."""
        if not self.creds.due(now):
            return False
        self._use(self._self_signed())
        log.info("QUIC: renewed the self-signed certificate, sha-256 %s", self.creds.sha256.hex())
        return True

    def configuration(self) -> QuicConfiguration:
        conf = QuicConfiguration(is_client=False, alpn_protocols=[ALPN_QUIC, *H3_ALPN],
                                 max_datagram_frame_size=MAX_DATAGRAM_FRAME,
                                 idle_timeout=self.sessions.cfg.session_timeout)
        conf.certificate = self.creds.chain[0]
        conf.certificate_chain = self.creds.chain[1:]
        conf.private_key = self.creds.key
        return conf

