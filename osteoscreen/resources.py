"""How many CPUs this process may really use, for sizing thread pools.

In a container `os.cpu_count()` is the node's core count (64 on a big node) while the pod's CPU limit (its
CFS quota) may allow 4: TensorFlow, OpenMP/BLAS and Python's default executors size themselves to the
node, run far more threads than the quota pays for, and get throttled in every 100 ms period. The budget
is, first match wins: `Settings.cpus` (OSTEOSCREEN_CPUS; the Deployment sets it from the pod's `limits.cpu` through the
Downward API), the container's cgroup quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us`), the CPUs this process
may be scheduled on.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from osteoscreen import settings

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup's CFS quota allows (e.g. 4.0 for `400000 100000`), or None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct", root):  # cgroup v1
        try:
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def schedulable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cpu_budget(cpus: float | None = None, root: Path = CGROUP_ROOT) -> int:
    """Whole CPUs for thread pools (a fractional quota rounds up: 2.5 CPUs keep 3 threads busy part-time).
    `cpus`: an explicit budget; default the `cpus` setting."""
    explicit = settings.current().cpus if cpus is None else cpus
    if explicit is not None:
        return max(1, math.ceil(explicit))
    budget = schedulable_cpus()
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        budget = min(budget, max(1, math.ceil(quota)))
    return budget
