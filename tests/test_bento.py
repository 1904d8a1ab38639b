"""`bentoml build` offline: the bento carries the service, the protos and generated stubs, the
registered model, and a Dockerfile exposing both ports; the GPU variant builds on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _requirements(name: str) -> list[str]:
    lines = (REPO / "requirements" / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_bento_requirements_match_the_project_dependencies():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert _requirements("bento.txt") == deps
    gpu = [d.replace("tensorflow[and-cuda]", "tensorflow-cpu") for d in _requirements("bento-gpu.txt")]
    assert gpu == deps and "tensorflow[and-cuda]==2.21.0" in _requirements("bento-gpu.txt")


def _build(env: dict, *args: str) -> Path:
    result = subprocess.run([str(BIN / "bentoml"), "build", "--output", "tag", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    return Path(env["BENTOML_HOME"]) / "bentos" / name / version


@pytest.fixture(scope="module")
def build_env(registered_model) -> dict:
    return {**registered_model["env"], "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "BENTOML_DO_NOT_TRACK": "True"}


@pytest.mark.slow
def test_cpu_bento_has_service_stubs_model_and_both_ports(build_env, registered_model, tmp_path):
    bento = _build(build_env)
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    model_tags = [m["tag"] for s in manifest["services"] for m in s["models"]]
    assert model_tags == [registered_model["tag"]]
    for path in ("src/service.py", "src/protos/osteoscreen/v1/screening.proto", "src/protos/inference/grpc_predict_v2.proto",
                 "src/osteoscreen/_generated/osteoscreen/v1/screening_pb2_grpc.py",
                 "src/osteoscreen/_generated/inference/grpc_predict_v2_pb2.py"):
        assert (bento / path).is_file(), path
    assert not list(bento.glob("src/tests/**/*.py"))
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "EXPOSE 3000" in dockerfile and "EXPOSE 50051" in dockerfile
    exported = tmp_path / "osteoscreen.bento"
    tag = f"{bento.parent.name}:{bento.name}"
    subprocess.run([str(BIN / "bentoml"), "export", tag, str(exported)], env=build_env, check=True,
                   capture_output=True, timeout=600)
    with tarfile.open(exported) as tar:
        names = tar.getnames()
    version = registered_model["tag"].split(":")[1]
    assert any(f"models/osteoscreen/{version}/extractor.keras" in n for n in names)
    assert any(f"models/osteoscreen/{version}/classifier.joblib" in n for n in names)


def test_gpu_bento_builds_on_cuda(build_env):
    bento = _build(build_env, "-f", "bentofile.gpu.yaml")
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "nvidia/cuda" in dockerfile and "EXPOSE 50051" in dockerfile
    assert "tensorflow[and-cuda]==2.21.0" in (bento / "env" / "python" / "requirements.txt").read_text()
