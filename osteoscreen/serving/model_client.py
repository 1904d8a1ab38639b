"""The front's calls to the model service, with transport failures told apart from bugs.

A model process that crashed, is restarting or cannot be reached is a condition the caller can retry, here
or on another replica (HTTP 503 / gRPC UNAVAILABLE), not an internal error; an error the model service
itself answered with stays what it is. Readiness (`osteoscreen.serving.readiness`) uses the same split.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import numpy as np
from bentoml.exceptions import ServiceUnavailable

from osteoscreen.errors import ModelUnavailableError
from osteoscreen.types import InferFn


@contextlib.contextmanager
def _transport_errors_are_unavailable() -> Iterator[None]:
    try:
        yield
    except (aiohttp.ClientConnectionError, ServiceUnavailable) as exc:
        raise ModelUnavailableError(
            f"the model service cannot be reached ({type(exc).__name__}); retry shortly") from exc


def remote_infer(call: InferFn) -> InferFn:
    """Wrap BentoML's client call to the model service's `infer` (BentoML's service-to-service client is aiohttp)."""

    async def infer(batch: np.ndarray) -> np.ndarray:
        with _transport_errors_are_unavailable():
            return await call(batch)

    return infer


def remote_info(call: Callable[[], Awaitable[dict[str, Any]]]) -> Callable[[], Awaitable[dict[str, Any]]]:
    """Wrap the call to the model service's `info`, the cheap call readiness polls."""

    async def info() -> dict[str, Any]:
        with _transport_errors_are_unavailable():
            return await call()

    return info
