"""An autoscaler outside the server: read Prometheus, call Admin.Scale.

`elasticmoe serve --autoscale policy.yaml` scales from inside the server. This is the other way:
a loop that reads what Prometheus scraped from the server's /metrics and changes the worker count
through the public gRPC API, exactly as `elasticmoe scale N` does. Use it as a starting point for
a controller of your own (a cron job, a Kubernetes operator, a Ray Serve deployment).

    # a server, and a Prometheus scraping its metrics port (see deploy/prometheus/prometheus.yml)
    elasticmoe serve --model .demo-model --workers 1 --metrics-port 9400 &
    prometheus --config.file=deploy/prometheus/prometheus.yml &
    python examples/external_controller.py --prometheus http://127.0.0.1:9090 \
        --address 127.0.0.1:50051 --min-workers 1 --max-workers 4 --ttft-slo-s 1.0 \
        --max-waiting 8 --interval-s 15 --iterations 40

Every `--interval-s` it reads three things (PromQL below) and, after `--cooldown-s` since its last
change, scales up by one when the TTFT p95 is above `--ttft-slo-s` or more than `--max-waiting`
requests wait, and down by one when nothing waits and the TTFT p95 is below half the SLO (the
gap between the two is what keeps it from flapping). It stops after `--iterations` ticks
(0: never) and changes nothing with `--dry-run`. Addresses default to loopback.

This is deliberately simpler than the built-in policy (server/autoscale/policy.py), which also judges
inter-token latency, waits for a fresh window after each change and projects the utilisation a
downscale would leave.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

import grpc

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc

QUEUE = "sum(elasticmoe_requests_waiting)"
TTFT_P95 = ("histogram_quantile(0.95, sum by (le) "
            "(rate(elasticmoe_time_to_first_token_seconds_bucket[{window}])))")
WORKERS = "max(elasticmoe_expert_workers)"


@dataclass(frozen=True)
class Reading:
    waiting: float
    ttft_p95_s: float | None   # None: no request got a first token in the window
    workers: int


def query(prometheus: str, expr: str, timeout_s: float = 5.0) -> float | None:
    """The value of an instant query that returns one series; None when it returns none or NaN."""
    url = f"{prometheus.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {expr!r}: {body}")
    result = body["data"]["result"]
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if math.isnan(value) else value


def read(prometheus: str, window: str) -> Reading | None:
    """None until Prometheus has scraped the server at least once."""
    workers = query(prometheus, WORKERS)
    if workers is None:
        return None
    return Reading(waiting=query(prometheus, QUEUE) or 0.0,
                   ttft_p95_s=query(prometheus, TTFT_P95.format(window=window)),
                   workers=int(workers))


def target(r: Reading, min_workers: int, max_workers: int, ttft_slo_s: float, max_waiting: int) -> tuple[int, str]:
    """The worker count wanted now and why (pure: no I/O, no clock)."""
    ttft = "no TTFT samples" if r.ttft_p95_s is None else f"TTFT p95 {r.ttft_p95_s:.3f} s"
    why = f"{ttft}, {r.waiting:g} waiting, {r.workers} workers"
    if r.workers < min_workers or r.workers > max_workers:
        return min(max(r.workers, min_workers), max_workers), f"outside [{min_workers}, {max_workers}]: {why}"
    if (r.ttft_p95_s is not None and r.ttft_p95_s > ttft_slo_s) or r.waiting > max_waiting:
        return min(r.workers + 1, max_workers), f"pressure: {why}"
    if r.waiting == 0 and (r.ttft_p95_s is None or r.ttft_p95_s < ttft_slo_s / 2):
        return max(r.workers - 1, min_workers), f"slack: {why}"
    return r.workers, f"steady: {why}"


def scale(address: str, n: int, timeout_s: float) -> str:
    with grpc.insecure_channel(address) as channel:
        r = pb_grpc.AdminStub(channel).Scale(pb.ScaleRequest(num_workers=n), timeout=timeout_s)
    return f"topology v{r.topology.version} with {len(r.topology.workers)} workers in {r.duration_seconds:.2f} s"


def run(args: argparse.Namespace) -> int:
    last_change = -math.inf
    tick = 0
    while args.iterations == 0 or tick < args.iterations:
        if tick:
            time.sleep(args.interval_s)
        tick += 1
        try:
            reading = read(args.prometheus, args.window)
        except OSError as exc:  # Prometheus not up (yet): try again next tick
            print(f"[{tick}] cannot read {args.prometheus}: {exc}", flush=True)
            continue
        if reading is None:
            print(f"[{tick}] no elasticmoe series in Prometheus yet", flush=True)
            continue
        n, why = target(reading, args.min_workers, args.max_workers, args.ttft_slo_s, args.max_waiting)
        if n == reading.workers:
            print(f"[{tick}] hold at {n}: {why}", flush=True)
            continue
        if time.monotonic() - last_change < args.cooldown_s:
            print(f"[{tick}] want {n}, cooling down: {why}", flush=True)
            continue
        if args.dry_run:
            print(f"[{tick}] would scale {reading.workers} -> {n}: {why}", flush=True)
            continue
        try:
            done = scale(args.address, n, args.scale_timeout_s)
        except grpc.RpcError as exc:  # FAILED_PRECONDITION: a change is running or Ray lacks room
            print(f"[{tick}] scale to {n} refused: {exc.code().name}: {exc.details()}", flush=True)
            continue
        last_change = time.monotonic()
        print(f"[{tick}] scaled {reading.workers} -> {n} ({why}): {done}", flush=True)
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    p.add_argument("--address", default="127.0.0.1:50051", help="the server's gRPC address")
    p.add_argument("--min-workers", type=int, default=1)
    p.add_argument("--max-workers", type=int, default=4)
    p.add_argument("--ttft-slo-s", type=float, default=1.0, help="TTFT p95 to stay under")
    p.add_argument("--max-waiting", type=int, default=8, help="more waiting requests is pressure")
    p.add_argument("--window", default="1m", help="PromQL range of the TTFT rate, e.g. 30s, 1m")
    p.add_argument("--interval-s", type=float, default=15.0)
    p.add_argument("--cooldown-s", type=float, default=60.0, help="between two changes")
    p.add_argument("--iterations", type=int, default=40, help="ticks before exiting; 0 = forever")
    p.add_argument("--scale-timeout-s", type=float, default=600.0)
    p.add_argument("--dry-run", action="store_true", help="print decisions, change nothing")
    args = p.parse_args(argv)
    if not 1 <= args.min_workers <= args.max_workers:
        p.error(f"need 1 <= --min-workers ({args.min_workers}) <= --max-workers ({args.max_workers})")
    if args.iterations < 0 or args.interval_s <= 0:
        p.error("--iterations must be >= 0 and --interval-s > 0")
    return args


if __name__ == "__main__":
    sys.exit(run(parse()))
