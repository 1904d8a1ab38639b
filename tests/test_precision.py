"""Extractor compute precision: selection (flag, environment, auto on given hardware), the numerics gate,
feature cache keys, and bfloat16 features against float32 ones on phantom images."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from osteoscreen.cli import build_parser
from osteoscreen.model import precision as P
from osteoscreen.settings import SettingsError
from training.feature_cache import FeatureCache

REPO = Path(__file__).resolve().parents[1]


def hw(flags=(), amx=True, onednn=True, gpus=(), machine="x86_64") -> P.Hardware:
    return P.Hardware(frozenset(flags), amx, onednn, tuple(gpus), machine)


# ---- selection ---------------------------------------------------------------------------------------------------

F32_CARD = {"runtime": "tensorflow", "precision": "float32"}  # a forest fitted on the reference, nothing gated yet


def _card(trained: str = "tensorflow/float32", **checks: tuple[float, float]) -> dict:
    """A model card whose forest was fitted on `trained` features, with a gate record per other combination:
    `openvino_int8=(max_dp, agreement)`."""
    combo = P.Combo.parse(trained)
    return {"runtime": combo.runtime, "precision": combo.precision,
            "precision_check": {"trained": trained, "rule": P.RULE, "combinations": {
                key.replace("_", "/"): _record(*figures) for key, figures in checks.items()}}}


def test_no_flag_no_env_means_auto(monkeypatch):
    monkeypatch.delenv(P.ENV, raising=False)
    monkeypatch.delenv(P.RUNTIME_ENV, raising=False)
    assert P.requested() == "auto" and P.requested_runtime() == "auto"
    card = _card(tensorflow_bfloat16=(0.0, 1.0))
    assert P.select(card, hardware=hw(["avx512_bf16"]), openvino=False).combo.key == "tensorflow/bfloat16"
    assert P.select(card, hardware=hw([]), openvino=False).combo.key == "tensorflow/float32"


def test_env_and_flag(monkeypatch):
    card = _card(tensorflow_bfloat16=(0.0, 1.0), openvino_float32=(0.0, 1.0), openvino_int8=(0.0, 1.0))
    monkeypatch.setenv(P.ENV, "float32")
    # forced by the environment, whatever the hardware; TensorFlow first among float32 runtimes (the reference)
    assert P.select(card, hardware=hw(["amx_bf16"]), openvino=True).combo.key == "tensorflow/float32"
    monkeypatch.setenv(P.RUNTIME_ENV, " OpenVINO ")
    assert P.requested_runtime() == "openvino"
    assert P.select(card, hardware=hw([]), openvino=True).combo.key == "openvino/float32"
    # the flags win over the environment
    assert P.select(card, "tensorflow", "bfloat16", hardware=hw([]), openvino=True).combo.key == "tensorflow/bfloat16"
    assert P.select(card, "auto", "int8", hardware=hw([]), openvino=True).combo.key == "openvino/int8"
    monkeypatch.setenv(P.ENV, " BFloat16 ")
    assert P.requested() == "bfloat16"


@pytest.mark.parametrize("value", ["fp16", "bf16", "float64", "yes"])
def test_bad_precisions_are_clear_errors(monkeypatch, value):
    monkeypatch.setenv(P.ENV, value)
    with pytest.raises(SettingsError, match=rf"OSTEOSCREEN_PRECISION='{value}' is not valid: it accepts auto or "
                                             "float32 or bfloat16 or int8"):
        P.select(F32_CARD, hardware=hw(["avx512_bf16"]), openvino=True)
    with pytest.raises(P.PrecisionError, match=r"--precision must be one of"):
        P.requested(value)


@pytest.mark.parametrize("value", ["onnx", "tf", "torch", "1"])
def test_bad_runtimes_are_clear_errors(monkeypatch, value):
    monkeypatch.setenv(P.RUNTIME_ENV, value)
    with pytest.raises(SettingsError, match=rf"OSTEOSCREEN_RUNTIME='{value}' is not valid: it accepts auto or "
                                             "tensorflow or openvino"):
        P.select(F32_CARD, hardware=hw([]), openvino=True)
    with pytest.raises(P.PrecisionError, match=r"--runtime must be one of auto, tensorflow, openvino, not"):
        P.requested_runtime(value)


def test_int8_on_tensorflow_is_a_clear_error():
    with pytest.raises(P.PrecisionError, match="int8 runs on OpenVINO only"):
        P.select(F32_CARD, "tensorflow", "int8", hardware=hw(["avx512_vnni"]), openvino=True)
    with pytest.raises(P.PrecisionError, match="int8 runs on OpenVINO only"):
        P.training_choice("tensorflow", "int8", hardware=hw(["avx512_vnni"]), openvino=True)


def test_openvino_missing():
    # asked for: a clear error, before any model is loaded
    with pytest.raises(P.RuntimeUnavailableError, match="runtime openvino was asked for but OpenVINO is not installed"):
        P.select(F32_CARD, "openvino", None, hardware=hw(["avx512_vnni"]), openvino=False)
    with pytest.raises(P.RuntimeUnavailableError, match="not installed"):
        P.select(F32_CARD, "auto", "int8", hardware=hw(["avx512_vnni"]), openvino=False)
    # auto: TensorFlow, and the reason says why OpenVINO was not considered (the start-up log line)
    card = _card(openvino_int8=(0.0, 1.0), tensorflow_bfloat16=(0.0, 1.0))
    chosen = P.select(card, hardware=hw(["avx512_bf16", "avx512_vnni"]), openvino=False)
    assert chosen.combo.key == "tensorflow/bfloat16" and "openvino/int8 skipped: OpenVINO is not installed" in chosen.reason
    # a forest fitted on OpenVINO features, OpenVINO gone, nothing else passing: an error, never other features
    with pytest.raises(P.RuntimeUnavailableError, match="fitted on openvino/int8 features but OpenVINO is not installed"):
        P.select(_card("openvino/int8", tensorflow_float32=(0.08, 0.95)), hardware=hw([]), openvino=False)


def test_the_installed_openvino_is_detected():
    assert P.openvino_installed() == (importlib.util.find_spec("openvino") is not None)


@pytest.mark.parametrize("hardware, expected, why", [
    (hw(["amx_bf16", "amx_tile"]), "bfloat16", "AMX"),
    (hw(["amx_bf16"], amx=False), "float32", "refused this process AMX"),
    (hw(["amx_bf16", "avx512_bf16"], amx=False), "bfloat16", "AVX512_BF16"),
    (hw(["avx512_bf16"]), "bfloat16", "AVX512_BF16"),
    (hw(["avx512f", "avx512_vnni"]), "float32", "emulated"),
    (hw(["avx512_bf16"], onednn=False), "float32", "TF_ENABLE_ONEDNN_OPTS=0"),
    (hw(["avx512_bf16"], machine="aarch64"), "float32", "aarch64"),
    (hw([], gpus=[(8, 0)]), "bfloat16", "compute capability 8.0"),
    (hw(["avx512_bf16"], gpus=[(7, 5)]), "float32", "7.5 has no bfloat16"),  # the GPU runs the model, not the CPU
    (hw([], gpus=[(7, 0), (9, 0)]), "bfloat16", "9.0"),
])
def test_tensorflow_auto_follows_the_hardware(hardware, expected, why):
    combo, reason = P.training_choice("tensorflow", "auto", hardware=hardware, openvino=True)
    assert combo == P.Combo("tensorflow", expected) and why in reason


@pytest.mark.parametrize("hardware, expected", [
    (hw(["avx512_bf16", "avx512_vnni"]), "openvino/int8"),  # the EPYC of the issue
    (hw(["amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni"]), "openvino/int8"),
    (hw(["avx_vnni"]), "openvino/int8"),
    (hw(["amx_int8"], amx=False), "tensorflow/float32"),  # AMX refused, no VNNI: int8 would gain little
    (hw(["avx512_bf16"]), "tensorflow/bfloat16"),  # no VNNI: bfloat16, TensorFlow first among equals
    (hw(["avx512_bf16"], onednn=False), "openvino/bfloat16"),  # TF without oneDNN emulates; OpenVINO has its own
    (hw(["avx512_bf16", "avx512_vnni"], gpus=[(8, 0)]), "tensorflow/bfloat16"),  # the GPU, not OpenVINO's CPU plugin
    (hw(["avx512_vnni"], machine="aarch64"), "tensorflow/float32"),
])
def test_auto_picks_the_fastest_native_combination(hardware, expected):
    assert P.training_choice(None, None, hardware=hardware, openvino=True)[0].key == expected


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert P.cpu_flags(info) == {"fpu", "sse2", "avx512_bf16", "amx_tile"}
    assert P.cpu_flags(tmp_path / "missing") == frozenset()


def test_cli_flags_present_absent_and_bad(capsys):
    parser = build_parser()
    for command in (["train", "--data", "d"], ["compare", "--data", "d"], ["predict", "f.png"]):
        assert parser.parse_args(command).precision is None  # absent: the environment or auto decides
        assert parser.parse_args([*command, "--precision", "bfloat16"]).precision == "bfloat16"
        assert parser.parse_args([*command, "--precision", "int8"]).precision == "int8"
    for command in (["train", "--data", "d"], ["predict", "f.png"], ["bench"]):
        assert parser.parse_args(command).runtime is None
        assert parser.parse_args([*command, "--runtime", "openvino"]).runtime == "openvino"
    for command in (["predict", "f.png"], ["bench"]):
        assert parser.parse_args(command).force_precision is False
        assert parser.parse_args([*command, "--force-precision"]).force_precision is True
    assert parser.parse_args(["bench"]).precision is None
    assert parser.parse_args(["bench", "--precision", "float32", "auto"]).precision == ["float32", "auto"]
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d", "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "f.png", "--runtime", "onnx"])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err


def test_cli_int8_on_tensorflow_is_one_error_line(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "OSTEOSCREEN_RUNTIME": "tensorflow"}
    result = subprocess.run([sys.executable, "-m", "osteoscreen.cli", "predict", "--precision", "int8", "x.png"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "osteoscreen predict: error: precision int8 runs on OpenVINO only" in result.stderr


# ---- the gate ----------------------------------------------------------------------------------------------------

def _record(max_dp: float, agreement: float) -> dict:
    validation = {"n": 80, "max_abs_dp": max_dp, "mean_abs_dp": max_dp / 4, "label_agreement": agreement,
                  "labels_changed": round((1 - agreement) * 80), "auc": {}}
    return P.check(validation)


def test_gate_thresholds():
    assert _record(0.02, 1.0)["passed"]
    assert not _record(0.021, 1.0)["passed"]
    assert not _record(0.001, 79 / 80)["passed"]  # one label changed is one too many


def test_gate_serves_another_combination_only_when_its_record_passes():
    epyc = hw(["avx512_bf16", "avx512_vnni"])
    passing = _card(openvino_int8=(0.01, 1.0))
    assert P.select(passing, hardware=epyc, openvino=True).combo.key == "openvino/int8"
    # int8 refused: the next fastest whose record passes, and the reason names what was refused and why
    chosen = P.select(_card(openvino_int8=(0.05, 1.0), tensorflow_bfloat16=(0.01, 1.0)), hardware=epyc, openvino=True)
    assert chosen.combo.key == "tensorflow/bfloat16" and not chosen.forced
    # nothing passes: the forest's own combination
    chosen = P.select(_card(openvino_int8=(0.05, 1.0), tensorflow_bfloat16=(0.001, 0.9)), hardware=epyc, openvino=True)
    assert chosen.combo.key == "tensorflow/float32" and "fails the gate" in chosen.reason and "0.0500" in chosen.reason
    chosen = P.select(F32_CARD, "auto", "int8", hardware=epyc, openvino=True)  # bundles without a record
    assert chosen.combo.key == "tensorflow/float32" and "records no agreement check" in chosen.reason
    # an explicit request does not bypass the gate either...
    assert P.select(_card(openvino_int8=(0.3, 0.5)), "openvino", "int8", hardware=epyc,
                    openvino=True).combo.key == "tensorflow/float32"
    # ...only --force-precision does, marked
    forced = P.select(_card(openvino_int8=(0.3, 0.5)), "openvino", "int8", force=True, hardware=epyc, openvino=True)
    assert forced.combo.key == "openvino/int8" and forced.forced and "FORCED" in forced.reason
    # forcing changes nothing where the gate lets the combination through
    assert not P.select(passing, force=True, hardware=epyc, openvino=True).forced
    # a forest fitted on int8 needs no check to be served on int8; float32 asked for and refused: int8
    trained_int8 = _card("openvino/int8", tensorflow_float32=(0.09, 0.95))
    assert P.select(trained_int8, hardware=epyc, openvino=True).combo.key == "openvino/int8"
    assert P.select(trained_int8, None, "float32", hardware=epyc, openvino=True).combo.key == "openvino/int8"


def test_cards_of_the_two_precision_era_still_gate():
    old = {"precision": "bfloat16", "precision_check": {"trained": "bfloat16", "other": "float32", "passed": False,
                                                         "validation": {"max_abs_dp": 0.087, "label_agreement": 1.0}}}
    assert P.fitted_on(old) == P.Combo("tensorflow", "bfloat16")
    assert P.select(old, None, "float32", hardware=hw([]), openvino=True).combo.key == "tensorflow/bfloat16"
    old["precision_check"]["passed"] = True
    assert P.select(old, None, "float32", hardware=hw([]), openvino=True).combo.key == "tensorflow/float32"


def test_agreement_figures():
    y = np.array([0, 0, 1, 1])
    a = P.agreement([0.1, 0.4, 0.6, 0.9], [0.1, 0.52, 0.6, 0.88], y, threshold=0.5, trained="openvino/int8",
                    other="tensorflow/float32")
    assert a["max_abs_dp"] == pytest.approx(0.12) and a["labels_changed"] == 1 and a["label_agreement"] == 0.75
    assert a["auc"] == {"openvino/int8": 1.0, "tensorflow/float32": 1.0}


# ---- feature cache -----------------------------------------------------------------------------------------------

def test_feature_cache_keys_include_runtime_precision_and_calibration(tmp_path):
    caches = [FeatureCache("vgg16", "abc", "float32", tmp_path), FeatureCache("vgg16", "abc", "bfloat16", tmp_path),
              FeatureCache("vgg16", "abc", "float32", tmp_path, runtime="openvino"),
              FeatureCache("vgg16", "abc", "int8", tmp_path, runtime="openvino", variant="calib-a"),
              FeatureCache("vgg16", "abc", "int8", tmp_path, runtime="openvino", variant="calib-b")]
    assert len({cache.dir for cache in caches}) == len(caches)
    caches[0].put("ff00", {"block4_avg": np.ones(3, np.float32)})
    assert all(cache.get("ff00") is None for cache in caches[1:])
    assert caches[0].get("ff00")["block4_avg"].tolist() == [1, 1, 1]


# ---- bundles served through the gate (fresh processes: BentoML reads BENTOML_HOME once) --------------------------

def _serve_tiny_bundle(record_json: str) -> None:
    """Register a small real extractor (random weights) + forest with a given precision record, then load it the
    way serving does, with $OSTEOSCREEN_PRECISION=bfloat16, and print what precision it runs in."""
    import keras
    from sklearn.ensemble import RandomForestClassifier

    from osteoscreen.model import bundle
    from osteoscreen.model.backbones import build_extractor

    keras.utils.set_random_seed(0)
    extractor = build_extractor("vgg16", weights=None, features=["block3_avg"])
    rng = np.random.default_rng(0)
    forest = RandomForestClassifier(n_estimators=10, random_state=0).fit(rng.normal(size=(20, 256)), [0, 1] * 10)
    record = json.loads(record_json)
    tag = bundle.register(bundle.ModelBundle(extractor, forest, ["block3_avg"], 0.5, "vgg16",
                                             metadata={"precision": "float32", "runtime": "tensorflow",
                                                       "precision_check": {"trained": "tensorflow/float32",
                                                                           "combinations": {"tensorflow/bfloat16": record}}}))
    loaded = bundle.load(tag)
    compute = {layer.dtype_policy.name for layer in loaded.extractor.layers[2].layers}
    x = rng.uniform(0, 255, (2, 224, 224, 1)).astype(np.float32)
    features = loaded.features_of(x)
    print(json.dumps({"precision": loaded.precision, "reason": loaded.precision_reason, "policies": sorted(compute),
                      "features_dtype": str(features.dtype),
                      "summary": {k: v for k, v in bundle.find_model(tag).info.metadata.items() if "precision" in k or k.startswith("gate")}}))


def _in_fresh_process(record: dict, tmp_path: Path) -> dict:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "OSTEOSCREEN_PRECISION": "bfloat16", "TF_CPP_MIN_LOG_LEVEL": "2"}
    code = f"import tests.test_precision as t; t._serve_tiny_bundle({json.dumps(json.dumps(record))})"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_bundle_whose_check_fails_is_served_in_its_own_precision(tmp_path):
    served = _in_fresh_process(_record(0.08, 0.95), tmp_path)
    assert served["precision"] == "float32" and "fails the gate" in served["reason"]
    assert served["policies"] == ["float32"] and served["features_dtype"] == "float32"
    assert served["summary"]["precision"] == "float32" and served["summary"]["gate_tensorflow_bfloat16_passed"] is False
    # `bentoml models get` shows the table
    assert served["summary"]["gate_tensorflow_bfloat16_validation_max_abs_dp"] == 0.08


def test_a_bundle_whose_check_passes_is_served_in_bfloat16(tmp_path):
    served = _in_fresh_process(_record(0.004, 1.0), tmp_path)
    assert served["precision"] == "bfloat16" and "gate passed" in served["reason"]
    assert "mixed_bfloat16" in served["policies"] and served["features_dtype"] == "float32"


# ---- bfloat16 features against float32 ones, real ImageNet weights, phantom radiographs --------------------------

# Measured on 8 phantom radiographs (seed 5) on an AVX512_BF16 CPU: relative L2 error per image of the block3..block5
# avg/max features between 0.0015 and 0.0045 (largest: block5_max). The bound is ~3x that, room for other CPUs'
# bfloat16 kernels (summation order), and still an order of magnitude below a feature set that is really off.
FEATURE_REL_TOLERANCE = 0.015


def test_bfloat16_features_are_close_to_float32_on_phantoms(use_keras_home, tmp_path):
    from training import phantom
    from osteoscreen.imaging.decode import load_image
    from osteoscreen.model.backbones import build_extractor, with_precision

    phantom.generate_dataset(tmp_path / "set", n=4, seed=5)
    x = np.stack([load_image(p.read_bytes()) for p in sorted((tmp_path / "set").rglob("*.png"))])
    f32 = build_extractor("vgg16")
    bf16 = with_precision(f32, "bfloat16")
    a, b = f32.predict_on_batch(x), bf16.predict_on_batch(x)
    assert sorted(a) == sorted(b)
    for name in a:
        assert b[name].dtype == np.float32, name  # features leave as float32 whatever the compute precision
        rel = np.linalg.norm(a[name] - b[name], axis=1) / np.linalg.norm(a[name], axis=1)
        assert rel.max() <= FEATURE_REL_TOLERANCE, (name, rel)
        assert rel.max() > 0, name  # bfloat16 really computed: identical features would mean float32 ran twice
