"""What to screen, as one row per input, and the one way the stages read an input: local paths and any URL
pyarrow's file systems open (`s3://`, `gs://`, ...).

A folder is listed recursively for DICOM, PNG and JPEG files (DICOM files often have no extension, so files
without one are listed too; the content decides what they are). A manifest (CSV or Parquet) has a `path`
column, relative paths resolved against the manifest's folder; its optional `patient_id`,
`study_instance_uid` and `study_date` columns name the patient of a non-DICOM file (a DICOM header wins).
Listing happens on the driver once: Ray's own file-listing reads are slow to plan over millions of paths
(ray issue 40686), a list of strings is not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from osteoscreen.errors import DataError

EXTENSIONS = frozenset({".dcm", ".dicom", ".png", ".jpg", ".jpeg", ""})
MANIFEST_EXTENSIONS = frozenset({".csv", ".parquet"})
CARRIED = ("patient_id", "study_instance_uid", "study_date")  # manifest columns kept for non-DICOM inputs


def is_url(source: str) -> bool:
    return "://" in source


def list_inputs(source: str) -> list[dict]:
    """One dict per input: {"source": path or URL, and the manifest's CARRIED columns (None when absent)}."""
    if not is_url(source) and Path(source).is_dir():
        root = Path(source)
        paths = sorted(str(p) for p in root.rglob("*")
                       if p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith("."))
        return [{"source": p, "qido": None, **dict.fromkeys(CARRIED)} for p in paths]
    suffix = Path(source.split("?", 1)[0]).suffix.lower()
    if suffix in MANIFEST_EXTENSIONS:
        return _manifest(source, suffix)
    raise DataError(f"{source}: not a folder and not a .csv or .parquet manifest")


def _manifest(source: str, suffix: str) -> list[dict]:
    import pyarrow.csv
    import pyarrow.parquet

    try:
        with open_input(source) as fh:
            table = (pyarrow.csv.read_csv(fh, convert_options=pyarrow.csv.ConvertOptions(
                column_types={c: "string" for c in ("path", *CARRIED)})) if suffix == ".csv"
                     else pyarrow.parquet.read_table(fh))
    except OSError as exc:
        raise DataError(f"{source}: cannot read the manifest: {exc}") from None
    if "path" not in table.column_names:
        raise DataError(f"{source}: the manifest has no `path` column")
    base = "" if is_url(source) else str(Path(source).parent)
    rows = []
    for row in table.to_pylist():
        path = str(row["path"] or "").strip()
        if not path:
            continue
        if base and not is_url(path) and not Path(path).is_absolute():
            path = str(Path(base) / path)
        rows.append({"source": path, "qido": None, **{c: (str(row[c]) if row.get(c) not in (None, "") else None)
                                        for c in CARRIED}})
    return rows


@contextlib.contextmanager
def open_input(source: str) -> Iterator[IO[bytes]]:
    """A binary file object of a local path or a URL; raises OSError when it cannot be opened."""
    if not is_url(source) or source.startswith("file://"):
        with open(source.removeprefix("file://"), "rb") as fh:
            yield fh
        return
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(source)
    with filesystem.open_input_file(path) as fh:
        yield fh


def read_bytes(source: str) -> bytes:
    with open_input(source) as fh:
        return fh.read()
