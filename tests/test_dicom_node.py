"""The PACS node's parts without a network (issue 23): deterministic result UIDs, its settings, and the durable
outbox (crash safety, re-send idempotence, backoff, purge, file mode, no identifiers outside the instance bytes).
The node over the network, against dcmtk and a real Orthanc, is tests/test_dicom_node_pacs.py."""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import stat

import numpy as np
import pydicom
import pytest

from osteoscreen import settings
from osteoscreen.dicom_results import reader, sr
from osteoscreen.serving.dicom import outbox as ob
from tests.test_dicom_results import ALGORITHM, PATIENT_ID, PATIENT_NAME, prediction, source

OVERLAY = np.zeros((64, 60, 3), np.uint8)

# -- deterministic result UIDs ---------------------------------------------------------------------------------


def _uids(results) -> tuple[str, ...]:
    docs = [pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True) for b in (results.sr, *results.images)]
    return tuple(u for d in docs for u in (str(d.SeriesInstanceUID), str(d.SOPInstanceUID)))


def test_result_uids_follow_the_source_and_the_model_version():
    data = source("RG3_J2KR")
    first = sr.to_results(data, prediction(0.7), ALGORITHM, overlay_rgb=OVERLAY)
    again = sr.to_results(data, prediction(0.2), ALGORITHM, overlay_rgb=OVERLAY)  # a re-send (or a retry)
    assert _uids(first) == _uids(again) and first.sr_sop_instance_uid == again.sr_sop_instance_uid
    assert len(set(_uids(first))) == 4  # SR and SC: each its own series and instance
    for uid in _uids(first):
        assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
        assert 0 < int(uid[5:]) < 2 ** 128
    newer = sr.Algorithm(ALGORITHM.name, "another-version", ALGORITHM.backbone)
    other_model = sr.Algorithm("osteoscreen-b", ALGORITHM.version, ALGORITHM.backbone)
    other_source = source("RG3_J2KR", SOPInstanceUID=pydicom.uid.generate_uid())
    for different in (sr.to_results(data, prediction(0.7), newer, overlay_rgb=OVERLAY),
                      sr.to_results(data, prediction(0.7), other_model, overlay_rgb=OVERLAY),
                      sr.to_results(other_source, prediction(0.7), ALGORITHM, overlay_rgb=OVERLAY)):
        assert not set(_uids(different)) & set(_uids(first))
    # the SR still references its own overlay by the derived UID
    assert reader.read(first.sr).result_image_uids == (_uids(first)[3],)


# -- settings ----------------------------------------------------------------------------------------------------


def test_node_settings_default_off_and_parse():
    s = settings.load({})
    assert (s.dicom_port, s.dicom_ae_title, s.allowed_aes, s.results_destination, s.results_overlay) == (
        None, "OSTEOSCREEN", (), None, False)
    assert s.outbox_path == s.cache / "outbox"
    s = settings.load({"OSTEOSCREEN_DICOM_PORT": "11112", "OSTEOSCREEN_DICOM_ALLOWED_AES": " ORTHANC, MODALITY1 ",
                       "OSTEOSCREEN_RESULTS_DESTINATION": "dicom://ORTHANC@pacs.example:4242",
                       "OSTEOSCREEN_OUTBOX_DIR": "/var/lib/osteoscreen", "OSTEOSCREEN_OUTBOX_RETENTION_S": "3600"})
    assert (s.dicom_port, s.allowed_aes, s.outbox_path, s.outbox_retention_s) == (
        11112, ("ORTHANC", "MODALITY1"), settings.Path("/var/lib/osteoscreen"), 3600.0)
    assert settings.destination(s.results_destination) == settings.Destination("dicom", "pacs.example", 4242,
                                                                               ae_title="ORTHANC")
    web = settings.destination("https://pacs.example/dicom-web/")
    assert (web.scheme, web.host, web.port, web.url) == ("https", "pacs.example", 443, "https://pacs.example/dicom-web")


@pytest.mark.parametrize(("name", "value", "accepts"), [
    ("OSTEOSCREEN_DICOM_PORT", "70000", "an integer >= 0 and <= 65535"),
    ("OSTEOSCREEN_DICOM_AE_TITLE", "A" * 17, "1-16 characters"),
    ("OSTEOSCREEN_DICOM_AE_TITLE", "BACK\\SLASH", "no backslash"),
    ("OSTEOSCREEN_DICOM_ALLOWED_AES", "ORTHANC,WAY_TOO_LONG_A_TITLE", "AE titles (1-16 characters)"),
    ("OSTEOSCREEN_RESULTS_DESTINATION", "dicom://pacs:4242", "dicom://AET@host:port"),  # no AE title
    ("OSTEOSCREEN_RESULTS_DESTINATION", "dicom://ORTHANC@pacs", "dicom://AET@host:port"),  # no port
    ("OSTEOSCREEN_RESULTS_DESTINATION", "ftp://pacs/x", "http(s)://host:port/path"),
    ("OSTEOSCREEN_OUTBOX_RETENTION_S", "-1", "a number >= 0"),
])
def test_bad_node_settings_name_what_they_accept(name, value, accepts):
    with pytest.raises(settings.SettingsError) as caught:
        settings.load({name: value})
    assert str(caught.value).startswith(f"{name}={value!r} is not valid: it accepts") and accepts in str(caught.value)


# -- the outbox ---------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _outbox(path, clock=None, **kw) -> ob.Outbox:
    return ob.Outbox(path, clock=clock or Clock(), **kw)


def test_an_accepted_instance_survives_a_crash_and_is_pending_after_the_restart(tmp_path):
    box = _outbox(tmp_path)
    box.accept("1.2.3.1", "1.2.840.10008.5.1.4.1.1.1", b"instance one")
    box.accept("1.2.3.2", "1.2.840.10008.5.1.4.1.1.1", b"instance two")
    (second,) = [e for e in box.pending() if e.sop_instance_uid == "1.2.3.2"]
    box.screened(second, b"the SR", "2.25.99")
    # no close: the process dies here; another connection (the restarted process) sees every committed write
    reopened = _outbox(tmp_path)
    pending = reopened.pending()
    assert [(e.sop_instance_uid, e.state) for e in pending] == [("1.2.3.1", "received"), ("1.2.3.2", "screened")]
    assert reopened.data(pending[0]) == b"instance one" and reopened.result(pending[1]) == [b"the SR"]
    assert [e.sop_instance_uid for e in reopened.due()] == ["1.2.3.1", "1.2.3.2"]
    reopened.close()
    box.close()


def test_a_re_send_replaces_its_entry_and_work_on_the_old_copy_finishes_nothing(tmp_path):
    box = _outbox(tmp_path)
    box.accept("1.2.3.1", "cls", b"first copy")
    old = box.get("1.2.3.1")
    box.accept("1.2.3.1", "cls", b"second copy")
    assert len(box.pending()) == 1 and box.counts() == {"received": 1}
    new = box.get("1.2.3.1")
    assert new.generation == old.generation + 1 and box.data(new) == b"second copy"
    assert box.data(old) is None and not box.screened(old, b"SR of the old copy", "2.25.1")  # a stale worker
    assert box.get("1.2.3.1").state == "received"
    # a re-send after it was stored starts it over: screened again, its result (same UIDs) replaces the first
    assert box.screened(new, b"SR", "2.25.1") and box.stored(box.get("1.2.3.1"))
    box.accept("1.2.3.1", "cls", b"third copy")
    assert [(e.state, e.attempts) for e in box.pending()] == [("received", 0)]
    with contextlib.closing(sqlite3.connect(box.path)) as db:
        assert db.execute("SELECT COUNT(*) FROM entries").fetchone() == (1,)
    box.close()


def test_store_back_failures_wait_with_exponential_backoff(tmp_path):
    clock = Clock()
    box = _outbox(tmp_path, clock, retry_s=5.0, retry_max_s=60.0)
    assert [box.backoff(n) for n in range(1, 7)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    box.accept("1.2.3.1", "cls", b"x")
    box.screened(box.get("1.2.3.1"), b"SR", "2.25.1")
    waits = []
    for attempt in range(1, 5):
        entry = box.get("1.2.3.1")
        waits.append(box.store_failed(entry))
        entry = box.get("1.2.3.1")
        assert (entry.state, entry.attempts, entry.next_try) == ("waiting", attempt, clock.now + waits[-1])
        assert box.due() == [] and box.pending() == [entry]  # waiting: pending, not due
        clock.now = entry.next_try
        assert box.due() == [entry]
    assert waits == [5.0, 10.0, 20.0, 40.0]
    assert box.stored(box.get("1.2.3.1")) and box.pending() == []
    box.close()


def test_finished_entries_are_purged_of_the_instance_at_once_and_deleted_after_the_retention(tmp_path):
    clock = Clock()
    box = _outbox(tmp_path, clock, retention_s=3600)
    for n, finish in enumerate(("stored", "skipped", "failed")):
        uid = f"1.2.3.{n}"
        box.accept(uid, "cls", b"PIXELS AND " + PATIENT_ID.encode())
        entry = box.get(uid)
        if finish == "stored":
            box.screened(entry, b"SR WITH " + PATIENT_ID.encode(), "2.25.1")
            box.stored(box.get(uid))
        elif finish == "skipped":
            box.skipped(entry, "body_part")
        else:
            box.failed(entry, "content")
    with contextlib.closing(sqlite3.connect(box.path)) as db:
        assert db.execute("SELECT COUNT(*) FROM entries WHERE data IS NOT NULL OR result IS NOT NULL").fetchone() == (0,)
        assert db.execute("SELECT state, reason FROM entries ORDER BY sop_instance_uid").fetchall() == [
            ("stored", ""), ("skipped", "body_part"), ("failed", "content")]
    assert box.pending() == [] and box.oldest_pending_age() == 0.0
    clock.now += 3599
    assert box.expire() == 0
    clock.now += 2
    assert box.expire() == 3 and box.counts() == {}
    box.close()
    # SQLite keeps deleted pages: after the checkpoint the identifier is nowhere in the files (secure_delete)
    for path in tmp_path.iterdir():
        assert PATIENT_ID.encode() not in path.read_bytes(), path.name


def test_outbox_files_are_private_and_hold_no_identifier_outside_the_instance_bytes(tmp_path):
    directory = tmp_path / "outbox"
    box = _outbox(directory)
    data = source("RG3_J2KR")
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    box.accept(str(ds.SOPInstanceUID), str(ds.SOPClassUID), data)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    files = sorted(p.name for p in directory.iterdir())
    assert files == ["outbox.sqlite3", "outbox.sqlite3-shm", "outbox.sqlite3-wal"]  # WAL
    for name in files:
        assert stat.S_IMODE(os.stat(directory / name).st_mode) == 0o600, name
    with contextlib.closing(sqlite3.connect(box.path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        columns = [c[1] for c in db.execute("PRAGMA table_info(entries)")]
        row = db.execute(f"SELECT {', '.join(c for c in columns if c not in ('data', 'result'))} FROM entries").fetchone()
    said = " ".join(str(v) for v in row)
    for secret in (PATIENT_ID, *PATIENT_NAME.split("^"), str(ds.get("AccessionNumber", "")) or PATIENT_ID):
        assert secret not in said
    assert str(ds.SOPInstanceUID) in said
    box.close()
