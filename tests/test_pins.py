"""Why two dependencies have an upper bound: the code uses their private parts, which a new major may change
without notice. Each pin is checked against what the code uses, so a pin outlives neither its reason nor the
API it guards."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]

# package -> (the file that uses its private parts, the private names it uses there)
PINS = {
    "pillow": ("osteoscreen/imaging/jpeg2000.py", ("img._size", "ImageFile._Tile")),
    "uvicorn": ("osteoscreen/serving/https.py", ("HTTP_PROTOCOLS", "uvicorn.protocols.http")),
}


def requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found = (Requirement(r) for r in project["dependencies"])
    return {r.name.lower(): r for r in found}


@pytest.mark.parametrize("package", sorted(PINS))
def test_the_pin_stops_before_the_next_major_of_what_is_installed(package):
    requirement = requirements()[package]
    installed = Version(version(package))
    assert installed in requirement.specifier, f"{package} {installed} is outside {requirement}"
    upper = [s for s in requirement.specifier if s.operator == "<"]
    assert upper, f"{package} needs an upper bound: {PINS[package][0]} uses its private parts"
    assert Version(upper[0].version) == Version(f"{installed.major + 1}" if installed.major else "1"), (
        f"{package}'s bound {upper[0]} is not the next major after {installed}")


@pytest.mark.parametrize("package", sorted(PINS))
def test_the_reason_for_the_pin_is_still_in_the_code(package):
    path, names = PINS[package]
    source = (REPO / path).read_text()
    assert all(name in source for name in names), f"{path} no longer uses {names}: drop the pin on {package}"


def test_the_private_parts_exist_in_the_installed_versions():
    from PIL import Image, ImageFile
    import uvicorn.config

    assert hasattr(ImageFile, "_Tile") and "_size" in vars(Image.Image()), "Pillow moved what jpeg2000.py sets"
    assert isinstance(uvicorn.config.HTTP_PROTOCOLS, dict) and "auto" in uvicorn.config.HTTP_PROTOCOLS
