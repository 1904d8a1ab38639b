"""The extractor's compute precision: which one to use (`OSTEOSCREEN_PRECISION=auto|float32|bfloat16`,
`--precision` on the CLI), and the numerics gate that decides whether a bundle may be served in a
precision other than the one its classifier was trained on.

bfloat16 is worth it only where the hardware runs it natively (x86 AMX or AVX512_BF16 through oneDNN,
NVIDIA tensor cores from compute capability 8.0); elsewhere it is emulated and slower than float32, so
`auto` picks it only there. The Random Forest was fitted on features of one precision: the other one moves
every feature a little, and the gate serves it only when training measured that the screening answers on
the validation split stayed the same. Nothing here imports TensorFlow unless a GPU must be looked at.
"""

from __future__ import annotations

import ctypes
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
FLOAT32, BFLOAT16, AUTO = "float32", "bfloat16", "auto"
PRECISIONS = (FLOAT32, BFLOAT16)
CHOICES = (AUTO, *PRECISIONS)

# The gate. On the demo phantom (400 images, forest trained on bfloat16 features, isotonic calibration) float32
# features moved validation probabilities by 0.0025 on average but by up to 0.087 at worst (the isotonic map is a
# step function: a few trees' votes crossing a step move the answer a whole step), every validation label held,
# and on the test split (max 0.117) 2 of 80 labels flipped. The worst case, not the average, is what a patient
# sees: keep the 0.02 (a quarter of the shifts that came with flipped labels) and demand every validation
# label unchanged. Such a bundle then stays in its own precision: train in the serving hardware's precision.
MAX_PROBABILITY_DIFFERENCE = 0.02
MIN_LABEL_AGREEMENT = 1.0


class PrecisionError(OsteoScreenError, ValueError):
    """An unknown precision was asked for."""


def other(precision: str) -> str:
    return BFLOAT16 if precision == FLOAT32 else FLOAT32


def requested(value: str | None = None) -> str:
    """The precision asked for: `value` (a CLI flag) or else $OSTEOSCREEN_PRECISION, default auto."""
    if value is None:
        return settings.current().precision  # validated with the other settings
    source, text = "--precision", value
    name = (text or AUTO).strip().lower()
    if name not in CHOICES:
        raise PrecisionError(f"{source} must be one of {', '.join(CHOICES)}, not {text!r}")
    return name


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


@dataclass(frozen=True)
class Choice:
    precision: str  # float32 | bfloat16: what the extractor computes in
    requested: str  # auto | float32 | bfloat16
    reason: str

    def describe(self) -> str:
        return f"precision {self.precision} (requested {self.requested}: {self.reason})"


def choose(value: str | None = None, hardware: Hardware | Callable[[], Hardware] = detect) -> Choice:
    """Resolve `value` (flag), else $OSTEOSCREEN_PRECISION, else auto, into a compute precision."""
    asked = requested(value)
    if asked != AUTO:
        return Choice(asked, asked, "forced")
    hw = hardware() if callable(hardware) else hardware
    fast, why = fast_bfloat16(hw)
    return Choice(BFLOAT16 if fast else FLOAT32, AUTO, why)


def agreement(p_trained, p_other, y, threshold: float, trained: str) -> dict:
    """The gate's figures for one split: the classifier's probabilities on features of the precision it was
    trained on (`p_trained`) and of the other precision (`p_other`)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    p_trained, p_other, y = (np.asarray(a, dtype=np.float64) for a in (p_trained, p_other, y))
    same = (p_trained >= threshold) == (p_other >= threshold)
    auc = {}
    for name, p in ((trained, p_trained), (other(trained), p_other)):
        auc[name] = float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else float("nan")
    return {"n": int(len(y)), "max_abs_dp": float(np.max(np.abs(p_trained - p_other))) if len(y) else 0.0,
            "mean_abs_dp": float(np.mean(np.abs(p_trained - p_other))) if len(y) else 0.0,
            "label_agreement": float(np.mean(same)) if len(y) else 1.0, "labels_changed": int(np.sum(~same)),
            "auc": auc}


def check(validation: dict, trained: str) -> dict:
    """The record the model card keeps: figures on the validation split and whether they pass."""
    passed = (validation["max_abs_dp"] <= MAX_PROBABILITY_DIFFERENCE
              and validation["label_agreement"] >= MIN_LABEL_AGREEMENT)
    return {"trained": trained, "other": other(trained), "validation": validation, "passed": bool(passed),
            "rule": f"max |dp| <= {MAX_PROBABILITY_DIFFERENCE} and label agreement >= {MIN_LABEL_AGREEMENT:g} "
                    "on the validation split"}


def gate(choice: Choice, trained: str, record: dict | None) -> tuple[str, str]:
    """The precision to serve a bundle trained in `trained` at, given what was chosen, and why.

    Another precision than the bundle's own is served only when its recorded check passed; otherwise the
    bundle's own precision, even when forced: an answer the classifier was never checked on is not served.
    """
    if choice.precision == trained:
        return trained, choice.describe()
    if not record:
        return trained, (f"precision {trained}, the bundle's own: {choice.precision} was chosen ({choice.reason}) "
                         f"but the bundle records no {choice.precision} agreement check (retrain to get one)")
    if record.get("other") == choice.precision and record.get("passed"):
        v = record["validation"]
        return choice.precision, (f"{choice.describe()}; gate passed: validation max |dp| {v['max_abs_dp']:.4f}, "
                                  f"label agreement {v['label_agreement']:.3f}")
    v = record.get("validation", {})
    return trained, (f"precision {trained}, the bundle's own: {choice.precision} was chosen ({choice.reason}) but its "
                     f"recorded agreement fails the gate ({record.get('rule', '')}): validation max |dp| "
                     f"{v.get('max_abs_dp', float('nan')):.4f}, label agreement {v.get('label_agreement', float('nan')):.3f}")


__all__ = ["AUTO", "BFLOAT16", "CHOICES", "ENV", "FLOAT32", "PRECISIONS", "Choice", "Hardware", "PrecisionError",
           "agreement", "check", "choose", "detect", "fast_bfloat16", "gate", "other", "requested"]
