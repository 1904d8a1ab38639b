"""The PACS node's durable outbox: every instance it accepted, from received to stored back, in SQLite.

One row per accepted instance, keyed by its SOP Instance UID, so a re-sent image replaces its row instead of
adding one (and, with the deterministic result UIDs of `osteoscreen.dicom_results.identity`, its result replaces
its result in the PACS). The node answers C-STORE success only after `accept` has committed (WAL,
synchronous=FULL), so a crash before that makes the sender retry, and after a restart `pending()` returns every
row not finished.

States:
  received  -> screened (the SR is held, waiting to be stored back)  -> stored
            -> skipped  (an intended-use header check failed: acknowledged, never screened; reason = the check)
            -> failed   (decode failure or content-check refusal: no SR; reason says which)
  screened  -> waiting  (the destination failed: `attempts`, `next_try` with exponential backoff) -> stored

PHI: the columns hold UIDs, states, reasons (check names, error kinds), counts and times only; the patient data
is in the instance bytes (`data`) and the SR (`result`), and both are purged when the row finishes (stored,
skipped, failed). Finished rows are deleted after the retention. The database file (and SQLite's -wal and -shm
files, which take its mode) is created 0600, in a directory created 0700.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from osteoscreen import settings

FILE_NAME = "outbox.sqlite3"
RECEIVED, SCREENED, WAITING, STORED, SKIPPED, FAILED = "received", "screened", "waiting", "stored", "skipped", "failed"
PENDING = (RECEIVED, SCREENED, WAITING)
FINISHED = (STORED, SKIPPED, FAILED)
STATES = PENDING + FINISHED

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    generation INTEGER NOT NULL,      -- +1 per re-send: work on an older copy does not finish the new one
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',  -- a check name or an error kind, never an input value
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    result_uid TEXT NOT NULL DEFAULT '',
    data BLOB,                        -- the instance as received (Part 10); NULL once finished
    result BLOB,                      -- the SR to store back (Part 10); NULL once finished
    overlay BLOB                      -- the overlay Secondary Capture the SR references, when asked for; idem
);
CREATE INDEX IF NOT EXISTS entries_state ON entries (state, next_try);
"""


@dataclass(frozen=True)
class Entry:
    sop_instance_uid: str
    sop_class_uid: str
    generation: int
    state: str
    reason: str
    attempts: int
    next_try: float
    received_at: float
    updated_at: float
    result_uid: str


_COLUMNS = "sop_instance_uid, sop_class_uid, generation, state, reason, attempts, next_try, received_at, " \
           "updated_at, result_uid"


class Outbox:
    """Thread-safe (one connection behind a lock: the listener's association threads write, the worker reads
    and updates). `clock` is wall-clock seconds (times survive a restart)."""

    def __init__(self, directory: Path, retention_s: float = 7 * 86400.0, retry_s: float = 5.0,
                 retry_max_s: float = 300.0, clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.retention_s, self.retry_s, self.retry_max_s = retention_s, retry_s, retry_max_s
        self._clock = clock
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = self.directory / FILE_NAME
        # create the file 0600 before SQLite opens it; SQLite gives its -wal and -shm files the same mode
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed accept survives power loss, not just a crash
        self._db.execute("PRAGMA secure_delete=ON")  # a purged instance's pages are zeroed, not left in free pages
        self._db.executescript(_SCHEMA)

    @classmethod
    def from_settings(cls, s: settings.Settings) -> Outbox:
        return cls(s.outbox_path, s.outbox_retention_s, s.results_retry_s, s.results_retry_max_s)

    def close(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()

    def _write(self, sql: str, args: tuple) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- intake ------------------------------------------------------------------------------------------

    def accept(self, sop_instance_uid: str, sop_class_uid: str, data: bytes) -> None:
        """Hold a received instance (committed when this returns). A re-send replaces the row: the new bytes,
        back to `received`, attempts reset."""
        now = self._clock()
        self._write(
            "INSERT INTO entries (sop_instance_uid, sop_class_uid, generation, state, received_at, updated_at, data) "
            "VALUES (?, ?, 1, ?, ?, ?, ?) ON CONFLICT (sop_instance_uid) DO UPDATE SET "
            "sop_class_uid = excluded.sop_class_uid, generation = entries.generation + 1, state = excluded.state, "
            "reason = '', attempts = 0, next_try = 0, received_at = excluded.received_at, "
            "updated_at = excluded.updated_at, result_uid = '', data = excluded.data, result = NULL, overlay = NULL",
            (sop_instance_uid, sop_class_uid, RECEIVED, now, now, data))

    # -- reading -----------------------------------------------------------------------------------------

    def get(self, sop_instance_uid: str) -> Entry | None:
        rows = self._rows(f"SELECT {_COLUMNS} FROM entries WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return Entry(*rows[0]) if rows else None

    def pending(self) -> list[Entry]:
        """Every entry not finished (received, screened, waiting), oldest first."""
        marks = ",".join("?" * len(PENDING))
        return [Entry(*r) for r in self._rows(
            f"SELECT {_COLUMNS} FROM entries WHERE state IN ({marks}) ORDER BY received_at", PENDING)]

    def due(self, now: float | None = None) -> list[Entry]:
        """Pending entries whose work can start now: received ones, and results whose next try has come."""
        now = self._clock() if now is None else now
        return [e for e in self.pending() if e.state == RECEIVED or e.next_try <= now]

    def data(self, entry: Entry) -> bytes | None:
        """The received instance of this generation of the entry (None: re-sent since, or finished)."""
        rows = self._rows("SELECT data FROM entries WHERE sop_instance_uid = ? AND generation = ?",
                          (entry.sop_instance_uid, entry.generation))
        return rows[0][0] if rows else None

    def result(self, entry: Entry) -> list[bytes] | None:
        """The instances to store back, in order: the overlay (when there is one) before the SR that references it,
        so the PACS never holds an SR pointing at an image it lacks. None: re-sent since, or finished."""
        rows = self._rows("SELECT overlay, result FROM entries WHERE sop_instance_uid = ? AND generation = ?",
                          (entry.sop_instance_uid, entry.generation))
        if not rows or rows[0][1] is None:
            return None
        return [part for part in rows[0] if part is not None]

    def counts(self) -> dict[str, int]:
        return dict(self._rows("SELECT state, COUNT(*) FROM entries GROUP BY state"))

    def oldest_pending_age(self, now: float | None = None) -> float:
        """Seconds the oldest unfinished entry has waited (0 when none): what the outbox alert watches."""
        now = self._clock() if now is None else now
        marks = ",".join("?" * len(PENDING))
        (oldest,), = self._rows(f"SELECT MIN(received_at) FROM entries WHERE state IN ({marks})", PENDING)
        return 0.0 if oldest is None else max(0.0, now - oldest)

    # -- transitions (each applies to the generation the worker read; False: re-sent meanwhile) ---------------

    def _move(self, entry: Entry, sets: str, args: tuple) -> bool:
        return self._write(f"UPDATE entries SET {sets}, updated_at = ? WHERE sop_instance_uid = ? AND generation = ?",
                           (*args, self._clock(), entry.sop_instance_uid, entry.generation)) == 1

    def screened(self, entry: Entry, result: bytes, result_uid: str, overlay: bytes | None = None) -> bool:
        """The SR (and its overlay) is built: hold it until it is stored back (the instance too, until then)."""
        return self._move(entry, "state = ?, result = ?, overlay = ?, result_uid = ?, next_try = 0",
                          (SCREENED, result, overlay, result_uid))

    def skipped(self, entry: Entry, check: str) -> bool:
        """Outside the intended use by its header (`check`: modality, body_part, view, patient_age): not screened."""
        return self._move(entry, "state = ?, reason = ?, data = NULL, result = NULL, overlay = NULL", (SKIPPED, check))

    def failed(self, entry: Entry, reason: str) -> bool:
        """No result can be made (`reason`: content, invalid_input, internal): recorded, the image purged."""
        return self._move(entry, "state = ?, reason = ?, data = NULL, result = NULL, overlay = NULL", (FAILED, reason))

    def store_failed(self, entry: Entry, reason: str = "destination") -> float:
        """Storing the result back failed: wait (exponential backoff) and try again. Returns the delay."""
        attempts = entry.attempts + 1
        delay = self.backoff(attempts)
        self._move(entry, "state = ?, reason = ?, attempts = ?, next_try = ?",
                   (WAITING, reason, attempts, self._clock() + delay))
        return delay

    def backoff(self, attempts: int) -> float:
        """Seconds before try `attempts + 1`: retry_s, doubling per attempt, at most retry_max_s."""
        return min(self.retry_max_s, self.retry_s * 2.0 ** max(0, attempts - 1))

    def stored(self, entry: Entry) -> bool:
        """Stored back: finished; the instance and the SR are purged (the UIDs and state stay for the retention)."""
        return self._move(entry, "state = ?, reason = '', data = NULL, result = NULL, overlay = NULL", (STORED,))

    def expire(self, now: float | None = None) -> int:
        """Delete finished rows older than the retention; returns how many."""
        now = self._clock() if now is None else now
        marks = ",".join("?" * len(FINISHED))
        deleted = self._write(f"DELETE FROM entries WHERE state IN ({marks}) AND updated_at < ?",
                              (*FINISHED, now - self.retention_s))
        with self._lock:  # the WAL still holds purged pages' old images: fold it into the (zeroed) file, empty it
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted
