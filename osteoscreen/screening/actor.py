"""The model stage: a Ray actor that loads the bundle once and screens batches of model inputs.

Every row of a batch leaves as a row of the results table (`schema.SCHEMA`): pending ones with the
probability, label and the content check's verdict (an image the content check rejects is excluded, with
`content` among its findings, and gets no probability, as the service would refuse it); excluded and failed
ones as they came, stamped with the model they were not screened by.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa

from osteoscreen.results import assemble
from osteoscreen.screening import metrics
from osteoscreen.screening.schema import COLUMNS, EXCLUDED, PENDING, PIXELS, SCHEMA, SCREENED
from osteoscreen.types import INPUT_SIZE


class Screener:
    def __init__(self, tag: str, precision: str | None = None, cpus: float = 1.0, last: bool = True) -> None:
        """`last`: no stage changes a row's status after this one (no store-back), so it counts the rows done."""
        from osteoscreen.model import bundle
        from osteoscreen.model.threads import limit_threads

        limit_threads(threads_for(cpus))  # TensorFlow's pools sized to the actor's CPUs, as the model service's are
        self.bundle = bundle.load(tag, precision=precision)
        self.info, self.rules = self.bundle.info, self.bundle.intended_use
        self.last = last

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        batch = batch.copy()
        pending = np.flatnonzero((batch["status"] == PENDING).to_numpy())
        batch["probability"], batch["label"] = np.nan, None
        batch["findings"] = [list(f) if f is not None else [] for f in batch["findings"]]
        if len(pending):
            images = np.stack([np.frombuffer(batch[PIXELS].iat[i], np.float32).reshape(INPUT_SIZE, INPUT_SIZE, 1)
                               for i in pending])
            started = time.perf_counter()
            probabilities, scores = self.bundle.assess(images)
            metrics.count_model(len(pending), time.perf_counter() - started)
            for i, p, score in zip(pending, probabilities.tolist(), scores.tolist(), strict=True):
                prediction = assemble(p, score, (), self.info, self.rules)
                if prediction.findings:  # the content check: not a lumbar radiograph the model can read
                    checks = [f.check for f in prediction.findings]
                    batch.iat[i, batch.columns.get_loc("status")] = EXCLUDED
                    batch.iat[i, batch.columns.get_loc("reason")] = ",".join(checks)
                    batch.iat[i, batch.columns.get_loc("findings")] = checks
                else:
                    batch.iat[i, batch.columns.get_loc("status")] = SCREENED
                    batch.iat[i, batch.columns.get_loc("probability")] = prediction.probability
                    batch.iat[i, batch.columns.get_loc("label")] = prediction.label
        batch["threshold"], batch["model"] = self.info.threshold, self.bundle.tag
        batch["precision"], batch["time"] = self.bundle.precision, datetime.now(timezone.utc)
        if self.last:
            metrics.count_rows(zip(batch["status"], batch["reason"], strict=True))
        return as_results(batch)


def threads_for(cpus: float) -> int:
    return max(1, round(cpus))


def as_results(frame: pd.DataFrame) -> pa.Table:
    """The frame's result columns in the table's exact types (every Parquet file of a run then shares one
    schema, whatever mix of statuses a block held)."""
    frame = frame.astype({"probability": "float64"})  # NaN: null, as from_pandas reads it
    return pa.Table.from_pandas(frame[list(COLUMNS)], schema=SCHEMA, preserve_index=False)
