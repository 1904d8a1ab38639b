"""Throwaway certificates for the TLS benchmark and the tests: a private CA, server and client certificates,
written as PEM files. Never for production: real deployments get theirs from cert-manager (k8s/components/tls)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """One certificate and its key, as PEM bytes and, once written, as files."""

    cert_pem: bytes
    key_pem: bytes
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def write(self, folder: Path, name: str) -> tuple[Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)
        return cert_path, key_path


def _issued(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem, cert, key)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "OsteoScreen test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(name: str = "OsteoScreen test CA", days: int = 30) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return _issued(cert, key)


def issue(ca: Issued, common_name: str, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
          uris: tuple[str, ...] = (), server: bool = True, client: bool = True,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> Issued:
    """A leaf certificate signed by `ca`: SANs from `dns`, `ips` and `uris` (e.g. a SPIFFE id), extended key
    usage serverAuth and/or clientAuth. `not_before`/`not_after` make not-yet-valid or expired ones."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    usages = [u for u, on in ((ExtendedKeyUsageOID.SERVER_AUTH, server), (ExtendedKeyUsageOID.CLIENT_AUTH, client)) if on]
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before or now - dt.timedelta(minutes=5))
               .not_valid_after(not_after or now + dt.timedelta(days=7))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               # key identifiers: strict verifiers (urllib3 2, Python 3.13) reject chains without them
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return _issued(builder.sign(ca.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class LocalPKI:
    """Files for a TLS server on localhost and one allowed client, in one folder."""

    authority: Issued
    folder: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_env(self, mutual: bool = True, allowed: str = "") -> dict[str, str]:
        env = {"OSTEOSCREEN_TLS_CERT": str(self.server_cert), "OSTEOSCREEN_TLS_KEY": str(self.server_key)}
        if mutual:
            env["OSTEOSCREEN_TLS_CLIENT_CA"] = str(self.ca)
        if allowed:
            env["OSTEOSCREEN_ALLOWED_CLIENTS"] = allowed
        return env


def localhost_pki(folder: Path, client_name: str = "radiology-platform") -> LocalPKI:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate named `client_name`."""
    ca = make_ca()
    ca_path = folder / "ca.crt"
    folder.mkdir(parents=True, exist_ok=True)
    ca_path.write_bytes(ca.cert_pem)
    server_cert, server_key = issue(ca, "osteoscreen", dns=("localhost",), ips=("127.0.0.1", "::1")).write(folder, "server")
    client_cert, client_key = issue(ca, client_name, dns=(client_name,), server=False).write(folder, "client")
    return LocalPKI(ca, folder, ca_path, server_cert, server_key, client_cert, client_key)


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client-side SSLContext trusting `ca`, presenting `cert`/`key` when given (mutual TLS)."""

    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context
