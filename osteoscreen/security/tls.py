"""TLS settings from the environment, checked up front, and certificate files followed while serving.

    OSTEOSCREEN_TLS_CERT, OSTEOSCREEN_TLS_KEY   PEM server certificate (chain) and key: TLS on gRPC and HTTP
    OSTEOSCREEN_TLS_CLIENT_CA                   PEM CA bundle: mutual TLS, client certificates required
    OSTEOSCREEN_ALLOWED_CLIENTS                 comma list of caller identities (see `identity.py`)

Why check here rather than let grpc/uvicorn fail: both would fail inside a worker, after start-up, with an
OpenSSL error code, and a worker manager would restart them in a loop. A missing file, a key that does not
belong to the certificate or an expired certificate should stop `bentoml serve` at once with a sentence.

Why a watcher: cert-manager renews certificates long before they expire and kubelet swaps the mounted
Secret's files atomically (a symlink flip). `CertificateFiles.poll()` is a few stat() calls, cheap enough
to run at every new connection: new handshakes get the new certificate, connections already open keep the
one they negotiated. A half-written or inconsistent update is logged and ignored until it is complete.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from osteoscreen import settings
from osteoscreen.errors import OsteoScreenError
from osteoscreen.security.identity import AllowList

log = logging.getLogger("osteoscreen.tls")

ENV_CERT, ENV_KEY = "OSTEOSCREEN_TLS_CERT", "OSTEOSCREEN_TLS_KEY"
ENV_CLIENT_CA, ENV_ALLOWED = "OSTEOSCREEN_TLS_CLIENT_CA", "OSTEOSCREEN_ALLOWED_CLIENTS"


class TLSConfigError(OsteoScreenError):
    """The TLS settings or files are unusable; the server must not start (or keep its last good material)."""


@dataclass(frozen=True)
class TLSSettings:
    cert: Path
    key: Path
    client_ca: Path | None = None
    allowed: AllowList | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.cert, self.key, *((self.client_ca,) if self.client_ca else ()))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TLSSettings | None:
        """None when TLS is off (no certificate set). Raises TLSConfigError for an incomplete set or bad files.
        `environ`: variables to check instead of this process's settings."""
        s = settings.current() if environ is None else settings.load(environ)
        cert, key = str(s.tls_cert or ""), str(s.tls_key or "")
        client_ca, allowed = str(s.tls_client_ca or ""), s.allowed_clients or ""
        if not cert and not key:
            if client_ca or allowed:
                raise TLSConfigError(f"{ENV_CLIENT_CA} / {ENV_ALLOWED} need TLS: set {ENV_CERT} and {ENV_KEY} too")
            return None
        if not cert or not key:
            raise TLSConfigError(f"TLS needs both {ENV_CERT} and {ENV_KEY} (only {ENV_CERT if cert else ENV_KEY} is set)")
        if allowed and not client_ca:
            raise TLSConfigError(f"{ENV_ALLOWED} names client identities, which only mutual TLS proves: "
                                 f"set {ENV_CLIENT_CA} too")
        chosen = cls(Path(cert), Path(key), Path(client_ca) if client_ca else None,
                     AllowList.parse(allowed) if allowed else None)
        load_material(chosen)  # fail now, with a sentence, rather than inside a worker
        return chosen


@dataclass(frozen=True)
class Material:
    """The PEM bytes of one consistent, valid set of files."""

    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None
    subject: str
    not_after: dt.datetime


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise TLSConfigError(f"{what} file {path} cannot be read: {exc.strerror or exc}") from None
    if not data.strip():
        raise TLSConfigError(f"{what} file {path} is empty")
    return data


def _certificates(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(f"{what} file {path} holds no PEM certificate") from None
    return certs


def load_material(settings: TLSSettings, now: dt.datetime | None = None) -> Material:
    """Read and check the files: PEM certificate and key, the key belongs to the certificate, the certificate
    is valid now, the client CA parses. Raises TLSConfigError naming the file and the problem."""
    now = now or dt.datetime.now(dt.timezone.utc)
    cert_pem, key_pem = _read(settings.cert, "TLS certificate"), _read(settings.key, "TLS key")
    leaf = _certificates(cert_pem, settings.cert, "TLS certificate")[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TLSConfigError(f"TLS key file {settings.key} holds no unencrypted PEM private key ({exc})") from None
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, raw) != leaf.public_key().public_bytes(
            serialization.Encoding.DER, raw):
        raise TLSConfigError(f"TLS key {settings.key} does not belong to the certificate {settings.cert}")
    subject = leaf.subject.rfc4514_string()
    if leaf.not_valid_after_utc <= now:
        raise TLSConfigError(f"TLS certificate {settings.cert} ({subject}) expired on "
                             f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if leaf.not_valid_before_utc > now:
        raise TLSConfigError(f"TLS certificate {settings.cert} ({subject}) is not valid before "
                             f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    ca_pem = None
    if settings.client_ca is not None:
        ca_pem = _read(settings.client_ca, "TLS client CA")
        _certificates(ca_pem, settings.client_ca, "TLS client CA")
    return Material(cert_pem, key_pem, ca_pem, subject, leaf.not_valid_after_utc)


def _signature(paths: tuple[Path, ...]) -> tuple:
    """What changes when a file is replaced: a rename or a Secret's symlink flip changes the inode, an
    in-place write the mtime or size. stat() follows symlinks, as the TLS libraries do."""
    out = []
    for path in paths:
        try:
            st = path.stat()
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


class CertificateFiles:
    """The current material of `settings`' files. `poll()` returns new material once the files changed and
    the new set is consistent and valid, else None; the last good material stays in `current`."""

    def __init__(self, settings: TLSSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()  # grpc calls the fetcher from its own threads
        self._seen = _signature(settings.files)
        self.current = load_material(settings)
        self.reloads = 0

    def poll(self) -> Material | None:
        signature = _signature(self.settings.files)
        if signature == self._seen:
            return None
        with self._lock:
            if signature == self._seen:
                return None
            try:
                material = load_material(self.settings)
            except TLSConfigError as exc:  # mid-update, or a bad renewal: keep serving with what works
                log.warning("TLS files changed but are not usable yet, keeping the current certificate: %s", exc)
                self._seen = signature  # warn once per change; the next change is tried again
                return None
            self._seen = _signature(self.settings.files)
            self.current = material
            self.reloads += 1
            log.info("TLS certificate reloaded: %s, valid until %s", material.subject,
                     f"{material.not_after:%Y-%m-%d %H:%M} UTC")
            return material
