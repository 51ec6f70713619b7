"""server/metrics/: the exported names, types and labels are CONTRACT.md's plus the additions the
README documents, and nothing else: checked with every verb of ServerMetrics called (so every
lazily registered family exists) and on a real server after a request."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from experts.model.profile import StepProfile
from server.metrics import ServerMetrics
from tests.conftest import generate, running_server

# CONTRACT.md's table, as exposed: name -> (type, label names, label values initialised to 0).
CONTRACT: dict[str, tuple[str, set[str], list[dict[str, str]]]] = {
    "elasticmoe_requests_total": (
        "counter", {"status"}, [{"status": s} for s in ("ok", "invalid", "rejected", "cancelled", "error")],
    ),
    "elasticmoe_request_duration_seconds": ("histogram", set(), []),
    "elasticmoe_time_to_first_token_seconds": ("histogram", set(), []),
    "elasticmoe_inter_token_latency_seconds": ("histogram", set(), []),
    "elasticmoe_prompt_tokens_total": ("counter", set(), []),
    "elasticmoe_generated_tokens_total": ("counter", set(), []),
    "elasticmoe_requests_running": ("gauge", set(), []),
    "elasticmoe_requests_waiting": ("gauge", set(), []),
    "elasticmoe_kv_cache_usage_ratio": ("gauge", set(), []),
    "elasticmoe_expert_workers": ("gauge", set(), []),
    "elasticmoe_topology_version": ("gauge", set(), []),
    "elasticmoe_scale_events_total": (
        "counter",
        {"direction", "outcome"},
        [{"direction": d, "outcome": o} for d in ("up", "down", "rebalance") for o in ("committed", "aborted")],
    ),
    "elasticmoe_scale_duration_seconds": (
        "histogram", {"direction"}, [{"direction": d} for d in ("up", "down", "rebalance")],
    ),
    "elasticmoe_expert_bytes_moved_total": (
        "counter", {"path"}, [{"path": p} for p in ("remap", "peer", "disk")],
    ),
    "elasticmoe_expert_tokens_total": ("counter", {"layer", "expert"}, []),
    "elasticmoe_autoscaler_target_workers": ("gauge", set(), []),
}  # fmt: skip


def readme_additions() -> set[str]:
    """Metric names the README documents as additions to CONTRACT.md."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return set(re.findall(r"`(elasticmoe_[a-z_]+)", text))


def exported_families(text: str) -> set[str]:
    """Names of the families in an exposition, as its TYPE lines name them (counters with
    `_total`), without prometheus_client's standard `_created` timestamps."""
    return {n for n in re.findall(r"^# TYPE (\S+) \S+$", text, re.MULTILINE) if not n.endswith("_created")}


def assert_documented(text: str) -> None:
    """The exported families are exactly CONTRACT.md's and the README's additions."""
    exported, documented = exported_families(text), set(CONTRACT) | readme_additions()
    assert not exported - documented, f"exported but neither in CONTRACT.md nor in the README: {sorted(exported - documented)}"
    assert not documented - exported, f"documented but not exported: {sorted(documented - exported)}"


def samples(metrics: ServerMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value of everything `render()` exposes."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: ServerMetrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, frozenset(labels.items()))]


# Every public verb of ServerMetrics, called once by `exercised()`; a new verb must be added here
# (test_exercised_calls_every_verb), so a family registered only when it is called is checked too.
VERBS = {"request_finished", "inter_token", "tokens", "queue", "kv_cache_usage", "workers", "computing_workers", "topology_version",
         "scale_event", "bytes_moved", "expert_tokens", "expert_load_imbalance", "autoscaler_target",
         "worker_lost", "failover", "failover_failed", "degraded", "watch_engine_phases",
         "watch_worker_connections",
         "stream_write_timeout"}  # fmt: skip


def exercised() -> ServerMetrics:
    """Metrics after one call of every verb, so that every series exists."""
    m = ServerMetrics()
    m.request_finished("ok", duration_s=1.5, ttft_s=0.2)
    m.inter_token(0.012)
    m.tokens(prompt=7, generated=3)
    m.queue(running=2, waiting=5)
    m.kv_cache_usage(0.25)
    m.workers(3)
    m.computing_workers(1)
    m.topology_version(4)
    m.scale_event("up", "committed", duration_s=2.0)
    m.bytes_moved("remap", 4096)
    m.expert_tokens(0, [3, 0, 1, 4])
    m.expert_load_imbalance(1.5)
    m.autoscaler_target(3)
    m.worker_lost()
    m.failover(0.2)
    m.failover_failed()
    m.degraded(True)
    m.stream_write_timeout("grpc")
    profile = StepProfile(enabled=True)   # the engine's own profile, as app.py wires it
    profile.add("attention", 0.25)
    profile.add("experts", 0.5)
    profile.steps = 2
    m.watch_engine_phases(profile.snapshot)
    m.watch_worker_connections(lambda: {("w1", "data"): 2, ("w1", "transfer"): 0})
    return m


def test_exercised_calls_every_verb() -> None:
    public = {name for name, _ in inspect.getmembers(ServerMetrics, inspect.isfunction) if not name.startswith("_")}
    assert public - {"render", "serve", "stop"} == VERBS


def test_every_contract_metric_has_its_type_and_labels() -> None:
    text = exercised().render().decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    by_name: dict[str, set[frozenset[str]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            by_name.setdefault(s.name, set()).add(frozenset(s.labels))
    for name, (kind, labels, _) in CONTRACT.items():
        assert types.get(name) == kind, f"{name}: TYPE {types.get(name)!r}, contract says {kind}"
        if kind == "histogram":
            for suffix, extra in (("_bucket", {"le"}), ("_sum", set()), ("_count", set())):
                assert by_name[name + suffix] == {frozenset(labels | extra)}, name + suffix
        else:
            assert by_name[name] == {frozenset(labels)}, name
    assert_documented(text)
    m = samples(exercised())
    assert m[("elasticmoe_engine_step_phase_seconds_total", frozenset({("phase", "experts")}))] == 0.5
    assert m[("elasticmoe_engine_steps_total", frozenset())] == 2


def test_known_label_values_start_at_zero() -> None:
    fresh = samples(ServerMetrics())
    for name, (kind, _, children) in CONTRACT.items():
        sample = name + "_count" if kind == "histogram" else name
        for labels in children:
            assert fresh[(sample, frozenset(labels.items()))] == 0, (name, labels)


def test_verbs_add_up() -> None:
    m = ServerMetrics()
    m.request_finished("ok", duration_s=0.3, ttft_s=0.05)
    m.request_finished("ok")
    m.request_finished("cancelled", duration_s=1.0)
    m.tokens(prompt=10)
    m.tokens(generated=4)
    m.tokens(prompt=1, generated=1)
    m.scale_event("down", "aborted", duration_s=12.0)
    m.scale_event("down", "committed")
    m.bytes_moved("peer", 100)
    m.bytes_moved("peer", 23)
    m.queue(running=1, waiting=0)
    m.queue(running=4, waiting=9)

    assert value(m, "elasticmoe_requests_total", status="ok") == 2
    assert value(m, "elasticmoe_requests_total", status="cancelled") == 1
    assert value(m, "elasticmoe_request_duration_seconds_count") == 2
    assert value(m, "elasticmoe_request_duration_seconds_sum") == pytest.approx(1.3)
    assert value(m, "elasticmoe_time_to_first_token_seconds_count") == 1
    assert value(m, "elasticmoe_time_to_first_token_seconds_bucket", le="0.05") == 1
    assert value(m, "elasticmoe_prompt_tokens_total") == 11
    assert value(m, "elasticmoe_generated_tokens_total") == 5
    assert value(m, "elasticmoe_scale_events_total", direction="down", outcome="aborted") == 1
    assert value(m, "elasticmoe_scale_events_total", direction="down", outcome="committed") == 1
    assert value(m, "elasticmoe_scale_duration_seconds_count", direction="down") == 1
    assert value(m, "elasticmoe_scale_duration_seconds_count", direction="up") == 0
    assert value(m, "elasticmoe_expert_bytes_moved_total", path="peer") == 123
    assert value(m, "elasticmoe_requests_running") == 4
    assert value(m, "elasticmoe_requests_waiting") == 9


def test_expert_tokens_accumulate_per_layer_and_expert() -> None:
    m = ServerMetrics()
    m.expert_tokens(1, [2, 0, 5])
    m.expert_tokens(1, np.array([1, 1, 0], dtype=np.int32))
    m.expert_tokens(0, [0, 0])
    m.expert_tokens(1, [0, 0, 0, 7])  # a longer row grows the layer
    m.expert_tokens(3, [])  # a layer no token reached in this step
    got = {
        (dict(labels)["layer"], dict(labels)["expert"]): v
        for (name, labels), v in samples(m).items()
        if name == "elasticmoe_expert_tokens_total"
    }
    assert got == {
        ("0", "0"): 0, ("0", "1"): 0,
        ("1", "0"): 3, ("1", "1"): 1, ("1", "2"): 5, ("1", "3"): 7,
    }  # fmt: skip


def test_expert_tokens_takes_a_cpu_tensor() -> None:
    torch = pytest.importorskip("torch")
    m = ServerMetrics()
    m.expert_tokens(2, torch.bincount(torch.tensor([0, 2, 2]), minlength=4))
    assert value(m, "elasticmoe_expert_tokens_total", layer="2", expert="2") == 2
    assert value(m, "elasticmoe_expert_tokens_total", layer="2", expert="3") == 0


def test_servers_in_one_process_do_not_share_metrics() -> None:
    a, b = ServerMetrics(), ServerMetrics()
    a.request_finished("error")
    a.expert_tokens(0, [1])
    assert value(a, "elasticmoe_requests_total", status="error") == 1
    assert value(b, "elasticmoe_requests_total", status="error") == 0
    assert ("elasticmoe_expert_tokens_total", frozenset({("layer", "0"), ("expert", "0")})) not in samples(b)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.request_finished("OK"),
        lambda m: m.request_finished("timeout"),
        lambda m: m.request_finished("ok", duration_s=-1.0),
        lambda m: m.request_finished("ok", ttft_s=float("nan")),
        lambda m: m.inter_token(float("inf")),
        lambda m: m.tokens(prompt=-1),
        lambda m: m.tokens(generated=1.5),
        lambda m: m.queue(running=-1, waiting=0),
        lambda m: m.kv_cache_usage(1.5),
        lambda m: m.kv_cache_usage(float("nan")),
        lambda m: m.workers(-2),
        lambda m: m.computing_workers(-1),
        lambda m: m.topology_version(-1),
        lambda m: m.scale_event("sideways", "committed"),
        lambda m: m.scale_event("up", "done"),
        lambda m: m.scale_event("up", "committed", duration_s=-3.0),
        lambda m: m.bytes_moved("nfs", 10),
        lambda m: m.bytes_moved("peer", -10),
        lambda m: m.expert_tokens(-1, [1]),
        lambda m: m.expert_tokens(0, [1, -1]),
        lambda m: m.expert_tokens(0, [0.5, 1.0]),
        lambda m: m.expert_tokens(0, [[1, 2]]),
        lambda m: m.autoscaler_target(-1),
        lambda m: m.stream_write_timeout("websocket"),
    ],
)
def test_bad_values_raise_value_error(call) -> None:
    m = ServerMetrics()
    before = m.render()
    with pytest.raises(ValueError):
        call(m)
    # A refused call leaves no trace: no new series, no partial count.
    strip = re.compile(rb"^\S+_created(\{.*\})? .*$", re.MULTILINE)
    assert strip.sub(b"", m.render()) == strip.sub(b"", before)


def test_promtool_accepts_the_exposition(tmp_path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus; .ci/run installs it)")
    text = exercised().render()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_http_endpoint_serves_metrics_on_localhost() -> None:
    m = exercised()
    port = m.serve("127.0.0.1", 0)
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            body = response.read()
        assert b'elasticmoe_requests_total{status="ok"} 1.0' in body
        assert b"elasticmoe_expert_tokens_total" in body
        with pytest.raises(RuntimeError):
            m.serve("127.0.0.1", 0)
    finally:
        m.stop()
    m.stop()  # stopping twice is harmless
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_a_serving_server_exports_exactly_the_documented_families(tiny_models, ray_local) -> None:
    """The server's own wiring (engine phases from its profile, expert tokens from its steps),
    after a real request: the whole exported set against CONTRACT.md and the README."""
    with running_server(tiny_models["mixtral"], workers=1) as server:
        generate(server.channel, [5, 17, 33], max_tokens=4, ignore_eos=True)
        server.metrics.expert_load_imbalance(1.0)   # set by the rebalancer's window in a live server
        text = server.metrics.render().decode()
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    assert [s.value for s in families["elasticmoe_engine_steps"]] > [0]
    phases = {s.labels["phase"]: s.value for s in families["elasticmoe_engine_step_phase_seconds"]}
    assert {"schedule", "experts"} <= set(phases) and phases["experts"] > 0, phases
    assert_documented(text)
