"""What the content check's two bands do with a registered model: unseen in-distribution phantoms against the
inputs it must refuse (tag-stripped chest and tibia films, MR and ultrasound, photographs) and the doubtful
ones (phantoms rotated, cropped, flipped).

    python -m training.content_bands --model osteoscreen:TAG --unseen DIR [DIR...] [--out FILE.json]

Each `--unseen` folder is a phantom set the model never saw (`osteoscreen synth --seed S` with S not the
training seed). Prints one markdown table (per input kind: count, median and range of the score, how many
were answered, answered with the "unusual image" flag, refused) under the model's stored band edges, and
writes every score to --out, so that another rule for the edges can be tried on the same scores. Needs the
test extras (pydicom-data's films, matplotlib's sample pictures).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from osteoscreen.imaging.decode import decode_image, to_model_input
from osteoscreen.intended_use.policy import content_band
from training.doubtful import DOUBTFUL, FLIPS

BATCH = 16


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    **{f"phantom {name}": t for name, t in DOUBTFUL.items()}, **{f"phantom {name}": t for name, t in FLIPS.items()}}


def _foreign() -> dict[str, list[np.ndarray]]:
    """Real inputs the model must refuse, as pixels (their DICOM headers would refuse them first; here only the
    content check sees them, as if every tag had been removed)."""
    from matplotlib import cbook
    from pydicom.data import get_testdata_file

    def dicom(name: str) -> np.ndarray:
        return decode_image(Path(get_testdata_file(name)).read_bytes())

    def sample(name: str) -> np.ndarray:
        return decode_image(Path(cbook.get_sample_data(name, asfileobj=False)).read_bytes())

    return {"chest PA and tibia AP films (pydicom-data RG1, RG3), tags removed": [dicom("RG1_UNCR.dcm"),
                                                                                 dicom("RG3_UNCR.dcm")],
            "MR and ultrasound slices (MR2, US1)": [dicom("MR2_UNCR.dcm"), dicom("US1_UNCR.dcm")],
            "a photograph and a logo (matplotlib samples)": [sample("grace_hopper.jpg"), sample("logo2.png")]}


def _png_round_trip(gray: np.ndarray) -> np.ndarray:
    """As a client would send a transformed film: an 8-bit PNG, decoded by the server's own decoder."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return decode_image(buf.getvalue())


def scores_of(model, images: list[np.ndarray]) -> np.ndarray:
    out = []
    for start in range(0, len(images), BATCH):
        batch = np.stack([to_model_input(g) for g in images[start:start + BATCH]])
        out.append(model.assess(batch)[1])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def measure(model, unseen: list[Path], transformed: int = 20) -> dict[str, list[float]]:
    """Input kind -> content scores."""
    groups: dict[str, list[float]] = {}
    first: list[np.ndarray] = []
    for folder in unseen:
        files = sorted(folder.glob("*/*.png"))
        images = [decode_image(p.read_bytes()) for p in files]
        first = first or images[::max(1, len(images) // transformed)][:transformed]
        groups[f"unseen phantoms ({folder.name})"] = scores_of(model, images).tolist()
        print(f"{folder}: {len(files)} scored", file=sys.stderr)
    for name, transform in TRANSFORMS.items():
        groups[name] = scores_of(model, [_png_round_trip(np.ascontiguousarray(transform(g))) for g in first]).tolist()
    for name, images in _foreign().items():
        groups[name] = scores_of(model, images).tolist()
    return groups


def table(groups: dict[str, list[float]], flag_cutoff: float | None, refuse_cutoff: float) -> str:
    edges = (f"flag above {flag_cutoff:.2f}, " if flag_cutoff is not None else "no flag band, ") + \
        f"refuse above {refuse_cutoff:.2f}"
    lines = [f"| input | n | content score: median (range) | answered | answered, flagged unusual | refused ({edges}) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, values in groups.items():
        bands = [content_band(v, flag_cutoff, refuse_cutoff) for v in values]
        lines.append(f"| {name} | {len(values)} | {np.median(values):.2f} ({min(values):.2f}-{max(values):.2f}) | "
                     f"{bands.count('typical')} | {bands.count('unusual')} | {bands.count('outside')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="registered model tag (default: the latest)")
    parser.add_argument("--unseen", type=Path, nargs="+", required=True, help="phantom folders the model never saw")
    parser.add_argument("--out", type=Path, default=None, help="write every score here (JSON)")
    args = parser.parse_args(argv)
    from osteoscreen.model import bundle as bundle_mod

    model = bundle_mod.load(args.model)
    rules = model.intended_use
    groups = measure(model, args.unseen)
    if args.out:
        args.out.write_text(json.dumps({"model": f"{model.name}:{model.version}", "flag_cutoff": rules.content_flag_cutoff,
                                        "refuse_cutoff": rules.content_cutoff, "scores": groups}, indent=1))
    print(table(groups, rules.content_flag_cutoff, rules.content_cutoff))
    unseen = [v for name, values in groups.items() if name.startswith("unseen") for v in values]
    refused = sum(content_band(v, rules.content_flag_cutoff, rules.content_cutoff) == "outside" for v in unseen)
    print(f"\nunseen phantoms refused: {refused} of {len(unseen)} ({refused / max(1, len(unseen)):.2%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
