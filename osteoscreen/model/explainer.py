"""The model side of an explanation: one forward pass that keeps the activation maps the served
features pool over, TreeSHAP on the served forest, and the exact spread of one onto the other
(`osteoscreen.explain.attribution` says why it is exact).

Built from a loaded bundle and sharing its extractor's layers (no second copy of the weights); its own
Keras model, so it can run on its own thread beside the screening batcher without sharing a predict
function with it. When the bundle serves on OpenVINO, the forest reads the OpenVINO features (what Predict
answers from) and the Keras maps only spread each feature's SHAP value over the image, so the map still sums
exactly to the answer it explains.
"""

from __future__ import annotations

import numpy as np

from osteoscreen.explain.attribution import Explanation, ForestShap, forest_and_calibrator, spread
from osteoscreen.model.bundle import ModelBundle


class Explainer:
    def __init__(self, bundle: ModelBundle) -> None:
        import keras

        self.bundle = bundle
        forest, self._calibrated = forest_and_calibrator(bundle.classifier)
        self.shap = ForestShap(forest)
        extractor = bundle.extractor
        # A pooling layer's input is the activation map it reduces; its output, the feature the forest sees.
        self.features = list(bundle.features)
        outputs = [extractor.get_layer(name).input for name in self.features]
        outputs += [extractor.get_layer(name).output for name in self.features]
        self._maps = keras.Model(extractor.inputs[0], outputs, name="explainer_maps")

    def explain(self, image: np.ndarray) -> Explanation:
        """(224, 224, 1) or (1, 224, 224, 1) model input -> its Explanation."""
        batch = np.asarray(image, dtype=np.float32).reshape(1, *np.shape(image)[-3:])
        out = [np.asarray(a, dtype=np.float32) for a in self._maps.predict_on_batch(batch)]
        n = len(self.features)
        maps = {name: out[i][0] for i, name in enumerate(self.features)}
        if self.bundle.runner is None:
            pooled = np.concatenate([out[n + i] for i in range(n)], axis=1)
        else:  # served on OpenVINO: its features, so the explanation's answer is Predict's; Keras's maps only share out
            pooled = self.bundle.features_of(batch)  # each feature's SHAP value over the image (any map does)
        phi, forest_output = self.shap(pooled)
        attribution = spread(phi[0], self.features, maps)
        probability = float(self.bundle.classifier.predict_proba(pooled)[0, 1])
        check = self.bundle.content_check
        content_score = float(check.scores(pooled)[0]) if check is not None else float("nan")
        return Explanation(attribution.astype(np.float32), probability, float(forest_output[0]),
                           self.shap.expected_value, content_score)
