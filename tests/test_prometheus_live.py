"""A real Prometheus (Debian's `prometheus`) scrapes a real server during a short Locust run; then every query
of the Grafana dashboard, every recording-rule and alert expression of the PrometheusRule, and the autoscaling
queries (prometheus-adapter, KEDA) run through Prometheus's HTTP API.

What this Prometheus mirrors from the cluster, so that the real queries run unchanged:
- The scrape job is what the Prometheus Operator generates from k8s/monitoring/servicemonitor.yaml: job
  `osteoscreen` (the Service's `app.kubernetes.io/name`, the ServiceMonitor's jobLabel), the endpoint's path,
  scheme and `honorLabels`, its metricRelabelings, and the target labels the operator attaches to every
  series: namespace, service, pod, container and `endpoint` (the port name). They are static labels here
  (loopback has no service discovery); like the operator's, they are target labels, so a metric label of
  the same name is renamed `exported_<name>` unless the ServiceMonitor sets `honorLabels: true`.
- The PrometheusRule's groups are loaded as they are, except that every group is evaluated each second (not
  every 30 s / 5 min) so recorded series exist within a short test. The server is scraped every 2 s.
- Grafana's variables: `$namespace` -> the namespace the labels carry (the KEDA queries' own), `$__rate_interval`
  -> 15s (Grafana's floor is 4 x the scrape interval, 2 s here), `$__interval` -> 2s, `$__range` -> 1m.

Every expression must parse and evaluate. Those that describe our own traffic (every metric they name comes
from the server or from our recording rules) must return data. Expressions that only name series of other
exporters -- kube-state-metrics (`kube_*`), the kubelet's cAdvisor (`container_*`), NVIDIA's DCGM exporter
(`DCGM_*`) -- cannot have data on a loopback test and are checked for parsing and evaluation only. Alert
expressions are conditions (empty means "not firing"), so for them the data check is that every series they
name exists.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from loadtest.server import free_port
from test_loadtest import run_locust, stats_rows
from tests.required_tools import missing_tool
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.server, pytest.mark.slow]  # the fixtures start a server and Prometheus, then 20 s of load
MONITORING = REPO / "k8s" / "monitoring"
RULES = MONITORING / "prometheusrule.yaml"
SERVICEMONITOR = MONITORING / "servicemonitor.yaml"
DASHBOARD = MONITORING / "dashboards" / "osteoscreen.json"
ADAPTER = REPO / "k8s" / "autoscaling" / "prometheus-adapter" / "values.yaml"
KEDA = REPO / "k8s" / "overlays" / "gpu-keda" / "scaledobject.yaml"

NAMESPACE = "osteoscreen"
POD = "osteoscreen-7d9f8c6b5-x2x7q"
TARGET_LABELS = {"namespace": NAMESPACE, "service": "osteoscreen", "pod": POD, "container": "osteoscreen"}
GRAFANA_VARIABLES = {"namespace": NAMESPACE, "__rate_interval": "15s", "__interval": "2s", "__range": "1m",
                     "__range_s": "60"}
EXTERNAL = re.compile(r"\b(kube_[a-zA-Z0-9_]+|container_[a-zA-Z0-9_]+|DCGM_[A-Z0-9_]+)\b")
OWN = re.compile(r"\b((?:osteoscreen|bentoml)_[a-zA-Z0-9_]+|osteoscreen:[a-zA-Z0-9_:]+)\b")


# ------------------------------------------------------------------------------------------ the expressions


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)


def substitute(expr: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in GRAFANA_VARIABLES:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", value, expr)


def external_only(expr: str) -> bool:
    """Every series the expression names comes from another exporter (kube-state-metrics, cAdvisor, DCGM)."""
    code = _strip_strings(expr)
    return bool(EXTERNAL.search(code)) and not OWN.search(code) and "up{" not in code.replace(" ", "")


def own_metric_names(expr: str) -> set[str]:
    return set(OWN.findall(_strip_strings(expr)))


def dashboard_queries() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((f"panel {panel.get('title')!r} {target.get('refId', '')}", target["expr"]))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def template_queries() -> list[tuple[str, str]]:
    out = []
    for var in json.loads(DASHBOARD.read_text()).get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var.get("query"), dict) else var.get("query", "")
            out.append((var["name"], query))
    return out


def rule_spec() -> dict:
    return yaml.safe_load(RULES.read_text())["spec"]


def rules() -> list[dict]:
    return [rule for group in rule_spec()["groups"] for rule in group["rules"]]


def autoscaling_queries() -> list[tuple[str, str]]:
    out = []
    for rule in yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]:
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)
        out.append((f"adapter seriesQuery {series}", rule["seriesQuery"]))
        query = (rule["metricsQuery"].replace("<<.Series>>", series)
                 .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{POD}"').replace("<<.GroupBy>>", "pod"))
        out.append((f"adapter metricsQuery {rule['name']['as']}", query))
    for doc in yaml.safe_load_all(KEDA.read_text()):
        for trigger in (doc or {}).get("spec", {}).get("triggers", []):
            if trigger.get("type") == "prometheus":
                out.append((f"KEDA trigger {trigger.get('name')}", trigger["metadata"]["query"]))
    return out


# ------------------------------------------------------------------------------------------ Prometheus


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def scrape_job(http_port: int) -> dict:
    """The Operator's scrape job for our ServiceMonitor, for one target on loopback."""
    endpoint = yaml.safe_load(SERVICEMONITOR.read_text())["spec"]["endpoints"][0]
    job = {
        "job_name": "osteoscreen",  # the Service's label named by jobLabel (app.kubernetes.io/name)
        "scrape_interval": "2s", "scrape_timeout": "2s",
        "metrics_path": endpoint.get("path", "/metrics"), "scheme": endpoint.get("scheme", "http"),
        "honor_labels": bool(endpoint.get("honorLabels", False)),
        "static_configs": [{"targets": [f"127.0.0.1:{http_port}"],
                            "labels": {**TARGET_LABELS, "endpoint": str(endpoint.get("port", "http"))}}],
    }
    if endpoint.get("metricRelabelings"):
        job["metric_relabel_configs"] = [{_snake(k): v for k, v in r.items()} for r in endpoint["metricRelabelings"]]
    return job


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def api(self, path: str, **params: str) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400/422: a parse or evaluation error, with its message
            return json.loads(exc.read() or b"{}") or {"status": "error", "error": str(exc)}

    def query(self, expr: str, at: float) -> dict:
        return self.api("query", query=expr, time=f"{at:.3f}")


@pytest.fixture(scope="module")
def server(registered_model, tmp_path_factory):
    """The session's model served as a site runs it in production: the refuse policy (the out-of-intended-use share
    counts refusals) and the PACS node on (the dashboard's PACS row and its alert name the node's series), storing
    results back to a destination that is down, so that the store failures and a waiting outbox entry exist."""
    from loadtest.server import ServerProcess
    from tests.test_dicom_node_pacs import MODALITY

    folder = tmp_path_factory.mktemp("server")
    srv = ServerProcess(env=registered_model["env"], log_path=folder / "server.log", OSTEOSCREEN_INTENDED_USE="refuse",
                        OSTEOSCREEN_DICOM_PORT=str(free_port()), OSTEOSCREEN_DICOM_HOST="127.0.0.1",
                        OSTEOSCREEN_DICOM_ALLOWED_AES=MODALITY, OSTEOSCREEN_OUTBOX_DIR=str(folder / "outbox"),
                        OSTEOSCREEN_RESULTS_DESTINATION=f"dicom://PACS@127.0.0.1:{free_port()}",
                        OSTEOSCREEN_RESULTS_RETRY_S="0.5", OSTEOSCREEN_RESULTS_RETRY_MAX_S="2").start()
    try:
        yield srv.wait_ready(600)
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    exe = shutil.which("prometheus")
    if exe is None:
        missing_tool("prometheus is not installed (Debian package `prometheus`; `make tools` installs it)")
    folder = tmp_path_factory.mktemp("prometheus")
    spec = rule_spec()
    for group in spec["groups"]:
        group["interval"] = "1s"
    (folder / "osteoscreen.rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    config = {"global": {"scrape_interval": "2s", "evaluation_interval": "1s"},
              "rule_files": ["osteoscreen.rules.yaml"], "scrape_configs": [scrape_job(server.http_port)]}
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = folder / "prometheus.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([exe, f"--config.file={folder / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                                cwd=folder, stdout=fh, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _send_bad_inputs(server) -> None:
    """One refused request per protocol, so the rejection series exist (HTTP 400, gRPC INVALID_ARGUMENT)."""
    import grpc

    from osteoscreen.client import ScreeningClient

    request = urllib.request.Request(f"{server.url}/predict", data=b"not an image",
                                     headers={"Content-Type": "application/octet-stream"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 400
    with ScreeningClient(server.grpc_target, timeout=30) as client, pytest.raises(grpc.RpcError) as rpc:
        client.predict(b"not an image")
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _send_to_the_node(server, folder: Path, png: Path) -> None:
    """A lumbar lateral film and a chest film over C-STORE: one screened (its result waits in the outbox, the
    destination being down), one skipped by its header; and the chest film over HTTP, refused by its header."""
    from tests.test_dicom_node_pacs import chest
    from tests.test_dicom_node_served import lumbar_lateral, storescu

    sent = storescu(int(server.env["OSTEOSCREEN_DICOM_PORT"]), folder, lumbar_lateral(png), chest())
    assert sent.returncode == 0, sent.stdout + sent.stderr
    request = urllib.request.Request(f"{server.url}/predict", data=chest(),
                                     headers={"Content-Type": "application/dicom"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=60)
    assert info.value.code == 422


@pytest.fixture(scope="module")
def scraped(server, prometheus, registered_model, tmp_path_factory) -> dict:
    """Traffic while Prometheus watches: bad inputs, films for the PACS node, then 20 s of Locust over all three APIs. Returns the time
    to evaluate at: inside the load, after the recording rules have run on it."""
    deadline = time.monotonic() + 30
    while not prometheus.query('up{job="osteoscreen"} == 1', time.time())["data"]["result"]:
        assert time.monotonic() < deadline, "Prometheus never scraped the server"
        time.sleep(0.5)
    _send_bad_inputs(server)
    # a training film the content check passes (test_dicom_node_served's choice)
    _send_to_the_node(server, tmp_path_factory.mktemp("storescu"),
                      sorted((registered_model["root"] / "data").glob("*/*.png"))[0])
    out = tmp_path_factory.mktemp("locust")
    # The SLO gate is tests/test_loadtest.py's business; here only the traffic matters (errors are traffic too).
    result = run_locust(server, out, ["HttpPredictUser", "GrpcPredictUser", "V2InferUser"], run_time="20s",
                        n_users=3, slo_file=None)
    end = time.time()
    assert result.returncode in (0, 1), result.stderr[-4000:]  # 1: some request failed
    rows = stats_rows(out)
    for key in (("POST", "/predict"), ("grpc", "osteoscreen.v1.Screening/Predict"),
                ("grpc", "inference.GRPCInferenceService/ModelInfer")):
        assert int(rows.get(key, {}).get("Request Count", 0)) > 0, (key, result.stderr[-3000:])
    wait_until(lambda: _settled(prometheus, end), 60, 0.5, "no scrape and rule evaluation after the load")
    return {"at": end - 1.5}


def _settled(prometheus: Prometheus, after: float) -> bool:
    """A scrape taken after `after` has landed, and every rule group has been evaluated a full interval (1 s)
    after it: the load's last samples and the recorded series computed from them are all in."""
    scrape = prometheus.query('timestamp(up{job="osteoscreen"})', time.time())["data"]["result"]
    if not scrape or (scraped_at := float(scrape[0]["value"][1])) < after:
        return False
    groups = prometheus.api("rules").get("data", {}).get("groups", [])
    evaluated = [dt.datetime.fromisoformat(g["lastEvaluation"]).timestamp() for g in groups]
    return bool(evaluated) and min(evaluated) >= scraped_at + 1.0


# ------------------------------------------------------------------------------------------ the checks


def collision_hint(prometheus: Prometheus, at: float) -> str:
    """Why our own series may lack a label the queries filter on: with honorLabels false, the operator's target
    labels (endpoint, service, namespace, pod, container, job, instance) rename the metric's own labels."""
    renamed = set()
    for label in ("endpoint", "service", "namespace", "pod", "container", "job", "instance"):
        if prometheus.query(f'count({{job="osteoscreen", exported_{label}!=""}})', at)["data"]["result"]:
            renamed.add(f"exported_{label}")
    if not renamed:
        return ""
    return (f"\nhint: series carry {sorted(renamed)}: metric labels collide with the target labels the Prometheus "
            "Operator attaches (e.g. `endpoint` = the port name, `service` = the Service name) and were renamed. "
            "Set `honorLabels: true` on the ServiceMonitor endpoint (or rename the metric labels).")


def _check(prometheus: Prometheus, items: list[tuple[str, str]], at: float, need_data) -> list[str]:
    problems = []
    for where, expr in items:
        try:
            text = substitute(expr)
        except KeyError as exc:
            problems.append(f"{where}: {exc}")
            continue
        answer = prometheus.query(text, at)
        if answer.get("status") != "success":
            problems.append(f"{where}: {answer.get('errorType')}: {answer.get('error')}\n    {text}")
        elif need_data(expr) and not answer["data"]["result"]:
            problems.append(f"{where}: no data\n    {text}")
    if problems and (hint := collision_hint(prometheus, at)):
        problems.append(hint)
    return problems


def test_prometheus_scrapes_the_server_with_the_operators_labels(prometheus, scraped):
    result = prometheus.query('max_over_time(up{job="osteoscreen"}[30s])', scraped["at"])["data"]["result"]
    assert len(result) == 1 and result[0]["value"][1] == "1", result
    labels = prometheus.query('up{job="osteoscreen"}', scraped["at"])["data"]["result"][0]["metric"]
    assert {k: labels.get(k) for k in TARGET_LABELS} == TARGET_LABELS


def test_dashboard_template_variables_resolve(prometheus, scraped):
    """`label_values(metric{...}, label)` is what Grafana asks the series API; it must offer our namespace."""
    assert template_queries(), "the dashboard has no query variables"
    for name, query in template_queries():
        match = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", query)
        assert match, f"variable {name}: only label_values(selector, label) is supported here: {query}"
        selector, label = match.groups()
        answer = prometheus.api(f"label/{label}/values", **{"match[]": selector})
        assert answer["status"] == "success", answer
        assert GRAFANA_VARIABLES[name] in answer["data"], f"variable {name}: {answer['data']}"


def test_every_dashboard_query_runs_and_traffic_queries_return_data(prometheus, scraped):
    queries = dashboard_queries()
    assert len(queries) >= 20
    problems = _check(prometheus, queries, scraped["at"], lambda expr: not external_only(expr))
    assert not problems, "dashboard queries:\n" + "\n".join(problems)


def test_every_recording_rule_returns_data(prometheus, scraped):
    recording = [(f"record {r['record']}", r["expr"]) for r in rules() if "record" in r]
    assert recording
    problems = _check(prometheus, recording, scraped["at"], lambda expr: not external_only(expr))
    # and the recorded series themselves, as the rule manager wrote them
    problems += _check(prometheus, [(f"recorded series {r['record']}", r["record"]) for r in rules() if "record" in r],
                       scraped["at"], lambda expr: True)
    assert not problems, "recording rules:\n" + "\n".join(problems)


def test_every_alert_expression_evaluates_and_its_series_exist(prometheus, scraped):
    alerts = [r for r in rules() if "alert" in r]
    assert alerts
    problems = _check(prometheus, [(f"alert {r['alert']}", r["expr"]) for r in alerts], scraped["at"], lambda e: False)
    for rule in alerts:
        for name in sorted(own_metric_names(rule["expr"])):
            if not prometheus.query(f"count({name})", scraped["at"])["data"]["result"]:
                problems.append(f"alert {rule['alert']}: series {name} does not exist")
    if problems and (hint := collision_hint(prometheus, scraped["at"])):
        problems.append(hint)
    assert not problems, "alerts:\n" + "\n".join(problems)


def test_rules_are_healthy_in_prometheus(prometheus, scraped):
    answer = prometheus.api("rules")
    assert answer["status"] == "success", answer
    loaded = [r for g in answer["data"]["groups"] for r in g["rules"]]
    assert len(loaded) == len(rules())
    unhealthy = [(r["name"], r.get("health"), r.get("lastError")) for r in loaded if r.get("health") != "ok"]
    assert not unhealthy, unhealthy


def test_every_series_the_monitoring_names_exists(prometheus, scraped):
    """A renamed metric or a typo in a label-less selector would otherwise only show as an empty panel."""
    exprs = [e for _, e in dashboard_queries()] + [r["expr"] for r in rules()] + [e for _, e in autoscaling_queries()]
    names = set().union(*(own_metric_names(e) for e in exprs))
    assert "osteoscreen_request_duration_seconds_bucket" in names
    missing = [n for n in sorted(names) if not prometheus.query(f"count({n})", scraped["at"])["data"]["result"]]
    assert not missing, (f"named by the dashboard/rules/autoscaling but not exposed or recorded: {missing}"
                         + collision_hint(prometheus, scraped["at"]))


def test_autoscaling_queries_return_data(prometheus, scraped):
    """prometheus-adapter's series and metrics queries (templates filled in) and the KEDA triggers."""
    queries = autoscaling_queries()
    assert len(queries) >= 4
    problems = _check(prometheus, queries, scraped["at"], lambda expr: not external_only(expr))
    assert not problems, "autoscaling queries:\n" + "\n".join(problems)
