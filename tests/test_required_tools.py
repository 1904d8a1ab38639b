"""Under `make test` every tool the suite needs must be there (issue 17, item 11): a missing one fails the run
instead of quietly skipping the tests that need it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.required_tools import REQUIRE_TOOLS_ENV, missing_tool

REPO = Path(__file__).resolve().parents[1]


def test_a_missing_tool_skips_by_hand_and_fails_when_required(monkeypatch) -> None:
    monkeypatch.delenv(REQUIRE_TOOLS_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="kubectl"):
        missing_tool("no kubectl")
    monkeypatch.setenv(REQUIRE_TOOLS_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="kubectl.*make test"):
        missing_tool("no kubectl")


def test_make_test_requires_the_tools_and_installs_them_first() -> None:
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^test:(?P<deps>[^\n]*)\n(?P<body>(?:\t[^\n]*\n)+)", makefile, re.M)
    assert recipe, "no `test` target in the Makefile"
    assert "tools" in recipe["deps"].split(), "`make test` must run `make tools` first"
    assert re.search(rf"\b{REQUIRE_TOOLS_ENV}=1\b.*pytest", recipe["body"]), recipe["body"]
    tools = re.search(r"^tools:[^\n]*\n(?P<body>(?:\t[^\n]*\n)+)", makefile, re.M)
    assert tools and "kubectl" in tools["body"] and "prometheus" in tools["body"]


def test_no_test_skips_for_a_missing_tool_on_its_own() -> None:
    """Every "tool is missing" exit goes through missing_tool, so the switch reaches it."""
    offenders = []
    for path in sorted(p for p in (REPO / "tests").glob("test_*.py") if p.name != Path(__file__).name):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "pytest.skip(" in line and re.search(r"install|missing|not found|no \w+:", line, re.I):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders
