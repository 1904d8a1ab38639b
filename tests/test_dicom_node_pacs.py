"""The PACS node over the network (issue 23): dcmtk's `echoscu` and `storescu` act as the modality, a real Orthanc
(tests/test_dicom_pacs.py's, on loopback) is the destination the node stores its SRs back into, and the one
inference path screens over a fake model whose answer the test sets (no TensorFlow). A small TCP gate in front of
Orthanc's DICOM port takes the destination down and brings it back."""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, generate_uid

from loadtest.server import free_port
from osteoscreen.dicom_results import reader
from osteoscreen.intended_use.policy import Policy
from osteoscreen.serving.dicom.node import DicomNode
from osteoscreen.serving.dicom.outbox import Outbox
from osteoscreen.serving.dicom.scu import DicomDestination
from osteoscreen.serving.inference import InferencePath
from osteoscreen.settings import Destination
from osteoscreen.types import ModelInfo
from tests.inputs import picture, to_u16
from tests.test_dicom_pacs import orthanc  # noqa: F401 - the fixture: a real Orthanc on loopback
from tests.test_dicom_results import PATIENT_ID, source
from tests.waiting import wait_until

pytestmark = pytest.mark.server

INFO = ModelInfo(name="osteoscreen", version="t23version", backbone="vgg16", threshold=0.316,
                 intended_use={"content_cutoff": 3.0})
MODALITY, NODE = "MODALITY", "OSTEOSCREEN"


class FakeModel:
    """The model service's answer: probability, batch seconds, batch size, content score (all fixed)."""

    def __init__(self, probability: float = 0.625, content_score: float = 1.0) -> None:
        self.probability, self.content_score, self.images = probability, content_score, 0

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        self.images += len(images)
        n = len(images)
        return np.stack([np.full(n, self.probability), np.full(n, 0.001 * n), np.full(n, n),
                         np.full(n, self.content_score)], axis=1)


def spine(transfer_syntax=None, seed: int = 1) -> bytes:
    """A phantom lateral lumbar film: a pydicom-data CR header (with the distinctive patient identifiers), CR,
    LSPINE, LL, an adult age, in a study of its own, small phantom pixels."""
    ds = pydicom.dcmread(io.BytesIO(source("RG3_J2KR", BodyPartExamined="LSPINE", ViewPosition="LL",
                                           PatientAge="065Y", StudyInstanceUID=generate_uid(),
                                           SeriesInstanceUID=generate_uid(), SOPInstanceUID=generate_uid())))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    del ds.WindowCenter, ds.WindowWidth  # RG3's window is for its own 12-bit pixels
    ds.set_pixel_data(to_u16(picture(seed=seed)), photometric_interpretation="MONOCHROME2", bits_stored=16)
    if transfer_syntax:
        ds.compress(transfer_syntax)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def chest() -> bytes:
    """pydicom-data's RG1 (CR, BodyPartExamined CHEST, JPEG 2000) in a study of its own."""
    return source("RG1_J2KR", StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
                  SOPInstanceUID=generate_uid())


def uids(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)


class Gate:
    """A TCP forwarder on a fixed loopback port to `target`: `up()` listens, `down()` closes the port (connection
    refused), as a PACS that is down."""

    def __init__(self, target: int) -> None:
        self.port, self.target, self._server = free_port(), target, None

    def up(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._serve, args=(self._server,), daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _serve(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class RecordingDestination:
    """A destination that keeps what it is sent (for tests that need no PACS)."""

    def __init__(self) -> None:
        self.stored: list[bytes] = []

    def store(self, data: bytes) -> None:
        self.stored.append(data)


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


class Running:
    def __init__(self, loop, tmp_path: Path, destination, allowed=(MODALITY,), model=None,
                 policy=Policy.REFUSE, port: int = 0) -> None:
        self.loop, self.tmp_path = loop, tmp_path
        self.model = model or FakeModel()
        path = InferencePath(self.model, policy=policy)
        path.set_model(INFO)
        self.outbox = Outbox(tmp_path / "outbox", retry_s=0.3, retry_max_s=1.0)
        self.node = DicomNode(path, self.outbox, destination, NODE, tuple(allowed), poll_s=0.2)
        self.port = self.call(self.node.start("127.0.0.1", port))

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    stopped = False

    def stop(self) -> None:
        self.call(self.node.stop())
        self.stopped = True

    def storescu(self, *files: bytes, calling: str = MODALITY, verbose: bool = False) -> subprocess.CompletedProcess:
        paths = []
        for n, data in enumerate(files):
            paths.append(self.tmp_path / f"send{n}-{uids(data).SOPInstanceUID}.dcm")
            paths[-1].write_bytes(data)
        # -xv: JPEG 2000 lossless and the uncompressed syntaxes, as a modality sending what it holds
        return subprocess.run(["storescu", "-xv", *(["-v"] if verbose else []), "-aet", calling, "-aec", NODE, "127.0.0.1", str(self.port),
                               *map(str, paths)], capture_output=True, text=True, timeout=60)

    def state(self, data: bytes) -> tuple[str, str] | None:
        entry = self.outbox.get(str(uids(data).SOPInstanceUID))
        return entry and (entry.state, entry.reason)


@pytest.fixture
def running(loop, tmp_path):
    started = []

    def start(destination, **kw) -> Running:
        started.append(Running(loop, tmp_path, destination, **kw))
        return started[-1]

    yield start
    for node in started:
        if not node.stopped:
            node.stop()


def orthanc_destination(pacs, port: int | None = None) -> DicomDestination:
    return DicomDestination(Destination("dicom", "127.0.0.1", port or pacs.dicom_port, ae_title="ORTHANC"), NODE)


def srs_in_study(pacs, study_uid: str) -> list[dict]:
    """The SR instances Orthanc holds in the study (by its DICOM Study Instance UID)."""
    studies = requests_post(pacs, "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
    out = []
    for study in studies:
        for series in pacs.get(f"/studies/{study}/series").json():
            if series["MainDicomTags"]["Modality"] == "SR":
                out += pacs.get(f"/series/{series['ID']}/instances").json()
    return out


def requests_post(pacs, path: str, body: dict):
    import requests

    answer = requests.post(f"{pacs.url}{path}", json=body, timeout=30)
    assert answer.ok, answer.text
    return answer.json()


# -- association ------------------------------------------------------------------------------------------------


def test_c_echo_answers_and_an_unknown_calling_ae_is_rejected(running):
    assert shutil.which("echoscu") and shutil.which("storescu"), "dcmtk missing: `make tools` installs it"
    node = running(RecordingDestination())
    echo = subprocess.run(["echoscu", "-aet", MODALITY, "-aec", NODE, "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    stranger = subprocess.run(["echoscu", "-aet", "STRANGER", "-aec", NODE, "127.0.0.1", str(node.port)],
                              capture_output=True, text=True, timeout=30)
    assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stdout + stranger.stderr
    sent = node.storescu(spine(), calling="STRANGER")
    assert sent.returncode != 0 and node.outbox.pending() == [] and node.outbox.counts() == {}


# -- intake and store-back -------------------------------------------------------------------------------------


def test_lumbar_laterals_get_srs_in_their_study_a_chest_film_is_acknowledged_and_not_screened(running, orthanc,
                                                                                             caplog):
    caplog.set_level(logging.DEBUG, logger="osteoscreen")
    caplog.set_level(logging.INFO, logger="pynetdicom")
    node = running(orthanc_destination(orthanc))
    films = [spine(), spine(JPEG2000Lossless, seed=2)]
    for film in films:  # the PACS holds the sources, as when it routes what it received
        orthanc.store(film)
    rg1 = chest()
    sent = node.storescu(*films, rg1)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_until(lambda: all(node.state(f) == ("stored", "") for f in films), 60,
               message=lambda: str([node.state(f) for f in films]))
    assert node.state(rg1) == ("skipped", "body_part") and node.model.images == 2  # the chest never screened
    for film in films:
        src = uids(film)
        (stored,) = srs_in_study(orthanc, src.StudyInstanceUID)
        back_bytes = orthanc.get(f"/instances/{stored['ID']}/file").content
        doc = uids(back_bytes)
        assert doc.StudyInstanceUID == src.StudyInstanceUID and doc.PatientID == PATIENT_ID
        back = reader.read(back_bytes)
        assert back.source_sop_instance_uid == src.SOPInstanceUID and back.probability == pytest.approx(0.625)
        assert back.osteoporosis_present is True and back.algorithm_version == "osteoscreen:t23version"
    assert srs_in_study(orthanc, uids(rg1).StudyInstanceUID) == []

    # a re-sent image: screened again, the same SR UID, and Orthanc keeps one SR
    first_uid = uids(orthanc.get(f"/instances/{srs_in_study(orthanc, uids(films[0]).StudyInstanceUID)[0]['ID']}/file")
                     .content).SOPInstanceUID
    assert node.storescu(films[0]).returncode == 0
    wait_until(lambda: node.model.images == 3 and node.state(films[0]) == ("stored", ""), 60)
    (again,) = srs_in_study(orthanc, uids(films[0]).StudyInstanceUID)
    assert uids(orthanc.get(f"/instances/{again['ID']}/file").content).SOPInstanceUID == first_uid
    assert node.node.outcomes["stored"] == 3 and node.outbox.pending() == []
    assert node.node.outcomes == {"screened": 3, "stored": 3, "skipped:body_part": 1}
    assert "skipped (body_part)" in caplog.text and PATIENT_ID not in caplog.text  # no identifier in a log line


def test_with_the_destination_down_results_wait_and_arrive_once_when_it_is_back(running, orthanc):
    gate = Gate(orthanc.dicom_port)  # down: nothing listens on its port
    node = running(orthanc_destination(orthanc, gate.port))
    films = [spine(seed=3), spine(seed=4)]
    assert node.storescu(*films).returncode == 0
    def retried() -> list | None:
        entries = [node.outbox.get(str(uids(f).SOPInstanceUID)) for f in films]
        return entries if all(e and e.attempts >= 2 for e in entries) else None

    waiting = wait_until(retried, 30, message=lambda: str([node.state(f) for f in films]))
    assert all(e.state == "waiting" for e in waiting) and len(node.outbox.pending()) == 2
    gate.up()
    try:
        wait_until(lambda: all(node.state(f) == ("stored", "") for f in films), 30,
                   message=lambda: str([node.state(f) for f in films]))
    finally:
        gate.down()
    for film in films:
        assert len(srs_in_study(orthanc, uids(film).StudyInstanceUID)) == 1  # arrived, once
    assert node.node.outcomes["stored"] == 2 and node.node.outcomes["store_retry"] >= 4
    assert node.model.images == 2  # screened once each: the retries re-send the held SR


def test_content_refusals_and_undecodable_images_are_recorded_failed_without_a_result(running):
    destination = RecordingDestination()
    node = running(destination, model=FakeModel(content_score=5.0))  # over the cut-off: unlike a spine film
    film = spine(seed=5)
    ds = pydicom.dcmread(io.BytesIO(spine(seed=6)))
    ds.PixelData = ds.PixelData[:100]  # truncated pixels: does not decode
    broken = io.BytesIO()
    ds.save_as(broken, enforce_file_format=True)
    assert node.storescu(film, broken.getvalue()).returncode == 0  # acknowledged: kept in the outbox first
    wait_until(lambda: node.state(film) == ("failed", "content") and
               node.state(broken.getvalue()) == ("failed", "invalid_input"), 30,
               message=lambda: str([node.state(film), node.state(broken.getvalue())]))
    assert destination.stored == [] and node.outbox.pending() == []


def test_an_instance_the_outbox_could_not_keep_is_answered_as_a_failure_so_the_sender_retries(running):
    node = running(RecordingDestination())

    def full_disk(*_args) -> None:
        raise OSError("No space left on device")

    node.outbox.accept = full_disk
    sent = node.storescu(spine(seed=7), verbose=True)
    assert "Received Store Response (Refused: OutOfResources)" in sent.stdout + sent.stderr, sent.stdout + sent.stderr
    assert node.outbox.counts() == {}
    assert node.node.listener.refused == 1 and node.node.listener.accepted == 0


def test_after_a_restart_what_was_received_but_not_stored_back_is_completed_once(running, orthanc):
    """In process (the node stopped while its destination is down, a new node on the same outbox): the SIGKILL
    of a whole server is issue 23's later test; the outbox's own crash safety is test_dicom_node.py's."""
    gate = Gate(orthanc.dicom_port)
    first = running(orthanc_destination(orthanc, gate.port))
    films = [spine(seed=8), spine(seed=9)]
    assert first.storescu(*films).returncode == 0
    wait_until(lambda: all(first.state(f) == ("waiting", "destination") for f in films), 30,
               message=lambda: str([first.state(f) for f in films]))
    first.stop()
    gate.up()
    try:
        second = running(orthanc_destination(orthanc, gate.port), model=FakeModel())
        wait_until(lambda: all(second.state(f) == ("stored", "") for f in films), 30,
                   message=lambda: str([second.state(f) for f in films]))
    finally:
        gate.down()
    for film in films:
        assert len(srs_in_study(orthanc, uids(film).StudyInstanceUID)) == 1
    assert second.model.images == 0 and second.node.outcomes == {"stored": 2}  # the held SRs, not screened again
