"""The external tools some tests need (kubectl/kustomize, promtool, prometheus), and what their absence means.

Run by hand, a test whose tool is missing is skipped with the way to install it. Under `make test` (which
sets OSTEOSCREEN_REQUIRE_TOOLS=1 after `make tools` has installed them) the whole suite must run: a
missing tool fails the test, so a green `make test` never hides sixty skipped Kubernetes checks.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_TOOLS_ENV = "OSTEOSCREEN_REQUIRE_TOOLS"


def tools_required() -> bool:
    return os.environ.get(REQUIRE_TOOLS_ENV, "").strip().lower() in ("1", "true", "yes")


def missing_tool(message: str) -> NoReturn:
    """Skip (by hand) or fail (under `make test`) a test that cannot run without a tool."""
    if tools_required():
        pytest.fail(f"{message}; {REQUIRE_TOOLS_ENV}=1 (set by `make test`) requires every tool", pytrace=False)
    pytest.skip(message)
