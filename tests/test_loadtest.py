"""The load test in `make test`: a short, bounded Locust run (HTTP, gRPC Screening and the v2 protocol at once)
against a real `bentoml serve` must meet loadtest/slo.yaml, and a broken SLO must fail the run. The SLO gate
and the image mix are also checked on their own (no server).

Locust runs as a subprocess (`locust -f loadtest/locustfile.py --headless ...`, through `loadtest/run.py` as
`make loadtest` does), so gevent's monkey patching never meets TensorFlow or pytest. No timing is asserted
here beyond the generous SLO file; `make bench` measures performance.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import slo
from loadtest.images import build_mix, parse_mix

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"
SLO_FILE = REPO / "loadtest" / "slo.yaml"
NAMES = {"http": ("POST", "/predict"), "grpc": ("grpc", "osteoscreen.v1.Screening/Predict"),
         "v2": ("grpc", "inference.GRPCInferenceService/ModelInfer")}


def locust_env() -> dict[str, str]:
    # No TensorFlow in the Locust process; keep its start quick and its output short.
    return {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}


def run_locust(server, out: Path, users: list[str], run_time: str = "20s", n_users: int = 3,
               slo_file: Path | None = SLO_FILE, extra: tuple[str, ...] = (),
               timeout: float = 240) -> subprocess.CompletedProcess:
    """`locust -f loadtest/locustfile.py --headless` against `server` (the conftest Server), CSV/HTML into `out`;
    `slo_file=None` runs without the SLO gate (Locust's own exit code)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "locust"), "-f", str(LOCUSTFILE), "--headless", "-u", str(n_users), "-r", str(n_users),
           "-t", run_time, "--stop-timeout", "30", "--host", server.url, "--grpc-target", server.grpc_target,
           "--slo", str(slo_file or ""), "--csv", str(out / "locust"), "--html", str(out / "report.html"),
           "--only-summary", *extra, *users]
    return subprocess.run(cmd, cwd=REPO, env=locust_env(), capture_output=True, text=True, timeout=timeout)


def stats_rows(out: Path) -> dict[tuple[str, str], dict]:
    with open(out / "locust_stats.csv", newline="") as fh:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(fh)}


# ------------------------------------------------------------------------------------------ against a server


@pytest.mark.server
@pytest.mark.slow
def test_bounded_run_over_every_protocol_meets_the_slo(server, tmp_path):
    """`make loadtest`'s runner against the running server: three user classes, 20 s, SLOs of loadtest/slo.yaml."""
    out = tmp_path / "reports"
    cmd = [sys.executable, "-m", "loadtest.run", "--host", server.url, "--grpc-target", server.grpc_target,
           "--users", "3", "--spawn-rate", "3", "--run-time", "20s", "--reports", str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=locust_env(), capture_output=True, text=True, timeout=240)
    log = result.stdout[-3000:] + result.stderr[-5000:]
    assert result.returncode == 0, log
    verdict = json.loads((out / "locust_slo.json").read_text())
    assert verdict["passed"], log
    for protocol in ("http", "grpc", "v2"):
        seen = verdict["observed"][protocol]
        assert seen["requests"] >= 3 and seen["failures"] == 0, (protocol, seen)
        assert any(c["scope"] == protocol and c["metric"] == "p95_ms" for c in verdict["checks"]), protocol
    rows = stats_rows(out)
    for protocol, key in NAMES.items():
        assert key in rows, f"{protocol}: no {key} row in locust_stats.csv"
        assert int(rows[key]["Request Count"]) >= 3 and int(rows[key]["Failure Count"]) == 0, rows[key]
    assert "Locust" in (out / "report.html").read_text()[:20000]
    assert (out / "locust_stats_history.csv").stat().st_size > 0


@pytest.mark.server
def test_broken_slo_fails_the_run(server, tmp_path):
    """An impossible p95 for gRPC must make locust exit 1; the HTTP limit is not checked (no HTTP users ran)."""
    strict = tmp_path / "strict.yaml"
    strict.write_text("total: {max_failure_ratio: 0.0}\n"
                      "protocols:\n  grpc: {min_requests: 1, p95_ms: 1}\n  http: {min_requests: 1000000}\n")
    out = tmp_path / "reports"
    result = run_locust(server, out, ["GrpcPredictUser"], run_time="6s", n_users=1, slo_file=strict)
    log = result.stdout[-2000:] + result.stderr[-4000:]
    assert result.returncode == 1, log
    assert "SLO check" in result.stderr and "FAILED" in result.stderr, log
    verdict = json.loads((out / "locust_slo.json").read_text())
    failed = [(c["scope"], c["metric"]) for c in verdict["checks"] if not c["ok"]]
    assert failed == [("grpc", "p95_ms")], verdict
    assert not any(c["scope"] == "http" for c in verdict["checks"])


def test_refuses_a_non_loopback_target(tmp_path):
    """Load tests stay on this machine unless --allow-remote is given (no request is sent here)."""
    cmd = [str(BIN / "locust"), "-f", str(LOCUSTFILE), "--headless", "-u", "1", "-t", "2s",
           "--host", "http://10.255.255.1:3000", "--grpc-target", "10.255.255.1:50051", "--slo", ""]
    result = subprocess.run(cmd, cwd=REPO, env=locust_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "non-loopback" in result.stderr


# ------------------------------------------------------------------------------------------ no server


def test_slo_gate_judges_each_protocol():
    config = {"total": {"max_failure_ratio": 0.01},
              "protocols": {"http": {"min_requests": 5, "max_failure_ratio": 0.0, "p95_ms": 1000},
                            "grpc": {"p95_ms": 1000}, "v2": {"p50_ms": 10}}}
    observed = {"http": {"requests": 10, "failures": 0, "p50_ms": 300, "p95_ms": 900},
                "grpc": {"requests": 10, "failures": 0, "p50_ms": 300, "p95_ms": 1200}}
    total = {"requests": 20, "failures": 0}
    checks = slo.evaluate(config, observed, total, active={"http", "grpc"})
    assert not slo.passed(checks)
    assert [(c.scope, c.metric) for c in checks if not c.ok] == [("grpc", "p95_ms")]
    assert not any(c.scope == "v2" for c in checks)  # v2 users did not run
    # an API whose users ran but never completed a request fails, even without a min_requests limit
    checks = slo.evaluate(config, {"http": observed["http"]}, total, active={"http", "grpc"})
    assert ("grpc", "requests") in [(c.scope, c.metric) for c in checks if not c.ok]
    # failures over the allowed ratio fail, within it pass
    checks = slo.evaluate({"total": {"max_failure_ratio": 0.01}}, {}, {"requests": 200, "failures": 2})
    assert slo.passed(checks)
    checks = slo.evaluate({"total": {"max_failure_ratio": 0.01}}, {}, {"requests": 200, "failures": 3})
    assert not slo.passed(checks)
    assert "FAILED" in slo.report(checks)


def test_checked_in_slo_files_are_valid():
    for path in sorted((REPO / "loadtest").glob("slo*.yaml")):
        config = slo.load(path)
        assert set(config["protocols"]) == {"http", "grpc", "v2"}, path.name
    with pytest.raises(slo.SloConfigError, match="unknown limits"):
        slo.validate({"protocols": {"grpc": {"p95": 100}}})
    with pytest.raises(slo.SloConfigError, match="unknown protocol"):
        slo.validate({"protocols": {"rest": {"p95_ms": 100}}})


def test_default_mix_sends_phantoms_jpegs_and_real_dicom():
    mix = build_mix()
    assert {f for f, items in mix.by_format.items() if items} == {"png", "jpeg", "dicom"}
    assert any(s.name.startswith("RG1_") for s in mix.by_format["dicom"])
    assert all(s.data[:4] == b"\x89PNG" for s in mix.by_format["png"])
    assert all(s.data[:2] == b"\xff\xd8" for s in mix.by_format["jpeg"])
    import random

    rng = random.Random(0)
    drawn = {mix.pick(rng).format for _ in range(300)}
    assert drawn == {"png", "jpeg", "dicom"}


def test_mix_from_a_folder_reads_files_by_content(tmp_path):
    source = build_mix(mix="png=1")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(source.by_format["png"][0].data)  # a PNG whatever its name
    (tmp_path / "notes.txt").write_text("not an image")
    mix = build_mix(tmp_path, mix="png=1,jpeg=1,dicom=0")
    assert [s.name for s in mix.by_format["png"]] == ["a/x.bin"]
    assert len(mix.by_format["jpeg"]) == 1  # derived from the PNG
    with pytest.raises(ValueError, match="unknown format"):
        parse_mix("gif=1")
    with pytest.raises(ValueError, match="no format"):
        parse_mix("png=0")
