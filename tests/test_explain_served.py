"""`Explain` over gRPC and `POST /explain` over HTTP against a real server (`bentoml serve`): a phantom PNG
and a real DICOM radiograph (pydicom-data), bad input, the explanation limit refusing past it while
/predict still answers, metrics counted apart, and `osteoscreen explain` locally and against the server."""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from PIL import Image

from osteoscreen._generated.osteoscreen.v1 import screening_pb2 as pb
from osteoscreen._generated.osteoscreen.v1 import screening_pb2_grpc as pb_grpc
from osteoscreen.client import ScreeningClient
from tests.inputs import BAD_INPUTS, PNG_SIGNATURE, real_radiograph

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.server
BAD_CASES = ("empty", "png_truncated_half", "gif_unsupported_format", "hint_png_content_jpeg", "dicom_no_pixel_data",
             "png_bomb_8000x8000")


@pytest.fixture(scope="module")
def phantom_png(registered_model) -> tuple[Path, bytes]:
    path = sorted((registered_model["root"] / "data" / "osteoporosis").glob("*.png"))[0]
    return path, path.read_bytes()


@pytest.fixture(scope="module")
def client(server):
    with ScreeningClient(server.grpc_target, timeout=120) as c:
        c.wait_ready(30)
        yield c


def _metric(server, name: str, **labels: str) -> float:
    total = 0.0
    for line in requests.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _explain_http(server, data: bytes, accept: str, content_type: str = "image/png", **headers) -> requests.Response:
    return requests.post(f"{server.url}/explain", data=data, timeout=180,
                         headers={"Content-Type": content_type, "Accept": accept, **headers})


def _png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "RGB"
        return img.size


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img, dtype=np.float32)


def test_grpc_explain_answers_the_prediction_an_additive_map_and_an_overlay(client, phantom_png):
    _, data = phantom_png
    e = client.explain(data, request_id="x-1")
    p = client.predict(data)
    assert e.prediction.request_id == "x-1"
    assert e.prediction.probability == pytest.approx(p.probability, abs=1e-5)
    assert (e.prediction.label, e.prediction.threshold, e.prediction.version) == (p.label, p.threshold, p.version)
    assert e.attribution.shape == (224, 224) and e.attribution.dtype == np.float32
    assert float(e.attribution.sum(dtype=np.float64)) == pytest.approx(e.forest_output - e.expected_value, abs=1e-4)
    assert np.abs(e.attribution).max() > 0
    with Image.open(io.BytesIO(data)) as original:
        w, h = original.size
    ow, oh = _png_size(e.overlay_png)
    assert max(ow, oh) == min(512, max(w, h)) and abs(ow / oh - w / h) < 0.02  # the radiograph's aspect


def test_http_explain_answers_png_or_json_and_agrees_with_grpc(server, client, phantom_png):
    _, data = phantom_png
    png = _explain_http(server, data, "image/png")
    assert png.status_code == 200, png.text
    assert png.headers["content-type"] == "image/png"
    _png_size(png.content)
    as_json = _explain_http(server, data, "application/json")
    assert as_json.status_code == 200, as_json.text
    body = as_json.json()
    amap = np.asarray(body["map"], dtype=np.float64)
    assert body["shape"] == [224, 224] and amap.shape == (224, 224)
    assert amap.sum() == pytest.approx(body["forest_output"] - body["expected_value"], abs=1e-4)
    grpc_answer = client.explain(data)
    assert body["probability"] == pytest.approx(grpc_answer.prediction.probability, abs=1e-6)
    np.testing.assert_allclose(amap, grpc_answer.attribution, atol=1e-7)
    assert float(png.headers["x-osteoscreen-probability"]) == pytest.approx(body["probability"], abs=1e-6)


def test_explain_a_real_dicom_radiograph_on_both_protocols(server, client):
    data = real_radiograph("RG3_J2KR")  # a real CR (tibia, JPEG 2000): decoding works, the map is made
    e = client.explain(data)
    assert float(e.attribution.sum(dtype=np.float64)) == pytest.approx(e.forest_output - e.expected_value, abs=1e-4)
    assert _png_size(e.overlay_png) == (512, 512)  # 1760x1760 shown at 512
    answer = _explain_http(server, data, "image/png", content_type="application/dicom")
    assert answer.status_code == 200, answer.text
    assert _pixels(answer.content).shape == _pixels(e.overlay_png).shape
    assert np.abs(_pixels(answer.content) - _pixels(e.overlay_png)).mean() < 1.0  # same image, same overlay


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gets_400_and_invalid_argument_as_on_predict(server, channel_stub, case):
    data, hint, words = BAD_INPUTS[case]
    content_type = {"png": "image/png", "jpeg": "image/jpeg", "dicom": "application/dicom"}.get(hint or "",
                                                                                               "application/octet-stream")
    answer = _explain_http(server, data, "application/json", content_type=content_type)
    assert answer.status_code == 400, answer.text
    assert all(w in answer.json()["error"].lower() for w in words), answer.text
    with pytest.raises(grpc.RpcError) as err:
        channel_stub.Explain(pb.PredictRequest(image=data, format=hint or ""), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(w in err.value.details().lower() for w in words), err.value.details()


@pytest.fixture(scope="module")
def channel_stub(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield pb_grpc.ScreeningStub(ch)


def test_a_burst_of_explanations_is_refused_past_its_limit_while_predict_answers(server, phantom_png):
    _, data = phantom_png
    refused_before = _metric(server, "osteoscreen_explanations_total", outcome="overloaded")
    screening_rejections_before = _metric(server, "osteoscreen_rejected_requests_total")
    with cf.ThreadPoolExecutor(12) as pool:
        burst = [pool.submit(_explain_http, server, data, "image/png") for _ in range(10)]
        predicted = requests.post(f"{server.url}/predict", data=data, headers={"Content-Type": "image/png"}, timeout=60)
        answers = [f.result() for f in burst]
    codes = sorted(a.status_code for a in answers)
    assert predicted.status_code == 200, predicted.text
    assert codes.count(503) >= 10 - 3, codes  # 1 running + 2 waiting per front worker (the defaults)
    assert codes.count(200) >= 1, codes
    refusal = next(a for a in answers if a.status_code == 503)
    assert "explanations busy" in refusal.json()["error"] and refusal.headers.get("retry-after") == "1"
    assert _metric(server, "osteoscreen_explanations_total", outcome="overloaded") - refused_before == codes.count(503)
    assert _metric(server, "osteoscreen_rejected_requests_total") == screening_rejections_before  # counted apart
    assert _metric(server, "osteoscreen_explanations_total", protocol="http", outcome="ok") >= 1


def test_cli_explain_writes_overlays_against_the_server_and_locally(server, registered_model, phantom_png, tmp_path):
    path, _ = phantom_png
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    remote = subprocess.run([str(BIN / "osteoscreen"), "explain", str(path), str(bad), "--out", str(tmp_path / "r"),
                             "--server", server.grpc_target], env=registered_model["env"], capture_output=True,
                            text=True, timeout=300)
    assert remote.returncode == 1, remote.stderr  # one file refused, the other explained
    assert "bad.png: error: INVALID_ARGUMENT" in remote.stderr
    line = json.loads(remote.stdout.strip().splitlines()[-1])
    assert line["overlay"] == str(tmp_path / "r" / f"{path.stem}.png")
    _png_size(Path(line["overlay"]).read_bytes())
    local = subprocess.run([str(BIN / "osteoscreen"), "explain", str(path), "--out", str(tmp_path / "l")],
                           env=registered_model["env"], capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-2000:]
    local_line = json.loads(local.stdout.strip().splitlines()[-1])
    assert local_line["probability"] == pytest.approx(line["probability"], abs=1e-5)
    local_pixels, remote_pixels = (_pixels(Path(x["overlay"]).read_bytes()) for x in (local_line, line))
    assert local_pixels.shape == remote_pixels.shape and np.abs(local_pixels - remote_pixels).mean() < 1.0
