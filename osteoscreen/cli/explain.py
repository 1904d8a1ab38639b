"""`osteoscreen explain FILE... --out DIR [--dicom-out DIR] [--server ADDR]`: one overlay PNG per file in
--out (named after the file), and one JSON line per file on stdout (path, probability, label, overlay, dicom).
Locally it loads the registered model (TensorFlow, imported only then); with --server it calls the gRPC
`Explain`. `--dicom-out` writes each DICOM input's results there, the SR and the overlay as a DICOM Secondary
Capture it references (`osteoscreen.dicom_results`); they follow OSTEOSCREEN_INTENDED_USE as predictions do
(refuse: an image outside the intended use gets no results), and a non-DICOM file then is an error.
Lines and failures as `osteoscreen.cli.files` says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from osteoscreen.cli.files import Finish, each_file
from osteoscreen.dicom_results import files as result_files


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
    taken: set[str] = set()

    def start(name: str) -> Finish:
        def finish() -> dict:
            result = explain_one(Path(name).read_bytes())
            line = {"probability": round(result["probability"], 6), "label": result["label"]}
            if out is not None:
                target = _overlay_name(out, name, taken)
                target.write_bytes(result["overlay_png"])
                line["overlay"] = str(target)
            if dicom_out is not None:
                line["dicom"] = [str(path) for path in result_files.write(result["dicom"], dicom_out)]
            return line
        return finish

    return each_file(list(files), start)


def _local(model_tag: str | None, dicom: bool) -> Callable[[bytes], dict]:
    from osteoscreen.dicom_results import sr
    from osteoscreen.explain.overlay import overlay_rgb, png_of
    from osteoscreen.imaging.decode import decode, to_model_input
    from osteoscreen.intended_use.header import decoded_findings
    from osteoscreen.intended_use.policy import Policy, enforce
    from osteoscreen.model import bundle
    from osteoscreen.model.explainer import Explainer
    from osteoscreen.results import assemble

    model = bundle.load(model_tag)
    explainer = Explainer(model)
    rules, policy, info = model.intended_use, Policy.from_env(), model.info
    algorithm = sr.Algorithm.of(info)

    def explain(data: bytes) -> dict:
        if dicom:
            sr.require_dicom(data)
        decoded = decode(data)
        e = explainer.explain(to_model_input(decoded.pixels))
        prediction = assemble(e.probability, e.content_score, decoded_findings(decoded.header, rules), info, rules)
        if dicom:
            enforce([prediction.findings], policy)  # a DICOM result is what a PACS stores: the operator's policy
        rgb = overlay_rgb(decoded.pixels, e.attribution)
        result = {"probability": e.probability, "label": prediction.label, "overlay_png": png_of(rgb)}
        if dicom:
            result["dicom"] = sr.to_results(decoded.header, prediction, algorithm, overlay_rgb=rgb)
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
