"""Polling with a deadline, for tests that wait on something another process does (a server answering, a
scrape landing, a log line flushed): ask until it holds, fail with a message when the deadline passes,
instead of sleeping a fixed time and hoping."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.2,
               message: str | Callable[[], str] = "") -> T:
    """Call `predicate` until it returns something truthy, and return that; fail the test after `timeout` s.

    `message` (or a function making it, called only on failure) says what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"not within {timeout:g} s: {text or getattr(predicate, '__name__', 'condition')}")
        time.sleep(interval)
