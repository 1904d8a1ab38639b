"""`osteoscreen compare`: the seed's table (every backbone + RF on one split) for the caller's data.

A backbone whose ImageNet weights cannot be had is listed as unavailable, never run with random
weights in disguise; VGG16 with random weights is added as an explicit ablation row, to show what the
pretrained features contribute.
"""

from __future__ import annotations

import sys
from pathlib import Path

from osteoscreen.errors import WeightsError
from osteoscreen.model.specs import BACKBONE_NAMES

from training import dataset
from training.train import evaluate_backbone, load

# The seed project's reported numbers (percent), for side-by-side reading; its data set is unnamed.
SEED_REPORTED = {"vgg16": "95 / 95.95 / 90.95", "resnet50": "87 / 88.86 / -", "inceptionv3": "89 / 89.89 / -"}


def _cell(metrics: dict, name: str) -> str:
    lo, hi = metrics["ci95"][name]
    return f"{metrics[name]:.3f} ({lo:.2f}-{hi:.2f})"


def run(data_dir: Path, reports: Path = Path("reports"), seed: int = 0, precision: str | None = None) -> str:
    data = load(data_dir)
    split = dataset.split(data.samples, seed=seed)
    header = ("| model | weights | accuracy | F1 | AUC | sensitivity | specificity | threshold | seed reported (acc / F1 / AUC %) |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for backbone, random_weights in [(name, False) for name in BACKBONE_NAMES] + [("vgg16", True)]:
        label = "random (ablation)" if random_weights else "ImageNet"
        try:
            m = evaluate_backbone(data, split, backbone, random_weights=random_weights, seed=seed,
                                  precision=precision).metrics
        except WeightsError as exc:
            print(f"{backbone}: {exc}", file=sys.stderr)
            rows.append(f"| {backbone} + RF | unavailable: no ImageNet weights here "
                        f"(`osteoscreen weights --backbone {backbone} --from FILE`) | - | - | - | - | - | - | "
                        f"{SEED_REPORTED[backbone]} |")
            continue
        cells = " | ".join(_cell(m, k) for k in ("accuracy", "f1", "auc", "sensitivity", "specificity"))
        seed_cell = SEED_REPORTED[backbone] if not random_weights else "-"
        rows.append(f"| {backbone} + RF | {label} | {cells} | {m['threshold']:.3f} | {seed_cell} |")
    balance = {part: dataset.class_balance(data.samples, getattr(split, part)) for part in ("train", "val", "test")}
    table = (f"# Backbone comparison on `{data_dir}`\n\nOne patient-grouped split for every row: {balance}. "
             "Cells: test value (patient-bootstrap 95% CI).\n\n" + header + "\n" + "\n".join(rows) + "\n")
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "compare.md").write_text(table)
    return table
