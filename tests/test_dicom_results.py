"""DICOM results (issue 13) without a trained model: the SR built from pydicom-data's real CR radiographs, checked
by dicom3tools' `dciodvfy` and read back with highdicom's SR reader; then served over our gRPC API, the Open
Inference Protocol v2 and HTTP through the real inference path, over a fake model whose answer the test sets.
The PACS round trip against a real server and Orthanc is in test_dicom_pacs.py."""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
import subprocess
import threading

import grpc
import numpy as np
import pydicom
import pytest
from starlette.testclient import TestClient

from osteoscreen.dicom_results import reader, sr
from osteoscreen.errors import DicomResultsError
from osteoscreen.intended_use.policy import Policy
from osteoscreen.serving import http
from osteoscreen.serving.grpc import screening, v2
from osteoscreen.serving.grpc.server import GrpcServer, GrpcSettings
from osteoscreen.serving.inference import InferencePath, ModelInfo
from osteoscreen.types import Prediction
from tests.inputs import good_png, retagged

# distinctive identifiers: none may reach a log line, a metric or an error message
PATIENT_NAME = "Quixwort^Zebulona"
PATIENT_ID = "PID-QZX-77310"
INFO = ModelInfo(name="osteoscreen", version="t13version", backbone="vgg16", threshold=0.316)


def source(name: str = "RG3_J2KR", **attributes: object) -> bytes:
    """A real radiograph from pydicom-data with distinctive patient identifiers (and any other attributes)."""
    return retagged(name, PatientName=PATIENT_NAME, PatientID=PATIENT_ID, **attributes)


def dciodvfy_errors(data: bytes, tmp_path, iod: str = "SR") -> list[str]:
    """dicom3tools' IOD validator: its error lines (warnings, e.g. for our private coding scheme, are allowed).
    `iod`: a word of the IOD name dciodvfy must have recognised ("SR"; "SCImage" for a Secondary Capture)."""
    assert shutil.which("dciodvfy"), "dciodvfy missing: `make tools` installs dicom3tools"
    path = tmp_path / "check.dcm"
    path.write_bytes(data)
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    assert any(iod in line for line in lines), lines  # it did recognise the IOD
    return [line for line in lines if line.startswith("Error")]


def prediction(probability: float, threshold: float = 0.316) -> Prediction:
    label = "osteoporosis" if probability >= threshold else "normal"
    return Prediction(probability, label, threshold, "osteoscreen", "t13version")


ALGORITHM = sr.Algorithm("osteoscreen", "t13version", "vgg16", clinical=False)


# -- the SR itself -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["RG1_J2KR", "RG3_UNCR", "RG3_J2KR"])  # RG1: MONOCHROME1, JPEG 2000
def test_sr_of_a_real_radiograph_is_valid_and_reads_back(name, tmp_path):
    data = source(name)
    results = sr.to_results(data, prediction(0.731234), ALGORITHM)
    assert dciodvfy_errors(results.sr, tmp_path) == []

    src, doc = pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(io.BytesIO(results.sr))
    assert doc.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage and doc.Modality == "SR"
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                "AccessionNumber", "StudyDate"):
        assert doc.get(key) == src.get(key), key  # the PACS files it in the source's study
    assert doc.SeriesInstanceUID != src.SeriesInstanceUID and doc.SOPInstanceUID == results.sr_sop_instance_uid
    assert (doc.Manufacturer, doc.SeriesNumber) == (sr.MANUFACTURER, sr.SERIES_NUMBER)
    # IHE AIR: the algorithm as contributing equipment (highdicom adds itself as a second item)
    (equipment,) = [e for e in doc.ContributingEquipmentSequence if e.Manufacturer == sr.MANUFACTURER]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert "Processing Algorithm" in equipment.ContributionDescription and "osteoscreen:t13version" in \
        equipment.ContributionDescription
    (evidence,) = doc.CurrentRequestedProcedureEvidenceSequence
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert [s.CodingSchemeDesignator for s in doc.CodingSchemeIdentificationSequence] == ["99OSTEO"]

    # dcmtk's SR reader (a second implementation no one here wrote) parses the tree and shows the finding
    dump = subprocess.run(["dsrdump", str(tmp_path / "check.dcm")], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and "Present" in dump.stdout and "Probability of osteoporosis" in dump.stdout, \
        dump.stdout + dump.stderr
    assert "E:" not in dump.stderr and "W:" not in dump.stderr, dump.stderr

    back = reader.read(results.sr)
    assert back.probability == pytest.approx(0.731234, abs=1e-9) and back.threshold == pytest.approx(0.316)
    assert back.osteoporosis_present and back.algorithm_version == "osteoscreen:t13version"
    assert back.source_sop_instance_uid == src.SOPInstanceUID and back.tracking_uid
    assert any("DXA" in text for text in back.cautions) and sr.NOT_CLINICAL in back.cautions


def test_finding_follows_the_threshold_and_the_model_card_decides_the_clinical_caution(tmp_path):
    data = source()
    negative = reader.read(sr.to_results(data, prediction(0.2), ALGORITHM).sr)
    assert not negative.osteoporosis_present and negative.probability == pytest.approx(0.2)
    clinical = sr.Algorithm("osteoscreen", "t13version", "vgg16", clinical=True)
    real = reader.read(sr.to_results(data, prediction(0.9), clinical).sr)
    assert real.osteoporosis_present and sr.NOT_CLINICAL not in real.cautions
    assert any("DXA" in text for text in real.cautions)  # the screening caution stays, always
    # only a card that records real training data is clinical; the phantom and unknown provenance are not
    from osteoscreen.model.bundle import is_clinical

    assert is_clinical({"training_data": {"synthetic": False}})
    assert not is_clinical({"training_data": {"synthetic": True}}) and not is_clinical({})


def test_result_images_are_referenced_from_the_sr(tmp_path):
    """The hook for the explanation overlay (issue 12): a result image in the same study, referenced by the SR."""
    import highdicom as hd

    src = pydicom.dcmread(io.BytesIO(source()))
    overlay = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=src, pixel_array=np.zeros((64, 64), np.uint8), photometric_interpretation="MONOCHROME2",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=hd.UID(), sop_instance_uid=hd.UID(),
        series_number=9871, instance_number=1, manufacturer=sr.MANUFACTURER, patient_orientation=("L", "F"))
    results = sr.to_results(source(), prediction(0.5), ALGORITHM, result_images=[overlay])
    assert reader.read(results.sr).result_image_uids == (overlay.SOPInstanceUID,)
    assert len(results.images) == 1 and dciodvfy_errors(results.sr, tmp_path) == []


@pytest.mark.parametrize(("data", "reason"), [
    (good_png(), "need a DICOM input"),
    (source(StudyInstanceUID=None), "lacks StudyInstanceUID"),
    (source(SOPInstanceUID=None), "lacks SOPInstanceUID"),
])
def test_inputs_that_cannot_carry_results_are_refused_without_quoting_them(data, reason):
    with pytest.raises(DicomResultsError, match=reason) as caught:
        sr.to_results(data, prediction(0.5), ALGORITHM)
    assert PATIENT_NAME.split("^")[0] not in str(caught.value) and PATIENT_ID not in str(caught.value)


def test_an_attribute_highdicom_rejects_gives_an_error_without_the_value(caplog):
    bad = source(PatientSex="Q" + PATIENT_ID)  # not a valid Patient's Sex: highdicom refuses to copy it
    with caplog.at_level(logging.DEBUG), pytest.raises(DicomResultsError) as caught:
        sr.to_results(bad, prediction(0.5), ALGORITHM)
    assert caught.value.__suppress_context__  # the chained highdicom message may quote the value
    assert PATIENT_ID not in str(caught.value) and PATIENT_ID not in caplog.text


# -- served: the one inference path over a fake model, through each protocol ---------------------------------


class FixedModel:
    """The model service's answer shape: probability, batch seconds, batch size; the probability is fixed."""

    def __init__(self, probability: float) -> None:
        self.probability = probability
        self.calls = 0

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        n = len(images)
        return np.stack([np.full(n, self.probability), np.full(n, 0.01 * n), np.full(n, n)], axis=1)


@pytest.fixture
def path() -> InferencePath:
    inference = InferencePath(FixedModel(0.625), policy=Policy.FLAG)
    inference.set_model(INFO)
    return inference


def test_a_non_dicom_input_asking_for_results_never_reaches_the_model():
    model = FixedModel(0.5)
    inference = InferencePath(model, policy=Policy.FLAG)
    inference.set_model(INFO)
    with pytest.raises(DicomResultsError, match="image 1: DICOM results need a DICOM input"):
        asyncio.run(inference.predict([source(), good_png()], dicom=[True, True]))
    assert model.calls == 0 and inference.queued == 0
    (answered,) = asyncio.run(inference.predict([source()], dicom=[True]))
    assert model.calls == 1 and reader.read(answered.dicom.sr).probability == pytest.approx(0.5)


@pytest.fixture
def grpc_target(path):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    async def make() -> GrpcServer:
        return GrpcServer(path, GrpcSettings(port=0, host="127.0.0.1"))

    server = call(make())
    port = call(server.start())
    try:
        yield f"127.0.0.1:{port}"
    finally:
        call(server.stop(grace=1))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_grpc_predict_answers_the_sr_and_refuses_a_non_dicom_input(grpc_target, caplog):
    caplog.set_level(logging.DEBUG)
    with grpc.insecure_channel(grpc_target) as channel:
        stub = screening.pb_grpc.ScreeningStub(channel)
        data = source("RG1_J2KR")
        response = stub.Predict(screening.pb.PredictRequest(image=data, request_id="r1", dicom_results=True),
                                timeout=60)
        back = reader.read(response.dicom_sr)
        assert back.probability == pytest.approx(response.probability) == pytest.approx(0.625)
        # a chest film, answered under the flag policy: the SR names each failed check and makes no finding
        assert response.outside_intended_use and back.osteoporosis_present is None
        assert [text.split(" check:")[0] for text in back.outside_intended_use] == \
            [f.check for f in response.intended_use_findings]
        assert back.algorithm_version == f"{response.model_name}:{response.model_version}"
        assert pydicom.dcmread(io.BytesIO(response.dicom_sr)).SOPInstanceUID == response.dicom_sr_sop_instance_uid
        assert list(response.dicom_images) == []

        plain = stub.Predict(screening.pb.PredictRequest(image=data), timeout=60)
        assert plain.dicom_sr == b"" and plain.probability == response.probability  # only when asked

        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(screening.pb.PredictRequest(image=good_png(), dicom_results=True), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "DICOM input" in caught.value.details()

        batch = stub.PredictBatch(screening.pb.PredictBatchRequest(requests=[
            screening.pb.PredictRequest(image=good_png()),
            screening.pb.PredictRequest(image=source("RG3_J2KR"), dicom_results=True)]), timeout=60)
        assert [bool(r.dicom_sr) for r in batch.responses] == [False, True]
        with pytest.raises(grpc.RpcError) as caught:  # the index of the offending image is named
            stub.PredictBatch(screening.pb.PredictBatchRequest(requests=[
                screening.pb.PredictRequest(image=data, dicom_results=True),
                screening.pb.PredictRequest(image=good_png(), dicom_results=True)]), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image 1" in caught.value.details()
    assert PATIENT_NAME.split("^")[0] not in caplog.text and PATIENT_ID not in caplog.text


@pytest.mark.parametrize("raw", [False, True])
def test_v2_model_infer_adds_a_dicom_sr_output_on_request(grpc_target, raw):
    data = source("RG3_J2KR")
    request = v2.pb.ModelInferRequest(model_name=v2.MODEL_NAME)
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[2])
    if raw:
        request.raw_input_contents.append(v2.encode_raw_bytes([data, data]))
    else:
        tensor.contents.bytes_contents.extend([data, data])
    with grpc.insecure_channel(grpc_target) as channel:
        stub = v2.pb_grpc.GRPCInferenceServiceStub(channel)
        assert [o.name for o in stub.ModelInfer(request, timeout=60).outputs] == ["probability", "label"]
        request.parameters[v2.DICOM_PARAMETER].bool_param = True
        response = stub.ModelInfer(request, timeout=60)
        outputs = {o.name: (i, o) for i, o in enumerate(response.outputs)}
        assert list(outputs) == ["probability", "label", "dicom_sr"]
        index, tensor_out = outputs["dicom_sr"]
        assert tensor_out.datatype == "BYTES" and list(tensor_out.shape) == [2]
        files = (v2.decode_raw_bytes(response.raw_output_contents[index], 2) if raw
                 else list(tensor_out.contents.bytes_contents))
        reports = [reader.read(f) for f in files]
        assert [r.probability for r in reports] == [pytest.approx(0.625)] * 2
        assert reports[0].tracking_uid != reports[1].tracking_uid  # one result per element

        request.parameters[v2.DICOM_PARAMETER].string_param = "yes"
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bool_param" in caught.value.details()


def test_http_answers_application_dicom_when_accepted(path):
    client = TestClient(http.create_app(path))
    data = source("RG1_J2KR")
    answer = client.post("/predict", content=data, headers={"Accept": "application/dicom",
                                                             "Content-Type": "application/dicom"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom"
    back = reader.read(answer.content)
    assert back.probability == pytest.approx(float(answer.headers["x-osteoscreen-probability"]))
    assert answer.headers["x-osteoscreen-label"] == "osteoporosis"
    assert answer.headers["x-osteoscreen-sr-instance-uid"] == pydicom.dcmread(io.BytesIO(answer.content)).SOPInstanceUID

    as_json = client.post("/predict", files={"image": ("x.dcm", data, "application/dicom")},
                          headers={"Accept": "application/json, application/dicom;q=0"})
    assert as_json.status_code == 200 and as_json.json()["label"] == "osteoporosis"

    refused = client.post("/predict", content=good_png(), headers={"Accept": "application/dicom"})
    assert refused.status_code == 400 and "DICOM input" in refused.json()["error"]
    missing = client.post("/predict", content=source(StudyInstanceUID=None), headers={"Accept": "application/dicom"})
    assert missing.status_code == 400 and "StudyInstanceUID" in missing.json()["error"]
    assert PATIENT_ID not in missing.text
    assert client.post("/predict", content=data).status_code == 200  # still serving


def test_bench_notes_the_sr_build_time():
    from loadtest import dicom_sr

    result = dicom_sr.measure(repeats=1)
    assert result["builds"] == len(dicom_sr.SOURCES) and 0 < result["cpu_median_ms"] and 0 < result["median_ms"]
    assert f"goal < {dicom_sr.GOAL_MS:.0f} ms" in dicom_sr.note(result)
    for key in ("overlay_sc", "sr_with_overlay_sc"):
        assert result[key]["builds"] == len(dicom_sr.SOURCES) and 0 < result[key]["cpu_median_ms"]
    assert "Secondary Capture" in dicom_sr.note(result)


# -- the explanation overlay as a DICOM Secondary Capture, referenced from the SR ----------------------------

OVERLAY = np.random.default_rng(13).integers(0, 256, size=(512, 482, 3), dtype=np.uint8)  # RG1's aspect


def multipart_dicom(content_type: str, body: bytes) -> list[bytes]:
    """The instances of a `multipart/related; type="application/dicom"` answer, parsed by the standard library's
    MIME parser (not by our encoder's inverse)."""
    import email
    import email.policy

    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body,
                                       policy=email.policy.HTTP)
    assert message.get_content_type() == "multipart/related" and message.get_param("type") == "application/dicom"
    parts = list(message.iter_parts())
    assert all(part.get_content_type() == "application/dicom" for part in parts)
    return [part.get_payload(decode=True) for part in parts]


@pytest.mark.parametrize("name", ["RG1_J2KR", "RG3_UNCR"])  # RG1: chest, no laterality; RG3: tibia, right
def test_overlay_secondary_capture_is_valid_in_the_source_study_and_the_sr_references_it(name, tmp_path):
    data = source(name)
    results = sr.to_results(data, prediction(0.731234), ALGORITHM, overlay_rgb=OVERLAY)
    (image_bytes,) = results.images
    assert dciodvfy_errors(image_bytes, tmp_path, iod="SCImage") == []
    assert dciodvfy_errors(results.sr, tmp_path) == []

    src, image = pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(io.BytesIO(image_bytes))
    doc = pydicom.dcmread(io.BytesIO(results.sr))
    assert image.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                "AccessionNumber", "StudyDate"):
        assert image.get(key) == src.get(key), key
    assert len({image.SeriesInstanceUID, src.SeriesInstanceUID, doc.SeriesInstanceUID}) == 3  # a series of its own
    assert (image.SeriesNumber, image.Manufacturer, image.ManufacturerModelName) == (9871, sr.MANUFACTURER,
                                                                                    sr.MODEL_NAME)
    assert "osteoscreen:t13version" in image.SoftwareVersions
    assert list(image.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    (source_ref,) = image.SourceImageSequence
    assert (source_ref.ReferencedSOPInstanceUID, source_ref.ReferencedSOPClassUID) == (src.SOPInstanceUID,
                                                                                         src.SOPClassUID)
    assert source_ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert image.PatientOrientation == src.PatientOrientation  # the same picture, scaled
    assert image.BurnedInAnnotation == "YES"  # the source does not say: never claim an image is clean
    # the pixels, losslessly, at the radiograph's aspect
    assert (image.Rows, image.Columns, image.PhotometricInterpretation) == (512, 482, "RGB")
    np.testing.assert_array_equal(image.pixel_array, OVERLAY)
    assert "NOT FOR CLINICAL USE" in image.SeriesDescription and sr.NOT_CLINICAL in image.DerivationDescription
    # the SR points at it, and lists it as evidence in the same study
    assert reader.read(results.sr).result_image_uids == (image.SOPInstanceUID,)
    (evidence,) = doc.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == src.StudyInstanceUID
    assert {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in evidence.ReferencedSeriesSequence} == \
        {src.SOPInstanceUID, image.SOPInstanceUID}


def test_overlay_of_a_clinical_model_and_a_source_without_burned_in_text():
    clinical = sr.Algorithm("osteoscreen", "t13version", "vgg16", clinical=True)
    results = sr.to_results(source(BurnedInAnnotation="NO"), prediction(0.2), clinical, overlay_rgb=OVERLAY)
    image = pydicom.dcmread(io.BytesIO(results.images[0]))
    assert image.BurnedInAnnotation == "NO"  # we add no text; the source had none
    assert "CLINICAL" not in image.SeriesDescription and "CLINICAL" not in image.DerivationDescription
    assert "0.200" in image.DerivationDescription and "normal" in image.DerivationDescription


def test_a_flagged_image_sr_names_the_failed_check_and_makes_no_finding(tmp_path):
    """Review point: an image answered under OSTEOSCREEN_INTENDED_USE=flag although it failed a check."""
    import dataclasses

    from osteoscreen.types import Finding

    found = (Finding("body_part", "CHEST", "body part examined CHEST is not the lumbar spine the model was "
                                           "trained on"),
             Finding("content", "7.3", "the image is unlike the model's training images"))
    flagged = dataclasses.replace(prediction(0.9), findings=found)
    results = sr.to_results(source("RG1_J2KR"), flagged, ALGORITHM, overlay_rgb=OVERLAY)
    assert dciodvfy_errors(results.sr, tmp_path) == []
    back = reader.read(results.sr)
    assert back.osteoporosis_present is None  # no Present / Absent a reader could take for a screening result
    assert back.outside_intended_use == tuple(f"{f.check} check: {f.reason}" for f in found)
    assert back.cautions[0].startswith("NOT A SCREENING RESULT") and "body_part, content" in back.cautions[0]
    assert back.probability == pytest.approx(0.9)  # still reported, for site validation
    doc = pydicom.dcmread(io.BytesIO(results.sr))
    assert doc.SeriesDescription == sr.SERIES_DESCRIPTION_OUTSIDE
    dump = subprocess.run(["dsrdump", str(tmp_path / "check.dcm")], capture_output=True, text=True, timeout=60)
    assert "Outside intended use" in dump.stdout and "Present" not in dump.stdout and "Absent" not in dump.stdout
    image = pydicom.dcmread(io.BytesIO(results.images[0]))
    assert "OUTSIDE INTENDED USE" in image.DerivationDescription and "body_part check" in image.DerivationDescription
    clean = reader.read(sr.to_results(source("RG1_J2KR"), prediction(0.9), ALGORITHM).sr)
    assert clean.osteoporosis_present is True and clean.outside_intended_use == ()


def test_a_one_part_patient_name_is_not_quoted_by_any_warning_or_log(caplog):
    """highdicom warns about a one-part person name by quoting it; that warning is patient data and is dropped."""
    import warnings

    from osteoscreen.security import dicom_values as privacy

    one_part = "Quixwortsolo"
    data = retagged("RG1_J2KR", PatientName=one_part, PatientID=PATIENT_ID,
                    ReferringPhysicianName="Drsolo" + PATIENT_ID)
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        privacy.withhold_values()  # as at import: pytest's own warning capture has replaced the process's filters
        results = sr.to_results(data, prediction(0.5), ALGORITHM, overlay_rgb=OVERLAY)
    assert pydicom.dcmread(io.BytesIO(results.images[0])).PatientName == one_part  # in the file, where it belongs
    said = caplog.text + " ".join(str(w.message) for w in caught)
    assert one_part not in said and PATIENT_ID not in said


# -- explanations with DICOM results, served: the explanation path over a fake model --------------------------

RULES = {"content_cutoff": 3.0}  # the default body parts, views and modalities, and a content check


class FixedExplanation:
    """The model service's explain answer (`attribution.pack`), with a fixed probability and content score."""

    def __init__(self, probability: float, content_score: float = 1.0) -> None:
        self.probability, self.content_score, self.calls = probability, content_score, 0

    async def __call__(self, image: np.ndarray) -> np.ndarray:
        from osteoscreen.explain.attribution import Explanation, pack

        self.calls += 1
        attribution = np.zeros((224, 224), np.float32)
        attribution[90:130, 100:120], attribution[10:30, 10:30] = 0.002, -0.001
        return pack(Explanation(attribution, self.probability, 0.7, 0.4, self.content_score))


def explain_app(policy: Policy, model: FixedExplanation):
    from osteoscreen.serving.explanations import ExplainPath

    info = ModelInfo(name="osteoscreen", version="t13version", backbone="vgg16", threshold=0.316,
                     intended_use=RULES)
    app = http.create_app()
    app.state.explainer = ExplainPath(model, lambda: info, policy=policy)
    return TestClient(app)


def test_http_explain_answers_the_sr_and_the_overlay_as_multipart_related(caplog):
    caplog.set_level(logging.DEBUG)
    model = FixedExplanation(0.625)
    client = explain_app(Policy.FLAG, model)
    data = source("RG3_J2KR")  # a tibia: the body part check fails, flagged
    answer = client.post("/explain", content=data, headers={"Accept": "application/dicom",
                                                            "Content-Type": "application/dicom"})
    assert answer.status_code == 200, answer.text
    report, image = multipart_dicom(answer.headers["content-type"], answer.content)
    back = reader.read(report)
    image_ds = pydicom.dcmread(io.BytesIO(image))
    assert back.result_image_uids == (image_ds.SOPInstanceUID,)
    assert back.probability == pytest.approx(float(answer.headers["x-osteoscreen-probability"])) == pytest.approx(0.625)
    assert back.osteoporosis_present is None and back.outside_intended_use[0].startswith("body_part check")
    assert answer.headers["x-osteoscreen-outside-intended-use"].split(",")[0] == "body_part"
    assert answer.headers["x-osteoscreen-sr-instance-uid"] == pydicom.dcmread(io.BytesIO(report)).SOPInstanceUID
    assert (image_ds.Rows, image_ds.Columns) == (512, 512)  # 1760x1760 shown at 512
    # the pixels are the PNG overlay's
    png = client.post("/explain", content=data, headers={"Accept": "image/png", "Content-Type": "application/dicom"})
    from PIL import Image

    np.testing.assert_array_equal(image_ds.pixel_array, np.asarray(Image.open(io.BytesIO(png.content))))
    # DICOMweb's own Accept form works too; JSON names the failed check as /predict does
    wado = client.post("/explain", content=data, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert len(multipart_dicom(wado.headers["content-type"], wado.content)) == 2
    as_json = client.post("/explain", content=data, headers={"Accept": "application/json"}).json()
    assert [f["check"] for f in as_json["out_of_intended_use"]][0] == "body_part"
    assert PATIENT_ID not in caplog.text and PATIENT_NAME.split("^")[0] not in caplog.text


def test_http_explain_refuses_dicom_results_it_cannot_give_before_the_model():
    model = FixedExplanation(0.625)
    client = explain_app(Policy.REFUSE, model)
    dicom = {"Accept": "application/dicom"}
    refused = client.post("/explain", content=good_png(), headers=dicom)
    assert refused.status_code == 400 and "DICOM input" in refused.json()["error"] and model.calls == 0
    missing = client.post("/explain", content=source(StudyInstanceUID=None), headers=dicom)
    assert missing.status_code == 400 and "StudyInstanceUID" in missing.json()["error"]
    assert PATIENT_ID not in missing.text
    outside = client.post("/explain", content=source("RG3_J2KR"), headers=dicom)  # refuse: the tibia is not screened
    assert outside.status_code == 422 and "body_part check" in outside.json()["error"]
    assert model.calls == 0  # refused on its header, before any model time
    unlike = explain_app(Policy.REFUSE, FixedExplanation(0.625, content_score=9.0))
    spine = source("RG3_J2KR", BodyPartExamined="LSPINE", ViewPosition="LAT", Laterality=None, PatientAge=None,
                   PatientBirthDate=None)
    assert unlike.post("/explain", content=spine, headers=dicom).status_code == 422  # the content check, after
    assert client.post("/explain", content=good_png(), headers={"Accept": "image/png"}).status_code == 200


def test_a_non_dicom_explanation_asking_for_results_is_refused_before_the_queue():
    """With the explanation queue full, a PNG asking for DICOM results still gets its 400 reason (not 503): the
    check comes before admission; a DICOM input is then refused as overloaded."""
    from osteoscreen.errors import OverloadedError
    from osteoscreen.serving.explanations import ExplainPath

    info = ModelInfo(name="osteoscreen", version="t13version", backbone="vgg16", threshold=0.316, intended_use=RULES)

    async def scenario() -> None:
        gate, model = asyncio.Event(), FixedExplanation(0.5)

        async def held(image: np.ndarray) -> np.ndarray:
            await gate.wait()
            return await model(image)

        path = ExplainPath(held, lambda: info, concurrency=1, queue=0, policy=Policy.FLAG)
        busy = asyncio.create_task(path.explain(good_png()))
        while path.admitted == 0:
            await asyncio.sleep(0.01)
        with pytest.raises(DicomResultsError, match="need a DICOM input"):
            await path.explain(good_png(), dicom=True)
        with pytest.raises(OverloadedError):
            await path.explain(source(), dicom=True)
        gate.set()
        await busy
        assert model.calls == 1

    asyncio.run(scenario())
