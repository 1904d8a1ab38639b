"""Store-back (`--results-to dicom://AET@host:port`, or a DICOMweb root `https://host/path`): the SR of every screened DICOM instance, built and sent as
the DICOM node sends its own (`dicom_results.sr`, `serving.dicom.scu`).

The SR's UIDs derive from the source's SOP Instance UID and the model version (`dicom_results.identity`), so an
instance screened twice (a rerun after a kill, a Ray task retry) replaces its SR in the PACS instead of filing a
second one: the PACS holds one SR per screened instance. The stage runs before the write, so a row in the
results means its SR was stored, or the row says why not (status failed, reason store-back).
"""

from __future__ import annotations

import time

import pandas as pd
import pyarrow as pa
import pydicom

from osteoscreen.dicom_results import sr
from osteoscreen.dicom_results.identity import Algorithm
from osteoscreen.screening import dicomweb, metrics
from osteoscreen.screening.actor import as_results
from osteoscreen.screening.schema import FAILED, SCREENED
from osteoscreen.screening.sources import open_input
from osteoscreen.serving.dicom.scu import StoreError, open_destination
from osteoscreen.settings import Destination
from osteoscreen.types import Prediction

ATTEMPTS = 3  # a PACS restarting between two stores costs a retry, not a row


class StoreBack:
    def __init__(self, destination: Destination, ae_title: str, algorithm: Algorithm,
                 rate: float | None = None) -> None:
        self.destination = open_destination(destination, ae_title)
        self.algorithm, self.rate = algorithm, rate  # rate: a DICOMweb source's request limit, for the metadata

    def __call__(self, batch: pa.Table) -> pa.Table:
        frame = batch.to_pandas(date_as_object=True)
        for i in range(len(frame)):
            row = frame.iloc[i]
            if row["status"] != SCREENED or "." not in str(row["id"]):  # a UID: DICOM; a sha256 has no dots
                continue
            error = self._store(row)
            if error:
                frame.iat[i, frame.columns.get_loc("status")] = FAILED
                frame.iat[i, frame.columns.get_loc("reason")] = f"store-back: {error}"
        metrics.count_rows(zip(frame["status"], frame["reason"], strict=True))  # the last stage: rows are done
        return as_results(frame)

    def _store(self, row: pd.Series) -> str | None:
        try:
            if dicomweb.is_dicomweb(row["source"]):
                header = dicomweb.metadata(row["source"], self.rate)
            else:
                with open_input(row["source"]) as fh:
                    header = pydicom.dcmread(fh, stop_before_pixels=True)
            name, _, version = str(row["model"]).partition(":")
            prediction = Prediction(float(row["probability"]), str(row["label"]), float(row["threshold"]), name,
                                    version)
            results = sr.to_results(header, prediction, self.algorithm)
        except Exception as exc:  # noqa: BLE001 - this instance's failure, recorded on its row
            return f"the SR could not be built ({type(exc).__name__})"
        for attempt in range(ATTEMPTS):
            try:
                self.destination.store(results.sr)
                return None
            except StoreError as exc:
                if attempt == ATTEMPTS - 1:
                    return str(exc)
                time.sleep(0.5 * 2 ** attempt)
        return None
