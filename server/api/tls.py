"""TLS and mutual TLS for the gRPC listener, from certificate files, reloadable.

grpc asks for the certificate configuration at every new handshake; after ``reload()``
(what SIGHUP triggers) the files are read again at the next one, so a renewed
certificate is served without a restart and without dropping open connections. When
the new files cannot be read, the previous certificate stays in use and the failure is
logged. With a client CA, every client must present a certificate it signed (mTLS).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc

from server.domain.errors import StartupError

log = logging.getLogger(__name__)


class TlsCredentials:
    """The listener's certificate and key (and client CA), re-read on ``reload()``."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self._cert_file = cert_file
        self._key_file = key_file
        self._client_ca_file = client_ca_file
        self._lock = threading.Lock()
        self._pending = False
        try:
            self._initial = self._read()
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot read the TLS certificate files: {exc}") from None

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate."""
        return self._client_ca_file is not None

    def _read(self) -> grpc.ServerCertificateConfiguration:
        key = self._key_file.read_bytes()
        cert = self._cert_file.read_bytes()
        if b"PRIVATE KEY" not in key or b"CERTIFICATE" not in cert:
            raise ValueError("expected a PEM private key and a PEM certificate")
        ca = None if self._client_ca_file is None else self._client_ca_file.read_bytes()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that consult ``reload()`` at each handshake."""
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            self._fetch,  # type: ignore[arg-type]  # grpc documents None as "keep it"
            require_client_authentication=self.mutual,
        )

    def reload(self) -> None:
        """Read the files again at the next handshake."""
        with self._lock:
            self._pending = True
        log.info("TLS certificate files will be read again at the next handshake")

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc in its own thread; None keeps the configuration in use.
        with self._lock:
            if not self._pending:
                return None
            self._pending = False
        try:
            return self._read()
        except (OSError, ValueError) as exc:
            log.error("TLS reload failed, keeping the previous certificate: %s", exc)
            return None
