"""DICOM results on disk (`osteoscreen predict FILE.dcm --dicom-out DIR`): one file per instance, named by the
SR's SOP Instance UID, which identifies the result without carrying anything about the patient."""

from __future__ import annotations

from pathlib import Path

from osteoscreen.types import DicomResults


def write(results: DicomResults, out_dir: Path) -> list[Path]:
    """Write the SR and its result images into `out_dir` (created if needed); returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    uid = results.sr_sop_instance_uid
    paths = [out_dir / f"SR_{uid}.dcm"] + [out_dir / f"SR_{uid}_image{k}.dcm" for k in range(len(results.images))]
    for path, data in zip(paths, (results.sr, *results.images), strict=True):
        path.write_bytes(data)
    return paths
