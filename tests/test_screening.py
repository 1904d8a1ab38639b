"""Screening an archive on Ray (issue 24), end to end through `osteoscreen screen` with a local Ray on this
machine's cores: a folder and a manifest of phantom lateral lumbar films in real CR headers, next to
pydicom-data's chest, MR and US instances and a corrupt file; the session's phantom-trained model; a real Orthanc
receiving the SRs. The job is killed with SIGKILL mid-run and resumed, and a model worker is killed mid-run:
every input ends up in the results exactly once, and its SR in the PACS once. The report carries the explanation
thumbnails of the flagged studies (Chromium loads them), and the job's counters reach Ray's metrics endpoint."""

from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
import requests
from PIL import Image

from osteoscreen.dicom_results.identity import Algorithm, result_uids
from osteoscreen.screening import metrics, resume, thumbnails, worklist
from osteoscreen.screening.schema import COLUMNS
from tests import archive
from tests.test_dicom_pacs import orthanc  # noqa: F401 - the fixture: a real Orthanc on loopback
from tests.waiting import wait_until

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def phantom_pngs(registered_model) -> list[Path]:
    return sorted((registered_model["root"] / "data").rglob("*.png"))


def screen_command(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "osteoscreen.cli", "screen", str(source), "--out", str(out), *extra]


def results_of(out: Path):
    return pq.read_table(out / "results").to_pandas(date_as_object=True)


def pacs_srs(pacs, patient_prefix: str) -> list[str]:
    """The SOP Instance UIDs of the SRs Orthanc holds for patients whose ID starts with `patient_prefix`."""
    found = requests.post(f"{pacs.url}/tools/find", json={
        "Level": "Instance", "Expand": True, "Query": {"Modality": "SR", "PatientID": f"{patient_prefix}*"}},
        timeout=30).json()
    return [i["MainDicomTags"]["SOPInstanceUID"] for i in found]


def session_pids(sid: int) -> list[int]:
    """Every process of session `sid`: the job and the local Ray it started (gcs, raylet, workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # after ")": state, ppid, pgrp, session; not zombies
                pids.append(int(entry.name))
    return pids


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(lambda: not session_pids(sid), 30, message="the killed job's processes did not exit")


def screener_pid(sid: int) -> int | None:
    for pid in session_pids(sid):
        try:
            if b"Screener" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            pass
    return None


def test_a_folder_is_screened_once_per_input_excluded_and_failed_get_rows_srs_reach_the_pacs(
        phantom_pngs, orthanc, registered_model, tmp_path):
    films = archive.build(tmp_path / "archive", phantom_pngs, patients=4, studies=2)
    out = tmp_path / "out"
    command = screen_command(tmp_path / "archive", out, "--results-to",
                             f"dicom://ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    run = subprocess.run(command, env=registered_model["env"], capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700  # the results name patients
    assert "PAT00" not in run.stdout + run.stderr and "Test^" not in run.stdout + run.stderr  # nor do the logs

    assert tuple(pq.read_schema(next((out / "results").glob("*.parquet"))).names) == COLUMNS
    rows = results_of(out)
    assert len(rows) == len(films) + len(archive.OTHERS) + 1 and rows["id"].is_unique
    by_source = rows.set_index(rows["source"].map(lambda s: Path(s).name))
    lumbar = rows[rows["id"].isin([f.sop_uid for f in films])]
    assert (lumbar["status"] == "screened").all() and lumbar["probability"].between(0, 1).all()
    assert set(lumbar["patient_id"]) == {f.patient_id for f in films}
    assert by_source.loc["RG1_J2KR.dcm", "status"] == "excluded" and "body_part" in by_source.loc["RG1_J2KR.dcm", "reason"]
    assert by_source.loc["MR_small.dcm", "reason"] == by_source.loc["US1_J2KR.dcm", "reason"] == "modality"
    corrupt = by_source.loc["corrupt.dcm"]
    assert corrupt["status"] == "failed" and "truncated" in corrupt["reason"] and corrupt["patient_id"] == "PATBAD"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["by_status"] == {"screened": len(films), "excluded": 3, "failed": 1}
    assert summary["excluded_by_reason"]["modality"] == 2

    with open(out / "referrals.csv") as fh:
        referrals = list(csv.DictReader(fh))
    threshold = float(rows["threshold"].iloc[0])
    expected = (lumbar[lumbar["probability"] >= threshold].groupby("patient_id")["probability"].max()
                .sort_values(ascending=False))
    assert [r["patient_id"] for r in referrals] == list(expected.index)
    assert all(int(r["images"]) == 2 for r in referrals)
    made = check_thumbnails(out)
    assert len(made) == sum(len(r["flagged_studies"].split(";")) for r in referrals)
    check_report_in_chromium(tmp_path, out, len(made))

    # one SR per screened instance, with the node's deterministic UIDs
    name, _, version = str(lumbar["model"].iloc[0]).partition(":")
    algorithm = Algorithm(name, version, "vgg16")
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((tmp_path / "archive/lumbar").iterdir())]
    assert sorted(pacs_srs(orthanc, "PAT0")) == sorted(result_uids(ds, algorithm, "sr")[1] for ds in sources)

    again = subprocess.run(command, env=registered_model["env"], capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(results_of(out)) == len(rows)  # nothing was left to do
    assert len(pacs_srs(orthanc, "PAT0")) == len(films)
    assert {p: p.stat().st_mtime_ns for p in made} == made  # nor any thumbnail to remake


def check_thumbnails(out: Path) -> dict[Path, int]:
    """DIR/thumbnails/ holds one JPEG per flagged study (its top image) and nothing else, each at the overlay's
    thumbnail size for its source; returns them with their mtimes."""
    flagged = worklist.flagged_images(resume.read_results(out / "results"))
    assert len(flagged), "no study was flagged: the thumbnails would go untested"
    folder = out / thumbnails.FOLDER
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # patient images
    expected = {out / thumbnails.relative_path(i): source for i, source in zip(flagged["id"], flagged["source"])}
    assert set(folder.iterdir()) == set(expected)  # flagged studies' top images only
    for path, source in expected.items():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        header = pydicom.dcmread(source, stop_before_pixels=True)
        scale = min(1.0, thumbnails.SIDE / max(header.Rows, header.Columns))  # the longer side to SIDE, same aspect
        want = (round(header.Rows * scale), round(header.Columns * scale))
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (want[1], want[0]), (img.size, want)
            pixels = img.convert("RGB")
            colours = pixels.getcolors(maxcolors=1 << 18)
            tinted = sum(n for n, (r, g, b) in colours if max(r, g, b) - min(r, g, b) > 40)
        assert tinted > 0.01 * want[0] * want[1]  # an overlay drawn over the grey film, not the film alone
    return {p: p.stat().st_mtime_ns for p in expected}


def check_report_in_chromium(tmp_path: Path, out: Path, thumbs: int) -> None:
    from tests.test_screening_worklist import chromium_flags, images_in_browser

    loaded = images_in_browser(chromium_flags(tmp_path), out / "report.html")
    assert len(loaded) == 1 + thumbs and all(i["ok"] for i in loaded), loaded  # histogram + thumbnails load


def test_killed_job_resumes_and_a_killed_model_worker_is_retried_every_instance_exactly_once(
        phantom_pngs, orthanc, registered_model, tmp_path):
    films = archive.build(tmp_path / "archive", phantom_pngs[20:], patients=10, studies=2, prefix="KPAT")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\n" + "".join(f"archive/lumbar/{f.sop_uid}.dcm\n" for f in films))
    out, results = tmp_path / "out", tmp_path / "out" / "results"
    command = screen_command(manifest, out, "--batch-size", "2", "--results-to",
                             f"dicom://ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    logs = [open(tmp_path / f"run{i}.log", "w") for i in (1, 2)]

    first = subprocess.Popen(command, env=registered_model["env"], stdout=logs[0], stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        wait_until(lambda: list(results.glob("*.parquet")), 300, message="the first run wrote no results")
    finally:
        kill_session(first.pid)  # SIGKILL: the job and its local Ray, mid-run
        first.wait()
    partial = len(results_of(out)) if list(results.glob("*.parquet")) else 0
    assert 0 < partial < len(films), "the kill was not mid-run"

    second = subprocess.Popen(command, env=registered_model["env"], stdout=logs[1], stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        before = set(results.glob("*.parquet"))
        wait_until(lambda: set(results.glob("*.parquet")) - before, 300, message="the rerun wrote no results")
        worker = screener_pid(second.pid)
        assert worker is not None, "no model actor process found"
        os.kill(worker, signal.SIGKILL)
        assert second.wait(timeout=400) == 0, (tmp_path / "run2.log").read_text()[-3000:]
    finally:
        kill_session(second.pid)
    rows = results_of(out)
    assert sorted(rows["id"]) == sorted(f.sop_uid for f in films)  # every instance, exactly once
    assert (rows["status"] == "screened").all()
    srs = pacs_srs(orthanc, "KPAT")
    assert len(srs) == len(set(srs)) == len(films)


class CountingProxy:
    """An HTTP proxy in front of Orthanc's DICOMweb that records every request's path (the archive's access log)."""

    def __init__(self, target: str) -> None:
        import http.server
        import threading

        self.paths: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                proxy.paths.append(self.path)
                answer = requests.get(target + self.path, headers={"Accept": self.headers.get("Accept", "*/*")},
                                      timeout=60)
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("Content-Type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def retrieves(self) -> list[str]:
        """The WADO-RS retrieves of an instance (not its metadata, not a search)."""
        return [p for p in self.paths if "/instances/" in p and not p.endswith("/metadata")]


def test_a_dicomweb_archive_is_searched_and_only_instances_the_header_checks_keep_are_retrieved(
        phantom_pngs, orthanc, registered_model, tmp_path):
    from tests.inputs import retagged

    films = archive.build(tmp_path / "archive", phantom_pngs[60:], patients=2, studies=2, prefix="WPAT")
    chest = retagged("RG1_J2KR", PatientID="WCHEST", StudyDate="20200301", StudyInstanceUID=pydicom.uid.generate_uid(),
                     SeriesInstanceUID=pydicom.uid.generate_uid(), SOPInstanceUID=pydicom.uid.generate_uid())
    late = archive.lumbar(archive.phantom_pixels(phantom_pngs[70]), "WLATE", pydicom.uid.generate_uid(),
                          archive.date(2023, 1, 1))
    for path in sorted((tmp_path / "archive/lumbar").iterdir()):
        orthanc.store(path.read_bytes())
    for data in (chest, late, *(archive.testdata(n) for n in archive.OTHERS if n != "RG1_J2KR.dcm")):
        orthanc.store(data)
    proxy = CountingProxy(orthanc.url)
    out = tmp_path / "out"
    run = subprocess.run(screen_command(f"dicomweb+{proxy.url}/dicom-web", out, "--since", "2020-01-01",
                                        "--until", "2020-12-31", "--max-requests-per-s", "50", "--concurrency", "2",
                                        "--results-to", f"dicom://ORTHANC@127.0.0.1:{orthanc.dicom_port}"),
                         env=registered_model["env"], capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = results_of(out).set_index("patient_id")
    assert set(rows.index) == {f.patient_id for f in films} | {"WCHEST"}  # the MR, US and 2023 film: not found
    assert (rows.loc[sorted({f.patient_id for f in films}), "status"] == "screened").all()
    assert rows.loc["WCHEST", "status"] == "excluded" and "body_part" in rows.loc["WCHEST", "reason"]
    retrieved = sorted(p.rsplit("/", 1)[1] for p in proxy.retrieves())
    thumbnailed = list(worklist.flagged_images(resume.read_results(out / "results"))["id"])  # retrieved again
    assert retrieved == sorted([f.sop_uid for f in films] + thumbnailed)  # the chest: never
    assert all((out / thumbnails.relative_path(i)).exists() for i in thumbnailed)
    assert any(p.startswith("/dicom-web/series?") for p in proxy.paths)
    assert len(pacs_srs(orthanc, "WPAT")) == len(films)
    proxy.server.shutdown()


PROBE = """
import json, sys
from pathlib import Path
import ray
from osteoscreen.screening.pipeline import Job, run

ray.init(num_cpus=4, include_dashboard=False, object_store_memory=1 << 30, _metrics_export_port=int(sys.argv[1]),
         _system_config={"metrics_report_interval_ms": 1000})
print(json.dumps(run(Job(sys.argv[2], Path(sys.argv[3]), batch_size=4))), flush=True)
sys.stdin.read()  # Ray, and its metrics endpoint, stay up until the test has scraped it
"""


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Ray's metrics endpoint, as Prometheus reads it: the osteoscreen series, summed over Ray's own labels
    (worker, node, session), by name and our labels."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except requests.RequestException:
        return {}
    series: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_" + metrics.PREFIX):
                ours = tuple(sorted((k, v) for k, v in sample.labels.items() if k in ("status", "reason", "outcome")))
                series[(sample.name, ours)] = series.get((sample.name, ours), 0.0) + sample.value
    return series


def test_the_jobs_counters_reach_rays_metrics_endpoint_with_statuses_and_reasons_only(
        phantom_pngs, registered_model, tmp_path):
    import socket
    import time

    films = archive.build(tmp_path / "archive", phantom_pngs[80:], patients=2, studies=2, prefix="MPAT")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out, log = tmp_path / "out", tmp_path / "probe.log"
    with open(log, "w") as fh:
        probe = subprocess.Popen([sys.executable, "-c", PROBE, str(port), str(tmp_path / "archive"), str(out)],
                                 env=registered_model["env"], stdin=subprocess.PIPE, stdout=fh,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        line = wait_until(lambda: next((l for l in log.read_text().splitlines() if l.startswith("{")), None), 400,
                          interval=1, message=lambda: log.read_text()[-3000:])
        finished = time.monotonic()
        summary = json.loads(line)
        rows = results_of(out)
        expected = {}
        for status, reason in zip(rows["status"], rows["reason"]):
            key = ("ray_osteoscreen_screening_images_total",
                   (("reason", metrics.reason_label(status, reason)), ("status", status)))
            expected[key] = expected.get(key, 0) + 1
        flagged = len(worklist.flagged_images(resume.read_results(out / "results")))
        expected[("ray_osteoscreen_screening_thumbnails_total", (("outcome", "ok"),))] = flagged
        expected[("ray_osteoscreen_screening_model_images_total", ())] = int(
            (rows["status"] == "screened").sum() + rows["reason"].eq("content").sum())
        expected[("ray_osteoscreen_screening_inputs_total", ())] = len(rows)

        def landed():
            found = scrape(port)
            return found if all(found.get(k) == v for k, v in expected.items()) else None

        found = wait_until(landed, 60, interval=1, message=lambda: f"{expected} not in {scrape(port)}")
        lag = time.monotonic() - finished
        exposed = [line for line in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines()
                   if metrics.PREFIX in line]
    finally:
        probe.stdin.close()
        probe.wait(timeout=120)
        kill_session(probe.pid)
    assert summary["by_status"] == {"screened": len(films), "excluded": 3, "failed": 1}
    assert found[("ray_osteoscreen_screening_images_total", (("reason", "modality"), ("status", "excluded")))] == 2
    assert found[("ray_osteoscreen_screening_images_total", (("reason", "decode"), ("status", "failed")))] == 1
    assert found[("ray_osteoscreen_screening_model_seconds_total", ())] > 0
    ours = [k for k in found if k[0] != "ray_osteoscreen_screening_images_total"]
    assert all(labels in ((), (("outcome", "ok"),)) for _, labels in ours)
    identifiers = [f.patient_id for f in films] + [f.sop_uid for f in films] + [f.study_uid for f in films]
    assert exposed and not [i for i in identifiers + ["MPATBAD", "Test^"] if any(i in line for line in exposed)]
    print(f"metrics landed {lag:.1f} s after the job's end")
