"""The DICOM node's throughput, from C-STORE intake to the SR stored back in a PACS, against the raw model.

    python -m loadtest.dicom_node [--images 96] [--associations 8] [--data DIR] [--out reports/bench]
    (make bench-dicom)

In one run:
1. *Raw*: the registered model on ready tensors (`loadtest/raw.py`, its own process, no server running) at batch
   1, 8 and 32; the yardstick is the best of those rates, measured before the server starts and after it stops
   (their mean: slow drifts of other load cancel out).
2. *Served*: `bentoml serve` with the DICOM node on, storing back into a real Orthanc on loopback. A warm-up
   round (one image per association), then `--images` phantom lateral lumbar films (`lumbar_lateral_dicom`),
   sent over `--associations` concurrent C-STORE associations (pynetdicom, one thread each). The clock runs
   from the first C-STORE to the moment the node's metrics count every image finished (the SR stored back, or
   the image recorded failed or skipped); the images whose SR reached the PACS are counted too.
3. *CPU outside the model*: CPU seconds of the server's front workers (receive, outbox, decode, checks, SR,
   store-back) and of the model service beyond its model calls, per image, over the measured round.

Writes `dicom_node.json` and `dicom_node.md` in `--out`; the target (served/raw >= 0.8 with 8 associations) is
reported, never asserted: timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import pydicom

from loadtest.images import build_mix, lumbar_lateral_dicom
from loadtest.orthanc import Orthanc
from loadtest.overhead import cpu_by_role, model_cpu_seconds
from loadtest.raw import RawWorker
from loadtest.server import ServerProcess, free_port, machine

AE_TITLE, NODE = "BENCHMODALITY", "OSTEOSCREEN"
TARGET = 0.8
FINISHED = ("stored", "skipped", "failed")


def films(data: str | None, n: int) -> list[bytes]:
    """`n` lateral lumbar films (each its own study and UIDs) from the phantom PNGs (the training folder's, when
    given, so the content check passes as it does for the model's own data)."""
    pngs = [s.data for s in build_mix(data, "png=1", n_phantoms=8).by_format["png"]]
    return [lumbar_lateral_dicom(pngs[i % len(pngs)]) for i in range(n)]


def send(port: int, instances: list[bytes], associations: int) -> list[int]:
    """C-STORE every instance over `associations` concurrent associations; the statuses, in order."""
    from pynetdicom import AE

    statuses = [-1] * len(instances)

    def one(share: range) -> None:
        ae = AE(ae_title=AE_TITLE)
        ae.add_requested_context(pydicom.uid.ComputedRadiographyImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE)
        if not assoc.is_established:
            return
        try:
            for i in share:
                status = assoc.send_c_store(pydicom.dcmread(io.BytesIO(instances[i])))
                statuses[i] = getattr(status, "Status", -1)
        finally:
            assoc.release()

    threads = [threading.Thread(target=one, args=(range(k, len(instances), associations),))
               for k in range(associations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def node_counts(server: ServerProcess) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "osteoscreen_dicom_outbox_entries":
                counts[sample.labels["state"]] = counts.get(sample.labels["state"], 0.0) + sample.value
    return counts


def wait_finished(server: ServerProcess, total: int, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = node_counts(server)
        if sum(counts.get(s, 0.0) for s in FINISHED) >= total:
            return counts
        time.sleep(0.2)
    raise TimeoutError(f"the node finished {counts} of {total} images in {timeout:.0f} s")


def report(result: dict) -> str:
    r = result
    lines = [f"# DICOM node: C-STORE intake to SR stored back ({r['machine']})", "",
             "| measure | value |", "| --- | --- |",
             f"| raw model, best batch (mean of before/after) | {r['raw_images_per_s']:.2f} img/s |",
             f"| node, {r['associations']} associations, {r['images']} images | {r['node_images_per_s']:.2f} img/s |",
             f"| served / raw | {r['ratio_to_raw']:.2f} (target >= {TARGET}) |",
             f"| SRs stored back / images | {r['stored']} / {r['images']} |",
             f"| front workers' CPU per image | {r['front_cpu_ms_per_image']:.1f} ms |",
             f"| model service's CPU per image outside the model call | {r['model_service_outside_ms_per_image']:.1f} ms |",
             f"| model call CPU per image | {r['model_call_cpu_ms_per_image']:.1f} ms |", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warm, measured = films(args.data, args.associations), films(args.data, args.images)
    raw = RawWorker(args.model, log_path=out / "raw-dicom.log").start()
    pacs = Orthanc(Path(tempfile.mkdtemp(prefix="osteoscreen-bench-pacs-")))
    server = None
    try:
        before = max(r["images_per_s"] for r in raw.measure([1, 8, 32], args.raw_seconds))
        port = free_port()
        server = ServerProcess(log_path=out / "server-dicom.log", OSTEOSCREEN_DICOM_PORT=str(port),
                               OSTEOSCREEN_DICOM_HOST="127.0.0.1", OSTEOSCREEN_INTENDED_USE="refuse",
                               OSTEOSCREEN_OUTBOX_DIR=tempfile.mkdtemp(prefix="osteoscreen-bench-outbox-"),
                               OSTEOSCREEN_RESULTS_DESTINATION=f"dicom://ORTHANC@127.0.0.1:{pacs.dicom_port}",
                               **({"OSTEOSCREEN_MODEL_TAG": args.model} if args.model else {}))
        server.start().wait_ready(args.ready_timeout)
        send(port, warm, args.associations)
        wait_finished(server, len(warm), args.timeout)
        cpu0, model0 = cpu_by_role(server.processes()), model_cpu_seconds(server.url)
        started = time.perf_counter()
        statuses = send(port, measured, args.associations)
        counts = wait_finished(server, len(warm) + len(measured), args.timeout)
        elapsed = time.perf_counter() - started
        cpu1, model1 = cpu_by_role(server.processes()), model_cpu_seconds(server.url)
        server.stop()
        server = None
        after = max(r["images_per_s"] for r in raw.measure([1, 8, 32], args.raw_seconds))
    finally:
        if server is not None:
            server.stop()
        raw.stop()
        pacs.stop()
    n = len(measured)
    raw_rate = (before + after) / 2
    result = {
        "machine": machine(), "images": n, "associations": args.associations,
        "c_store_success": sum(s == 0 for s in statuses),
        "stored": int(counts.get("stored", 0) - len(warm)), "outbox": counts,
        "raw_images_per_s_before": round(before, 3), "raw_images_per_s_after": round(after, 3),
        "raw_images_per_s": round(raw_rate, 3), "node_seconds": round(elapsed, 2),
        "node_images_per_s": round(n / elapsed, 3), "ratio_to_raw": round(n / elapsed / raw_rate, 3),
        "front_cpu_ms_per_image": round(1000 * (cpu1["front"] - cpu0["front"]) / n, 1),
        "model_service_outside_ms_per_image": round(1000 * ((cpu1["model"] - cpu0["model"]) - (model1 - model0)) / n, 1),
        "model_call_cpu_ms_per_image": round(1000 * (model1 - model0) / n, 1),
        "target": {"ratio_to_raw": TARGET, "met": n / elapsed / raw_rate >= TARGET},
    }
    (out / "dicom_node.json").write_text(json.dumps(result, indent=2))
    (out / "dicom_node.md").write_text(report(result))
    print(report(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.dicom_node", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=96, help="films in the measured round (default 96)")
    p.add_argument("--associations", type=int, default=8, help="concurrent C-STORE associations (default 8)")
    p.add_argument("--data", default=None, help="a folder of phantom PNGs (default: phantoms drawn for the run)")
    p.add_argument("--model", default=None, help="model tag (default: the latest registered)")
    p.add_argument("--raw-seconds", type=float, default=8.0, help="seconds per raw batch size (default 8)")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--timeout", type=float, default=900.0, help="longest wait for a round to finish")
    p.add_argument("--out", default="reports/bench")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
