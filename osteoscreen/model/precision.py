"""The extractor's runtime and compute precision: which combination to use (`OSTEOSCREEN_RUNTIME=auto|tensorflow|
openvino`, `OSTEOSCREEN_PRECISION=auto|float32|bfloat16|int8`, `--runtime`/`--precision` on the CLI), and the
numerics gate that decides whether a bundle may be served in a combination other than the one its classifier
was fitted on.

bfloat16 is worth it only where the hardware runs it natively (x86 AMX or AVX512_BF16 through oneDNN,
NVIDIA tensor cores from compute capability 8.0); elsewhere it is emulated and slower than float32, so
`auto` picks it only there. The Random Forest was fitted on features of one precision: the other one moves
every feature a little, and the gate serves it only when training measured that the screening answers on
the validation split stayed the same. int8 (OpenVINO only: NNCF post-training quantisation) is fast where the
CPU has VNNI or AMX int8. Nothing here imports TensorFlow unless a GPU must be looked at.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from osteoscreen import settings
from osteoscreen.errors import OsteoScreenError

log = logging.getLogger("osteoscreen.precision")

ENV = "OSTEOSCREEN_PRECISION"
RUNTIME_ENV = "OSTEOSCREEN_RUNTIME"
FLOAT32, BFLOAT16, INT8, AUTO = "float32", "bfloat16", "int8", "auto"
PRECISIONS = (FLOAT32, BFLOAT16, INT8)
CHOICES = (AUTO, *PRECISIONS)
TENSORFLOW, OPENVINO = "tensorflow", "openvino"
RUNTIMES = (TENSORFLOW, OPENVINO)
RUNTIME_CHOICES = (AUTO, *RUNTIMES)

# The gate. On the demo phantom (400 images, forest trained on bfloat16 features, isotonic calibration) float32
# features moved validation probabilities by 0.0025 on average but by up to 0.087 at worst (the isotonic map is a
# step function: a few trees' votes crossing a step move the answer a whole step), every validation label held,
# and on the test split (max 0.117) 2 of 80 labels flipped. The worst case, not the average, is what a patient
# sees: keep the 0.02 (a quarter of the shifts that came with flipped labels) and demand every validation
# label unchanged. Such a bundle then stays in its own precision: train in the serving hardware's precision.
MAX_PROBABILITY_DIFFERENCE = 0.02
MIN_LABEL_AGREEMENT = 1.0


class PrecisionError(OsteoScreenError, ValueError):
    """An unknown precision or runtime was asked for, or a combination no runtime has (int8 on TensorFlow)."""


class RuntimeUnavailableError(OsteoScreenError, RuntimeError):
    """The runtime asked for (or the one the bundle's forest was fitted on) is not installed here."""


def requested(value: str | None = None) -> str:
    """The precision asked for: `value` (a CLI flag) or else $OSTEOSCREEN_PRECISION, default auto."""
    if value is None:
        return settings.current().precision  # validated with the other settings
    name = (value or AUTO).strip().lower()
    if name not in CHOICES:
        raise PrecisionError(f"--precision must be one of {', '.join(CHOICES)}, not {value!r}")
    return name


def requested_runtime(value: str | None = None) -> str:
    """The runtime asked for: `value` (a CLI flag) or else $OSTEOSCREEN_RUNTIME, default auto."""
    if value is None:
        return settings.current().runtime
    name = (value or AUTO).strip().lower()
    if name not in RUNTIME_CHOICES:
        raise PrecisionError(f"--runtime must be one of {', '.join(RUNTIME_CHOICES)}, not {value!r}")
    return name


def openvino_installed() -> bool:
    """Whether OpenVINO can be imported here, without importing it (it is an optional speed-up at serving)."""
    return importlib.util.find_spec("openvino") is not None


@dataclass(frozen=True)
class Hardware:
    """What decides whether bfloat16 is fast here."""

    cpu_flags: frozenset[str]
    amx_permitted: bool  # Linux hands AMX tile state to a process only on request (arch_prctl)
    onednn: bool  # TensorFlow's bfloat16 CPU kernels are oneDNN's; TF_ENABLE_ONEDNN_OPTS=0 turns them off
    gpu_capabilities: tuple[tuple[int, int], ...]  # compute capability of each visible NVIDIA GPU
    machine: str = "x86_64"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def amx_permitted() -> bool:
    """Ask the kernel for AMX tile data, as oneDNN does: a container or old kernel may refuse it, and then
    oneDNN falls back to AVX-512 even though /proc/cpuinfo lists amx_bf16."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0
    except (OSError, AttributeError):
        return False


def gpu_capabilities() -> tuple[tuple[int, int], ...]:
    import tensorflow as tf

    found = []
    for device in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(device).get("compute_capability")
        if capability:
            found.append(tuple(int(v) for v in capability))
    return tuple(found)


def detect() -> Hardware:
    return Hardware(cpu_flags=cpu_flags(), amx_permitted=amx_permitted(),
                    onednn=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip() not in ("0", "false", "False"),
                    gpu_capabilities=gpu_capabilities(), machine=platform.machine())


def fast_bfloat16(hw: Hardware) -> tuple[bool, str]:
    """Whether bfloat16 runs natively here, and why (for the start-up log line)."""
    if hw.gpu_capabilities:  # TensorFlow puts the model on the GPU, so the GPU decides
        best = max(hw.gpu_capabilities)
        if best >= (8, 0):
            return True, f"NVIDIA GPU of compute capability {best[0]}.{best[1]} (bfloat16 tensor cores)"
        return False, f"NVIDIA GPU of compute capability {best[0]}.{best[1]} has no bfloat16 tensor cores (needs 8.0)"
    if hw.machine not in ("x86_64", "AMD64"):
        return False, f"{hw.machine} CPU: no bfloat16 path in TensorFlow's CPU kernels"
    if not hw.onednn:
        return False, "TF_ENABLE_ONEDNN_OPTS=0 turns off oneDNN, TensorFlow's only fast bfloat16 CPU kernels"
    if "amx_bf16" in hw.cpu_flags and hw.amx_permitted:
        return True, "x86 CPU with AMX (amx_bf16)"
    if "avx512_bf16" in hw.cpu_flags:
        return True, "x86 CPU with AVX512_BF16"
    if "amx_bf16" in hw.cpu_flags:
        return False, "the kernel refused this process AMX tile state (arch_prctl) and the CPU lacks AVX512_BF16"
    return False, "CPU without AMX or AVX512_BF16: bfloat16 would be emulated, slower than float32"


def fast_int8(hw: Hardware) -> tuple[bool, str]:
    """Whether OpenVINO's int8 kernels run natively here (VNNI dot products or AMX int8 tiles)."""
    if hw.machine not in ("x86_64", "AMD64"):
        return False, f"{hw.machine} CPU: int8 is measured on x86 only"
    if "amx_int8" in hw.cpu_flags and hw.amx_permitted:
        return True, "x86 CPU with AMX (amx_int8)"
    for flag in ("avx512_vnni", "avx_vnni"):
        if flag in hw.cpu_flags:
            return True, f"x86 CPU with {flag.upper()}"
    return False, "CPU without VNNI or AMX int8: int8 would gain little over float32"




# ---- combinations: a runtime and a precision ----------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Combo:
    runtime: str
    precision: str

    @property
    def key(self) -> str:
        """How model cards and logs name it: `openvino/int8`."""
        return f"{self.runtime}/{self.precision}"

    @classmethod
    def parse(cls, key: str) -> "Combo":
        runtime, _, precision = key.partition("/")
        return cls(runtime, precision)


REFERENCE = Combo(TENSORFLOW, FLOAT32)
COMBOS = (Combo(TENSORFLOW, FLOAT32), Combo(TENSORFLOW, BFLOAT16),
          Combo(OPENVINO, FLOAT32), Combo(OPENVINO, BFLOAT16), Combo(OPENVINO, INT8))
# Fastest first, from `osteoscreen bench` on the project's extractor at batch 32, one process per machine: AMD EPYC
# (AVX512_BF16, VNNI) TF f32 7.2, TF bf16 13.7, OV f32 7.3, OV bf16 14.0, OV int8 25.3 img/s; Intel with AMX: TF f32
# 2.5, TF bf16 19.9, OV f32 2.3, OV bf16 17.1, OV int8 27.6 (a shared machine: +-30% between runs). Only int8 is
# clearly faster; between runtimes within noise of each other TensorFlow, the reference, goes first.
SPEED_ORDER = (Combo(OPENVINO, INT8), Combo(TENSORFLOW, BFLOAT16), Combo(OPENVINO, BFLOAT16),
               Combo(TENSORFLOW, FLOAT32), Combo(OPENVINO, FLOAT32))


def native(combo: Combo, hw: Hardware) -> tuple[bool, str]:
    """Whether `combo` runs natively (not emulated, not beside an idle GPU) on `hw`, and why."""
    if combo.runtime == OPENVINO and hw.gpu_capabilities:
        return False, "an NVIDIA GPU is visible: TensorFlow runs on it, OpenVINO's CPU plugin would leave it idle"
    if combo.precision == FLOAT32:
        return True, "float32 runs everywhere"
    if combo.precision == INT8:
        return fast_int8(hw)
    if combo.runtime == OPENVINO:  # OpenVINO brings its own oneDNN: TensorFlow's switch does not apply
        return fast_bfloat16(Hardware(hw.cpu_flags, hw.amx_permitted, True, (), hw.machine))
    return fast_bfloat16(hw)


def check_request(runtime: str | None, precision: str | None, openvino: bool | None = None) -> tuple[str, str]:
    """The requested (runtime, precision), refused at once when no runtime here can honour them."""
    runtime, precision = requested_runtime(runtime), requested(precision)
    openvino = openvino_installed() if openvino is None else openvino
    if runtime == TENSORFLOW and precision == INT8:
        raise PrecisionError("precision int8 runs on OpenVINO only (NNCF quantisation): use --runtime openvino "
                             "(OSTEOSCREEN_RUNTIME=openvino) or auto, or another precision with tensorflow")
    if runtime == OPENVINO and not openvino:
        raise RuntimeUnavailableError("runtime openvino was asked for but OpenVINO is not installed here "
                                      "(pip install openvino); use --runtime tensorflow or auto")
    if precision == INT8 and not openvino:
        raise RuntimeUnavailableError("precision int8 runs on OpenVINO only, and OpenVINO is not installed here "
                                      "(pip install openvino); use another precision")
    return runtime, precision


def candidates(runtime: str, precision: str, hw: Hardware, openvino: bool) -> tuple[list[Combo], list[str]]:
    """The combinations the requests allow, fastest first, and notes on those left out. An auto request keeps
    only what runs natively; an explicit precision is taken as asked, emulated or not (the person asked for it)."""
    check_request(runtime, precision, openvino)
    notes, found = [], []
    for combo in SPEED_ORDER:
        if runtime != AUTO and combo.runtime != runtime or precision != AUTO and combo.precision != precision:
            continue
        if combo.runtime == OPENVINO and not openvino:
            notes.append(f"{combo.key} skipped: OpenVINO is not installed")
            continue
        if precision == AUTO or runtime == AUTO and combo.runtime == OPENVINO and hw.gpu_capabilities:
            ok, why = native(combo, hw)
            if not ok:
                notes.append(f"{combo.key} skipped: {why}")
                continue
        found.append(combo)
    if not found:
        raise PrecisionError(f"no runtime runs precision {precision} here: " + "; ".join(notes))
    return found, notes


def training_choice(runtime: str | None = None, precision: str | None = None,
                    hardware: Hardware | Callable[[], Hardware] = detect,
                    openvino: bool | None = None) -> tuple[Combo, str]:
    """The combination a new forest is fitted on: the fastest one asked for that runs natively here, so that
    serving on this hardware runs the forest on the very features it was fitted on (see `gate` for why)."""
    asked_runtime, asked = requested_runtime(runtime), requested(precision)
    hw = hardware() if callable(hardware) else hardware
    found, notes = candidates(asked_runtime, asked, hw, openvino_installed() if openvino is None else openvino)
    why = "forced" if AUTO not in (asked_runtime, asked) else native(found[0], hw)[1]
    note = f"; not considered: {'; '.join(notes)}" if notes else ""
    return found[0], f"{found[0].key} (requested runtime {asked_runtime}, precision {asked}: {why}){note}"


@dataclass(frozen=True)
class Selection:
    combo: Combo
    reason: str
    forced: bool = False  # run although the gate refused it (--force-precision): comparisons only

    @property
    def runtime(self) -> str:
        return self.combo.runtime

    @property
    def precision(self) -> str:
        return self.combo.precision


def select(card: dict, runtime: str | None = None, precision: str | None = None, force: bool = False,
           hardware: Hardware | Callable[[], Hardware] = detect, openvino: bool | None = None) -> Selection:
    """The combination to serve a bundle in: the fastest one asked for that runs natively here and that the gate
    lets through (the forest's own, or one whose recorded validation agreement passed). None passing: the
    forest's own combination, or with `force` the first refused one, marked forced (comparisons only)."""
    asked_runtime, asked = requested_runtime(runtime), requested(precision)  # bad values fail before the slow load
    hw = hardware() if callable(hardware) else hardware
    have_openvino = openvino_installed() if openvino is None else openvino
    found, notes = candidates(asked_runtime, asked, hw, have_openvino)
    trained, record = fitted_on(card), records(card)
    refused = []
    for combo in found:
        verdict = gate(combo, trained, record)
        if verdict is None:
            note = "".join(f"; {what}: {'; '.join(items)}" for what, items in
                           (("refused by the numerics gate", [v for _, v in refused]), ("not considered", notes))
                           if items)
            return Selection(combo, f"{combo.key} (requested runtime {asked_runtime}, precision {asked}): "
                                    f"{_passed(combo, trained, record)}{note}")
        refused.append((combo, verdict))
    combo, verdict = refused[0]
    if force:
        return Selection(combo, f"{combo.key} FORCED past the numerics gate (comparisons only, not for screening): "
                                f"{verdict}", forced=True)
    if trained.runtime == OPENVINO and not have_openvino:
        raise RuntimeUnavailableError(f"the forest was fitted on {trained.key} features but OpenVINO is not "
                                      f"installed, and the gate refused {', '.join(c.key for c, _ in refused)}: "
                                      f"{verdict}")
    return Selection(trained, f"{trained.key}, the forest's own: " + "; ".join(v for _, v in refused))


# ---- the gate ------------------------------------------------------------------------------------------------------

def fitted_on(card: dict) -> Combo:
    """The combination the bundle's forest was fitted on (cards from before runtimes: TensorFlow)."""
    return Combo(card.get("runtime", TENSORFLOW), card.get("precision", FLOAT32))


def records(card: dict) -> dict[str, dict]:
    """{combination key: its check} from the card; a card of the two-precision era keeps one check, TensorFlow's."""
    check = card.get("precision_check") or {}
    if "combinations" in check:
        return dict(check["combinations"])
    if check.get("other"):
        return {Combo(TENSORFLOW, check["other"]).key: check}
    return {}


def _passed(combo: Combo, trained: Combo, record: dict[str, dict]) -> str:
    if combo == trained:
        return "the forest was fitted on these features"
    v = record[combo.key]["validation"]
    return f"gate passed: validation max |dp| {v['max_abs_dp']:.4f}, label agreement {v['label_agreement']:.3f}"


def gate(combo: Combo, trained: Combo, record: dict[str, dict]) -> str | None:
    """None when `combo` may serve a forest fitted on `trained` features, else why not. The forest's own
    combination always may; another one only when its recorded validation check passed: an answer the
    classifier was never checked on is not served."""
    if combo == trained:
        return None
    check = record.get(combo.key)
    if not check:
        return f"{combo.key}: the bundle records no agreement check for it (retrain to get one)"
    if check.get("passed"):
        return None
    v = check.get("validation", {})
    return (f"{combo.key}: recorded agreement fails the gate ({check.get('rule', '')}): validation max |dp| "
            f"{v.get('max_abs_dp', float('nan')):.4f}, label agreement {v.get('label_agreement', float('nan')):.3f}")


def agreement(p_trained, p_other, y, threshold: float, trained: str, other: str) -> dict:
    """The gate's figures for one split: the classifier's probabilities on features of the combination it was
    fitted on (`p_trained`) and of another one (`p_other`)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    p_trained, p_other, y = (np.asarray(a, dtype=np.float64) for a in (p_trained, p_other, y))
    same = (p_trained >= threshold) == (p_other >= threshold)
    auc = {}
    for name, p in ((trained, p_trained), (other, p_other)):
        auc[name] = float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else float("nan")
    return {"n": int(len(y)), "max_abs_dp": float(np.max(np.abs(p_trained - p_other))) if len(y) else 0.0,
            "mean_abs_dp": float(np.mean(np.abs(p_trained - p_other))) if len(y) else 0.0,
            "label_agreement": float(np.mean(same)) if len(y) else 1.0, "labels_changed": int(np.sum(~same)),
            "auc": auc}


RULE = (f"max |dp| <= {MAX_PROBABILITY_DIFFERENCE} and label agreement >= {MIN_LABEL_AGREEMENT:g} "
        "on the validation split")


def check(validation: dict) -> dict:
    """One combination's record in the model card: figures on the validation split and whether they pass."""
    passed = (validation["max_abs_dp"] <= MAX_PROBABILITY_DIFFERENCE
              and validation["label_agreement"] >= MIN_LABEL_AGREEMENT)
    return {"validation": validation, "passed": bool(passed), "rule": RULE}


__all__ = ["AUTO", "BFLOAT16", "CHOICES", "COMBOS", "Combo", "ENV", "FLOAT32", "Hardware", "INT8", "OPENVINO",
           "PRECISIONS", "PrecisionError", "REFERENCE", "RUNTIMES", "RUNTIME_CHOICES", "RUNTIME_ENV",
           "RuntimeUnavailableError", "SPEED_ORDER", "Selection", "TENSORFLOW", "agreement", "candidates", "check", "check_request",
           "detect", "fast_bfloat16", "fast_int8", "fitted_on", "gate", "native", "openvino_installed", "records",
           "requested", "requested_runtime", "select", "training_choice"]
