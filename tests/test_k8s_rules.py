"""The PrometheusRule's rules, checked by promtool: syntax and lint (`promtool check rules`) and behaviour
(`promtool test rules` on k8s/monitoring/tests/*_test.yaml), where every alert has a case in which it fires
and one in which it must stay quiet."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from test_k8s import K8S, render, require_promtool

RULES = K8S / "monitoring" / "prometheusrule.yaml"
RULE_TESTS = sorted((K8S / "monitoring" / "tests").glob("*_test.yaml"))
RULES_FILE_NAME = "osteoscreen.rules.yaml"  # what the test files' rule_files name


def alerts() -> set[str]:
    spec = yaml.safe_load(RULES.read_text())["spec"]
    return {r["alert"] for g in spec["groups"] for r in g["rules"] if "alert" in r}


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory) -> Path:
    """The PrometheusRule's spec as a plain Prometheus rules file, with copies of the unit tests beside it."""
    folder = tmp_path_factory.mktemp("rules")
    spec = yaml.safe_load(RULES.read_text())["spec"]
    (folder / RULES_FILE_NAME).write_text(yaml.safe_dump(spec, sort_keys=False))
    for test in RULE_TESTS:
        shutil.copy(test, folder / test.name)
    return folder


def test_rendered_prometheusrule_is_the_file():
    """The overlays ship exactly the rules tested here (kustomize changes only metadata)."""
    rendered = [d for d in render("overlays/gpu") if d["kind"] == "PrometheusRule"]
    assert len(rendered) == 1 and rendered[0]["spec"] == yaml.safe_load(RULES.read_text())["spec"]


def test_promtool_check_rules(rules_dir):
    promtool = require_promtool()
    result = subprocess.run([promtool, "check", "rules", RULES_FILE_NAME], cwd=rules_dir,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_test_rules(rules_dir):
    promtool = require_promtool()
    assert RULE_TESTS, "no rule unit tests in k8s/monitoring/tests"
    result = subprocess.run([promtool, "test", "rules", *(t.name for t in RULE_TESTS)], cwd=rules_dir,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet():
    fires, quiet = set(), set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == [RULES_FILE_NAME], path.name
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts() - fires == set(), f"never shown to fire: {sorted(alerts() - fires)}"
    assert alerts() - quiet == set(), f"never shown to stay quiet: {sorted(alerts() - quiet)}"
    assert (fires | quiet) <= alerts(), f"tests name unknown alerts: {sorted((fires | quiet) - alerts())}"
