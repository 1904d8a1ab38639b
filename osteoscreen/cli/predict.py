"""`osteoscreen predict FILE...`: the registered model, locally (or a server, `--server`), one JSON line per file.

Lines and failures as `osteoscreen.cli.files` says. A file outside the model's intended use is refused, with the
check that failed, under the default policy (OSTEOSCREEN_INTENDED_USE=refuse); under `flag`, or with `--force`
(research use only, local only), it is predicted and its line carries `out_of_intended_use`. `--dicom-out DIR`
also writes each DICOM input's results (the SR a PACS stores) into DIR; a non-DICOM file then is an error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO

from osteoscreen.cli.files import Finish, each_file
from osteoscreen.dicom_results import files as result_files
from osteoscreen.dicom_results import sr


def run(files: list[str], model_tag: str | None = None, server: str | None = None, tls: bool = False,
        force: bool = False, dicom_out: Path | None = None, ca: str | None = None, cert: str | None = None,
        key: str | None = None, server_name: str | None = None, precision: str | None = None,
        runtime: str | None = None, force_precision: bool = False) -> int:
    if server:
        return predict_files_remote(files, server, tls=tls, root_certificates=ca, client_cert=cert, client_key=key,
                                    server_name=server_name, dicom_out=dicom_out)
    from osteoscreen.imaging.decode import decode
    from osteoscreen.intended_use.policy import Policy, enforce
    from osteoscreen.model import bundle
    from osteoscreen.model.local import screen_decoded

    policy = Policy.FLAG if force else Policy.from_env()
    model = bundle.load(model_tag, precision=precision, runtime=runtime, force=force_precision)
    print(f"model {model.tag}: extractor {model.precision_reason}", file=sys.stderr)
    if force:
        print("osteoscreen predict: --force: intended-use checks only flag; research use only, not for screening",
              file=sys.stderr)
    algorithm = sr.Algorithm.of(model.info)

    def start(name: str) -> Finish:
        def finish() -> dict:
            data = Path(name).read_bytes()
            if dicom_out is not None:
                sr.require_dicom(data)
            decoded = decode(data)
            (p,) = screen_decoded(model, [decoded])
            enforce([p.findings], policy)
            line = {"probability": round(p.probability, 6), "label": p.label, "threshold": p.threshold,
                    "model": model.tag, "runtime": model.runtime, "precision": model.precision}
            if model.forced:  # the gate refused this combination: the answer is for comparisons only
                line["forced_precision"] = True
            if p.findings:
                line["out_of_intended_use"] = [asdict(f) for f in p.findings]
            if p.cautions:
                line["cautions"] = [asdict(f) for f in p.cautions]
            if dicom_out is not None:
                results = sr.to_results(decoded.header, p, algorithm)
                line["dicom"] = [str(path) for path in result_files.write(results, dicom_out)]
            return line
        return finish

    return each_file(files, start)


def predict_files_remote(
    paths: Sequence[str | os.PathLike],
    server: str,
    tls: bool = False,
    *,
    root_certificates=None,
    client_cert=None,
    client_key=None,
    server_name: str | None = None,
    timeout: float = 60.0,
    window: int = 8,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    dicom_out: Path | None = None,
) -> int:
    """`osteoscreen predict --server HOST:PORT FILE...`: lines shaped like the local ones (path, probability,
    label, threshold, model tag "name:version"), `window` calls in flight at once. TLS as in `ScreeningClient`
    (PEM bytes or paths). Returns 0 when every file was predicted, 1 when some failed, 2 when the server is
    unreachable (a refused TLS handshake looks the same to gRPC)."""
    import grpc

    from osteoscreen.client import ScreeningClient, to_result

    err = err or sys.stderr
    with ScreeningClient(server, tls=tls, root_certificates=root_certificates, client_cert=client_cert,
                         client_key=client_key, server_name=server_name, timeout=timeout) as client:
        try:
            client.wait_ready(timeout=min(10.0, timeout))
        except grpc.FutureTimeoutError:
            hint = " (or its TLS handshake failed: check --tls, --ca, --cert, --key)" if client.secure else ""
            print(f"osteoscreen predict: error: cannot reach the OsteoScreen gRPC server at {server}{hint}", file=err)
            return 2

        def start(path: str) -> Finish:
            request = client.request(Path(path), request_id=str(path), dicom_results=dicom_out is not None)
            call = client._stub.Predict.future(request, timeout=timeout)

            def finish() -> dict:
                r = call.result()
                line = {"probability": round(r.probability, 6), "label": r.label,
                        "threshold": round(r.threshold, 6), "model": f"{r.model_name}:{r.model_version}"}
                if dicom_out is not None:
                    line["dicom"] = [str(p) for p in result_files.write(to_result(r).dicom, dicom_out)]
                if r.outside_intended_use:  # the server's policy is `flag`
                    line["out_of_intended_use"] = [{"check": f.check, "value": f.value, "reason": f.reason}
                                                   for f in r.intended_use_findings]
                if r.cautions:
                    line["cautions"] = [{"check": f.check, "value": f.value, "reason": f.reason} for f in r.cautions]
                return line
            return finish

        return each_file([str(p) for p in paths], start, window=window, out=out, err=err)
