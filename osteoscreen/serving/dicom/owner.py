"""Which front worker runs the PACS node: the one holding an exclusive lock on the outbox directory.

With `OSTEOSCREEN_FRONT_WORKERS` > 1 every front worker process runs `start_grpc`, but only one may listen on
the DICOM port and work the outbox. Each worker tries a non-blocking `flock` on `<outbox>/owner.lock`; the one
that gets it starts the listener and the worker, the others try again every `retry_s`. Why a lock, not
"worker index 0" (BentoML's `server_context.worker_index`):

  - the lock is the outbox's own guarantee: however many processes could reach it (workers of one pod, an old and
    a new pod on the same PersistentVolume during a rollout, a second `bentoml serve` on one machine), only one
    opens the SQLite file and screens from it, so no entry is worked twice and no two stores race;
  - the kernel releases it when its holder dies, even by SIGKILL, so another worker takes the port and the outbox
    over within `retry_s`, without waiting for BentoML to restart worker 0;
  - it needs nothing from BentoML's internals (the worker index is an implementation detail, not API).

The lock file holds nothing (mode 0600, in the 0700 outbox directory)."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from osteoscreen import settings

if TYPE_CHECKING:
    from osteoscreen.serving.dicom.node import DicomNode
    from osteoscreen.serving.explanations import ExplainPath
    from osteoscreen.serving.inference import InferencePath

log = logging.getLogger("osteoscreen.dicom")
LOCK_NAME = "owner.lock"


class OutboxLock:
    """A non-blocking exclusive `flock` on `<directory>/owner.lock`; `acquire()` says whether it is held now."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class NodeOwner:
    """Runs the PACS node in whichever process holds the outbox lock: `await start()` takes the lock now or keeps
    trying in the background, `await stop()` stops the node (if this process ran it) and lets the lock go."""

    def __init__(self, predictor: InferencePath, s: settings.Settings | None = None, retry_s: float = 5.0,
                 make_node: Callable[[], DicomNode] | None = None, explainer: ExplainPath | None = None) -> None:
        from osteoscreen.serving.dicom.node import DicomNode

        self.settings = s or settings.current()
        self.lock = OutboxLock(self.settings.outbox_path)
        self.retry_s = retry_s
        self._make_node = make_node or (lambda: DicomNode.from_settings(predictor, self.settings, explainer))
        self.node: DicomNode | None = None
        self._waiting: asyncio.Task | None = None

    async def start(self) -> None:
        if not await self._try():
            log.info("DICOM node: another process owns the outbox; this one takes over if it stops")
            self._waiting = asyncio.create_task(self._wait(), name="dicom-node-owner")

    async def _try(self) -> bool:
        if not await asyncio.to_thread(self.lock.acquire):
            return False
        node = None
        try:
            node = self._make_node()
            port = await node.start(self.settings.dicom_host, self.settings.dicom_port)
        except BaseException:
            if node is not None:
                await asyncio.to_thread(node.outbox.close)
            self.lock.release()
            raise
        self.node = node
        log.info("DICOM node: listening on port %d", port)
        return True

    async def _wait(self) -> None:
        while True:
            await asyncio.sleep(self.retry_s)
            try:
                if await self._try():
                    return
            except Exception as exc:  # noqa: BLE001 - the port not free yet, say: try again
                log.warning("DICOM node: taking the outbox over failed (%s); trying again", type(exc).__name__)

    async def stop(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()
            await asyncio.gather(self._waiting, return_exceptions=True)
        if self.node is not None:
            await self.node.stop()
            self.node = None
        self.lock.release()
