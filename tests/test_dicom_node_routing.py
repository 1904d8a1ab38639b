"""The PACS node as a site wires it (issue 23): a real Orthanc routes what it receives to the node with a Lua
`OnStoredInstance` calling `SendToModality`, as sites auto-route to AI nodes; a router posts studies over STOW-RS
instead of C-STORE; the node stores results back over DICOMweb (dicomweb-client's STOW-RS) as well as C-STORE.
The screening runs over the one inference path with a fake model (tests/test_dicom_node_pacs.py's)."""

from __future__ import annotations

import shutil

import pytest
from pydicom.uid import generate_uid
from starlette.testclient import TestClient

from loadtest.server import free_port
from osteoscreen.serving.dicom.scu import WebDestination
from osteoscreen.serving.http import create_app, multipart_related
from osteoscreen.settings import destination
from tests.test_dicom_node_pacs import (MODALITY, NODE, RecordingDestination, chest, loop, orthanc_destination,  # noqa: F401
                                        running, spine, srs_in_study, uids)
from loadtest.orthanc import DICOMWEB_PLUGIN, Orthanc
from tests.test_dicom_pacs import orthanc  # noqa: F401
from tests.test_dicom_results import source
from tests.waiting import wait_until

pytestmark = pytest.mark.server

# Route radiographs (CR, DX) to the AI node, never what the node itself sends back (SR, SC): no loop
ROUTING = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags['Modality']
  if modality == 'CR' or modality == 'DX' then
    SendToModality(instanceId, 'osteoscreen')
  end
end
"""


def tibia() -> bytes:
    """pydicom-data's RG3 as it is: CR, BodyPartExamined EXTREMITY (a distal tibia), in a study of its own."""
    return source("RG3_UNCR", StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
                  SOPInstanceUID=generate_uid())


@pytest.fixture
def routing_orthanc(tmp_path_factory):
    """An Orthanc whose routing script forwards each radiograph it stores to the node's port (chosen here)."""
    assert shutil.which("Orthanc") and DICOMWEB_PLUGIN.exists(), "Orthanc missing: `make tools` installs it"
    node_port = free_port()
    pacs = Orthanc(tmp_path_factory.mktemp("routing"), lua=ROUTING, config={
        "DicomAet": "ORTHANC", "DicomModalities": {"osteoscreen": [NODE, "127.0.0.1", node_port]}})
    pacs.node_port = node_port
    try:
        yield pacs
    finally:
        pacs.stop()


def test_orthanc_routes_lumbar_films_to_the_node_and_gets_srs_back_chest_and_tibia_are_ignored(running,
                                                                                            routing_orthanc):
    pacs = routing_orthanc
    node = running(orthanc_destination(pacs), allowed=("ORTHANC",), port=pacs.node_port)
    film, rg1, rg3 = spine(), chest(), tibia()
    for data in (film, rg1, rg3):  # the modality stores into the PACS; the PACS routes; nobody calls us
        pacs.store(data)
    wait_until(lambda: node.state(film) == ("stored", ""), 120,
               message=lambda: f"{node.state(film)} {(pacs.log.name)}")
    wait_until(lambda: node.state(rg3) is not None and node.state(rg1) is not None, 60)
    assert node.state(rg1) == ("skipped", "body_part") and node.state(rg3) == ("skipped", "body_part")
    assert node.model.images == 1  # only the lumbar lateral reached the model
    (sr,) = srs_in_study(pacs, uids(film).StudyInstanceUID)
    assert uids(pacs.get(f"/instances/{sr['ID']}/file").content).StudyInstanceUID == uids(film).StudyInstanceUID
    assert srs_in_study(pacs, uids(rg1).StudyInstanceUID) == srs_in_study(pacs, uids(rg3).StudyInstanceUID) == []

    # the SR was not routed back to the node (the script's filter), and a re-stored film keeps one SR in the PACS
    assert node.outbox.get(str(uids(pacs.get(f"/instances/{sr['ID']}/file").content).SOPInstanceUID)) is None
    pacs.store(film)  # Orthanc routes it again (a re-send): the same SR UID replaces the SR
    wait_until(lambda: node.model.images == 2 and node.state(film) == ("stored", ""), 120)
    (again,) = srs_in_study(pacs, uids(film).StudyInstanceUID)
    assert again["MainDicomTags"]["SOPInstanceUID"] == sr["MainDicomTags"]["SOPInstanceUID"]


def test_stow_rs_intake_answers_per_instance_and_results_go_back_over_dicomweb(running, orthanc):
    """One good and one bad instance in one STOW-RS request: 202, the good one referenced, the bad one failed with
    its reason; the good one's SR reaches Orthanc through its DICOMweb root (STOW-RS store-back)."""
    web = WebDestination(destination(f"{orthanc.url}/dicom-web"))
    node = running(web)
    app = create_app()
    app.state.outbox = node.outbox
    client = TestClient(app)
    film = spine()
    body, content_type = multipart_related([film, b"this is not DICOM"])
    answer = client.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})
    assert answer.status_code == 202 and answer.headers["content-type"].startswith("application/dicom+json")
    (kept,) = answer.json()["00081199"]["Value"]
    (failed,) = answer.json()["00081198"]["Value"]
    assert kept["00081155"]["Value"] == [str(uids(film).SOPInstanceUID)]
    assert failed["00081197"]["Value"] == [0xC000]  # cannot understand
    wait_until(lambda: node.state(film) == ("stored", ""), 60, message=lambda: str(node.state(film)))
    (sr,) = srs_in_study(orthanc, uids(film).StudyInstanceUID)
    assert uids(orthanc.get(f"/instances/{sr['ID']}/file").content).Modality == "SR"

    # all kept: 200; a study URL the instance is not in: 409 with "does not match"; a chest film is kept (and
    # later skipped by the worker), as C-STORE acknowledges it, so a router does not send it again
    other, rg1 = spine(seed=3), chest()
    body, content_type = multipart_related([other, rg1])
    assert client.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type}).status_code == 200
    wait_until(lambda: node.state(rg1) == ("skipped", "body_part"), 60)
    body, content_type = multipart_related([spine(seed=4)])
    mismatch = client.post(f"/dicom-web/studies/{generate_uid()}", content=body, headers={"Content-Type": content_type})
    assert mismatch.status_code == 409 and mismatch.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]


def test_stow_rs_refuses_bodies_that_are_not_dicom_multipart_and_is_off_without_the_node(tmp_path, running):
    node = running(RecordingDestination())
    app = create_app()
    client = TestClient(app)
    body, content_type = multipart_related([spine()])
    off = client.post("/dicom-web/studies", content=body, headers={"Content-Type": content_type})
    assert off.status_code == 404 and "OSTEOSCREEN_DICOM_PORT" in off.json()["error"]
    app.state.outbox = node.outbox
    plain = client.post("/dicom-web/studies", content=spine(), headers={"Content-Type": "application/dicom"})
    assert plain.status_code == 400 and "multipart/related" in plain.json()["error"]
    broken = client.post("/dicom-web/studies", content=b"--nothing here",
                         headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=abc'})
    assert broken.status_code == 400
    png = (b"--b\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n--b--\r\n")
    wrong = client.post("/dicom-web/studies", content=png,
                        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    assert wrong.status_code == 415
    assert node.outbox.counts() == {}  # nothing kept from any of them
