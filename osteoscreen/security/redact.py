"""Internal errors logged without what the request carried.

An unexpected exception's message may quote the data it choked on: a DICOM header value (a patient's
name, an accession number), bytes of the image. Server logs are shipped to places that must never hold
PHI, so an internal error is logged as its reference, the exception types and the code locations (enough
to find the bug), never the messages. The client gets only the reference.
"""

from __future__ import annotations

import logging
import traceback
import uuid


def traceback_without_messages(exc: BaseException) -> str:
    """Like `traceback.format_exception`, with each exception's message replaced by its type name."""
    lines: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    chain: list[BaseException] = []
    while current is not None and id(current) not in seen:  # causes first, as Python prints them
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    for i, item in enumerate(reversed(chain)):
        if i:
            lines.append("  which led to:")
        for frame in traceback.extract_tb(item.__traceback__):
            lines.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}')
        lines.append(f"{type(item).__module__}.{type(item).__qualname__} (message withheld: it may quote request data)")
    return "\n".join(lines)


def internal_error(log: logging.Logger, api: str, exc: BaseException) -> str:
    """Log an unexpected exception under a new reference, types and code locations only; returns the message
    the caller gets (the reference, never the exception's text)."""
    ref = uuid.uuid4().hex[:12]
    log.error("internal error in %s (ref %s)\n%s", api, ref, traceback_without_messages(exc))
    return f"internal server error (ref {ref}); see the server log"
