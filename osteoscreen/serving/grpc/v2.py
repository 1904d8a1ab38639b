"""`inference.GRPCInferenceService` (KServe/Triton Open Inference Protocol v2) over `Predictor.predict`.

One model, `osteoporosis`: input `image` (BYTES, [N], one encoded file per element), outputs `probability`
(FP32, [N]) and `label` (BYTES, [N]). Inputs may come in `contents.bytes_contents` or in `raw_input_contents`
(per element a 4-byte little-endian length, then the bytes); answers use the same form as the request,
because tritonclient reads only raw outputs for FP32. Protocol mistakes are answered here with
INVALID_ARGUMENT / NOT_FOUND; domain errors propagate to the interceptor in `grpc_server`.

DICOM results: `dicom_sr` (BYTES, [N], a DICOM SR file per image) is added when the request parameter
`dicom_results` is true or the output is named.

Intended use: under the `flag` policy, images that failed a check are named in the response parameter
`out_of_intended_use` (a JSON list of {"index", "check", "value", "reason"}), so the outputs, and the stock
clients that read them, stay as they are; under `refuse` the call fails with FAILED_PRECONDITION.
"""

from __future__ import annotations

import json
import struct

import grpc
import numpy as np

import osteoscreen
from osteoscreen import codegen
from osteoscreen.serving.grpc.screening import predict_in_context
from osteoscreen.types import Prediction, Predictor

codegen.ensure_stubs()
from osteoscreen._generated.inference import grpc_predict_v2_pb2 as pb  # noqa: E402
from osteoscreen._generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # "inference.GRPCInferenceService"
SERVER_NAME = "osteoscreen"
MODEL_NAME = "osteoporosis"
INPUT_NAME = "image"
FINDINGS_PARAMETER = "out_of_intended_use"
CAUTIONS_PARAMETER = "cautions"  # unusual images, answered (JSON list, with each image's index)
OUTPUTS = {"probability": "FP32", "label": "BYTES"}
# DICOM results, on request only: parameter `dicom_results` (bool) or naming the output; one SR file per image.
DICOM_PARAMETER = "dicom_results"
DICOM_OUTPUT = "dicom_sr"
_LENGTH = struct.Struct("<I")
Context = grpc.aio.ServicerContext
_TYPED_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                 "fp32_contents", "fp64_contents")


class InvalidTensor(ValueError):
    """The request's tensors do not match the model's signature (INVALID_ARGUMENT)."""


def decode_raw_bytes(raw: bytes, count: int) -> list[bytes]:
    """Split a raw BYTES tensor into `count` elements, strictly: every length must fit and nothing may
    trail, so a truncated upload or a wrong element count is reported instead of guessed at."""
    elements, offset = [], 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise InvalidTensor(f"raw BYTES input ends before the length prefix of element {i} (shape says {count})")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidTensor(f"raw BYTES element {i} claims {size} bytes but only {len(raw) - offset} remain")
        elements.append(raw[offset : offset + size])
        offset += size
    if offset != len(raw):
        extra = len(raw) - offset
        raise InvalidTensor(f"raw BYTES input has {extra} bytes after the {count} elements its shape declares")
    return elements


def encode_raw_bytes(values: list[bytes]) -> bytes:
    """The inverse of decode_raw_bytes (what tritonclient's deserialize_bytes_tensor reads)."""
    return b"".join(_LENGTH.pack(len(v)) + v for v in values)


def read_images(request: pb.ModelInferRequest) -> tuple[list[bytes], bool]:
    """The images of a ModelInferRequest, and whether they came in raw form."""
    names = [t.name for t in request.inputs]
    if names != [INPUT_NAME]:
        raise InvalidTensor(f"model {MODEL_NAME!r} takes exactly one input, {INPUT_NAME!r}; the request has {names}")
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidTensor(
            f"input {INPUT_NAME!r} must have datatype BYTES (encoded image files), not {tensor.datatype!r}")
    if len(tensor.shape) != 1 or tensor.shape[0] < 1:
        raise InvalidTensor(
            f"input {INPUT_NAME!r} must have shape [N] with N >= 1 (one file per element), not {list(tensor.shape)}")
    count = tensor.shape[0]
    if any(len(getattr(tensor.contents, f)) for f in _TYPED_FIELDS):
        raise InvalidTensor(f"input {INPUT_NAME!r} data must be in bytes_contents or raw_input_contents")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidTensor(f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input")
        if tensor.contents.bytes_contents:
            raise InvalidTensor("use raw_input_contents or contents.bytes_contents, not both")
        return decode_raw_bytes(request.raw_input_contents[0], count), True
    images = list(tensor.contents.bytes_contents)
    if len(images) != count:
        raise InvalidTensor(f"input {INPUT_NAME!r} has shape [{count}] but {len(images)} elements in bytes_contents")
    return images, False


def wants_dicom(request: pb.ModelInferRequest) -> bool:
    """The request parameter `dicom_results` (bool), or `dicom_sr` among the requested outputs."""
    if DICOM_PARAMETER in request.parameters:
        parameter = request.parameters[DICOM_PARAMETER]
        if parameter.WhichOneof("parameter_choice") != "bool_param":
            raise InvalidTensor(f"parameter {DICOM_PARAMETER!r} must be a bool_param")
        if parameter.bool_param:
            return True
    return any(o.name == DICOM_OUTPUT for o in request.outputs)


def requested_outputs(request: pb.ModelInferRequest, dicom: bool = False) -> list[str]:
    names = [o.name for o in request.outputs] or [*OUTPUTS, *([DICOM_OUTPUT] if dicom else [])]
    unknown = [n for n in names if n not in OUTPUTS and n != DICOM_OUTPUT]
    if unknown:
        raise InvalidTensor(f"unknown output(s) {unknown}; model {MODEL_NAME!r} has {[*OUTPUTS, DICOM_OUTPUT]}")
    return names


def build_response(
    request: pb.ModelInferRequest, predictions: list[Prediction], outputs: list[str], raw: bool, version: str
) -> pb.ModelInferResponse:
    values = {
        "probability": np.array([p.probability for p in predictions], dtype="<f4"),
        "label": [p.label.encode() for p in predictions],
        DICOM_OUTPUT: [p.dicom.sr if p.dicom else b"" for p in predictions],
    }
    response = pb.ModelInferResponse(model_name=MODEL_NAME, model_version=version, id=request.id)
    flagged = [{"index": i, "check": f.check, "value": f.value, "reason": f.reason}
               for i, p in enumerate(predictions) for f in p.findings]
    if flagged:
        response.parameters[FINDINGS_PARAMETER].string_param = json.dumps(flagged)
    cautioned = [{"index": i, "check": f.check, "value": f.value, "reason": f.reason}
                 for i, p in enumerate(predictions) for f in p.cautions]
    if cautioned:
        response.parameters[CAUTIONS_PARAMETER].string_param = json.dumps(cautioned)
    for name in outputs:
        tensor = response.outputs.add(name=name, datatype=OUTPUTS.get(name, "BYTES"), shape=[len(predictions)])
        data = values[name]
        if raw:
            response.raw_output_contents.append(data.tobytes() if name == "probability" else encode_raw_bytes(data))
        elif name == "probability":
            tensor.contents.fp32_contents.extend(data.tolist())
        else:
            tensor.contents.bytes_contents.extend(data)
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The six core Open Inference Protocol RPCs for the one served model."""

    def __init__(self, predictor: Predictor) -> None:
        self._predictor = predictor

    async def _check_model(self, name: str, version: str, context: Context) -> None:
        if name != MODEL_NAME:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; this server serves {MODEL_NAME!r}")
        if version not in ("", self._predictor.model_version):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model {MODEL_NAME!r} has no version {version!r}; served: {self._predictor.model_version!r}",
            )

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._predictor.is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        await self._check_model(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=self._predictor.is_ready())

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=osteoscreen.__version__, extensions=[])

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        await self._check_model(request.name, request.version, context)
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=MODEL_NAME,
            versions=[self._predictor.model_version],
            platform=f"osteoscreen_{self._predictor.backbone}_random_forest",
            inputs=[meta(name=INPUT_NAME, datatype="BYTES", shape=[-1])],
            outputs=[meta(name=n, datatype=t, shape=[-1]) for n, t in OUTPUTS.items()],
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        await self._check_model(request.model_name, request.model_version, context)
        try:
            images, raw = read_images(request)
            dicom = wants_dicom(request)
            outputs = requested_outputs(request, dicom)
        except InvalidTensor as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        predictions = await predict_in_context(self._predictor, images, None, context,
                                               [True] * len(images) if dicom else None)
        return build_response(request, predictions, outputs, raw, self._predictor.model_version)
