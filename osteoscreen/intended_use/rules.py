"""What the model is for, as data: the header values a DICOM input may carry, and the patient ages the
training data covered. Stored in the model card (`intended_use`), so the rules travel with the model that
they describe and serving needs no configuration of its own.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

# CR and DX are the digital radiography modalities; RG (conventional film/screen radiography) is a digitised
# lateral spine film, the same projection radiograph. Everything else (CT, MR, US, NM, MG, XA, RF, PX, OT...)
# is not a projection radiograph of the kind the model saw.
MODALITIES = ("CR", "DX", "RG")
# DICOM PS3.16 CID 4031 defined terms that contain the lumbar spine, plus the free-text spellings sites use
# (compared with spaces, dashes and case removed).
BODY_PARTS = ("LSPINE", "LSSPINE", "TLSPINE", "SPINE", "LUMBARSPINE", "LUMBAR", "LUMBOSACRALSPINE",
              "THORACOLUMBARSPINE")
# ViewPosition defined terms for a lateral projection (PS3.3 C.8.11.5), and free text.
VIEWS = ("LL", "RL", "LATERAL", "LAT", "LEFTLATERAL", "RIGHTLATERAL")
# The population osteoporosis screening addresses (adults 50 and over), used when the training data records no
# ages; `osteoscreen train` replaces it with the ages of the training patients when the manifest has them.
DEFAULT_AGE_YEARS = (50.0, 110.0)
DEFAULT_AGE_SOURCE = "declared screening population (the training manifest records no ages)"


def normalise(value: str) -> str:
    """'L-Spine ' and 'LSPINE' are one value: upper case, letters and digits only."""
    return re.sub(r"[^A-Z0-9]", "", str(value).upper())


@dataclass(frozen=True)
class IntendedUse:
    modalities: tuple[str, ...] = MODALITIES
    body_parts: tuple[str, ...] = BODY_PARTS
    views: tuple[str, ...] = VIEWS
    age_years: tuple[float, float] = DEFAULT_AGE_YEARS
    age_source: str = DEFAULT_AGE_SOURCE
    # the content check: its refusal edge on the out-of-distribution score, the acceptance it was chosen for,
    # and the edge of the borderline band below it (answered, flagged "unusual image"); a model card from before
    # the two bands has no flag edge and refuses above `content_cutoff` as it always did
    content_cutoff: float | None = None
    content_acceptance: float | None = None
    content_flag_cutoff: float | None = None
    extra: dict = field(default_factory=dict)  # what the card says beyond these (method, counts), kept as is

    def to_dict(self) -> dict:
        out = asdict(self)
        extra = out.pop("extra")
        return {**extra, **{k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}}

    @classmethod
    def from_dict(cls, card: dict | None) -> IntendedUse:
        """From a model card's `intended_use` (None: a model trained before the checks existed)."""
        card = dict(card or {})
        known = {k: card.pop(k) for k in list(card) if k in cls.__dataclass_fields__ and k != "extra"}
        for key in ("modalities", "body_parts", "views"):
            if key in known:
                known[key] = tuple(known[key])
        if "age_years" in known:
            lo, hi = known["age_years"]
            known["age_years"] = (float(lo), float(hi))
        return cls(**known, extra=card)
