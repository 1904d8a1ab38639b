"""The content check: how far an image's features lie from the training images', learned with the model.

Score: the squared Mahalanobis distance of the classifier's own features (the backbone's pooled activations)
to the training features, divided by their dimension, so that a typical training image scores about 1
(Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples"). The features are
standardised (no feature's scale below the median feature's) and the covariance is Ledoit-Wolf shrunk
(scikit-learn), because a few hundred training images cannot estimate a 512 x 512 covariance on their own.
It needs no labels and no examples of what to refuse, and it is computed from the features the forest
already needs: no extra network pass.

Two edges split the scores into three bands (`policy.content_band`): up to the flag edge an image is typical;
between the edges it is answered with a caution ("unusual image: check the view and the exposure"), since a
good film lands there now and then and so does a rotated or oddly exposed one; above the refusal edge it is
refused. Both are chosen when the model is trained (`ContentCheck.fit`, `choose_refusal`) and stored with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.preprocessing import StandardScaler

DEFAULT_ACCEPTANCE = 0.99  # the flag edge: typical films answered without a caution
# the refusal edge's in-distribution bound: by the validation fit, one typical film in 2000 scores above it. The
# target is at most 0.5% of good films refused; the fit on a few dozen validation images underestimates the
# tail (a 0.99 cut-off accepted 95-99% of unseen phantoms), hence the tenfold margin
REFUSE_ACCEPTANCE = 0.9995
METHOD = "Mahalanobis distance (squared, per feature) to the training features; standardised, Ledoit-Wolf covariance"


@dataclass
class ContentCheck:
    scaler: StandardScaler
    covariance: LedoitWolf
    cutoff: float  # the refusal edge (in checks pickled before the two bands: the one cut-off, also refusing)
    acceptance: float  # what the flag edge (before the two bands: the cut-off) was chosen to accept
    n_fit: int
    n_calibration: int
    # class attributes for checks pickled before the two bands, so that they load and refuse as they did
    flag_cutoff: float | None = None
    doubtful_median: float | None = None  # the median score of the doubtful examples the refusal edge saw
    n_doubtful: int = 0

    @classmethod
    def fit(cls, train: np.ndarray, validation: np.ndarray, acceptance: float = DEFAULT_ACCEPTANCE,
            doubtful: np.ndarray | None = None) -> ContentCheck:
        """Fit on the training features; choose the edges on the validation features and on `doubtful`, the
        features of images that are not what the model is for but come closest (validation films rotated or
        cropped: what a site's own data gives without collecting foreign images)."""
        if not 0.5 < acceptance < REFUSE_ACCEPTANCE:
            raise ValueError(f"acceptance must be in (0.5, {REFUSE_ACCEPTANCE}), got {acceptance}")
        train = np.asarray(train, dtype=np.float64)
        scaler = StandardScaler().fit(train)
        # No feature's scale below the median feature's: a feature nearly constant over a few dozen training
        # images would otherwise be divided by almost nothing, and any new image that moves it at all (the
        # phantom's collimated margins did) would score far outside while looking like every other one.
        scaler.scale_ = np.maximum(scaler.scale_, np.median(scaler.scale_))
        covariance = LedoitWolf().fit(scaler.transform(train))
        check = cls(scaler, covariance, math.inf, acceptance, len(train), len(validation))
        typical = check.scores(validation)
        check.flag_cutoff = choose_cutoff(typical, acceptance)
        odd = check.scores(doubtful) if doubtful is not None and len(doubtful) else None
        check.cutoff = choose_refusal(typical, odd)
        check.doubtful_median = None if odd is None else float(np.median(odd))
        check.n_doubtful = 0 if odd is None else len(odd)
        return check

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N,) scores; about 1 for training images, larger the less alike."""
        z = self.scaler.transform(np.asarray(features, dtype=np.float64))
        return (self.covariance.mahalanobis(z) / z.shape[1]).astype(np.float32)

    def card(self) -> dict:
        """What the model card says about the check (`content_cutoff` is the refusal edge, as it always was)."""
        card = {"content_method": METHOD, "content_cutoff": float(self.cutoff),
                "content_acceptance": float(self.acceptance), "content_n_fit": int(self.n_fit),
                "content_n_calibration": int(self.n_calibration)}
        if self.flag_cutoff is not None:
            card.update(content_flag_cutoff=float(self.flag_cutoff), content_refuse_acceptance=REFUSE_ACCEPTANCE,
                        content_n_doubtful=int(self.n_doubtful), content_doubtful_median=self.doubtful_median)
        return card


def choose_refusal(typical: np.ndarray, doubtful: np.ndarray | None) -> float:
    """The refusal edge: never below the score only one typical film in 2000 exceeds (`REFUSE_ACCEPTANCE` by
    the validation fit, `choose_cutoff`), and, where doubtful examples score above that, halfway (on the log
    scale, as the scores spread) between it and their median. Measured on the test suite's model: unseen
    phantoms at most 5.0, rotated and cropped validation films 3.2-31 (median 10): the edge 7.3 keeps every
    good film while most crops are refused and the rest, like most rotations, are answered with the caution.
    Doubtful examples below the bound (bands that overlap) cannot pull the edge down: refusing good films is
    the failure this edge exists to keep rare."""
    bound = choose_cutoff(typical, REFUSE_ACCEPTANCE)
    if doubtful is None or not len(doubtful):
        return bound
    middle = float(np.median(np.asarray(doubtful, dtype=np.float64)))
    return max(bound, math.sqrt(bound * middle)) if middle > 0 else bound


def choose_cutoff(scores: np.ndarray, acceptance: float) -> float:
    """The score below which `acceptance` of in-distribution images fall, from validation scores.

    With a few dozen validation images the empirical quantile at 0.99 is just their maximum, and a new image
    exceeds the maximum of n with probability 1/(n+1): 9% for n = 10. So the cut-off is the larger of the
    empirical quantile and the same quantile of a log-normal fitted to the scores (distances are positive and
    right-skewed; the fit extrapolates past the largest one seen). With enough validation images both agree.
    """
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores) & (scores > 0)]
    if len(scores) < 3:
        raise ValueError(f"{len(scores)} validation scores: too few to choose a content cut-off")
    from scipy.stats import norm

    logs = np.log(scores)
    fitted = float(np.exp(logs.mean() + norm.ppf(acceptance) * logs.std(ddof=1)))
    return max(float(np.quantile(scores, acceptance)), fitted)
