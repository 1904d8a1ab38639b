"""The content check: how far an image's features lie from the training images', learned with the model.

Score: the squared Mahalanobis distance of the classifier's own features (the backbone's pooled activations)
to the training features, divided by their dimension, so that a typical training image scores about 1
(Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples"). The features are
standardised (no feature's scale below the median feature's) and the covariance is Ledoit-Wolf shrunk
(scikit-learn), because a few hundred training images cannot estimate a 512 x 512 covariance on their own.
It needs no labels and no examples of what to refuse, and it is computed from the features the forest
already needs: no extra network pass.

The cut-off is chosen on the validation split (images the check was not fitted on) for a stated share of
in-distribution images to accept; `choose_cutoff` says how.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.preprocessing import StandardScaler

DEFAULT_ACCEPTANCE = 0.99
METHOD = "Mahalanobis distance (squared, per feature) to the training features; standardised, Ledoit-Wolf covariance"


@dataclass
class ContentCheck:
    scaler: StandardScaler
    covariance: LedoitWolf
    cutoff: float
    acceptance: float
    n_fit: int
    n_calibration: int

    @classmethod
    def fit(cls, train: np.ndarray, validation: np.ndarray, acceptance: float = DEFAULT_ACCEPTANCE) -> ContentCheck:
        """Fit on the training features; choose the cut-off on the validation features."""
        if not 0.5 < acceptance < 1.0:
            raise ValueError(f"acceptance must be in (0.5, 1), got {acceptance}")
        train = np.asarray(train, dtype=np.float64)
        scaler = StandardScaler().fit(train)
        # No feature's scale below the median feature's: a feature nearly constant over a few dozen training
        # images would otherwise be divided by almost nothing, and any new image that moves it at all (the
        # phantom's collimated margins did) would score far outside while looking like every other one.
        scaler.scale_ = np.maximum(scaler.scale_, np.median(scaler.scale_))
        covariance = LedoitWolf().fit(scaler.transform(train))
        check = cls(scaler, covariance, math.inf, acceptance, len(train), len(validation))
        check.cutoff = choose_cutoff(check.scores(validation), acceptance)
        return check

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N,) scores; about 1 for training images, larger the less alike."""
        z = self.scaler.transform(np.asarray(features, dtype=np.float64))
        return (self.covariance.mahalanobis(z) / z.shape[1]).astype(np.float32)

    def card(self) -> dict:
        """What the model card says about the check."""
        return {"content_method": METHOD, "content_cutoff": float(self.cutoff),
                "content_acceptance": float(self.acceptance), "content_n_fit": int(self.n_fit),
                "content_n_calibration": int(self.n_calibration)}


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
