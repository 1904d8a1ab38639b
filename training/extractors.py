"""One training run's extractor in every runtime and precision: the Keras one built from the reference weights,
the OpenVINO one converted from it once, and its int8 form calibrated once on the training split's original
images. Once, because the forest is fitted on one of them and the bundle stores exactly that one: a second
calibration would give other quantisation parameters and other features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from osteoscreen.model import precision as precision_mod
from osteoscreen.model.precision import Combo
from osteoscreen.model.specs import BackboneSpec

from training.feature_cache import FeatureCache


class Extractors:
    def __init__(self, reference: Any, spec: BackboneSpec, weights_id: str, calibration: Sequence[np.ndarray],
                 calibration_keys: Sequence[str]):
        self.reference, self.spec, self.weights_id = reference, spec, weights_id
        self._calibration = list(calibration)
        # int8 features depend on the images NNCF calibrated on: their cache entries must too
        self.calibration_id = hashlib.sha256("\n".join(calibration_keys).encode()).hexdigest()[:16]
        self._openvino: dict[str, Any] = {}  # "float32" | "int8" -> ov.Model with every candidate feature

    def keras(self, features: list[str] | None = None):
        """The float32 Keras extractor (what the bundle stores; TensorFlow applies bfloat16 on load)."""
        from osteoscreen.model import backbones

        return backbones.extractor_from(self.reference, self.spec, features)

    def openvino(self, precision: str) -> Any:
        """The OpenVINO model, all candidate features: float32 (bfloat16 compiles it too) or int8."""
        from osteoscreen.model import openvino_runtime

        kind = precision_mod.INT8 if precision == precision_mod.INT8 else precision_mod.FLOAT32
        if kind not in self._openvino:
            if kind == precision_mod.INT8:
                self._openvino[kind] = openvino_runtime.quantize(self.openvino(precision_mod.FLOAT32),
                                                                 self._calibration)
            else:
                self._openvino[kind] = openvino_runtime.convert(self.keras())
        return self._openvino[kind]

    def runner(self, combo: Combo, features: list[str] | None = None):
        """What computes `combo`'s features (`predict_on_batch` -> {name: (N, C)}), cut to `features`."""
        if combo.runtime == precision_mod.TENSORFLOW:
            from osteoscreen.model import backbones

            return backbones.with_precision(self.keras(features), combo.precision)
        from osteoscreen.model import openvino_runtime

        model = self.openvino(combo.precision)
        if features:
            model = openvino_runtime.only(model, features)
        return openvino_runtime.OpenVINOExtractor(model, combo.precision)

    def cache(self, combo: Combo) -> FeatureCache:
        variant = self.calibration_id if combo.precision == precision_mod.INT8 else None
        return FeatureCache(self.spec.name, self.weights_id, combo.precision, runtime=combo.runtime, variant=variant)

    def to_store(self, features: list[str]) -> dict[str, Any]:
        """The OpenVINO models the bundle stores, cut to the forest's features; only those converted in this run
        (OpenVINO installed), int8 only when it was calibrated (it is, whenever its agreement was checked)."""
        from osteoscreen.model import openvino_runtime

        return {kind: openvino_runtime.only(model, features) for kind, model in self._openvino.items()}
