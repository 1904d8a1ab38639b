"""`osteoscreen predict FILE...`: the registered model, locally, one JSON line per file.

A file that cannot be read gets a one-line error on stderr and a non-zero exit status; the other
files are still predicted, so one bad file in a folder never hides the rest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from osteoscreen.errors import ImageDecodeError


def run(files: list[str], model_tag: str | None = None, server: str | None = None, tls: bool = False,
        precision: str | None = None) -> int:
    if server:
        from osteoscreen.client import predict_files_remote

        return predict_files_remote(files, server, tls=tls)
    from osteoscreen.model import bundle
    from osteoscreen.imaging.decode import load_image

    model = bundle.load(model_tag, precision=precision)
    print(f"model {model.tag}: extractor {model.precision_reason}", file=sys.stderr)
    status = 0
    for name in files:
        try:
            image = load_image(Path(name).read_bytes())
        except (OSError, ImageDecodeError) as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            status = 1
            continue
        p = model.predictions(image[None])[0]
        print(json.dumps({"path": name, "probability": round(p.probability, 6), "label": p.label,
                          "threshold": p.threshold, "model": model.tag}), flush=True)
    return status
