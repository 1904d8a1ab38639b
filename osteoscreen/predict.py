"""`osteoscreen predict FILE...`: the registered model, locally, one JSON line per file.

A file that cannot be read gets a one-line error on stderr and a non-zero exit status; the other
files are still predicted, so one bad file in a folder never hides the rest. `--dicom-out DIR` also writes
each DICOM input's results (the SR a PACS stores) into DIR; a non-DICOM file then is an error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from osteoscreen.dicom_results import files as result_files
from osteoscreen.dicom_results import sr
from osteoscreen.errors import ImageDecodeError


def run(files: list[str], model_tag: str | None = None, server: str | None = None, tls: bool = False,
        dicom_out: Path | None = None) -> int:
    if server:
        from osteoscreen.client import predict_files_remote

        return predict_files_remote(files, server, tls=tls, dicom_out=dicom_out)
    from osteoscreen.model import bundle
    from osteoscreen.imaging.decode import load_image

    model = bundle.load(model_tag)
    status = 0
    for name in files:
        try:
            data = Path(name).read_bytes()
            if dicom_out is not None:
                sr.require_dicom(data)
            image = load_image(data)
        except (OSError, ImageDecodeError) as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            status = 1
            continue
        p = model.predictions(image[None])[0]
        line = {"path": name, "probability": round(p.probability, 6), "label": p.label,
                "threshold": p.threshold, "model": model.tag}
        if dicom_out is not None:
            algorithm = sr.Algorithm(model.name, model.version, model.backbone, sr.is_clinical(model.metadata))
            try:
                results = sr.to_results(data, p, algorithm)
            except ImageDecodeError as exc:
                print(f"{name}: error: {exc}", file=sys.stderr)
                status = 1
                continue
            line["dicom"] = [str(path) for path in result_files.write(results, dicom_out)]
        print(json.dumps(line), flush=True)
    return status
