"""The one per-file loop of `osteoscreen predict` and `osteoscreen explain`, local or against a server.

One JSON line per file on stdout, in input order; a file that cannot be read, is refused or fails gets one line
on stderr and exit status 1, and the other files are still answered, so one bad file in a folder never hides
the rest. `start(path)` begins a file's work and returns what finishes it: locally the work itself, remotely a
call already in flight, so that `window` files travel at once while the lines stay in order.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import IO

from osteoscreen.errors import ImageDecodeError, OutOfIntendedUseError

Finish = Callable[[], dict]  # the file's JSON line (without its path), or raises


def each_file(paths: Sequence[str], start: Callable[[str], Finish], window: int = 1, out: IO[str] | None = None,
              err: IO[str] | None = None) -> int:
    """Run every file; 0 when all were answered, 1 when some were not. An exception `failure` cannot describe
    is a bug and propagates."""
    out, err = out or sys.stdout, err or sys.stderr
    status = 0
    for first in range(0, len(paths), window):
        pending = []
        for path in paths[first : first + window]:
            try:
                pending.append((path, start(path)))
            except Exception as exc:  # noqa: BLE001 - reported below, in order, like a failure of the work
                pending.append((path, _raise(exc)))
        for path, finish in pending:
            try:
                line = finish()
            except Exception as exc:
                message = failure(exc)
                if message is None:
                    raise
                print(f"{path}: {message}", file=err, flush=True)
                status = 1
                continue
            print(json.dumps({"path": str(path), **line}), file=out, flush=True)
    return status


def failure(exc: BaseException) -> str | None:
    """The stderr line for a file that was not answered; None for an unexpected exception."""
    if isinstance(exc, OutOfIntendedUseError):
        return f"refused: {exc}"
    if isinstance(exc, ImageDecodeError):
        return f"error: {exc}"
    if isinstance(exc, OSError):
        return f"error: cannot read the file: {exc.strerror or exc}"
    code = getattr(exc, "code", None)  # grpc.RpcError, without importing grpc for local runs
    if callable(code) and callable(getattr(exc, "details", None)):
        return f"error: {code().name if code() else 'UNKNOWN'}: {exc.details()}"
    return None


def _raise(exc: BaseException) -> Finish:
    def finish() -> dict:
        raise exc
    return finish
