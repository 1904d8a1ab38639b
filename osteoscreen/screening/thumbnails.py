"""The report's thumbnails: for each flagged study, its top image (the highest probability) with the explanation
overlay (`osteoscreen.explain`: TreeSHAP spread over the backbone's maps, drawn as the HTTP /explain and the DICOM
node's Secondary Capture draw it), as a small JPEG under DIR/thumbnails/ (mode 0700: patient images).

A second, small pass after the screening, not inside the model actor, because it costs least that way:
- an explanation is a forward pass that keeps the activation maps plus TreeSHAP over the forest, several
  predictions' worth; in the actor every image over the threshold would pay it, here one image per flagged study
  does (a patient screened five times in one study gets one), and unflagged studies none;
- which image is a study's top one is known only once all of its images are screened, which may be in
  different blocks, on different actors, or in an earlier run of a resumed job;
- the actor holds the 224x224 model input, not the radiograph at its own aspect that the overlay is drawn on;
- on a cluster the actors cannot write into the driver's DIR, and a results column of image bytes would change
  the table other tools read. Here the thumbnails come back to the driver, which writes them.
It pays one re-read of the top images and one more bundle load per thumbnail actor; a rerun makes only the
thumbnails that are missing. A thumbnail that cannot be made (the source gone, an archive error) leaves its
study without one in the report and is counted (`metrics`); it never fails the job.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pandas as pd

from osteoscreen.screening import dicomweb, metrics
from osteoscreen.screening.sources import read_bytes

FOLDER = "thumbnails"
SIDE = 256  # the longer side, in pixels: enough to see where the evidence lies, small enough for a long list
QUALITY = 85
BATCH = 4  # explanations per actor call: each is one image; small batches keep the progress honest


def relative_path(image_id: str) -> str:
    """Where an image's thumbnail lives under DIR. Named by a hash of its id: a SOP Instance UID is an
    identifier, and a file name is shown in more places than the file."""
    return f"{FOLDER}/{hashlib.sha256(image_id.encode()).hexdigest()[:32]}.jpg"


def missing(flagged: pd.DataFrame, out: Path) -> pd.DataFrame:
    """The rows of `flagged` (columns id, source) whose thumbnail is not in `out` yet."""
    if flagged.empty:
        return flagged
    return flagged[[not (out / relative_path(i)).exists() for i in flagged["id"]]]


class Thumbnailer:
    """A Ray actor (or a plain object in tests): loads the bundle and its explainer once, then turns batches of
    (id, source) into (id, image, error): the JPEG bytes, or the failure's kind (no message: it could quote a
    header)."""

    def __init__(self, tag: str, cpus: float = 1.0, rate: float | None = None) -> None:
        from osteoscreen.model import bundle
        from osteoscreen.model.explainer import Explainer
        from osteoscreen.model.threads import limit_threads
        from osteoscreen.screening.actor import threads_for

        limit_threads(threads_for(cpus))
        self.explainer, self.rate = Explainer(bundle.load(tag)), rate

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        images, errors = [], []
        for source in batch["source"]:
            try:
                images.append(self.thumbnail(source))
                errors.append(None)
            except Exception as exc:  # noqa: BLE001 - one study without a thumbnail, never a failed job
                images.append(b"")
                errors.append(type(exc).__name__)
            metrics.count_thumbnail(errors[-1] is None)
        return pd.DataFrame({"id": batch["id"].to_numpy(), "image": images, "error": errors})

    def thumbnail(self, source: str) -> bytes:
        from PIL import Image

        from osteoscreen.explain.overlay import overlay_rgb
        from osteoscreen.imaging.decode import decode, to_model_input

        data = dicomweb.retrieve(source, self.rate) if dicomweb.is_dicomweb(source) else read_bytes(source)
        gray = decode(data).pixels
        explanation = self.explainer.explain(to_model_input(gray))
        buffer = io.BytesIO()
        Image.fromarray(overlay_rgb(gray, explanation.attribution, SIDE), mode="RGB").save(
            buffer, format="JPEG", quality=QUALITY)
        return buffer.getvalue()


def make(todo: pd.DataFrame, out: Path, tag: str, actors: int = 1, cpus: float = 1.0, gpus: float = 0.0,
         rate: float | None = None) -> dict:
    """The thumbnails of `todo` (id, source) into out/thumbnails/, on the Ray cluster already initialised.
    Returns {"made": n, "failed": {kind: n}}."""
    import ray

    folder = out / FOLDER
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    ds = ray.data.from_items(todo[["id", "source"]].to_dict("records"),
                             override_num_blocks=max(1, min(len(todo), 100)))
    ds = ds.map_batches(Thumbnailer, fn_constructor_kwargs={"tag": tag, "cpus": cpus, "rate": rate},
                        batch_size=BATCH, batch_format="pandas", concurrency=(1, max(1, actors)), num_cpus=cpus,
                        **({"num_gpus": gpus} if gpus else {}))
    made, failed = 0, {}
    for row in ds.iter_rows():
        if row["error"]:
            failed[row["error"]] = failed.get(row["error"], 0) + 1
            continue
        write(out / relative_path(row["id"]), row["image"])
        made += 1
    return {"made": made, "failed": failed}


def write(path: Path, data: bytes) -> None:
    """Whole or not at all (a kill mid-write leaves no half image that a rerun would take as done), owner only."""
    partial = path.with_suffix(".part")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(partial, path)
