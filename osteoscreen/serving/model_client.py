"""The front's call to the model service, with transport failures told apart from bugs.

A model process that crashed, is restarting or cannot be reached is a condition the caller can retry, here
or on another replica (HTTP 503 / gRPC UNAVAILABLE), not an internal error; an error the model service
itself answered with stays what it is.
"""

from __future__ import annotations

import aiohttp
import numpy as np
from bentoml.exceptions import ServiceUnavailable

from osteoscreen.errors import ModelUnavailableError
from osteoscreen.types import InferFn


def remote_infer(call: InferFn) -> InferFn:
    """Wrap BentoML's client call to the model service's `infer` (BentoML's service-to-service client is aiohttp)."""

    async def infer(batch: np.ndarray) -> np.ndarray:
        try:
            return await call(batch)
        except (aiohttp.ClientConnectionError, ServiceUnavailable) as exc:
            raise ModelUnavailableError(
                f"the model service cannot be reached ({type(exc).__name__}); retry shortly") from exc

    return infer
