"""TensorFlow's and OpenMP/BLAS's thread pools sized to the pod's CPU budget, not the node's cores.

Call `limit_threads()` before the first TensorFlow op of the process: TensorFlow fixes its pools when its
runtime starts and refuses to change them later. Intra-op threads = the budget (the convolutions are
where the work is parallel); inter-op threads = 2 at most, because VGG16 is a chain of ops that run one
after another and the model service calls it from one thread (service.py); OpenMP/BLAS (numpy, the
Random Forest's scikit-learn) get the budget through threadpoolctl.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from osteoscreen.resources import cpu_budget

log = logging.getLogger("osteoscreen.threads")


@dataclass(frozen=True)
class ThreadLimits:
    cpus: int
    intra_op: int
    inter_op: int


_applied: ThreadLimits | None = None


def limit_threads(cpus: int | None = None) -> ThreadLimits:
    """Apply the limits once per process (a second call returns the first call's limits)."""
    global _applied
    if _applied is not None:
        return _applied
    cpus = cpus or cpu_budget()
    limits = ThreadLimits(cpus=cpus, intra_op=cpus, inter_op=min(2, cpus))
    # For libraries that read their pool size from the environment when they load (OpenMP, OpenBLAS, MKL).
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(cpus))
    import tensorflow as tf
    from threadpoolctl import threadpool_limits

    try:
        tf.config.threading.set_intra_op_parallelism_threads(limits.intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(limits.inter_op)
    except RuntimeError as exc:  # TensorFlow already started in this process: its pools are fixed
        log.warning("TensorFlow thread pools already fixed, not limited to %d CPUs: %s", cpus, exc)
        limits = ThreadLimits(cpus, tf.config.threading.get_intra_op_parallelism_threads(),
                              tf.config.threading.get_inter_op_parallelism_threads())
    threadpool_limits(cpus)  # the OpenMP/BLAS runtimes numpy and scikit-learn have already loaded
    log.info("thread pools sized to %d CPUs (%s, node has %s cores): TensorFlow intra-op %d, inter-op %d",
             cpus, "OSTEOSCREEN_CPUS or cgroup quota", os.cpu_count(), limits.intra_op, limits.inter_op)
    _applied = limits
    return limits
