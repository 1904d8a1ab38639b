"""Which of a cohort's images the model's intended use covers, by the same checks serving applies (the DICOM
header rules of the model card, the content score against its cut-off). A site's validation then measures
the images the service would screen, and counts the ones it would refuse: a high refusal rate is itself a
finding (another scanner, view or population than the model was trained on)."""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np

from osteoscreen.errors import DataError
from osteoscreen.intended_use.header import header_findings
from osteoscreen.intended_use.policy import content_finding
from osteoscreen.types import Finding

from training.site.cohort import Cohort


def findings(model, cohort: Cohort, features: np.ndarray) -> list[tuple[Finding, ...]]:
    """Per image, the intended-use checks it fails (empty: screened as usual)."""
    rules = model.intended_use
    scores = (model.content_check.scores(features) if model.content_check is not None
              else np.full(len(features), np.nan))  # no content check: every image fails it, as in serving
    out = []
    for sample, score in zip(cohort.samples, scores.tolist(), strict=True):
        found = header_findings(sample.path.read_bytes(), None, rules)
        content = content_finding(float(score), rules.content_cutoff)
        out.append(tuple(found + ([content] if content else [])))
    return out


def summary(cohort: Cohort, found: list[tuple[Finding, ...]], force: bool) -> dict:
    """What the record says: how many images were outside, by the first check each failed, and which."""
    outside = [i for i, f in enumerate(found) if f]
    return {
        "policy": "force: every image evaluated (research use)" if force
                  else "refuse: images outside the intended use are left out, as serving would refuse them",
        "checked": len(found),
        "outside": len(outside),
        "by_check": dict(Counter(found[i][0].check for i in outside)),
        "files": [{"path": str(cohort.samples[i].path), "checks": [f.check for f in found[i]]} for i in outside],
    }


def in_use(model, cohort: Cohort, features: np.ndarray, force: bool) -> tuple[Cohort, np.ndarray, dict]:
    """The images serving would screen, their features, and the record of what was left out (`summary`);
    `force` keeps every image (research use). Said on stderr; a DataError when too little is left to measure."""
    found = findings(model, cohort, features)
    record = summary(cohort, found, force)
    keep = list(range(len(found))) if force else [i for i, f in enumerate(found) if not f]
    if record["outside"]:
        print(f"{record['outside']} of {len(found)} images are outside the model's intended use "
              f"({record['by_check']}); " + ("kept anyway (--force)" if force else "left out (--force keeps them)"),
              file=sys.stderr)
    if len(set(cohort.y[keep].tolist())) < 2:
        raise DataError(f"after leaving out the {record['outside']} images outside the model's intended use "
                        f"({record['by_check']}), both classes are needed; the model was not trained for these "
                        "images (use --force for research use)")
    return cohort.subset(keep), features[keep], record
