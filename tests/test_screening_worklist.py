"""The screening job's parts that need no Ray (issue 24): the header stage reads no pixel data, and the worklist
ranks patients (not images) from a results table, into a CSV and an HTML report that a real browser (Debian's
headless Chromium) renders with the table's rows and the flagged studies' thumbnails; the metrics' labels."""

from __future__ import annotations

import html
import io
import json
import shutil
import subprocess
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

from osteoscreen.intended_use.rules import IntendedUse
from osteoscreen.screening import inspect, metrics, thumbnails, worklist
from osteoscreen.screening.schema import SCHEMA
from tests.required_tools import missing_tool


class CountingFile(io.BufferedReader):
    """A file that counts the bytes read from it."""

    read_bytes = 0

    def read(self, size=-1):
        data = super().read(size)
        CountingFile.read_bytes += len(data)
        return data


def test_the_header_stage_excludes_without_reading_the_pixel_data(monkeypatch):
    path = get_testdata_file("RG1_J2KR.dcm")  # a 4 MB chest CR
    size = Path(path).stat().st_size

    def counting_open(source: str):
        return CountingFile(open(source, "rb", buffering=0))

    CountingFile.read_bytes = 0
    monkeypatch.setattr(inspect, "open_input", counting_open)
    row = inspect.inspect({"source": path}, IntendedUse())
    assert row["status"] == "excluded" and row["findings"] == ["body_part", "view"]
    assert row["id"] == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert 0 < CountingFile.read_bytes < size // 20, (CountingFile.read_bytes, size)


def result(id_: str, patient: str | None, probability: float | None, status: str = "screened",
           study: str | None = None, day: date | None = date(2021, 3, 4), threshold: float = 0.3) -> dict:
    return {"id": id_, "source": f"/archive/{id_}.dcm", "patient_id": patient, "study_instance_uid": study or f"S{id_}",
            "series_instance_uid": None, "study_date": day, "status": status,
            "reason": None if status == "screened" else "modality", "probability": probability,
            "label": None, "threshold": threshold, "findings": [], "model": "osteoscreen:v", "precision": "float32",
            "time": datetime.now(timezone.utc)}


RESULTS = pa.Table.from_pylist([
    result("1", "ALICE", 0.35, study="A1"), result("2", "ALICE", 0.62, study="A2", day=date(2022, 5, 6)),
    result("3", "ALICE", 0.10, study="A3"),
    result("4", "BOB", 0.90, study="B1"),
    result("5", "CAROL", 0.29, study="C1"),  # under the threshold: not referred
    result("6", "DAVE", None, status="excluded"),
    result("7", None, 0.45),  # a PNG without a patient ID: its own entry, by source
], schema=SCHEMA)


def test_the_worklist_ranks_patients_by_their_highest_probability(tmp_path):
    counts = worklist.write(RESULTS, tmp_path)
    assert counts["by_status"] == {"screened": 6, "excluded": 1, "failed": 0}
    assert json.loads((tmp_path / "summary.json").read_text()) == counts
    ranked = worklist.referrals(RESULTS)
    assert list(ranked["patient_id"]) == ["BOB", "ALICE", "/archive/7.dcm"]
    alice = ranked.iloc[1]
    assert alice["rank"] == 2 and alice["max_probability"] == 0.62 and alice["images"] == 3
    assert alice["study_date"] == "2022-05-06"  # of the image with the highest probability
    assert alice["flagged_studies"] == "A2 (2022-05-06);A1 (2021-03-04)"  # A3 was under the threshold
    assert (tmp_path / "referrals.csv").read_text().splitlines()[1].startswith("1,BOB,0.9,")


def test_each_flagged_study_has_one_top_image():
    more = pa.concat_tables([RESULTS, pa.Table.from_pylist([result("8", "BOB", 0.5, study="B1")], schema=SCHEMA)])
    top = worklist.flagged_images(more)
    assert list(top["id"]) == ["4", "2", "7", "1"]  # highest first; B1's 0.5 image is not its top one
    assert list(top["study"]) == ["B1", "A2", "S7", "A1"]  # ALICE's A3 (0.10) and CAROL (0.29) are not flagged
    assert top.loc[top["id"] == "7", "patient"].item() == "/archive/7.dcm"


def chromium_flags(tmp_path: Path) -> list[str]:
    chromium = shutil.which("chromium")
    if chromium is None:
        missing_tool("chromium missing: `make tools` installs Debian's chromium")
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]


LOADED_PROBE = """<script>window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("img")];
  const p = document.createElement("pre"); p.id = "probe";
  p.textContent = JSON.stringify(imgs.map(i => ({src: i.getAttribute("src").slice(0, 40), w: i.naturalWidth,
                                                  h: i.naturalHeight, ok: i.complete && i.naturalWidth > 0})));
  document.body.appendChild(p);
});</script>"""


def images_in_browser(flags: list[str], report: Path) -> list[dict]:
    """Every <img> of `report` as the browser loaded it: a copy beside it (same relative links) with a probe that
    lists each image's natural size after the load event; Chromium's --dump-dom prints the DOM after it."""
    probe = report.with_name("report-probe.html")
    probe.write_text(report.read_text().replace("</body>", LOADED_PROBE + "</body>"))
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = dom.stdout.split('<pre id="probe">', 1)[1].split("</pre>", 1)[0]
    return json.loads(html.unescape(found))


def test_the_report_renders_in_a_real_browser_with_the_ranked_rows_and_thumbnails(tmp_path):
    flags = chromium_flags(tmp_path)
    flagged = worklist.flagged_images(RESULTS)
    (tmp_path / thumbnails.FOLDER).mkdir(mode=0o700)
    for i, image_id in enumerate(flagged["id"][:-1]):  # the last study's thumbnail could not be made
        buffer = io.BytesIO()
        Image.new("RGB", (200 + 10 * i, 256), (200, 40, 40)).save(buffer, format="JPEG")
        thumbnails.write(tmp_path / thumbnails.relative_path(image_id), buffer.getvalue())
    worklist.write(RESULTS, tmp_path)
    page = (tmp_path / "report.html").as_uri()
    text = (tmp_path / "report.html").read_text()
    assert "http://" not in text and "https://" not in text  # nothing online: readable offline
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    table = dom.stdout.split('<table id="referrals">', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 1 + 3 and table.index("BOB") < table.index("ALICE")
    assert "screened: 6" in dom.stdout
    assert table.count('class="thumbnail"') == 3 and table.count("no thumbnail") == 1
    alice = table.split("ALICE", 1)[1].split("</tr>", 1)[0]
    assert alice.count("<figure>") == 2 and alice.index("A2") < alice.index("A1")  # her flagged studies, top first

    loaded = images_in_browser(flags, tmp_path / "report.html")
    assert len(loaded) == 1 + 3 and all(i["ok"] for i in loaded), loaded  # the histogram and the thumbnails
    assert sorted((i["w"], i["h"]) for i in loaded[1:]) == [(200, 256), (210, 256), (220, 256)]
    shot = tmp_path / "shot.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1000,900", page], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.size == (1000, 900)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, table and the histogram, not a blank page


def test_metric_labels_are_statuses_checks_and_stages_never_free_text():
    assert metrics.reason_label("screened", None) == "none"
    assert metrics.reason_label("excluded", "body_part,view") == "body_part,view"
    assert metrics.reason_label("failed", "store-back: association rejected by PAT00 host") == "store_back"
    assert metrics.reason_label("failed", "cannot read the input: No such file or directory") == "read"
    assert metrics.reason_label("failed", "cannot read the input: the archive did not deliver the instance "
                                          "(HTTP 503)") == "retrieve"
    assert metrics.reason_label("failed", "the DICOM header cannot be read") == "header"
    assert metrics.reason_label("failed", "the archive did not give the instance's metadata (Timeout)") == "metadata"
    assert metrics.reason_label("failed", "the JPEG 2000 stream is truncated") == "decode"
    metrics.count_rows([("screened", None)])  # outside a Ray worker: records nothing, raises nothing


def test_the_archive_rate_limit_spaces_requests_and_multipart_answers_are_split():
    import time

    from osteoscreen.screening import dicomweb

    bucket = dicomweb.RateLimit(20.0)
    start = time.monotonic()
    for _ in range(6):
        bucket.wait()
    assert time.monotonic() - start >= 5 / 20.0  # the first goes at once, then one every 50 ms
    body = b"--b1\r\nContent-Type: application/dicom\r\n\r\nFIRST\r\n--b1\r\nContent-Type: application/dicom\r\n\r\n" \
           b"SECOND\r\n--b1--\r\n"
    assert dicomweb.multipart(body, 'multipart/related; type="application/dicom"; boundary=b1') == [b"FIRST", b"SECOND"]
    assert dicomweb.multipart(body, "application/dicom") == []
