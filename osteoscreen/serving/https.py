"""HTTPS for the BentoML front: the TLS files through BentoML's `ssl` service settings, plus what uvicorn does
not do itself, namely following renewed certificate files and telling the app who the caller is.

- `ssl_config(settings)`: BentoML's `ssl` settings (uvicorn's `ssl_certfile`, `ssl_keyfile`, `ssl_ca_certs`,
  `ssl_cert_reqs`): HTTPS, and with a client CA, client certificates required and verified in the handshake.
- `TLSProtocol`: uvicorn's HTTP protocol (httptools', or h11's without it) plus the ASGI TLS extension
  (`scope["extensions"]["tls"]`, with the verified client certificate), which uvicorn does not provide and
  BentoML offers no hook for; `install()` makes it uvicorn's "auto" HTTP protocol for this process, before
  BentoML's worker builds its server. A new connection first polls the certificate files and, when they
  were renewed, loads them into the live SSLContext: new handshakes get the new certificate, open
  connections keep theirs, no restart.
- `CallerAllowList`: ASGI middleware, 403 for a client certificate whose identities are not allowed (the
  identities and the list are the gRPC server's: `osteoscreen.security.identity`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from typing import Any

from osteoscreen.security.identity import AllowList, pem_identities
from osteoscreen.security.tls import CertificateFiles, TLSSettings

log = logging.getLogger("osteoscreen.https")

# carry no patient data; under mutual TLS the handshake still demands a certificate from the client CA
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
_files: CertificateFiles | None = None


def ssl_config(settings: TLSSettings) -> dict[str, Any]:
    config: dict[str, Any] = {"enabled": True, "certfile": str(settings.cert), "keyfile": str(settings.key)}
    if settings.client_ca is not None:
        config.update(ca_certs=str(settings.client_ca), cert_reqs=int(ssl.CERT_REQUIRED))
    return config


def tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    """The ASGI TLS extension (asgi.readthedocs.io, specs/tls) for one connection."""
    der = ssl_object.getpeercert(binary_form=True)
    chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
    peer = ssl_object.getpeercert() or {}
    name = ",".join("=".join(pair) for rdn in reversed(peer.get("subject", ())) for pair in rdn) or None
    return {"server_cert": None, "client_cert_chain": chain, "client_cert_name": name, "client_cert_error": None,
            "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""), "cipher_suite": None}


def _reload(context: ssl.SSLContext, settings: TLSSettings) -> None:
    try:
        context.load_cert_chain(settings.cert, settings.key)
        if settings.client_ca is not None:
            context.load_verify_locations(cafile=settings.client_ca)  # adds; a removed CA needs a restart
    except (OSError, ssl.SSLError) as exc:  # changed again under us: the next connection tries again
        log.warning("HTTPS certificate reload failed, keeping the current one: %s", exc)


try:  # the parser uvicorn's "auto" would pick: httptools (a dependency, C) when installed, else h11
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _UvicornProtocol
except ImportError:  # pragma: no cover - httptools missing: pure-Python h11, as uvicorn itself falls back
    from uvicorn.protocols.http.h11_impl import H11Protocol as _UvicornProtocol


class TLSProtocol(_UvicornProtocol):  # type: ignore[misc,valid-type]
    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # before this connection's handshake (asyncio wraps the socket after building the protocol)
        if _files is not None and config.ssl is not None and _files.poll() is not None:
            _reload(config.ssl, _files.settings)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return
        extension, app = tls_extension(ssl_object), self.app

        async def with_tls(scope: dict, receive: Any, send: Any) -> None:
            if scope.get("extensions") is None:
                scope["extensions"] = {}
            scope["extensions"]["tls"] = extension
            await app(scope, receive, send)

        self.app = with_tls


def install(settings: TLSSettings) -> None:
    """Make TLSProtocol uvicorn's "auto" HTTP protocol in this process and follow `settings`' files."""
    global _files
    import uvicorn.config

    _files = CertificateFiles(settings)
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:TLSProtocol"


def caller_identities(scope: dict) -> tuple[str, ...] | None:
    """The client certificate's identities; None when the connection carries no TLS extension."""
    tls = (scope.get("extensions") or {}).get("tls")
    if tls is None:
        return None
    chain = tls.get("client_cert_chain") or []
    return pem_identities(chain[0]) if chain else ()


class CallerAllowList:
    """403 for callers whose client certificate names no allowed identity (every path but `OPEN_PATHS`).
    A request without the TLS extension is refused too: without it nobody can tell who is calling."""

    def __init__(self, app: Any, allowed: AllowList) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        identities = caller_identities(scope)
        if identities is not None and self.allowed.allows(identities):
            return await self.app(scope, receive, send)
        log.warning("HTTPS caller refused: certificate identities %s are not in OSTEOSCREEN_ALLOWED_CLIENTS",
                    list(identities or ()) or "(none)")
        body = json.dumps({"error": "this client certificate's identity is not allowed to call OsteoScreen"}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
