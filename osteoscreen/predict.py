"""`osteoscreen predict FILE...`: the registered model, locally, one JSON line per file.

A file that cannot be read gets a one-line error on stderr and a non-zero exit status; the other
files are still predicted, so one bad file in a folder never hides the rest. A file outside the model's
intended use is refused the same way, with the check that failed, under the default policy
(OSTEOSCREEN_INTENDED_USE=refuse); under `flag`, or with `--force` (research use only), it is predicted and
its line carries `out_of_intended_use`. `--dicom-out DIR` also writes each DICOM input's results (the SR a
PACS stores) into DIR; a non-DICOM file then is an error.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from osteoscreen.dicom_results import files as result_files
from osteoscreen.dicom_results import sr
from osteoscreen.errors import ImageDecodeError, OutOfIntendedUseError


def run(files: list[str], model_tag: str | None = None, server: str | None = None, tls: bool = False,
        force: bool = False, dicom_out: Path | None = None, ca: str | None = None, cert: str | None = None,
        key: str | None = None, server_name: str | None = None, precision: str | None = None) -> int:
    from osteoscreen.intended_use.policy import Policy, enforce

    policy = Policy.FLAG if force else Policy.from_env()
    if server:
        from osteoscreen.client import predict_files_remote

        return predict_files_remote(files, server, tls=tls, root_certificates=ca, client_cert=cert, client_key=key,
                                    server_name=server_name, dicom_out=dicom_out)
    from osteoscreen.intended_use.local import screen
    from osteoscreen.model import bundle

    model = bundle.load(model_tag, precision=precision)
    print(f"model {model.tag}: extractor {model.precision_reason}", file=sys.stderr)
    if force:
        print("osteoscreen predict: --force: intended-use checks only flag; research use only, not for screening",
              file=sys.stderr)
    algorithm = sr.Algorithm(model.name, model.version, model.backbone, sr.is_clinical(model.metadata))
    status = 0
    for name in files:
        try:
            data = Path(name).read_bytes()
            if dicom_out is not None:
                sr.require_dicom(data)
            (p,) = screen(model, [data])
            enforce([p.findings], policy)
            line = {"path": name, "probability": round(p.probability, 6), "label": p.label,
                    "threshold": p.threshold, "model": model.tag}
            if p.findings:
                line["out_of_intended_use"] = [asdict(f) for f in p.findings]
            if dicom_out is not None:
                line["dicom"] = [str(path) for path in result_files.write(sr.to_results(data, p, algorithm), dicom_out)]
        except (OSError, ImageDecodeError) as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            status = 1
            continue
        except OutOfIntendedUseError as exc:
            print(f"{name}: refused: {exc}", file=sys.stderr)
            status = 1
            continue
        print(json.dumps(line), flush=True)
    return status
