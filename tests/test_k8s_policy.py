"""Policy checks on the rendered manifests (no cluster): GPU scheduling, gRPC probes, resources, security,
graceful shutdown, names and labels that must agree across objects, and every metric that the autoscaler,
prometheus-adapter, alerts and dashboard use being one the service really exports.

Known metrics: the `name="..."` strings of osteoscreen/serving/metrics.py (read as text, not imported), BentoML's
built-ins, kube_* (kube-state-metrics), DCGM_FI_* (NVIDIA DCGM exporter), container_* (cAdvisor), `up`, and
the recording rules of k8s/monitoring/prometheusrule.yaml. Histograms add _bucket/_sum/_count.

The screening RayJob (k8s/screening) gets the same pod checks where they apply (security, resources, GPU
placement, the bento's image), and its entrypoint is parsed by the real `osteoscreen screen` parser.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from test_k8s import K8S, KUSTOMIZATIONS, NAMESPACE, OVERLAYS, REPO, SCREENING, find, one, ray_pod_templates, render

GPU_OVERLAYS = ["overlays/gpu", "overlays/gpu-keda", "overlays/gpu-tls"]
TLS_OVERLAYS = ["overlays/gpu-tls"]
GRPC_PORT = 50051
HEALTH_PORT = 50052  # with TLS: the plaintext grpc.health.v1-only port the probes use
HTTP_PORT = 3000
READINESS_SERVICE = "osteoscreen.v1.Screening"
MODEL_LOAD_WORST_S = 120  # TensorFlow VGG16 on CPU, from the service's own measurements
JOB = "osteoscreen"

ADAPTER_VALUES = K8S / "autoscaling" / "prometheus-adapter" / "values.yaml"
DASHBOARD = K8S / "monitoring" / "dashboards" / "osteoscreen.json"
RULES = K8S / "monitoring" / "prometheusrule.yaml"
METRICS_PY = REPO / "osteoscreen" / "serving" / "metrics.py"


def deployment(docs):
    return one(docs, "Deployment", "osteoscreen")


def workloads(docs) -> list[dict]:
    """The Deployment, and the PACS node's StatefulSet where the overlay has one (k8s/components/dicom-node)."""
    return [deployment(docs), *find(docs, "StatefulSet")]


def pod_spec(docs):
    return deployment(docs)["spec"]["template"]["spec"]


def main_container(docs):
    containers = pod_spec(docs)["containers"]
    return next(c for c in containers if c["name"] == "osteoscreen")


def all_containers(docs):
    spec = pod_spec(docs)
    return spec["containers"] + spec.get("initContainers", [])


def config(docs):
    return one(docs, "ConfigMap", "osteoscreen-config")["data"]


def selects(selector: dict, labels: dict) -> bool:
    """Label-selector semantics for matchLabels (+ the simple matchExpressions operators)."""
    if not selector:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        op, key, values = expr["operator"], expr["key"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


_UNITS = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    match = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(value))
    assert match, f"unparsable quantity {value!r}"
    return float(match.group(1)) * _UNITS[match.group(2) or ""]


# ============================================================================ GPU scheduling
@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_overlay_requests_one_gpu_and_gpu_nodes(overlay):
    docs = render(overlay)
    resources = main_container(docs)["resources"]
    assert str(resources["limits"].get("nvidia.com/gpu")) == "1", "nvidia.com/gpu: 1 must be in limits"
    # Extended resources: a request, if given, must equal the limit; none is clearer.
    assert str(resources.get("requests", {}).get("nvidia.com/gpu", "1")) == "1"
    spec = pod_spec(docs)
    tolerations = spec.get("tolerations", [])
    assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") in (None, "NoSchedule") for t in tolerations)
    placement = json.dumps({"nodeSelector": spec.get("nodeSelector"), "affinity": spec.get("affinity")})
    assert "nvidia.com/gpu" in placement, "GPU pods must be pinned to GPU nodes (nodeSelector or nodeAffinity)"
    image = main_container(docs)["image"]
    assert "gpu" in image.split(":")[-1], f"GPU overlay should run the CUDA image, got {image}"


def test_cpu_overlay_has_no_gpu():
    docs = render("overlays/cpu")
    assert "nvidia.com/gpu" not in json.dumps(deployment(docs))
    assert "gpu" not in main_container(docs)["image"].split(":")[-1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_is_pinned_and_from_a_registry(overlay):
    image = main_container(render(overlay))["image"]
    name, _, tag = image.rpartition(":")
    assert "/" in name and tag and tag != "latest", f"image {image!r}: registry/name:version expected"


# ============================================================================ probes
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_grpc_health_checks_on_the_grpc_port(overlay):
    docs = render(overlay)
    container = main_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    tls = overlay in TLS_OVERLAYS
    assert ports == {"http": HTTP_PORT, "grpc": GRPC_PORT, **({"health": HEALTH_PORT} if tls else {})}
    assert config(docs)["OSTEOSCREEN_GRPC_PORT"] == str(GRPC_PORT)
    probe_port = HEALTH_PORT if tls else GRPC_PORT  # kubelet's gRPC probe cannot speak TLS
    if tls:
        assert config(docs)["OSTEOSCREEN_GRPC_HEALTH_PORT"] == str(HEALTH_PORT)
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(kind)
        assert probe, f"{kind} missing"
        assert set(probe) & {"httpGet", "tcpSocket", "exec"} == set(), f"{kind} must be a native gRPC probe"
        assert type(probe["grpc"]["port"]) is int and probe["grpc"]["port"] == probe_port, f"{kind}: {probe_port}"
    assert container["readinessProbe"]["grpc"]["service"] == READINESS_SERVICE
    assert container["livenessProbe"]["grpc"].get("service", "") == ""


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probe_timing_fits_model_loading(overlay):
    container = main_container(render(overlay))
    startup = container["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 2 * MODEL_LOAD_WORST_S, f"startup probe allows only {budget} s for a ~{MODEL_LOAD_WORST_S} s load"
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30, "liveness must not kill a busy pod fast"
    assert liveness["timeoutSeconds"] >= 2 and container["readinessProbe"]["timeoutSeconds"] >= 1


# ============================================================================ resources and security
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay):
    for container in all_containers(render(overlay)):
        resources = container.get("resources", {})
        for resource in ("cpu", "memory"):
            request = resources.get("requests", {}).get(resource)
            limit = resources.get("limits", {}).get(resource)
            assert request and limit, f"{container['name']}: {resource} request and limit required"
            assert quantity(limit) >= quantity(request), f"{container['name']}: {resource} limit < request"
        # VGG16 in TensorFlow holds ~2 GB per process.
        assert quantity(resources["requests"]["memory"]) >= 3 * 2**30


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_security_settings(overlay):
    docs = render(overlay)
    spec = pod_spec(docs)
    pod_sc = spec["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc.get("runAsUser", 1) != 0
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False, "service links would inject OSTEOSCREEN_*_PORT variables"
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    account = one(docs, "ServiceAccount", spec["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    for container in all_containers(docs):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc.get("privileged", False) is False
        assert "ALL" in sc["capabilities"]["drop"] and not sc["capabilities"].get("add")
    # Writable paths: emptyDir volumes with a size limit, nothing from the host.
    volumes = {v["name"]: v for v in spec["volumes"]}
    for volume in volumes.values():
        assert "hostPath" not in volume
    for container in all_containers(docs):
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if not mount.get("readOnly"):
                assert "emptyDir" in volume and volume["emptyDir"].get("sizeLimit"), mount
    mounted = {m["mountPath"] for m in main_container(docs)["volumeMounts"]}
    assert "/tmp" in mounted and config(docs)["BENTOML_HOME"] in mounted


def test_namespace_enforces_restricted_pod_security():
    ns = one(render("overlays/gpu"), "Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_graceful_shutdown_fits_the_grace_period(overlay):
    docs = render(overlay)
    spec = pod_spec(docs)
    pre_stop = main_container(docs)["lifecycle"]["preStop"]
    sleep_s = pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else int(pre_stop["exec"]["command"][-1])
    drain_s = int(config(docs)["OSTEOSCREEN_SHUTDOWN_GRACE_S"])
    assert sleep_s >= 5, "endpoint removal needs a few seconds to propagate"
    assert spec["terminationGracePeriodSeconds"] >= sleep_s + drain_s + 5


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_carries_the_service_settings(overlay):
    data = config(render(overlay))
    for key in ("OSTEOSCREEN_GRPC_PORT", "OSTEOSCREEN_GRPC_MAX_MESSAGE_BYTES", "OSTEOSCREEN_GRPC_MAX_CONCURRENT",
                "OSTEOSCREEN_SHUTDOWN_GRACE_S", "OSTEOSCREEN_MAX_BYTES", "OSTEOSCREEN_MAX_PIXELS"):
        assert data[key].isdigit(), key
    # an image the input limit admits must fit in one gRPC message (tests/test_k8s_resources.py sizes both)
    assert int(data["OSTEOSCREEN_GRPC_MAX_MESSAGE_BYTES"]) >= int(data["OSTEOSCREEN_MAX_BYTES"]) >= 16 * 2**20
    assert data["OSTEOSCREEN_PRECISION"] == "auto"  # CPU and GPU overlays alike: the node's hardware decides
    # The model is chosen by the image, never overridden by a ConfigMap.
    assert "OSTEOSCREEN_MODEL_TAG" not in data
    env_from = main_container(render(overlay))["envFrom"]
    assert {"configMapRef": {"name": "osteoscreen-config"}} in env_from


# ============================================================================ names and labels
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_the_pods_and_name_real_ports(overlay):
    """Every Service selects the pods of exactly one workload and names that workload's ports."""
    docs = render(overlay)
    pods = [(w["spec"]["template"]["metadata"]["labels"], w) for w in workloads(docs)]
    for labels, workload in pods:
        assert selects(workload["spec"]["selector"], labels)
        assert sum(selects(other["spec"]["selector"], labels) for _, other in pods) == 1, "overlapping selectors"
    services = find(docs, "Service")
    for service in services:
        (workload,) = [w for labels, w in pods if selects({"matchLabels": service["spec"]["selector"]}, labels)]
        container = next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == "osteoscreen")
        container_ports = {p["name"] for p in container["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports
            if port["name"] == "dicom":  # DICOM upper layer over TCP: no appProtocol applies
                continue
            assert port.get("appProtocol"), f"{service['metadata']['name']}:{port['name']} needs appProtocol"
            if port["name"] == "grpc":
                assert port["port"] == GRPC_PORT and port["appProtocol"] in ("kubernetes.io/h2c", "grpc")
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1, "a headless Service for client-side gRPC round robin"
    assert [p["name"] for p in headless[0]["spec"]["ports"]] == ["grpc"]
    assert headless[0]["spec"].get("publishNotReadyAddresses", False) is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_scrapes_exactly_the_main_service(overlay):
    docs = render(overlay)
    monitor = one(docs, "ServiceMonitor")
    matched = [s for s in find(docs, "Service") if selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
    # one Service per workload (the PACS node's too, where there is one), so one target per pod
    assert [s["metadata"]["name"] for s in matched] == ["osteoscreen"] + (["osteoscreen-dicom"] if find(
        docs, "StatefulSet") else []), "one Service per workload, so one target per pod"
    for dicom in matched[1:]:
        assert dicom["metadata"]["labels"][monitor["spec"]["jobLabel"]] == JOB  # the same job: the same alerts
    service = matched[0]
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert service_ports[endpoint["port"]]["port"] == HTTP_PORT and endpoint.get("path", "/metrics") == "/metrics"
    assert "namespaceSelector" not in monitor["spec"] or monitor["spec"]["namespaceSelector"] == {
        "matchNames": [NAMESPACE]}
    # job="osteoscreen" in every rule and panel comes from this label of the Service.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == JOB


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_autoscaler_targets_the_deployment(overlay):
    docs = render(overlay)
    hpas, scaled = find(docs, "HorizontalPodAutoscaler"), find(docs, "ScaledObject")
    assert len(hpas) + len(scaled) == 1, "exactly one autoscaler per overlay"
    target = (hpas or scaled)[0]["spec"]["scaleTargetRef"]
    assert (target.get("apiVersion", "apps/v1"), target.get("kind", "Deployment"), target["name"]) == (
        "apps/v1", "Deployment", deployment(docs)["metadata"]["name"])
    # The autoscaler owns the replica count: a `replicas:` in the Deployment would reset it on every apply.
    assert "replicas" not in deployment(docs)["spec"]
    if hpas:
        spec = hpas[0]["spec"]
        assert hpas[0]["metadata"]["name"] == "osteoscreen"  # the alerts and dashboard look it up by this name
        low, high = spec["minReplicas"], spec["maxReplicas"]
        assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    else:
        spec = scaled[0]["spec"]
        assert spec["advanced"]["horizontalPodAutoscalerConfig"]["name"] == "osteoscreen"
        low, high = spec["minReplicaCount"], spec["maxReplicaCount"]
        hpa_behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert hpa_behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
        assert spec["fallback"]["replicas"] >= low
    assert 2 <= low < high, "at least 2 replicas (survives a drain, see the PodDisruptionBudget)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_on_queue_pressure_with_a_utilisation_fallback(overlay):
    docs = render(overlay)
    for hpa in find(docs, "HorizontalPodAutoscaler"):
        metrics = hpa["spec"]["metrics"]
        pods = [m["pods"] for m in metrics if m["type"] == "Pods"]
        assert pods and pods[0]["metric"]["name"] == "osteoscreen_inflight_requests"
        assert pods[0]["target"]["type"] == "AverageValue"
        target = quantity(pods[0]["target"]["averageValue"])
        assert 0 < target < int(config(docs)["OSTEOSCREEN_GRPC_MAX_CONCURRENT"]) / 4
        assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics)
        if overlay in GPU_OVERLAYS:
            assert any(p["metric"]["name"] == "osteoscreen_gpu_utilization" for p in pods)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdb_and_networkpolicy_cover_the_pods(overlay):
    docs = render(overlay)
    pod_labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"], pod_labels)
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1
    for workload in workloads(docs):  # each workload's pods under exactly one policy
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert sum(selects(p["spec"]["podSelector"], labels) for p in find(docs, "NetworkPolicy")) == 1
    (policy,) = [p for p in find(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"], pod_labels)]
    assert "Ingress" in policy["spec"]["policyTypes"]
    port_names = {p["name"] for p in main_container(docs)["ports"]}
    sources = []
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits everyone"
        for port in rule["ports"]:
            assert port["port"] in port_names or port["port"] in (GRPC_PORT, HTTP_PORT)
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            sources.append(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
    assert len(sources) == 2 and "monitoring" in sources, "only the platform's namespace and Prometheus"


@pytest.mark.parametrize("overlay", TLS_OVERLAYS)
def test_tls_component_wires_certificates_secret_settings_and_scrape(overlay):
    docs = render(overlay)
    data = config(docs)
    mount = next(m for m in main_container(docs)["volumeMounts"] if m["name"] == "tls")
    assert mount["readOnly"] is True and "subPath" not in mount, "subPath mounts never see renewed files"
    volume = next(v for v in pod_spec(docs)["volumes"] if v["name"] == "tls")
    server = one(docs, "Certificate", "osteoscreen-server")
    assert volume["secret"]["secretName"] == server["spec"]["secretName"]
    for key, file in (("OSTEOSCREEN_TLS_CERT", "tls.crt"), ("OSTEOSCREEN_TLS_KEY", "tls.key"),
                      ("OSTEOSCREEN_TLS_CLIENT_CA", "ca.crt")):
        assert data[key] == f"{mount['mountPath']}/{file}", key
    # clients reach the pods through the Services: the certificate must name them
    for service in find(docs, "Service"):
        assert f"{service['metadata']['name']}.{NAMESPACE}.svc" in server["spec"]["dnsNames"]
    assert "server auth" in server["spec"]["usages"] and server["spec"]["privateKey"]["rotationPolicy"] == "Always"
    issuers = {d["metadata"]["name"] for d in find(docs, "Issuer")}
    for cert in find(docs, "Certificate"):
        assert cert["spec"]["issuerRef"]["name"] in issuers
    allowed = [a.strip() for a in data["OSTEOSCREEN_ALLOWED_CLIENTS"].split(",")]
    client = one(docs, "Certificate", "osteoscreen-client-radiology-platform")
    assert set(client["spec"]["dnsNames"]) & set(allowed) and client["spec"]["usages"][-1] == "client auth"
    endpoint = one(docs, "ServiceMonitor")["spec"]["endpoints"][0]
    prometheus = one(docs, "Certificate", "osteoscreen-prometheus")
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"]["cert"]["secret"]["name"] == prometheus["spec"]["secretName"]
    assert endpoint["tlsConfig"]["serverName"] in server["spec"]["dnsNames"]
    # the health port is no Service's and no NetworkPolicy rule's: only the kubelet reaches it
    assert all(p["targetPort"] != "health" for s in find(docs, "Service") for p in s["spec"]["ports"])
    assert all(p["port"] not in ("health", HEALTH_PORT) for r in one(docs, "NetworkPolicy")["spec"]["ingress"]
               for p in r["ports"])


def test_gateway_route_points_at_the_grpc_port():
    route = one(render("gateway"), "GRPCRoute")
    service = one(render("overlays/gpu"), "Service", "osteoscreen")
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    for rule in route["spec"]["rules"]:
        for ref in rule["backendRefs"]:
            assert (ref["name"], ref["port"]) == ("osteoscreen", grpc_port["port"])
    services = {m["method"]["service"] for r in route["spec"]["rules"] for m in r["matches"]}
    assert {"osteoscreen.v1.Screening", "inference.GRPCInferenceService"} <= services


# ============================================================================ metric names
def exported_metrics() -> dict[str, str]:
    """name -> type, from the text of osteoscreen/serving/metrics.py (Counter/Gauge/Histogram(name="..."))."""
    text = METRICS_PY.read_text()
    found = dict((name, kind) for kind, name in re.findall(
        r"\.(Counter|Gauge|Histogram|Summary)\(\s*name=\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"", text))
    assert len(found) >= 9 and len(found) == len(re.findall(r'\bname="', text)), "parse of metrics.py"
    return found


BENTOML_BUILTINS = {
    "bentoml_service_request_total": "Counter",
    "bentoml_service_request_duration_seconds": "Histogram",
    "bentoml_service_request_in_progress": "Gauge",
}
STANDARD_PREFIXES = ("kube_", "DCGM_FI_", "container_")


def recording_rules() -> set[str]:
    doc = yaml.safe_load(RULES.read_text())
    return {r["record"] for g in doc["spec"]["groups"] for r in g["rules"] if "record" in r}


def known_series() -> set[str]:
    names = {"up"} | recording_rules()
    for name, kind in {**exported_metrics(), **BENTOML_BUILTINS}.items():
        names.add(name)
        if kind in ("Histogram", "Summary"):
            names |= {f"{name}_sum", f"{name}_count"} | ({f"{name}_bucket"} if kind == "Histogram" else set())
    return names


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                 "offset", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (also prometheus-adapter templates and Grafana variables)."""
    text = re.sub(r"<<[^>]*>>", " ", expr)                              # adapter templates
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', " ", text)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)                              # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)                             # ranges, subqueries
    text = re.sub(r"\$\{?\w+\}?", " ", text)                            # Grafana variables
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        word, is_call = match.group(1), match.group(2)
        if is_call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def unknown_metrics(exprs: list[str]) -> set[str]:
    known = known_series()
    unknown = set()
    for expr in exprs:
        for name in promql_metrics(expr):
            if name not in known and not name.startswith(STANDARD_PREFIXES):
                unknown.add(name)
    return unknown


def test_metric_name_parser_finds_what_it_should():
    expr = ('sum by (namespace, le) (rate(osteoscreen_made_up_bucket{job="x", le=~"1|2"}[5m])) / on (namespace) '
            'group_left (pod) max(kube_pod_info) > bool 0.5 or vector(1) and osteoscreen:requests:rate5m')
    assert promql_metrics(expr) == {"osteoscreen_made_up_bucket", "kube_pod_info", "osteoscreen:requests:rate5m"}
    assert unknown_metrics([expr]) == {"osteoscreen_made_up_bucket"}
    assert "osteoscreen_inflight_requests" in exported_metrics()
    assert "osteoscreen_request_duration_seconds_bucket" in known_series()


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def test_prometheus_adapter_rules_use_exported_metrics():
    rules = adapter_rules()
    assert rules
    for rule in rules:
        assert set(rule) >= {"seriesQuery", "resources", "name", "metricsQuery"}
        overrides = rule["resources"]["overrides"]
        assert overrides["namespace"] == {"resource": "namespace"} and overrides["pod"] == {"resource": "pod"}
        assert "<<.Series>>" in rule["metricsQuery"] or "<<.LabelMatchers>>" in rule["metricsQuery"]
        assert "<<.GroupBy>>" in rule["metricsQuery"]
        assert re.match(rule["name"]["matches"], promql_metrics(rule["seriesQuery"]).pop())
    assert not unknown_metrics([r["seriesQuery"] for r in rules] + [r["metricsQuery"] for r in rules])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_metrics_exist(overlay):
    docs = render(overlay)
    served = {rule["name"]["as"] for rule in adapter_rules()}
    for hpa in find(docs, "HorizontalPodAutoscaler"):
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] in ("Pods", "Object", "External"):
                name = metric[metric["type"].lower()]["metric"]["name"]
                assert name in served, f"HPA metric {name} is served by no prometheus-adapter rule"
    queries = []
    for scaled in find(docs, "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            if trigger["type"] == "prometheus":
                query = trigger["metadata"]["query"]
                assert f'namespace="{NAMESPACE}"' in query, "the query must be scoped to the overlay's namespace"
                assert float(trigger["metadata"]["threshold"]) > 0
                queries.append(query)
    assert not unknown_metrics(queries)


def test_alerts_use_exported_metrics_and_carry_a_runbook():
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["spec"]["groups"] for r in g["rules"]]
    assert not unknown_metrics([r["expr"] for r in rules])
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    for required in ("OsteoscreenHighErrorRatio", "OsteoscreenLatencyP95OverSLO", "OsteoscreenNoReadyReplicas",
                     "OsteoscreenQueueSaturated", "OsteoscreenPredictionMixDrift", "OsteoscreenProbabilityDrift"):
        assert required in alerts
    for name, alert in alerts.items():
        annotations = alert["annotations"]
        assert annotations.get("summary") and annotations.get("description"), name
        assert annotations.get("runbook") and "\n" not in annotations["runbook"].strip(), f"{name}: one-line runbook"
        assert alert["labels"]["severity"] in ("critical", "warning"), name
        assert alert.get("for"), f"{name}: a `for` so that one bad scrape does not page"
    # Every recording rule follows level:metric:operations and is used somewhere.
    used = " ".join([r["expr"] for r in rules] + dashboard_exprs())
    for record in recording_rules():
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", record), record
        assert used.count(record) >= 1, f"recording rule {record} is used nowhere"


def test_alerts_have_a_runbook_section_in_the_deploy_docs():
    text = (REPO / "docs" / "deploy.md").read_text()
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["spec"]["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert re.search(rf"^#+ {rule['alert']}$", text, re.M), f"docs/deploy.md: no runbook for {rule['alert']}"


# ============================================================================ dashboard
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    exprs = []
    for panel in dashboard()["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query))
    return exprs


def test_dashboard_uses_exported_metrics():
    assert not unknown_metrics(dashboard_exprs())


def test_dashboard_shows_what_operators_need():
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    names = set().union(*(promql_metrics(e) for e in dashboard_exprs()))
    text = " ".join(dashboard_exprs())
    required = {
        "traffic by protocol": "osteoscreen:requests:rate5m",
        "error ratio": "osteoscreen:error_ratio:rate5m",
        "latency": "osteoscreen_request_duration_seconds_bucket",
        "queue time": "osteoscreen_queue_wait_seconds_bucket",
        "batch size": "osteoscreen_batch_size_bucket",
        "replicas": "kube_deployment_status_replicas_available",
        "prediction mix": "osteoscreen_predictions_total",
        "probability distribution": "osteoscreen_prediction_probability_bucket",
        "GPU utilisation": "DCGM_FI_DEV_GPU_UTIL",
        "GPU memory": "DCGM_FI_DEV_FB_USED",
        "memory": "container_memory_working_set_bytes",
        "autoscaling signal": "osteoscreen_inflight_requests",
    }
    missing = [what for what, metric in required.items() if metric not in names]
    assert not missing, f"dashboard lacks: {missing}"
    for q in ("0.50", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(osteoscreen_request_duration_seconds_bucket" in text
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel.get("targets"), panel["title"]
            assert all('namespace="$namespace"' in t["expr"] for t in panel["targets"]), panel["title"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_configmap_is_the_plain_file_for_grafanas_sidecar(overlay):
    docs = render(overlay)
    maps = [d for d in find(docs, "ConfigMap") if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(maps) == 1
    assert maps[0]["data"] == {"osteoscreen.json": DASHBOARD.read_text()}


# ============================================================================ no secrets in the repository
CREDENTIAL = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|API_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)


def env_lists(node):
    """Every `env:` list anywhere in a rendered object (pod templates, RayJob groups, the autoscaler)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield value
            else:
                yield from env_lists(value)
    elif isinstance(node, list):
        for item in node:
            yield from env_lists(item)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_no_secret_values_in_the_manifests(kustomization):
    """Credentials come from Secrets made in the cluster (secretKeyRef), never from a value committed here."""
    docs = render(kustomization)
    for secret in find(docs, "Secret"):
        assert not secret.get("data") and not secret.get("stringData"), f"Secret {secret['metadata']['name']}"
    for doc in docs:
        for env in env_lists(doc):
            for var in env:
                if CREDENTIAL.search(var["name"]):
                    assert "value" not in var and "secretKeyRef" in var.get("valueFrom", {}), \
                        f"{doc['kind']}/{doc['metadata']['name']}: {var['name']} must come from a Secret"
        for config_map in [doc] if doc["kind"] == "ConfigMap" else []:
            leaked = [k for k in config_map.get("data", {}) if CREDENTIAL.search(k)]
            assert not leaked, f"ConfigMap {doc['metadata']['name']}: {leaked}"


def test_secret_check_catches_a_literal():
    doc = {"kind": "RayJob", "metadata": {"name": "x"}, "spec": {"template": {"containers": [
        {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]}]}}}
    [env] = env_lists(doc)
    assert CREDENTIAL.search(env[0]["name"]) and "value" in env[0]


# ============================================================================ the screening RayJob
SCREEN_COMMANDS = (["osteoscreen", "screen"], ["python", "-m", "osteoscreen.cli", "screen"])


def rayjob(docs=None) -> dict:
    return one(docs if docs is not None else render(SCREENING), "RayJob")


def ray_containers(job: dict) -> list[tuple[str, dict]]:
    """(role, container) of every container the RayJob's pods run, the autoscaler sidecar included."""
    out = [(role, c) for role, template in ray_pod_templates(job).items()
           for c in template["spec"]["containers"] + template["spec"].get("initContainers", [])]
    options = job["spec"]["rayClusterSpec"].get("autoscalerOptions")
    if job["spec"]["rayClusterSpec"].get("enableInTreeAutoscaling"):
        out.append(("autoscaler", {"name": "autoscaler", **options}))
    return out


def screen_args(entrypoint: str):
    """The entrypoint as `osteoscreen screen` would read it: shlex (as the shell Ray runs it in), then the CLI's
    own argparse parser. Nothing runs; a flag the command does not have, or a bad value, fails the parse."""
    import shlex

    from osteoscreen.cli import build_parser

    argv = shlex.split(entrypoint)
    prefix = next((p for p in SCREEN_COMMANDS if argv[:len(p)] == p), None)
    assert prefix, f"the entrypoint must run `osteoscreen screen`: {argv[:4]}"
    try:
        return build_parser().parse_args(argv[len(prefix) - 1:])
    except SystemExit as exit_:
        raise AssertionError(f"`osteoscreen screen` refuses the RayJob's entrypoint: {entrypoint}") from exit_


def test_rayjob_entrypoint_parses_with_the_screen_command():
    job = rayjob()
    args = screen_args(job["spec"]["entrypoint"])
    assert args.command == "screen" and args.func.__name__ == "_cmd_screen"
    assert args.ray_address == "auto", "the cluster the RayJob started, not a local Ray"
    assert args.out.startswith("s3://"), "results on object storage: every worker writes there"
    name, _, version = args.model.partition(":")
    assert name == "osteoscreen" and version and version != "latest", "the model pinned by its tag"
    assert not args.bench
    # the actor pool fits the cluster: GPU actors need the GPU group, whose pods hold one GPU each
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    if args.gpus_per_actor:
        gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["maxReplicas"]
                   for g in groups.values() for c in g["template"]["spec"]["containers"])
        assert args.actors * args.gpus_per_actor <= gpus
        gpu_cpus = quantity(groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        assert args.cpus_per_actor <= gpu_cpus


@pytest.mark.xfail(strict=True, reason="issue 24: `screen` takes --out as a local folder (pathlib.Path, mkdir, "
                   "chmod 0700); results on object storage need the pipeline, resume and worklist to write there")
def test_rayjob_out_reaches_the_pipeline_as_an_object_store_uri(monkeypatch):
    """What the CLI hands the pipeline for the RayJob's --out: the s3:// URI itself, so that the workers' result
    files and the worklist land in the bucket (a local path on a cluster would scatter them over the nodes)."""
    from osteoscreen.screening import pipeline

    args = screen_args(rayjob()["spec"]["entrypoint"])
    jobs = []
    monkeypatch.setattr(pipeline, "run", lambda job: jobs.append(job) or {})
    args.func(args)
    assert str(jobs[0].out) == args.out


@pytest.mark.parametrize("entrypoint", [
    "osteoscreen screen s3://a/m.parquet --out s3://b/o --ray-adress auto",          # a typo in a flag
    "python -m osteoscreen.cli screen --out s3://b/o",                              # no SOURCE
    "osteoscreen screen s3://a/m.parquet --out s3://b/o --since 2024-13-01",         # not a date
    "osteoscreen predict s3://a/m.parquet",                                         # not the screen command
])
def test_a_broken_entrypoint_is_refused(entrypoint):
    with pytest.raises(AssertionError):
        screen_args(entrypoint)


def test_rayjob_lifecycle():
    spec = rayjob()["spec"]
    assert spec["shutdownAfterJobFinishes"] is True, "the cluster goes when the job ends"
    assert 0 < spec["ttlSecondsAfterFinished"] <= 24 * 3600
    assert spec["activeDeadlineSeconds"] >= 24 * 3600, "an archive takes hours to days"
    assert 1 <= spec["backoffLimit"] <= 3, "a retry resumes (same --out): a few are cheap, endless ones are not"
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no tasks beside the driver"
    assert {g["groupName"] for g in cluster["workerGroupSpecs"]} == {"cpu", "gpu"}
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


def test_rayjob_ray_version_is_the_screen_extras():
    """The cluster's Ray, the image's Ray (docker/Dockerfile.ray) and the project's `screen` extra are one."""
    import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["screen"]
    (requirement,) = [d.split(";")[0].strip() for d in extra if d.startswith("ray")]
    match = re.fullmatch(r"ray\[([a-z,]+)\]==(\S+)", requirement)
    assert match and {"data", "default"} <= set(match.group(1).split(",")), requirement  # default: metrics agent
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == match.group(2)
    assert f'"{requirement}"' in (REPO / "docker" / "Dockerfile.ray").read_text()


def test_rayjob_runs_the_bento_image_with_ray():
    """Head, CPU workers and submitter: the CPU overlay's bento image; GPU workers: the GPU overlay's. Each with
    Ray added (tag + "-ray", docker/Dockerfile.ray): the same code and model as the service serves."""
    cpu_image = main_container(render("overlays/cpu"))["image"]
    gpu_image = main_container(render("overlays/gpu"))["image"]
    job = rayjob()
    for role, container in ray_containers(job):
        if role == "autoscaler":
            assert "image" not in container, "KubeRay runs the autoscaler from the head's image"
            continue
        expected = gpu_image if role == "worker-gpu" else cpu_image
        assert container["image"] == f"{expected}-ray", f"{role}: {container['image']}"


def test_rayjob_gpu_group_is_placed_as_the_served_gpu_pods():
    job = rayjob()
    served = pod_spec(render("overlays/gpu"))
    templates = ray_pod_templates(job)
    gpu = templates["worker-gpu"]["spec"]
    assert gpu["affinity"] == served["affinity"] and gpu["tolerations"] == served["tolerations"]
    (container,) = gpu["containers"]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert "nvidia.com/gpu" not in container["resources"].get("requests", {})
    for role, template in templates.items():
        if role != "worker-gpu":
            assert "nvidia.com/gpu" not in json.dumps(template), f"{role} must not take a GPU"


def test_rayjob_pods_security():
    job = rayjob()
    for role, template in ray_pod_templates(job).items():
        spec = template["spec"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc.get("runAsUser", 1) != 0, role
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", role
        assert spec["enableServiceLinks"] is False, role
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), role
        if role == "head":
            # KubeRay gives the head its autoscaler's account (with a Role to scale the groups): it needs the token
            assert "serviceAccountName" not in spec and "automountServiceAccountToken" not in spec
        else:
            assert spec["automountServiceAccountToken"] is False, role
            account = one(render(SCREENING), "ServiceAccount", spec["serviceAccountName"])
            assert account["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{role}: Ray's session directory needs a writable /tmp"
            for volume in mounts.values():
                assert "emptyDir" in volume and volume["emptyDir"].get("sizeLimit"), f"{role}: {volume}"
    for role, container in ray_containers(job):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged", False) is False, role
        assert sc["readOnlyRootFilesystem"] is True, role
        assert "ALL" in sc["capabilities"]["drop"] and not sc["capabilities"].get("add"), role


def test_rayjob_resources_and_metrics():
    job = rayjob()
    for role, container in ray_containers(job):
        resources = container["resources"]
        for resource in ("cpu", "memory"):
            request, limit = resources["requests"][resource], resources["limits"][resource]
            assert quantity(limit) >= quantity(request), f"{role}: {resource} limit < request"
    for role, container in ray_containers(job):
        if role.startswith("worker"):
            # VGG16 in TensorFlow holds ~2 GiB per model actor; Ray's object store takes 30 % of the memory
            assert quantity(container["resources"]["limits"]["memory"]) >= 16 * 2**30, role
    # Ray's metrics (port 8080) on every Ray node, named so that a PodMonitor can select the port
    cluster = job["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == 8080


def test_rayjob_credentials_reach_every_ray_node_from_the_secret():
    """--out and the manifest are on object storage: the driver (head) and every worker read or write there."""
    job = rayjob()
    for role, template in ray_pod_templates(job).items():
        if role == "submitter":
            continue  # it only submits the job: no credentials where none are needed
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "osteoscreen-screening-s3" and ref["key"], f"{role}: {name}"
    submitter = ray_pod_templates(job)["submitter"]["spec"]["containers"][0]
    assert not any(CREDENTIAL.search(e["name"]) for e in submitter.get("env", []))
