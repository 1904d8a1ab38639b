"""Resuming into the same DIR: the inputs already in DIR/results are done and are not read again.

Our own done-set, not Ray Data's checkpointing: Ray's checkpoint filter runs on the read's output, and an
input's id (its SOP Instance UID, or its sha256) is known only after the header stage has read it. The driver
knows each input's source (path or URL) before anything is read, and so does every result row: the done-set
is the sources in the results, taken off the list on the driver, so a resumed job neither re-reads done inputs
nor ships a set of millions of ids to its tasks. A Parquet
file is complete only once its footer is written, so a file a SIGKILL cut short does not read back: it is moved
aside (DIR/results-incomplete/) and its rows, never counted as done, are screened again. Rows are written only
as whole files, so every id ends up in the results exactly once.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from osteoscreen.screening.schema import SCHEMA


def result_files(results: Path) -> list[Path]:
    return sorted(results.glob("*.parquet")) if results.is_dir() else []


def read_results(results: Path) -> pa.Table:
    """Every complete results file as one table (empty, with the schema, when there are none); incomplete
    files are moved aside first."""
    tables = []
    for path in result_files(results):
        try:
            tables.append(pq.read_table(path, schema=SCHEMA))
        except (pa.ArrowInvalid, OSError):
            aside = results.parent / "results-incomplete"
            aside.mkdir(mode=0o700, exist_ok=True)
            path.rename(aside / path.name)
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def done_sources(results: Path) -> frozenset[str]:
    return frozenset(read_results(results).column("source").to_pylist())
