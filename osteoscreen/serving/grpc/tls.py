"""gRPC transport security: server credentials that follow the certificate files, and the caller allow-list.

`grpc.dynamic_ssl_server_credentials` asks its fetcher for a new configuration at every handshake; the
fetcher is `CertificateFiles.poll()` (a few stat() calls), so a renewed certificate is used from the next
connection on, with no restart, while open connections finish on the old one.

The allow-list is an interceptor behind `RpcGuard`, so a refused call is still counted (code
PERMISSION_DENIED). Health checks are exempt: they carry no patient data, and under mutual TLS the
handshake already demands a certificate from the client CA.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from osteoscreen.security.identity import AllowList, pem_identities
from osteoscreen.security.tls import CertificateFiles, Material

log = logging.getLogger("osteoscreen.grpc")
EXEMPT_SERVICES = frozenset({"grpc.health.v1.Health"})


def _configuration(material: Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key_pem, material.cert_pem)], root_certificates=material.client_ca_pem)


def server_credentials(files: CertificateFiles) -> grpc.ServerCredentials:
    def fetch() -> grpc.ServerCertificateConfiguration | None:
        material = files.poll()
        return None if material is None else _configuration(material)

    return grpc.dynamic_ssl_server_credentials(
        _configuration(files.current), fetch, require_client_authentication=files.settings.mutual)


def caller_identities(context: grpc.aio.ServicerContext) -> tuple[str, ...]:
    """The verified client certificate's identities (SANs and CN); empty without one."""
    pem = context.auth_context().get("x509_pem_cert")
    return pem_identities(pem[0]) if pem else ()


class AllowedCallers(grpc.aio.ServerInterceptor):
    """PERMISSION_DENIED for a caller whose certificate names no allowed identity."""

    def __init__(self, allowed: AllowList) -> None:
        self.allowed = allowed

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service = details.method.lstrip("/").rpartition("/")[0]
        if handler is None or service in EXEMPT_SERVICES:
            return handler
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._wrap(behavior)})
        return handler

    async def _check(self, context: grpc.aio.ServicerContext) -> None:
        identities = caller_identities(context)
        if not self.allowed.allows(identities):
            log.warning("gRPC caller refused: certificate identities %s are not in OSTEOSCREEN_ALLOWED_CLIENTS",
                        list(identities) or "(none)")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "this client certificate's identity is not allowed to call OsteoScreen")

    def _wrap(self, behavior: Callable) -> Callable:
        if inspect.isasyncgenfunction(behavior):
            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await self._check(context)
                async for response in behavior(request, context):
                    yield response
            return streaming

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._check(context)
            return await behavior(request, context)
        return unary
