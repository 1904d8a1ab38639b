"""Thread pools follow the pod's CPU budget, not the node's cores (issue 17, item 8): the budget read from
OSTEOSCREEN_CPUS (the Downward API) or the cgroup quota, and TensorFlow's and OpenMP/BLAS's pools set from it
in a real TensorFlow process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from osteoscreen.settings import SettingsError
from osteoscreen.resources import cgroup_cpu_quota, cpu_budget, schedulable_cpus

REPO = Path(__file__).resolve().parents[1]


def cgroup_v2(tmp_path: Path, cpu_max: str) -> Path:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    return tmp_path


def cgroup_v1(tmp_path: Path, quota_us: int, period_us: int = 100000) -> Path:
    folder = tmp_path / "cpu,cpuacct"
    folder.mkdir()
    (folder / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")
    (folder / "cpu.cfs_period_us").write_text(f"{period_us}\n")
    return tmp_path


def test_the_cgroup_quota_is_read_in_both_cgroup_versions(tmp_path) -> None:
    folders = {name: tmp_path / name for name in ("a", "b", "c", "d")}
    for folder in folders.values():
        folder.mkdir()
    assert cgroup_cpu_quota(cgroup_v2(folders["a"], "400000 100000")) == 4.0
    assert cgroup_cpu_quota(cgroup_v2(folders["b"], "max 100000")) is None
    assert cgroup_cpu_quota(cgroup_v1(folders["c"], 250000)) == 2.5
    assert cgroup_cpu_quota(cgroup_v1(folders["d"], -1)) is None
    assert cgroup_cpu_quota(tmp_path / "nothing-here") is None


def test_the_budget_is_the_smallest_of_quota_and_cores_and_the_downward_api_wins(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("OSTEOSCREEN_CPUS", raising=False)
    cores = schedulable_cpus()
    half = cgroup_v2(tmp_path, "50000 100000")  # half a CPU: one thread, never zero
    assert cpu_budget(root=half) == 1
    (tmp_path / "big").mkdir()
    huge = cgroup_v2(tmp_path / "big", f"{(cores + 8) * 100000} 100000")
    assert cpu_budget(root=huge) == cores, "a quota above the cores this process may use does not add threads"
    monkeypatch.setenv("OSTEOSCREEN_CPUS", "3")  # the pod's limits.cpu, from the Downward API
    assert cpu_budget(root=half) == 3
    assert cpu_budget(2.5, half) == 3
    for bad in ("four", "0", "-2"):
        monkeypatch.setenv("OSTEOSCREEN_CPUS", bad)
        with pytest.raises(SettingsError, match="OSTEOSCREEN_CPUS"):
            cpu_budget(root=half)


PROBE = """
import json, psutil
from osteoscreen.model.threads import limit_threads
limits = limit_threads()
import numpy as np, tensorflow as tf
from threadpoolctl import threadpool_info
x = tf.random.uniform((4, 112, 112, 16))
k = tf.random.uniform((3, 3, 16, 32))
for _ in range(3):
    tf.nn.conv2d(x, k, 1, "SAME").numpy()
print(json.dumps({"intra": tf.config.threading.get_intra_op_parallelism_threads(),
                  "inter": tf.config.threading.get_inter_op_parallelism_threads(),
                  "limits": [limits.intra_op, limits.inter_op],
                  "blas": sorted({p["num_threads"] for p in threadpool_info()}),
                  "threads": psutil.Process().num_threads()}))
"""


def _probe(cpus: str) -> dict:
    env = {**os.environ, "OSTEOSCREEN_CPUS": cpus, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_tensorflow_and_blas_pools_follow_the_budget_in_a_real_process() -> None:
    capped, node_sized = _probe("1"), _probe("12")  # a 1-CPU pod vs pools as big as a 12-core node's
    assert capped["intra"] == 1 and capped["inter"] == 1 and capped["limits"] == [1, 1]
    assert capped["blas"] == [1], capped
    assert node_sized["intra"] == 12 and node_sized["inter"] == 2 and node_sized["blas"] == [12]
    # the running process really has fewer threads: TensorFlow's pool was made at the capped size
    assert node_sized["threads"] - capped["threads"] >= 8, (capped, node_sized)
