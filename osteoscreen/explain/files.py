"""`osteoscreen explain FILE... --out DIR [--dicom-out DIR] [--server ADDR]`: one overlay PNG per file in
--out (named after the file), and one JSON line per file on stdout (path, probability, label, overlay, dicom).
Locally it loads the registered model (TensorFlow, imported only then); with --server it calls the gRPC
`Explain`. `--dicom-out` writes each DICOM input's results there, the SR and the overlay as a DICOM Secondary
Capture it references (`osteoscreen.dicom_results`); they follow OSTEOSCREEN_INTENDED_USE as predictions do
(refuse: an image outside the intended use gets no results), and a non-DICOM file then is an error.

A file that cannot be read or is refused gets one line on stderr and exit status 1; the others are still
explained, as with `osteoscreen predict`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from osteoscreen.dicom_results import files as result_files
from osteoscreen.errors import ImageDecodeError, OutOfIntendedUseError


def _overlay_name(out: Path, path: str, taken: set[str]) -> Path:
    stem, n = Path(path).stem or "image", 1
    name = f"{stem}.png"
    while name in taken:  # two inputs with one name (from different folders) keep both overlays
        n += 1
        name = f"{stem}-{n}.png"
    taken.add(name)
    return out / name


def run(files: Sequence[str], out: Path | None, model_tag: str | None = None, server: str | None = None,
        tls: bool = False, dicom_out: Path | None = None) -> int:
    if out is None and dicom_out is None:
        raise ValueError("give --out (overlay PNGs), --dicom-out (DICOM results) or both")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    dicom = dicom_out is not None
    explain_one = _remote(server, tls, dicom) if server else _local(model_tag, dicom)
    status, taken = 0, set()
    for name in files:
        try:
            result = explain_one(Path(name).read_bytes())
        except (OSError, ImageDecodeError) as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            status = 1
            continue
        except OutOfIntendedUseError as exc:
            print(f"{name}: refused: {exc}", file=sys.stderr)
            status = 1
            continue
        except Exception as exc:  # noqa: BLE001 - a gRPC refusal of one file must not stop the others
            if server and hasattr(exc, "code"):
                print(f"{name}: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
                status = 1
                continue
            raise
        line = {"path": name, "probability": round(result["probability"], 6), "label": result["label"]}
        if out is not None:
            target = _overlay_name(out, name, taken)
            target.write_bytes(result["overlay_png"])
            line["overlay"] = str(target)
        if dicom_out is not None:
            line["dicom"] = [str(path) for path in result_files.write(result["dicom"], dicom_out)]
        print(json.dumps(line), flush=True)
    return status


def _local(model_tag: str | None, dicom: bool) -> Callable[[bytes], dict]:
    import dataclasses

    from osteoscreen.dicom_results import sr
    from osteoscreen.explain.overlay import overlay_rgb, png_of
    from osteoscreen.imaging.decode import decode_image, to_model_input
    from osteoscreen.intended_use.header import header_findings
    from osteoscreen.intended_use.policy import Policy, content_finding, enforce
    from osteoscreen.model import bundle
    from osteoscreen.model.explainer import Explainer

    model = bundle.load(model_tag)
    explainer = Explainer(model)
    rules, policy = model.intended_use, Policy.from_env()
    algorithm = sr.Algorithm(model.name, model.version, model.backbone, sr.is_clinical(model.metadata))

    def explain(data: bytes) -> dict:
        if dicom:
            sr.require_dicom(data)
        gray = decode_image(data)
        found = header_findings(data, None, rules)
        e = explainer.explain(to_model_input(gray))
        content = content_finding(e.content_score, rules.content_cutoff)
        found += [content] if content else []
        if dicom:
            enforce([found], policy)  # a DICOM result is what a PACS stores: the operator's policy applies
        rgb = overlay_rgb(gray, e.attribution)
        prediction = dataclasses.replace(model.prediction(e.probability), findings=tuple(found))
        result = {"probability": e.probability, "label": prediction.label, "overlay_png": png_of(rgb)}
        if dicom:
            result["dicom"] = sr.to_results(data, prediction, algorithm, overlay_rgb=rgb)
        return result

    return explain


def _remote(server: str, tls: bool, dicom: bool) -> Callable[[bytes], dict]:
    from osteoscreen.client import ScreeningClient

    client = ScreeningClient(server, tls=tls, timeout=120.0)

    def explain(data: bytes) -> dict:
        r = client.explain(data, dicom_results=dicom)
        return {"probability": r.prediction.probability, "label": r.prediction.label, "overlay_png": r.overlay_png,
                "dicom": r.prediction.dicom}

    return explain
