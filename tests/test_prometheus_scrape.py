"""A real Prometheus scrapes a real server: traffic and one change of topology later, the
queries a dashboard or an external controller would run answer with what the server did. Then
examples/external_controller.py reads that Prometheus and scales the server through gRPC."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.conftest import generate, running_server

ROOT = Path(__file__).resolve().parents[1]
RANGE = "30s"  # covers the whole test, so every rate sees the traffic


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[str]:
    """A Prometheus on loopback scraping `target` every second; yields its base URL."""
    binary = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if binary is None:
        pytest.skip("prometheus is not installed: apt-get install prometheus (.ci/run installs it)")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": "elasticmoe", "static_configs": [{"targets": [target]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    web = f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address={web}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://{web}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, f"Prometheus not ready in 30 s:\n{log_path.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def query(url: str, expr: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def value(url: str, expr: str) -> float | None:
    """The one series' value of an instant query; None when it returns nothing."""
    result = query(url, expr)
    assert len(result) <= 1, f"{expr}: {result}"
    return float(result[0]["value"][1]) if result else None


Check = tuple[str, Callable[[float], bool]]  # PromQL, and what its value must satisfy


def wait_for(url: str, checks: dict[str, Check], timeout_s: float = 30.0) -> dict[str, float | None]:
    """Query every expression until each passes its check (Prometheus scrapes once a second);
    the last values otherwise, for the assertion message."""
    got: dict[str, float | None] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        got = {name: value(url, expr) for name, (expr, _) in checks.items()}
        if all(got[name] is not None and ok(got[name]) for name, (_, ok) in checks.items()):
            return got
        if time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_prometheus_scrapes_traffic_and_a_scale_change(tiny_models: dict[str, Path], ray_local: None,
                                                       tmp_path: Path) -> None:
    with running_server(tiny_models["mixtral"], workers=1, metrics_port=0) as server, \
            prometheus(tmp_path, f"127.0.0.1:{server.metrics_port}") as url:
        stop = threading.Event()
        errors: list[str] = []

        def traffic(client: int) -> None:
            for i in range(10_000):  # bounded; stopped long before
                if stop.is_set():
                    return
                try:
                    generate(server.channel, [3 + client, 5 + i % 50, 7], max_tokens=8, ignore_eos=True)
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")
                    return

        clients = [threading.Thread(target=traffic, args=(c,), daemon=True) for c in range(3)]
        for t in clients:
            t.start()
        try:
            time.sleep(2.0)  # a few scrapes on one worker first
            report = server.scale(2)
            assert len(report.topology.workers) == 2
            version = report.topology.version
            checks = {
                "tokens/s": (f"rate(elasticmoe_generated_tokens_total[{RANGE}])", lambda v: v > 0),
                "ttft p90": ("histogram_quantile(0.9, sum(rate(elasticmoe_time_to_first_token_seconds_bucket"
                             f"[{RANGE}])) by (le))", lambda v: math.isfinite(v) and v > 0),
                "workers": ("elasticmoe_expert_workers", lambda v: v == 2),
                "version": ("elasticmoe_topology_version", lambda v: v == version),
                "expert tokens": ("sum(elasticmoe_expert_tokens_total)", lambda v: v > 0),
                "scale ups": ('elasticmoe_scale_events_total{direction="up", outcome="committed"}', lambda v: v == 1),
                "ok requests": ('elasticmoe_requests_total{status="ok"}', lambda v: v > 0),
            }
            got = wait_for(url, checks)
            assert all(got[n] is not None and ok(got[n]) for n, (_, ok) in checks.items()), got
            per_expert = query(url, "elasticmoe_expert_tokens_total")
            layers = {int(s["metric"]["layer"]) for s in per_expert}
            assert layers == set(server.spec.moe_layers)
            assert len(per_expert) == len(server.spec.moe_layers) * server.spec.num_experts

            # The example controller: a TTFT SLO no request can meet is pressure -> one more worker.
            example = load_example("external_controller")
            args = example.parse(["--prometheus", url, "--address", f"127.0.0.1:{server.port}",
                                  "--max-workers", "3", "--ttft-slo-s", "1e-9", "--window", RANGE,
                                  "--iterations", "1", "--cooldown-s", "0"])
            assert example.run(args) == 0
            assert len(server.controller.topology.workers) == 3
            assert wait_for(url, {"workers": ("elasticmoe_expert_workers", lambda v: v == 3)})["workers"] == 3
        finally:
            stop.set()
            for t in clients:
                t.join(timeout=60)
        assert not errors, errors[:5]


def test_external_controller_decisions() -> None:
    example = load_example("external_controller")
    R = example.Reading

    def target(r: Any) -> int:
        return example.target(r, min_workers=1, max_workers=4, ttft_slo_s=1.0, max_waiting=8)[0]

    assert target(R(waiting=0, ttft_p95_s=2.0, workers=2)) == 3        # SLO missed
    assert target(R(waiting=9, ttft_p95_s=None, workers=2)) == 3       # queue
    assert target(R(waiting=9, ttft_p95_s=2.0, workers=4)) == 4        # at max
    assert target(R(waiting=0, ttft_p95_s=0.2, workers=2)) == 1        # slack
    assert target(R(waiting=0, ttft_p95_s=None, workers=1)) == 1       # at min
    assert target(R(waiting=0, ttft_p95_s=0.7, workers=2)) == 2        # between the two: hold
    assert target(R(waiting=1, ttft_p95_s=0.2, workers=2)) == 2        # something waits: hold
    assert target(R(waiting=0, ttft_p95_s=0.2, workers=6)) == 4        # above max
