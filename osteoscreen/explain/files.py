"""`osteoscreen explain FILE... --out DIR [--server ADDR]`: one overlay PNG per file in DIR (named after the
file), and one JSON line per file on stdout (path, probability, label, overlay). Locally it loads the
registered model (TensorFlow, imported only then); with --server it calls the gRPC `Explain`.

A file that cannot be read or is refused gets one line on stderr and exit status 1; the others are still
explained, as with `osteoscreen predict`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from osteoscreen.errors import ImageDecodeError


def _overlay_name(out: Path, path: str, taken: set[str]) -> Path:
    stem, n = Path(path).stem or "image", 1
    name = f"{stem}.png"
    while name in taken:  # two inputs with one name (from different folders) keep both overlays
        n += 1
        name = f"{stem}-{n}.png"
    taken.add(name)
    return out / name


def run(files: Sequence[str], out: Path, model_tag: str | None = None, server: str | None = None,
        tls: bool = False) -> int:
    out.mkdir(parents=True, exist_ok=True)
    explain_one = _remote(server, tls) if server else _local(model_tag)
    status, taken = 0, set()
    for name in files:
        try:
            result = explain_one(Path(name).read_bytes())
        except (OSError, ImageDecodeError) as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            status = 1
            continue
        except Exception as exc:  # noqa: BLE001 - a gRPC refusal of one file must not stop the others
            if server and hasattr(exc, "code"):
                print(f"{name}: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
                status = 1
                continue
            raise
        target = _overlay_name(out, name, taken)
        target.write_bytes(result["overlay_png"])
        line = {"path": name, "probability": round(result["probability"], 6), "label": result["label"],
                "overlay": str(target)}
        print(json.dumps(line), flush=True)
    return status


def _local(model_tag: str | None) -> Callable[[bytes], dict]:
    from osteoscreen.explain.overlay import overlay_png
    from osteoscreen.imaging.decode import decode_image, to_model_input
    from osteoscreen.model import bundle
    from osteoscreen.model.explainer import Explainer

    model = bundle.load(model_tag)
    explainer = Explainer(model)

    def explain(data: bytes) -> dict:
        gray = decode_image(data)
        e = explainer.explain(to_model_input(gray))
        return {"probability": e.probability, "label": model.prediction(e.probability).label,
                "overlay_png": overlay_png(gray, e.attribution)}

    return explain


def _remote(server: str, tls: bool) -> Callable[[bytes], dict]:
    from osteoscreen.client import ScreeningClient

    client = ScreeningClient(server, tls=tls, timeout=120.0)

    def explain(data: bytes) -> dict:
        r = client.explain(data)
        return {"probability": r.prediction.probability, "label": r.prediction.label, "overlay_png": r.overlay_png}

    return explain
