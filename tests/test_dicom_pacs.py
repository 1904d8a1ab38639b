"""DICOM results end to end: a real server (the phantom-trained model) answers SRs over gRPC, HTTP and the CLI
for pydicom-data's CR radiographs carrying distinctive patient identifiers; dciodvfy validates each; a real PACS
(Orthanc, on loopback with its own temporary storage) stores the sources and our results, and what we read back
from it sits in the source's study and parses (highdicom's SR reader) to the values the server answered. The
identifiers appear in no server log line and no metric."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import highdicom
import numpy as np
import pydicom
import pytest
import requests
from PIL import Image

from loadtest.orthanc import DICOMWEB_PLUGIN, Orthanc
from training import phantom
from osteoscreen.dicom_results import reader, sr
from osteoscreen.serving.grpc import screening
from tests.inputs import good_png
from tests.test_dicom_results import PATIENT_ID, PATIENT_NAME, dciodvfy_errors, multipart_dicom, source

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    assert shutil.which("Orthanc") and DICOMWEB_PLUGIN.exists(), "Orthanc missing: `make tools` installs it"
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield pacs
    finally:
        pacs.stop()


def stored_round_trip(pacs: Orthanc, source_bytes: bytes, sr_bytes: bytes) -> reader.ReportedResult:
    """Store the source and the SR; read the SR back from the PACS; check that it is filed in the source's study,
    as a second series (SR) next to the image's. Returns the SR as read back."""
    study_uid = pydicom.dcmread(io.BytesIO(source_bytes), stop_before_pixels=True).StudyInstanceUID
    stored_source, stored_sr = pacs.store(source_bytes), pacs.store(sr_bytes)
    assert stored_source["ParentStudy"] == stored_sr["ParentStudy"]  # Orthanc's own study of each instance
    series = pacs.get(f"/studies/{stored_sr['ParentStudy']}/series").json()
    assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["CR", "SR"]
    # the same, as a DICOMweb client sees it (QIDO-RS)
    qido = pacs.get(f"/dicom-web/studies/{study_uid}/series").json()
    assert sorted(s["00080060"]["Value"][0] for s in qido) == ["CR", "SR"]
    return reader.read(pacs.get(f"/instances/{stored_sr['ID']}/file").content)


@pytest.mark.server
def test_results_round_trip_through_a_real_pacs(server, orthanc, registered_model, tmp_path):
    card = json.loads(next((registered_model["root"] / "bentoml" / "models" / "osteoscreen").glob("*/model_card.json"))
                      .read_text())
    # osteoscreen synth made the data: a demo model, and which version of the phantom drew it
    assert card["training_data"] == {"synthetic": True, "phantom_version": phantom.VERSION}

    # gRPC, our own API: RG3 (distal tibia, JPEG 2000)
    rg3 = source("RG3_J2KR")
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = screening.pb_grpc.ScreeningStub(channel)
        response = stub.Predict(screening.pb.PredictRequest(image=rg3, dicom_results=True), timeout=120)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(screening.pb.PredictRequest(image=source("RG3_J2KR", StudyInstanceUID=None),
                                                     dicom_results=True), timeout=120)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dciodvfy_errors(response.dicom_sr, tmp_path) == []
    back = stored_round_trip(orthanc, rg3, response.dicom_sr)
    assert back.probability == pytest.approx(response.probability, abs=1e-6)
    assert back.threshold == pytest.approx(response.threshold, abs=1e-6)
    assert response.outside_intended_use and back.osteoporosis_present is None  # a tibia, flagged: no finding
    assert len(back.outside_intended_use) == len(response.intended_use_findings)
    assert back.algorithm_version == f"{response.model_name}:{response.model_version}"
    assert sr.NOT_CLINICAL in back.cautions  # the phantom-trained model says so in the PACS

    # HTTP with Accept: application/dicom: RG1 (chest, MONOCHROME1, JPEG 2000), another study
    rg1 = source("RG1_J2KR")
    answer = requests.post(f"{server.url}/predict", data=rg1, timeout=120,
                           headers={"Accept": "application/dicom", "Content-Type": "application/dicom"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom"
    assert dciodvfy_errors(answer.content, tmp_path) == []
    back = stored_round_trip(orthanc, rg1, answer.content)
    assert back.probability == pytest.approx(float(answer.headers["x-osteoscreen-probability"]), abs=1e-6)
    assert back.osteoporosis_present is None and "body_part" in answer.headers["x-osteoscreen-outside-intended-use"]
    refused = requests.post(f"{server.url}/predict", files={"image": ("s.png", good_png(), "image/png")},
                            headers={"Accept": "application/dicom"}, timeout=60)
    assert refused.status_code == 400 and "DICOM input" in refused.json()["error"]

    # the CLI against the server: --dicom-out writes the SR, named by its UID
    cli = _cli_dicom_out("predict", rg3, tmp_path, server, registered_model["env"])
    line = json.loads(cli.stdout.strip().splitlines()[-1])
    (written,) = line["dicom"]
    assert Path(written).parent == tmp_path / "out" and Path(written).name.startswith("SR_")
    assert reader.read(Path(written).read_bytes()).probability == pytest.approx(line["probability"], abs=1e-6)

    # no identifier in the server's log or metrics
    metrics = requests.get(f"{server.url}/metrics", timeout=30).text
    log = server.log_path.read_text()
    for secret in (PATIENT_ID, PATIENT_NAME.split("^")[0], PATIENT_NAME.split("^")[1]):
        assert secret not in log and secret not in metrics and secret not in cli.stderr


def fresh_study(name: str) -> bytes:
    """A pydicom-data radiograph in a study of its own (new UIDs), so a PACS test sees only its own series."""
    return source(name, StudyInstanceUID=highdicom.UID(), SeriesInstanceUID=highdicom.UID(),
                  SOPInstanceUID=highdicom.UID())


@pytest.mark.server
def test_explanation_results_round_trip_through_a_real_pacs(server, orthanc, registered_model, tmp_path):
    """Explain with DICOM results (item 2 of issue 13): the SR and the overlay as a Secondary Capture, over gRPC,
    HTTP (multipart/related) and the CLI; dciodvfy validates both; Orthanc files source, SR and overlay in one
    study and the SR it hands back references the overlay it hands back."""
    rg3 = fresh_study("RG3_J2KR")
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = screening.pb_grpc.ScreeningStub(channel)
        explained = stub.Explain(screening.pb.PredictRequest(image=rg3, dicom_results=True), timeout=180)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Explain(screening.pb.PredictRequest(image=good_png(), dicom_results=True), timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "DICOM input" in refused.value.details()
    answer = explained.prediction
    (overlay,) = answer.dicom_images
    assert dciodvfy_errors(answer.dicom_sr, tmp_path) == []
    assert dciodvfy_errors(overlay, tmp_path, iod="SCImage") == []
    image = pydicom.dcmread(io.BytesIO(overlay))
    with Image.open(io.BytesIO(explained.overlay_png)) as png:  # the same pixels as the PNG overlay
        np.testing.assert_array_equal(image.pixel_array, np.asarray(png))
    assert image.SourceImageSequence[0].ReferencedSOPInstanceUID == pydicom.dcmread(io.BytesIO(rg3)).SOPInstanceUID

    study_uid = pydicom.dcmread(io.BytesIO(rg3), stop_before_pixels=True).StudyInstanceUID
    stored = [orthanc.store(data) for data in (rg3, answer.dicom_sr, overlay)]
    assert len({s["ParentStudy"] for s in stored}) == 1
    series = orthanc.get(f"/studies/{stored[0]['ParentStudy']}/series").json()
    assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["CR", "OT", "SR"]
    qido = orthanc.get(f"/dicom-web/studies/{study_uid}/series").json()
    assert sorted(s["00080060"]["Value"][0] for s in qido) == ["CR", "OT", "SR"]
    back = reader.read(orthanc.get(f"/instances/{stored[1]['ID']}/file").content)
    stored_image = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{stored[2]['ID']}/file").content))
    assert back.result_image_uids == (stored_image.SOPInstanceUID,)
    assert back.probability == pytest.approx(answer.probability, abs=1e-6)
    assert back.outside_intended_use and back.osteoporosis_present is None  # a tibia, flagged by the test server
    assert sr.NOT_CLINICAL in back.cautions and "NOT FOR CLINICAL USE" in stored_image.SeriesDescription

    # HTTP: both instances in one multipart/related answer; a PNG asking for DICOM gets 400
    rg1 = fresh_study("RG1_J2KR")
    http = requests.post(f"{server.url}/explain", data=rg1, timeout=180,
                         headers={"Accept": "application/dicom", "Content-Type": "application/dicom"})
    assert http.status_code == 200, http.text
    report, image_bytes = multipart_dicom(http.headers["content-type"], http.content)
    assert dciodvfy_errors(image_bytes, tmp_path, iod="SCImage") == []
    assert reader.read(report).result_image_uids == (pydicom.dcmread(io.BytesIO(image_bytes)).SOPInstanceUID,)
    assert reader.read(report).probability == pytest.approx(float(http.headers["x-osteoscreen-probability"]), abs=1e-6)
    png_refused = requests.post(f"{server.url}/explain", data=good_png(), timeout=60,
                                headers={"Accept": "application/dicom", "Content-Type": "image/png"})
    assert png_refused.status_code == 400 and "DICOM input" in png_refused.json()["error"]

    # the CLI against the server: --dicom-out writes the SR and the overlay it references
    cli = _cli_dicom_out("explain", rg3, tmp_path, server, registered_model["env"])
    line = json.loads(cli.stdout.strip().splitlines()[-1])
    written_sr, written_image = (Path(p) for p in line["dicom"])
    assert written_sr.parent == tmp_path / "out" and "overlay" not in line  # no --out: no PNG
    assert reader.read(written_sr.read_bytes()).result_image_uids == \
        (pydicom.dcmread(written_image, stop_before_pixels=True).SOPInstanceUID,)

    # no identifier in the server's log, its metrics, or anything but the DICOM files
    metrics = requests.get(f"{server.url}/metrics", timeout=30).text
    log = server.log_path.read_text()
    said = log + metrics + cli.stderr + cli.stdout + str(dict(http.headers)) + png_refused.text
    for secret in (PATIENT_ID, PATIENT_NAME.split("^")[0], PATIENT_NAME.split("^")[1]):
        assert secret not in said
        assert secret.encode() in overlay and secret.encode() in answer.dicom_sr  # where it belongs


def test_local_predict_writes_valid_dicom_results(registered_model, tmp_path):
    """`osteoscreen predict FILE.dcm --dicom-out DIR` without a server: the registered bundle, its model card's
    provenance (the phantom: not for clinical use), an SR per DICOM file; a PNG is refused, the rest still run."""
    (tmp_path / "rg1.dcm").write_bytes(source("RG1_J2KR"))
    (tmp_path / "spine.png").write_bytes(good_png())
    cli = subprocess.run([str(BIN / "osteoscreen"), "predict", str(tmp_path / "spine.png"), str(tmp_path / "rg1.dcm"),
                          "--dicom-out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, **registered_model["env"],
                              "OSTEOSCREEN_INTENDED_USE": "flag"})  # a chest film: decoding and SR, not screening
    assert cli.returncode == 1, cli.stderr  # the PNG failed, the DICOM file did not
    assert "spine.png: error: DICOM results need a DICOM input" in cli.stderr
    (line,) = [json.loads(text) for text in cli.stdout.splitlines() if text.startswith("{")]
    (written,) = line["dicom"]
    assert dciodvfy_errors(Path(written).read_bytes(), tmp_path) == []
    back = reader.read(Path(written).read_bytes())
    assert back.probability == pytest.approx(line["probability"], abs=1e-6)
    assert back.algorithm_version == line["model"] and sr.NOT_CLINICAL in back.cautions
    assert PATIENT_ID not in cli.stderr + cli.stdout


def test_local_explain_writes_the_sr_and_the_overlay(registered_model, tmp_path):
    """`osteoscreen explain FILE.dcm --out DIR --dicom-out DIR` without a server: the PNG, and the SR referencing
    the overlay as a Secondary Capture with the PNG's pixels; the flag policy's findings are in the SR."""
    (tmp_path / "rg3.dcm").write_bytes(source("RG3_UNCR"))
    cli = subprocess.run([str(BIN / "osteoscreen"), "explain", str(tmp_path / "rg3.dcm"), "--out", str(tmp_path / "png"),
                          "--dicom-out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, **registered_model["env"],
                              "OSTEOSCREEN_INTENDED_USE": "flag"})
    assert cli.returncode == 0, cli.stderr[-2000:]
    line = json.loads(cli.stdout.strip().splitlines()[-1])
    written_sr, written_image = (Path(p).read_bytes() for p in line["dicom"])
    assert dciodvfy_errors(written_sr, tmp_path) == [] and dciodvfy_errors(written_image, tmp_path, iod="SCImage") == []
    back, image = reader.read(written_sr), pydicom.dcmread(io.BytesIO(written_image))
    assert back.result_image_uids == (image.SOPInstanceUID,)
    assert back.probability == pytest.approx(line["probability"], abs=1e-6)
    assert back.outside_intended_use and sr.NOT_CLINICAL in back.cautions
    with Image.open(line["overlay"]) as png:
        np.testing.assert_array_equal(image.pixel_array, np.asarray(png))
    assert PATIENT_ID not in cli.stderr + cli.stdout


def _cli_dicom_out(command: str, source: bytes, tmp_path: Path, server, env: dict) -> subprocess.CompletedProcess:
    """`osteoscreen <command> in.dcm --server ... --dicom-out out` against the running server, succeeded."""
    (tmp_path / "in.dcm").write_bytes(source)
    cli = subprocess.run([str(BIN / "osteoscreen"), command, str(tmp_path / "in.dcm"), "--server", server.grpc_target,
                          "--dicom-out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert cli.returncode == 0, cli.stderr
    return cli
