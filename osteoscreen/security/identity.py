"""Who is calling: identities from a verified client certificate, and the allow-list they are checked against.

A certificate's identities are its subject alternative names (DNS names, URIs such as SPIFFE ids, e-mail
addresses, IP addresses) and its subject common name, as strings; cert-manager puts the names it issues for
in the SANs, older PKIs only in the CN, so both count. `OSTEOSCREEN_ALLOWED_CLIENTS` is a comma list of such
strings; an entry may end in `*` to allow a prefix (e.g. `spiffe://hospital.org/ns/radiology/*`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class AllowList:
    exact: frozenset[str]
    prefixes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AllowList:
        names = [n.strip() for n in text.split(",") if n.strip()]
        return cls(frozenset(n for n in names if not n.endswith("*")),
                   tuple(n[:-1] for n in names if n.endswith("*")))

    def allows(self, identities: Iterable[str]) -> bool:
        return any(i in self.exact or any(i.startswith(p) for p in self.prefixes) for i in identities)

    def describe(self) -> str:
        return ", ".join(sorted(self.exact) + [p + "*" for p in self.prefixes])


def certificate_identities(cert: x509.Certificate) -> tuple[str, ...]:
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for kind in (x509.DNSName, x509.UniformResourceIdentifier, x509.RFC822Name):
            names.extend(san.get_values_for_type(kind))
        names.extend(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    names.extend(a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if isinstance(a.value, str))
    return tuple(dict.fromkeys(names))


@functools.lru_cache(maxsize=1024)
def pem_identities(pem: bytes | str) -> tuple[str, ...]:
    """Identities of a PEM certificate; cached, since one connection presents the same certificate for
    every request on it."""
    data = pem.encode() if isinstance(pem, str) else pem
    return certificate_identities(x509.load_pem_x509_certificate(data))
