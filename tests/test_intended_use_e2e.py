"""Intended use with a real trained model: the content check learned from the phantom accepts unseen phantom
images and refuses real radiographs of other body parts, other modalities and pictures, through
`osteoscreen predict` and a real server under the default policy (refuse). The `flag` policy on a real server
is in tests/test_service.py, whose server runs under it."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
import requests
from matplotlib import cbook
from PIL import Image

from osteoscreen._generated.inference import grpc_predict_v2_pb2 as v2
from osteoscreen._generated.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from osteoscreen._generated.osteoscreen.v1 import screening_pb2 as pb
from osteoscreen._generated.osteoscreen.v1 import screening_pb2_grpc as pb_grpc
from osteoscreen.imaging.decode import decode_image
from tests.inputs import real_radiograph
from tests.inputs import testdata as dicom_file

BIN = Path(sys.executable).parent
REFUSED = re.compile(r"^(?P<path>\S+): refused: (?P<message>.*)$")


def _png(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _without_tags(name: str) -> bytes:
    """The film with every tag the header checks read removed: only the content check can refuse it."""
    ds = pydicom.dcmread(io.BytesIO(real_radiograph(name)))
    for keyword in ("BodyPartExamined", "ViewPosition", "PatientAge", "PatientBirthDate", "Modality"):
        if keyword in ds:
            delattr(ds, keyword)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _phantom(path: Path, transform) -> bytes:
    return _png(np.ascontiguousarray(transform(decode_image(path.read_bytes()))))


def _centre(gray: np.ndarray, keep: float) -> np.ndarray:
    h, w = gray.shape
    dh, dw = int(h * (1 - keep) / 2), int(w * (1 - keep) / 2)
    return gray[dh:h - dh, dw:w - dw]


@pytest.fixture(scope="module")
def unseen(registered_model, tmp_path_factory) -> list[Path]:
    """A phantom set the model never saw (another seed than the training set's)."""
    out = tmp_path_factory.mktemp("unseen") / "data"
    subprocess.run([str(BIN / "osteoscreen"), "synth", "--out", str(out), "--n", "60", "--seed", "101"],
                   env=registered_model["env"], check=True, capture_output=True, timeout=300)
    return sorted(out.glob("*/*.png"))


@pytest.fixture(scope="module")
def outside(unseen, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (file, the check that must refuse it)."""
    folder = tmp_path_factory.mktemp("outside")
    cases = {
        "chest.dcm": (real_radiograph("RG1_UNCR"), "body_part"),
        "tibia.dcm": (real_radiograph("RG3_J2KR"), "body_part"),
        "chest-untagged.dcm": (_without_tags("RG1_UNCR"), "content"),
        "tibia-untagged.dcm": (_without_tags("RG3_J2KR"), "content"),
        "mr-slice.png": (_png(decode_image(dicom_file("MR2_UNCR.dcm"))), "content"),
        "ultrasound.png": (_png(decode_image(dicom_file("US1_UNCR.dcm"))), "content"),
        "photograph.jpg": (Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes(), "content"),
        "logo.png": (Path(cbook.get_sample_data("logo2.png", asfileobj=False)).read_bytes(), "content"),
        "phantom-rotated.png": (_phantom(unseen[0], np.rot90), "content or caution"),
        "phantom-centre-quarter.png": (_phantom(unseen[1], lambda g: _centre(g, 0.5)), "content"),
    }
    files = {}
    for name, (data, check) in cases.items():
        (folder / name).write_bytes(data)
        files[name] = (folder / name, check)
    return files


def _predict(env: dict, files: list[Path], *flags: str) -> tuple[dict[str, dict], dict[str, str], int]:
    result = subprocess.run([str(BIN / "osteoscreen"), "predict", *flags, *map(str, files)], env=env,
                            capture_output=True, text=True, timeout=900)
    answers = {Path(line["path"]).name: line for line in map(json.loads, result.stdout.splitlines())}
    refused = {Path(m["path"]).name: m["message"] for m in map(REFUSED.match, result.stderr.splitlines()) if m}
    return answers, refused, result.returncode


@pytest.mark.slow
def test_local_predict_accepts_unseen_phantoms_and_refuses_everything_else_with_its_reason(
        registered_model, unseen, outside, tmp_path):
    upright = unseen[::len(unseen) // FLIPPED][:FLIPPED]
    flipped = {kind: [tmp_path / f"{kind}-{p.name}" for p in upright] for kind in FLIPS}
    for kind, transform in FLIPS.items():
        for p, out in zip(upright, flipped[kind], strict=True):
            out.write_bytes(_phantom(p, transform))
    answers, refused, status = _predict(registered_model["env"], [*unseen, *(p for p, _ in outside.values()),
                                                                 *(p for paths in flipped.values() for p in paths)])
    accepted = [p.name for p in unseen if p.name in answers]
    # Two bands: the refusal edge aims at <= 0.5% of good films refused (measured with this model's settings: 0 of
    # 400 unseen phantoms over four seeds, 6 answered with the caution); the flag edge at 99% answered plainly.
    assert len(accepted) >= len(unseen) - 1, {p.name: refused.get(p.name) for p in unseen if p.name not in answers}
    cautioned = [p.name for p in unseen if answers.get(p.name, {}).get("cautions")]
    assert len(cautioned) <= 0.1 * len(unseen), cautioned
    for name, (_, check) in outside.items():
        if check == "content or caution":  # a rotated film: refused, or answered "unusual image: check the view"
            if name in answers:
                assert [c["check"] for c in answers[name]["cautions"]] == ["content"], answers[name]
                assert "unusual image: check the view" in answers[name]["cautions"][0]["reason"]
            else:
                assert "content check" in refused[name], refused[name]
            continue
        assert name in refused, f"{name} was screened: {answers.get(name)}"
        assert f"{check} check" in refused[name], refused[name]
    assert "CHEST" in refused["chest.dcm"] and "EXTREMITY" in refused["tibia.dcm"]
    assert status == 1
    _flipped_are_accepted_and_answered_alike(answers, refused, upright, flipped, unseen)


FLIPS = {"upside-down": np.flipud, "mirrored": np.fliplr}
FLIPPED = 20  # unseen phantoms, of both classes, that are also sent upside down and mirrored


def _flipped_are_accepted_and_answered_alike(answers: dict, refused: dict, upright: list[Path],
                                             flipped: dict[str, list[Path]], unseen: list[Path]) -> None:
    """docs/intended-use.md: upside-down and mirrored phantoms are accepted, on purpose, and the answer stays
    meaningful. Accepted: as often as the same phantoms upright, less one (the content check refuses an unseen
    phantom now and then, flipped or not). Meaningful: flipping moves a phantom's probability far less than
    the classes lie apart (the difference between the unseen phantoms' mean probability per class, by their
    folder). Measured in two runs: median moves of 0.03-0.06 (upside down) and 0.03-0.04 (mirrored), the
    classes 0.40-0.41 apart, and 17-20 of 20 accepted in each orientation; the bound is a third of the gap."""
    kept = [p.name for p in upright if p.name in answers]
    by_class = {label: [answers[p.name]["probability"] for p in unseen if p.parent.name == label and p.name in answers]
                for label in ("normal", "osteoporosis")}
    apart = float(np.mean(by_class["osteoporosis"]) - np.mean(by_class["normal"]))
    assert apart > 0.1, by_class  # the model tells the classes apart at all
    for kind, paths in flipped.items():
        taken = [p.name for p in paths if p.name in answers]
        assert len(taken) >= len(kept) - 1, (
            f"{kind}: {len(taken)} of {len(paths)} accepted, upright {len(kept)}: "
            f"{ {p.name: refused.get(p.name) for p in paths if p.name not in answers} }")
        moves = [abs(answers[f"{kind}-{name}"]["probability"] - answers[name]["probability"]) for name in kept
                 if f"{kind}-{name}" in answers]
        assert np.median(moves) <= apart / 3, (kind, sorted(moves), apart)


@pytest.mark.slow
def test_force_and_flag_answer_with_the_findings(registered_model, outside):
    chest, photo = outside["chest.dcm"][0], outside["photograph.jpg"][0]
    answers, refused, status = _predict(registered_model["env"], [chest, photo], "--force")
    assert status == 0 and not refused
    assert [f["check"] for f in answers["chest.dcm"]["out_of_intended_use"]] == ["body_part", "view", "content"]
    assert [f["check"] for f in answers["photograph.jpg"]["out_of_intended_use"]] == ["content"]
    env = {**registered_model["env"], "OSTEOSCREEN_INTENDED_USE": "flag"}
    flagged, _, status = _predict(env, [chest])
    assert status == 0 and flagged["chest.dcm"]["out_of_intended_use"] == answers["chest.dcm"]["out_of_intended_use"]


@pytest.fixture(scope="module")
def refusing_server(registered_model, tmp_path_factory):
    from loadtest.server import ServerProcess

    srv = ServerProcess(env=registered_model["env"], OSTEOSCREEN_INTENDED_USE="refuse",
                        log_path=tmp_path_factory.mktemp("server") / "server.log").start()
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def _a_training_image(registered_model) -> bytes:
    """An image the content check was fitted on: accepted by construction (an unseen one is refused 1-2% of the
    time, at the 99% acceptance the cut-off is chosen for; the local test above measures that rate)."""
    from training import dataset, train

    data = train.load(registered_model["root"] / "data")  # as `osteoscreen train` reads it (the corrupt file left out)
    first = dataset.split(data.samples, seed=0).train[0]  # the split `--seed 0` fitted the check on
    return data.samples[first].path.read_bytes()


@pytest.mark.server
def test_server_refuses_on_every_protocol_and_counts_by_reason(refusing_server, registered_model, outside):
    srv = refusing_server
    chest, untagged = outside["chest.dcm"][0].read_bytes(), outside["tibia-untagged.dcm"][0].read_bytes()
    phantom = _a_training_image(registered_model)
    answer = requests.post(f"{srv.url}/predict", files={"image": ("c.dcm", chest, "application/dicom")}, timeout=120)
    assert answer.status_code == 422 and "body_part check" in answer.json()["error"], answer.text
    assert requests.post(f"{srv.url}/predict", data=phantom, timeout=120).status_code == 200
    with grpc.insecure_channel(srv.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as own:
            pb_grpc.ScreeningStub(channel).Predict(pb.PredictRequest(image=untagged), timeout=120)
        assert own.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "content check" in own.value.details(), own.value.details()
        request = v2.ModelInferRequest(model_name="osteoporosis")
        request.inputs.add(name="image", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([phantom, chest])
        with pytest.raises(grpc.RpcError) as infer:
            v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120)
        assert infer.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "image 1: " in infer.value.details()
        # the server keeps serving
        assert pb_grpc.ScreeningStub(channel).Predict(pb.PredictRequest(image=phantom), timeout=120).label
    text = requests.get(f"{srv.url}/metrics", timeout=10).text

    def sample(name: str, **labels: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))

    assert sample("osteoscreen_out_of_intended_use_total", check="body_part", action="refused") == 2
    assert sample("osteoscreen_out_of_intended_use_total", check="content", action="refused") == 1
    assert sample("osteoscreen_rejected_requests_total", protocol="http", reason="intended_use") == 1
    assert sample("osteoscreen_rejected_requests_total", protocol="grpc", reason="intended_use") == 2
