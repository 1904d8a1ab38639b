"""`osteoscreen compare`: the seed's table (every backbone + RF on one split) for the caller's data.

Choosing a backbone from test scores would be selection on the test split, so the rows are compared on
the validation split, the backbone with the best validation AUC is chosen, and only it is scored on the
test split, once; the others say so instead of showing test numbers. A backbone whose ImageNet weights
cannot be had is listed as unavailable (not run, with the reason), never run with random weights in
disguise; VGG16 with random weights is an explicit ablation row (validation only, never a candidate), to
show what the pretrained features contribute. Each ImageNet row names the release its weights are
(`WeightsInfo.release`): InceptionV3's offline weights are Google's 2015 release, not Keras's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from osteoscreen.errors import WeightsError
from osteoscreen.model import weights
from osteoscreen.model.specs import BACKBONE_NAMES

from training import dataset, evaluate
from training.train import Outcome, evaluate_backbone, load, make_split, score_test

# The seed project's reported numbers (percent), for side-by-side reading; its data set is unnamed.
SEED_REPORTED = {"vgg16": "95 / 95.95 / 90.95", "resnet50": "87 / 88.86 / -", "inceptionv3": "89 / 89.89 / -"}


NOT_CHOSEN = "not scored: not chosen"
TEST_METRICS = ("accuracy", "f1", "auc", "sensitivity", "specificity")


def _cell(metrics: dict, name: str) -> str:
    lo, hi = metrics["ci95"][name]
    return f"{metrics[name]:.3f} ({lo:.2f}-{hi:.2f})"


def validation_auc(outcome: Outcome, seed: int = 0) -> tuple[float, float, float]:
    """Validation AUC with its patient-bootstrap 95% interval: what the rows are compared on."""
    m = outcome.metrics
    lo, hi = evaluate.bootstrap_ci(outcome.y_val, outcome.p_val, m["threshold"], outcome.groups_val, seed=seed)["auc"]
    return m["val_auc"], lo, hi


def not_run_reason(exc: WeightsError) -> str:
    """The table cell's short reason; the full message went to stderr."""
    text = str(exc)
    if "no offline package ships them" in text:
        return "no offline source of ImageNet weights"
    return text.split("; ")[0].split(". ")[0][:160]


def release(backbone: str) -> str:
    """Which ImageNet weights a row used, as their JSON records it ("ImageNet" for Keras's own release)."""
    try:
        return weights.load_info(backbone).release
    except WeightsError:
        return "ImageNet"


def choose(outcomes: dict[tuple[str, bool], Outcome]) -> tuple[str, bool] | None:
    """The ImageNet backbone with the best validation AUC; the random-weights ablation is never a candidate."""
    candidates = [key for key in outcomes if not key[1]]
    return max(candidates, key=lambda key: outcomes[key].metrics["val_auc"]) if candidates else None


def run(data_dir: Path, reports: Path = Path("reports"), seed: int = 0, precision: str | None = None) -> str:
    data = load(data_dir)
    split = make_split(data, seed=seed)
    outcomes: dict[tuple[str, bool], Outcome] = {}
    unavailable: dict[str, str] = {}
    for backbone, random_weights in [(name, False) for name in BACKBONE_NAMES] + [("vgg16", True)]:
        try:
            outcomes[(backbone, random_weights)] = evaluate_backbone(data, split, backbone, random_weights=random_weights,
                                                                     seed=seed, precision=precision,
                                                                     runtime="tensorflow")  # every backbone alike
        except WeightsError as exc:
            print(f"{backbone}: {exc}", file=sys.stderr)
            unavailable[backbone] = not_run_reason(exc)
    chosen = choose(outcomes)
    if chosen is not None:
        score_test(outcomes[chosen], seed=seed)  # the test split's one use
    header = ("| model | weights | validation AUC | test accuracy | test F1 | test AUC | test sensitivity | "
              "test specificity | threshold | seed reported (acc / F1 / AUC %) |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for backbone, random_weights in [(name, False) for name in BACKBONE_NAMES] + [("vgg16", True)]:
        seed_cell = "-" if random_weights else SEED_REPORTED[backbone]
        if backbone in unavailable and not random_weights:
            rows.append(f"| {backbone} + RF | unavailable, not run: {unavailable[backbone]} "
                        f"(`osteoscreen weights --backbone {backbone} --from FILE` with Keras's file) | - | - | - | - | "
                        f"- | - | - | {seed_cell} |")
            continue
        outcome = outcomes.get((backbone, random_weights))
        if outcome is None:
            continue
        m = outcome.metrics
        auc, lo, hi = validation_auc(outcome, seed)
        label = "random (ablation)" if random_weights else release(backbone)
        if (backbone, random_weights) == chosen:
            label += ", **chosen**"
            cells = " | ".join(_cell(m, k) for k in TEST_METRICS)
        else:
            cells = " | ".join([NOT_CHOSEN] * len(TEST_METRICS))
        rows.append(f"| {backbone} + RF | {label} | {auc:.3f} ({lo:.2f}-{hi:.2f}) | {cells} | {m['threshold']:.3f} | "
                    f"{seed_cell} |")
    balance = {part: dataset.class_balance(data.samples, getattr(split, part)) for part in ("train", "val", "test")}
    table = (f"# Backbone comparison on `{data_dir}`\n\nOne patient-grouped split for every row: {balance}. "
             "Rows are compared on the validation split (AUC, patient-bootstrap 95% CI); the ImageNet backbone with "
             "the best validation AUC is chosen and only it is scored on the test split, once (value, patient-bootstrap "
             "95% CI). The random-weights row is an ablation, never a candidate.\n\n" + header + "\n" + "\n".join(rows) + "\n")
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "compare.md").write_text(table)
    return table
