"""Readiness that follows the model service, not just the front process.

The front (HTTP, gRPC, health) lives on when the model process is OOM-killed, crashes or hangs, and
BentoML takes tens of seconds to restart it. Probes must see that: a cheap periodic `info` call with a
timeout, plus the failures real calls meet (`InferencePath.predict`), turn the path not ready within
seconds, and the next answer from the model service turns it ready again. A refused connection (the
process is gone, or shutting down) counts at once; a slow answer only when it repeats.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from osteoscreen import settings
from osteoscreen.errors import ModelUnavailableError
from osteoscreen.serving.inference import InferencePath
from osteoscreen.types import ModelInfo

log = logging.getLogger("osteoscreen.readiness")


@dataclass(frozen=True)
class WatchSettings:
    """`interval_s` between checks while the model answers; `down_interval_s` while it does not (starting,
    restarting), so a new replica turns ready a fraction of a second after its model has loaded rather than up
    to `interval_s` later: autoscaling pays start-up on every replica, and a check that meets a refused
    connection or a 503 costs nothing. A check slower than `timeout_s` is a failure; `hung_after` such
    failures in a row mean a hung model (one slow answer on a loaded node is not). A refused connection
    (the process is gone) counts at once."""

    interval_s: float = settings.default("model_check_s")
    timeout_s: float = settings.default("model_check_timeout_s")
    hung_after: int = 2
    down_interval_s: float = 0.25

    @classmethod
    def from_env(cls) -> WatchSettings:
        s = settings.current()
        return cls(interval_s=s.model_check_s, timeout_s=s.model_check_timeout_s)


class ModelWatch:
    """Polls the model service's `info` for ever and keeps `path`'s readiness in step with it."""

    def __init__(self, path: InferencePath, info: Callable[[], Awaitable[dict[str, Any]]],
                 settings: WatchSettings | None = None) -> None:
        self.path = path
        self.info = info
        self.settings = settings or WatchSettings.from_env()
        self.slow = 0  # checks in a row that timed out

    async def check(self) -> bool:
        """One check; returns whether the model service answered."""
        try:
            answer = await asyncio.wait_for(self.info(), self.settings.timeout_s)
        except TimeoutError:
            self.slow += 1
            if self.slow >= self.settings.hung_after:
                self.path.model_down(f"no answer to a health check within {self.settings.timeout_s:g}s, "
                                     f"{self.slow} times in a row")
            return False
        except ModelUnavailableError as exc:
            self.slow = 0
            self.path.model_down(str(exc))
            return False
        except Exception as exc:  # noqa: BLE001 - still loading (503), or an error answer: not serving
            self.slow = 0
            self.path.model_down(f"health check failed: {type(exc).__name__}: {exc}")
            log.debug("model check failed", exc_info=exc)
            return False
        self.slow = 0
        self.path.set_model(ModelInfo(**answer))
        return True

    async def run(self) -> None:
        was_ready = False
        while True:
            ready = await self.check()
            if ready and not was_ready:
                log.info("model %s:%s ready", self.path.model_name, self.path.model_version)
            was_ready = ready
            await asyncio.sleep(self.settings.interval_s if ready else min(self.settings.interval_s,
                                                                           self.settings.down_interval_s))
