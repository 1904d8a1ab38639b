"""The load test's service-level objectives: read `slo.yaml`, judge a run's statistics, explain the verdict.

Pure functions on plain dicts, so the gate is unit-tested without Locust and reused by the Locust file:

    config = load("loadtest/slo.yaml")
    checks = evaluate(config, observed={"grpc": {"requests": 120, "failures": 0, "p50_ms": 800, "p95_ms": 1900}},
                      total={"requests": 120, "failures": 0}, active={"grpc"})
    passed(checks)  # False when any check fails

Config (YAML)::

    total:                  # over every request of the run
      max_failure_ratio: 0.0
    protocols:              # per API; only the APIs whose user class ran are checked
      grpc: {min_requests: 5, max_failure_ratio: 0.0, p50_ms: 4000, p95_ms: 10000}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

KNOWN_PROTOCOLS = ("http", "grpc", "v2")
LIMIT_KEYS = ("min_requests", "max_failure_ratio", "p50_ms", "p95_ms", "p99_ms")


class SloConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Check:
    scope: str  # "total" or a protocol
    metric: str  # requests | failure_ratio | p50_ms | p95_ms | p99_ms
    measured: float | None
    limit: float
    ok: bool

    def describe(self) -> str:
        op = ">=" if self.metric == "requests" else "<="
        value = "none" if self.measured is None else (f"{self.measured:.4g}")
        return f"{'PASS' if self.ok else 'FAIL'} {self.scope:5} {self.metric:13} {value:>10} {op} {self.limit:g}"


def load(path: str | Path) -> dict[str, Any]:
    import yaml

    config = yaml.safe_load(Path(path).read_text()) or {}
    validate(config)
    return config


def validate(config: dict[str, Any]) -> None:
    if not isinstance(config, dict) or set(config) - {"total", "protocols"}:
        raise SloConfigError("an SLO file has the keys 'total' and 'protocols' only")
    total = config.get("total") or {}
    if set(total) - {"max_failure_ratio", "min_requests"}:
        raise SloConfigError(f"unknown keys under total: {sorted(set(total) - {'max_failure_ratio', 'min_requests'})}")
    for protocol, limits in (config.get("protocols") or {}).items():
        if protocol not in KNOWN_PROTOCOLS:
            raise SloConfigError(f"unknown protocol {protocol!r}; use {', '.join(KNOWN_PROTOCOLS)}")
        unknown = set(limits or {}) - set(LIMIT_KEYS)
        if unknown:
            raise SloConfigError(f"unknown limits for {protocol}: {sorted(unknown)}; use {', '.join(LIMIT_KEYS)}")
        for key, value in (limits or {}).items():
            if not isinstance(value, (int, float)) or value < 0:
                raise SloConfigError(f"{protocol}.{key} must be a non-negative number, not {value!r}")


def _ratio(failures: float, requests: float) -> float:
    return failures / requests if requests else 0.0


def evaluate(config: dict[str, Any], observed: dict[str, dict[str, float]], total: dict[str, float],
             active: set[str] | None = None) -> list[Check]:
    """One Check per limit. `observed[protocol]` has requests, failures and p50_ms/p95_ms/p99_ms; a protocol
    that is active (its users ran) but absent from `observed` made no request, which fails its
    min_requests (at least 1 when unset): a silently dead API must not pass."""
    validate(config)
    checks: list[Check] = []
    t = config.get("total") or {}
    if "max_failure_ratio" in t:
        ratio = _ratio(total.get("failures", 0), total.get("requests", 0))
        checks.append(Check("total", "failure_ratio", ratio, t["max_failure_ratio"], ratio <= t["max_failure_ratio"]))
    if "min_requests" in t:
        n = total.get("requests", 0)
        checks.append(Check("total", "requests", n, t["min_requests"], n >= t["min_requests"]))
    for protocol, limits in (config.get("protocols") or {}).items():
        if active is not None and protocol not in active:
            continue
        limits = limits or {}
        stats = observed.get(protocol) or {"requests": 0, "failures": 0}
        n = stats.get("requests", 0)
        minimum = limits.get("min_requests", 1)
        checks.append(Check(protocol, "requests", n, minimum, n >= minimum))
        if "max_failure_ratio" in limits:
            ratio = _ratio(stats.get("failures", 0), n)
            checks.append(Check(protocol, "failure_ratio", ratio, limits["max_failure_ratio"],
                                ratio <= limits["max_failure_ratio"]))
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            if key in limits:
                value = stats.get(key)
                ok = value is not None and not math.isnan(value) and value <= limits[key]
                checks.append(Check(protocol, key, value, limits[key], ok))
    return checks


def passed(checks: list[Check]) -> bool:
    return all(c.ok for c in checks)


def report(checks: list[Check], source: str = "") -> str:
    head = f"SLO check{f' ({source})' if source else ''}: {'PASSED' if passed(checks) else 'FAILED'}"
    return "\n".join([head, *("  " + c.describe() for c in checks)])


def write_json(path: str | Path, checks: list[Check], observed: dict, total: dict, source: str = "") -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"slo_file": source, "passed": passed(checks),
                                      "checks": [asdict(c) for c in checks],
                                      "observed": observed, "total": total}, indent=2))
