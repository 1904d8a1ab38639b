"""Faithfulness of the explanations on the test split of a phantom set, and what one costs.

    python -m training.faithfulness --data data/phantom --synth-seed 0 --out docs/results

Re-renders each test image's patient and view from the phantom's seed to get the vertebral-body masks
(checked pixel for pixel against the file, so a wrong seed cannot pass silently), explains the image with
the registered model, and reports (a) the share of positive attribution inside the vertebral bodies against
their share of the area and (b) the deletion test, on average and per class; plus the time per explanation
and per TreeSHAP call, and a picture of overlays of both classes. Writes `explanations.md`,
`explanations.json` and `explanations.png` under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from training import phantom
from osteoscreen.explain import faithfulness as fx
from osteoscreen.imaging.decode import decode_image, to_model_input
from osteoscreen.types import INPUT_SIZE
from training import dataset


FILLS = ("blur", "normal bone")  # the deletion test's fills: the local background, the same film at T = 0


def _masks(path: Path, rel: str, synth_seed: int, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body and trabecular masks in the model-input frame, from a re-render of the file's view, and the
    neutral fill: the model input of the same view rendered with normal bone density."""
    patient_id, view = Path(rel).stem.rsplit("_v", 1)
    sample = phantom.render_view(patient_id, int(view), synth_seed)
    if sample.image.shape != gray.shape or np.abs(sample.image - gray).max() > 1.5 / 255:
        raise SystemExit(f"{path} does not match phantom seed {synth_seed}'s render of {patient_id} view {view}: "
                         "pass the --synth-seed the set was written with")
    normal = phantom.render_view(patient_id, int(view), synth_seed, t_score=phantom.NORMAL_T).image
    return (fx.mask_to_input(sample.body_mask, INPUT_SIZE), fx.mask_to_input(sample.trabecular_mask, INPUT_SIZE),
            to_model_input(normal))


def _suffix(fill: str) -> str:
    return "" if fill == "blur" else "_" + fill.replace(" ", "_")


def fill_summary(rows: list[dict], fill: str) -> dict:
    """The deletion test with one fill over `rows`: mean movement of p, top 20% and random 20%, and the share of
    images where the top moved it more."""
    top, random = (np.array([r[f"moved_{k}{_suffix(fill)}"] for r in rows]) for k in ("top", "random"))
    return {f"moved_top{_suffix(fill)}": float(top.mean()), f"moved_random{_suffix(fill)}": float(random.mean()),
            f"top_beats_random{_suffix(fill)}": float(np.mean(top > random))}


def _tree_stats(forest) -> dict:
    depths = [e.tree_.max_depth for e in forest.estimators_]
    leaves = [e.tree_.n_leaves for e in forest.estimators_]
    return {"trees": len(depths), "mean_depth": float(np.mean(depths)), "max_depth": int(max(depths)),
            "mean_leaves": float(np.mean(leaves))}


def run(data: Path, out: Path, synth_seed: int, model_tag: str | None = None, split_seed: int = 0,
        limit: int | None = None, picture_per_class: int = 3, whole: bool = False) -> dict:
    from osteoscreen.model import bundle as bundle_mod
    from osteoscreen.model.explainer import Explainer

    model = bundle_mod.load(model_tag)
    explainer = Explainer(model)
    explainer.explain(np.zeros((INPUT_SIZE, INPUT_SIZE, 1), np.float32))  # warm-up: trace before timing
    samples = dataset.load_folder(data)
    test = (list(range(len(samples))) if whole else dataset.split(samples, seed=split_seed).test)[:limit]
    rng = np.random.default_rng(0)
    rows, shown = [], {label: [] for label in phantom.LABELS}
    for i in test:
        s = samples[i]
        gray = decode_image(s.path.read_bytes())
        bodies, trabecular, neutral = _masks(s.path, str(s.path.relative_to(data)), synth_seed, gray)
        image = to_model_input(gray)
        started = time.perf_counter()
        e = explainer.explain(image)
        seconds = time.perf_counter() - started
        d = fx.deletion(image, e, model.probabilities, rng)
        dn = fx.deletion(image, e, model.probabilities, rng, fill=neutral)
        inside, area = fx.positive_share_inside(e.attribution, bodies)
        inside_trab, area_trab = fx.positive_share_inside(e.attribution, trabecular)
        evidence_inside, _ = fx.positive_share_inside(fx.evidence(e), bodies)  # for normals: the blue part
        label = phantom.LABELS[s.label]
        rows.append({"path": str(s.path.relative_to(data)), "label": label, "probability": e.probability,
                     "seconds": seconds, "positive_in_bodies": inside, "bodies_area": area,
                     "positive_in_trabecular": inside_trab, "trabecular_area": area_trab,
                     "evidence_in_bodies": evidence_inside,
                     "brightness_outside_bodies": float(image[..., 0][~bodies].mean()),
                     "moved_top": d.moved_top, "moved_random": d.moved_random,
                     "moved_top_normal_bone": dn.moved_top, "moved_random_normal_bone": dn.moved_random})
        if len(shown[label]) < picture_per_class:
            shown[label].append((gray, e, rows[-1]))
        print(f"{len(rows)}/{len(test)} {rows[-1]['path']}: p={e.probability:.3f} in-bodies {inside:.2f} (area "
              f"{area:.2f}) moved top {d.moved_top:.3f} random {d.moved_random:.3f}; normal-bone fill top "
              f"{dn.moved_top:.3f} random {dn.moved_random:.3f}", file=sys.stderr)

    forest = explainer.shap.forest
    features = model.features_of(np.stack([to_model_input(decode_image(samples[i].path.read_bytes()))
                                           for i in test[:20]]))
    started = time.perf_counter()
    for row in features:
        explainer.shap(row[None])
    shap_seconds = (time.perf_counter() - started) / len(features)

    def summary(part: list[dict]) -> dict:
        return {"n": len(part),
                "positive_in_bodies": float(np.nanmean([r["positive_in_bodies"] for r in part])),
                "bodies_area": float(np.mean([r["bodies_area"] for r in part])),
                "positive_in_trabecular": float(np.nanmean([r["positive_in_trabecular"] for r in part])),
                "trabecular_area": float(np.mean([r["trabecular_area"] for r in part])),
                "evidence_in_bodies": float(np.nanmean([r["evidence_in_bodies"] for r in part])),
                **fill_summary(part, "blur"), **fill_summary(part, "normal bone")}

    from sklearn.metrics import roc_auc_score

    y = [r["label"] == phantom.LABELS[1] for r in rows]
    result = {
        # A shortcut check the maps called for: how well the mean model-input brightness *outside* the
        # vertebral bodies alone tells the classes apart (0.5: not at all).
        "auc_brightness_outside_bodies": float(roc_auc_score(y, [r["brightness_outside_bodies"] for r in rows]))
        if 0 < sum(y) < len(y) else float("nan"),
        "model": model.tag, "features": model.features, "forest": _tree_stats(forest),
        "seconds_per_explanation_median": float(np.median([r["seconds"] for r in rows])),
        "seconds_per_treeshap": shap_seconds,
        "all": summary(rows), **{label: summary([r for r in rows if r["label"] == label]) for label in phantom.LABELS},
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "explanations.json").write_text(json.dumps(result, indent=1))
    (out / "explanations.md").write_text(_markdown(result, data))
    _picture(shown, out / "explanations.png")
    return result


def _markdown(r: dict, data: Path) -> str:
    lines = [
        "# Explanations on the phantom's test split",
        "",
        f"Model `{r['model']}` (features {', '.join(r['features'])}; forest: {r['forest']['trees']} trees, mean depth "
        f"{r['forest']['mean_depth']:.1f}, max {r['forest']['max_depth']}, {r['forest']['mean_leaves']:.0f} leaves on "
        f"average), test split of `{data}`. Written by `python -m training.faithfulness`.",
        "",
        "| images | n | positive attribution in vertebral bodies | their area | in trabecular bone (L1-L5) | its area "
        "| evidence for the result in the bodies |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for part in ("all", *phantom.LABELS):
        s = r[part]
        lines.append(f"| {part} | {s['n']} | {s['positive_in_bodies']:.1%} | {s['bodies_area']:.1%} | "
                     f"{s['positive_in_trabecular']:.1%} | {s['trabecular_area']:.1%} | {s['evidence_in_bodies']:.1%} |")
    lines += ["", "| images | deletion fill | top 20% moves p by | random 20% moves p by | top > random |",
              "| --- | --- | --- | --- | --- |"]
    for part in ("all", *phantom.LABELS):
        s = r[part]
        for fill in FILLS:
            x = _suffix(fill)
            lines.append(f"| {part} | {fill} | {s['moved_top' + x]:.3f} | {s['moved_random' + x]:.3f} | "
                         f"{s['top_beats_random' + x]:.0%} of images |")
    lines += [
        "",
        "Shares are of the summed positive attribution (red), averaged over images (an image with no red at all "
        "is left out of that mean); *evidence for the result* is the attribution in the direction the forest "
        "went (red for an image it scored above its mean, blue below), so it covers normal images too. "
        "Deletion replaces pixels by a wide blur of the image itself (the local background), or by the same "
        "pixels of the same film rendered with normal bone density (T = 0: the neutral fill, known only for the "
        "phantom); the random 20% is drawn in 16x16 cells (the map's grain), 4 draws per image; p is the "
        "served, calibrated probability.",
        "",
        f"Cost: {r['seconds_per_explanation_median'] * 1000:.0f} ms per explanation (median; forward pass with the "
        f"maps + TreeSHAP + spreading), of which TreeSHAP {r['seconds_per_treeshap'] * 1000:.1f} ms; "
        "2-core machine shared with other work, so absolute times are noisy.",
        "",
        f"Shortcut check: the mean model-input brightness outside the vertebral bodies alone separates the "
        f"classes with AUC {r['auc_brightness_outside_bodies']:.3f} on these images (0.5 would be no signal).",
        "",
        "![overlays](explanations.png)",
        "",
    ]
    return "\n".join(lines)


def _picture(shown: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from osteoscreen.explain.overlay import colorize, display_gray

    cols = max(len(v) for v in shown.values())
    fig = Figure(figsize=(2.6 * cols, 6.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, cols, squeeze=False)
    for row, label in enumerate(phantom.LABELS):
        for col in range(cols):
            ax = axes[row][col]
            ax.set_axis_off()
            if col < len(shown[label]):
                gray, e, info = shown[label][col]
                ax.imshow(colorize(display_gray(gray, 384), e.attribution))
                share = info["positive_in_bodies"]
                red = "no red" if share != share else f"{share:.0%} of the red in the bodies"  # NaN: no red
                ax.set_title(f"{label}, p = {e.probability:.2f}\n{red}", fontsize=8)
    fig.suptitle("Explanations (red: towards osteoporosis, blue: away from it)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--synth-seed", required=True, type=int, help="the seed the phantom set was written with")
    parser.add_argument("--out", default=Path("docs/results"), type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--split-seed", type=int, default=0, help="the seed `osteoscreen train` split with")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--whole", action="store_true", help="every image of --data, not its test split (for a "
                                                              "phantom set the model never saw)")
    args = parser.parse_args(argv)
    r = run(args.data, args.out, args.synth_seed, args.model, args.split_seed, args.limit, whole=args.whole)
    print(json.dumps({k: v for k, v in r.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
