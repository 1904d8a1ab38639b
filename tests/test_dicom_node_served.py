"""The PACS node inside `bentoml serve` (issue 23): `OSTEOSCREEN_DICOM_PORT` set, the front's on-startup hook starts
the listener and the outbox worker over the real inference path (the registered model: decode, intended-use
checks, batcher), dcmtk's `storescu` is the modality, a real Orthanc the destination; and a SIGKILL of the whole
server with a result not yet stored back, after which the restarted server stores it exactly once."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pydicom
import pytest
import requests

from loadtest.images import lumbar_lateral_dicom
from loadtest.server import ServerProcess, free_port
from osteoscreen.dicom_results import reader
from tests.test_dicom_node_pacs import MODALITY, NODE, Gate, chest, srs_in_study, uids
from tests.test_dicom_pacs import orthanc  # noqa: F401 - the fixture: a real Orthanc on loopback
from tests.test_dicom_results import source
from tests.waiting import wait_until

pytestmark = [pytest.mark.server, pytest.mark.slow]


def lumbar_lateral(png: Path) -> bytes:
    """A phantom lateral lumbar film the registered model was trained on (`osteoscreen synth`'s PNG, so the content
    check passes) as DICOM, on a pydicom-data CR header carrying the tests' distinctive patient identifiers."""
    return lumbar_lateral_dicom(png.read_bytes(), header=source("RG3_J2KR"))


@pytest.fixture(scope="module")
def films(registered_model) -> list[bytes]:
    """Two instances (each its own study and UIDs) of one training image the content check passes (not every
    phantom does: the cut-off keeps some training images out)."""
    png = sorted((registered_model["root"] / "data").glob("*/*.png"))[0]
    return [lumbar_lateral(png) for _ in range(2)]


def node_server(registered_model, tmp_path: Path, destination_port: int, dicom_port: int, **env: str) -> ServerProcess:
    return ServerProcess(
        env=registered_model["env"], log_path=tmp_path / f"server-{dicom_port}.log",
        OSTEOSCREEN_DICOM_PORT=str(dicom_port), OSTEOSCREEN_DICOM_HOST="127.0.0.1",
        OSTEOSCREEN_DICOM_ALLOWED_AES=MODALITY, OSTEOSCREEN_OUTBOX_DIR=str(tmp_path / "outbox"),
        OSTEOSCREEN_RESULTS_DESTINATION=f"dicom://ORTHANC@127.0.0.1:{destination_port}",
        OSTEOSCREEN_RESULTS_RETRY_S="0.5", OSTEOSCREEN_RESULTS_RETRY_MAX_S="2", **env).start()


def instances_in_study(pacs, study_uid: str) -> list[dict]:
    """Every instance Orthanc holds in the study (by its DICOM Study Instance UID)."""
    studies = requests.post(f"{pacs.url}/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}},
                            timeout=30).json()
    return [i for study in studies for i in pacs.get(f"/studies/{study}/instances").json()]


def storescu(port: int, tmp_path: Path, *files: bytes, calling: str = MODALITY) -> subprocess.CompletedProcess:
    paths = []
    for data in files:
        paths.append(tmp_path / f"send-{uids(data).SOPInstanceUID}.dcm")
        paths[-1].write_bytes(data)
    return subprocess.run(["storescu", "-xv", "-aet", calling, "-aec", NODE, "127.0.0.1", str(port), *map(str, paths)],
                          capture_output=True, text=True, timeout=60)


def outbox_state(tmp_path: Path, data: bytes) -> tuple | None:
    """(state, reason, attempts) of the instance's outbox row, read-only beside the serving process."""
    path = tmp_path / "outbox" / "outbox.sqlite3"
    if not path.exists():
        return None
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        row = db.execute("SELECT state, reason, attempts FROM entries WHERE sop_instance_uid = ?",
                         (str(uids(data).SOPInstanceUID),)).fetchone()
    return row


def sample(server: ServerProcess, name: str, **labels: str) -> float:
    total = 0.0
    for line in requests.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_served_node_stores_results_back_and_completes_them_exactly_once_after_a_sigkill(registered_model, orthanc,
                                                                                          films, tmp_path):
    """Two front workers: one owns the port and the outbox (the lock), the other waits; both start. With
    OSTEOSCREEN_RESULTS_OVERLAY the explanation overlay (a Secondary Capture) goes back with the SR. Then, with the
    destination down and a result held in the outbox, a SIGKILL of the whole server: the restarted server stores
    that result exactly once, without screening the image again. (One test, so two server starts, not three.)"""
    gate = Gate(orthanc.dicom_port)  # the destination, behind a gate the test opens and closes
    gate.up()
    port = free_port()
    server = node_server(registered_model, tmp_path, gate.port, port, OSTEOSCREEN_FRONT_WORKERS="2",
                         OSTEOSCREEN_RESULTS_OVERLAY="1")
    try:
        server.wait_ready(600)
        echo = subprocess.run(["echoscu", "-aet", MODALITY, "-aec", NODE, "127.0.0.1", str(port)],
                              capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        stranger = subprocess.run(["echoscu", "-aet", "STRANGER", "-aec", NODE, "127.0.0.1", str(port)],
                                  capture_output=True, text=True, timeout=30)
        assert stranger.returncode != 0
        rg1 = chest()
        sent = storescu(port, tmp_path, films[0], rg1)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        study = uids(films[0]).StudyInstanceUID
        (sr,) = wait_until(lambda: srs_in_study(orthanc, study), 180,
                           message=lambda: f"{outbox_state(tmp_path, films[0])}\n{server.log_tail()}")
        doc = uids(orthanc.get(f"/instances/{sr['ID']}/file").content)
        assert doc.StudyInstanceUID == study and doc.Modality == "SR"
        assert doc.ContentSequence  # a report, referencing its source (checked in depth by test_dicom_node_pacs)
        wait_until(lambda: outbox_state(tmp_path, films[0]) == ("stored", "", 0), 30)
        (overlay,) = [i for i in instances_in_study(orthanc, study) if i["ID"] != sr["ID"]]
        image = uids(orthanc.get(f"/instances/{overlay['ID']}/file").content)
        assert image.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and image.StudyInstanceUID == study
        assert reader.read(orthanc.get(f"/instances/{sr['ID']}/file").content).result_image_uids == \
            (image.SOPInstanceUID,)  # the SR references its overlay
        assert outbox_state(tmp_path, rg1) == ("skipped", "body_part", 0)
        assert srs_in_study(orthanc, uids(rg1).StudyInstanceUID) == []
        wait_until(lambda: sample(server, "osteoscreen_dicom_outbox_entries", state="stored") == 1, 30)
        assert sample(server, "osteoscreen_dicom_intake_total", outcome="received", reason="c_store") == 2
        assert sample(server, "osteoscreen_dicom_intake_total", outcome="screened") == 1
        assert sample(server, "osteoscreen_dicom_intake_total", outcome="skipped", reason="body_part") == 1
        assert sample(server, "osteoscreen_dicom_intake_total", outcome="rejected", reason="association") == 1
        assert sample(server, "osteoscreen_dicom_outbox_oldest_pending_seconds") == 0
        log = server.log_tail(10_000_000)
        assert log.count("DICOM node: listening on port") == 1  # one owner
        assert "another process owns the outbox" in log
        assert "Traceback" not in log

        gate.down()  # the PACS goes down; a result waits in the outbox
        film = films[1]
        assert storescu(port, tmp_path, film).returncode == 0
        wait_until(lambda: (outbox_state(tmp_path, film) or ("",))[0] == "waiting", 180,
                   message=lambda: f"{outbox_state(tmp_path, film)}\n{server.log_tail()}")
        assert sample(server, "osteoscreen_dicom_store_failures_total", kind="association") >= 1
    finally:
        server.kill()  # the whole server and its workers, no shutdown hook
    assert outbox_state(tmp_path, film)[0] == "waiting"
    assert srs_in_study(orthanc, uids(film).StudyInstanceUID) == []

    second = node_server(registered_model, tmp_path, gate.port, free_port())
    try:
        second.wait_ready(600)
        gate.up()
        wait_until(lambda: (outbox_state(tmp_path, film) or ("",))[0] == "stored", 120,
                   message=lambda: f"{outbox_state(tmp_path, film)}\n{second.log_tail()}")
        assert len(srs_in_study(orthanc, uids(film).StudyInstanceUID)) == 1
        assert sample(second, "osteoscreen_dicom_intake_total", outcome="screened") == 0  # the held SR, not re-screened
        assert "pending from before the start" in second.log_tail(10_000_000)
    finally:
        gate.down()
        second.stop()
