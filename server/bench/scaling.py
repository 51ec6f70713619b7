"""`elasticmoe bench scaling`: live changes of topology under a constant load of streams.

One node: 2 -> 3 -> 2 workers and a rebalance by the recent load without standby, then
2 -> 3 -> 2 with `--standby 1`. Two raylet nodes on this
machine: 2 -> 3 across nodes. Per change: duration and its phases, bytes per path, the longest gap
between two tokens of one stream during the change against steady state, tokens/s before / during
/ after, and the peak memory of all the server's processes (PSS, so shared expert pages count
once) against steady state. The floor for a scale-up without standby, starting one Ray actor that
imports torch, is measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from server.bench.common import ServerProcess, ensure_model, print_table, say, write_json

SHAPE = dict(hidden=512, layers=8, experts=8, top_k=2, intermediate=2048)   # ~800 MB of experts (fp32)
STREAMS = 8
MAX_TOKENS = 48
SETTLE_S = 4.0
DURING_MIN_S = 1.0


@dataclass
class Load:
    """STREAMS clients, each generating back-to-back requests until stopped; every token timed."""
    channel: grpc.Channel
    vocab: int
    stop: threading.Event = field(default_factory=threading.Event)
    tokens: list[float] = field(default_factory=list)                  # arrival time of every token
    gaps: list[tuple[float, float]] = field(default_factory=list)      # (prev, this) within one request
    errors: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(STREAMS)]
        for t in self.threads:
            t.start()

    def _client(self, i: int) -> None:
        stub = pb_grpc.InferenceStub(self.channel)
        n = 0
        while not self.stop.is_set():
            prompt = [(13 * i + 5 * n + j) % (self.vocab - 3) + 3 for j in range(16 + i)]
            req = pb.GenerateRequest(prompt_token_ids=prompt,
                                     sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
            prev = None
            try:
                for msg in stub.Generate(req, timeout=300):
                    now = time.monotonic()
                    for _ in msg.token_ids:
                        self.tokens.append(now)
                        if prev is not None:
                            self.gaps.append((prev, now))
                        prev = now
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")
            n += 1

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def rate(self, t0: float, t1: float) -> float:
        return sum(1 for t in self.tokens if t0 <= t < t1) / max(t1 - t0, 1e-9)

    def max_gap(self, t0: float, t1: float) -> float:
        """Longest gap between consecutive tokens of one stream that overlaps [t0, t1]."""
        return max((b - a for a, b in self.gaps if b >= t0 and a <= t1), default=0.0)


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size of these processes: shared pages split among their users."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


class MemorySampler:
    def __init__(self, pids: Callable[[], list[int]], every_s: float = 0.1) -> None:
        self.pids, self.every = pids, every_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), pss_bytes(self.pids())))
            self._stop.wait(self.every)

    def peak(self, t0: float, t1: float) -> int:
        return max((m for t, m in self.samples if t0 <= t <= t1), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class FloorProbe:
    """The floor of a scale-up without standby: starting one Ray actor that imports torch and
    answers a call, in a Ray of our own, measured idle and again under the benchmark's load."""

    def __init__(self) -> None:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)

        @ray.remote(num_cpus=0.5)
        class Probe:
            def __init__(self) -> None:
                import torch  # noqa: F401  (what a worker imports before it can serve)

            def ping(self) -> int:
                return 1

        self.probe = Probe

    def measure(self) -> float:
        import ray

        t0 = time.monotonic()
        p = self.probe.remote()
        ray.get(p.ping.remote())
        took = time.monotonic() - t0
        ray.kill(p)
        return took

    def close(self) -> None:
        import ray

        ray.shutdown()


def run_changes(label: str, server: ServerProcess, vocab: int, targets: list[int | str], rows: list[dict],
                timeline: dict, extra_pids: Callable[[], list[int]] = list,
                under_load: Callable[[], None] | None = None) -> None:
    load = Load(server.channel, vocab)
    mem = MemorySampler(lambda: server.pids() + extra_pids())
    load.start()
    origin = time.monotonic()
    admin = pb_grpc.AdminStub(server.channel)
    time.sleep(SETTLE_S)
    if under_load is not None:
        under_load()
        time.sleep(SETTLE_S)
    for n in targets:
        before0 = time.monotonic() - SETTLE_S
        t0 = time.monotonic()
        # "rebalance": re-place experts by the load of the window at the same worker count
        resp = (admin.Rebalance(pb.RebalanceRequest(), timeout=600) if n == "rebalance"
                else admin.Scale(pb.ScaleRequest(num_workers=n), timeout=600))
        t1 = time.monotonic()
        time.sleep(SETTLE_S)
        t2 = time.monotonic()
        row = {
            "setup": label, "change": f"-> {n}" if n != "rebalance" else "rebalance", "seconds": resp.duration_seconds,
            "phases": dict(resp.phase_seconds), "experts_moved": resp.experts_moved,
            "bytes_remapped": resp.bytes_remapped, "bytes_copied": resp.bytes_copied, "bytes_loaded": resp.bytes_loaded,
            # a change shorter than a second is measured over the second from its start: a rate
            # over a few milliseconds says nothing
            "tok_s_before": load.rate(before0, t0), "tok_s_during": load.rate(t0, max(t1, t0 + DURING_MIN_S)),
            "tok_s_after": load.rate(max(t1, t0 + DURING_MIN_S), t2),
            "max_gap_steady_s": load.max_gap(before0, t0 - 0.05), "max_gap_during_s": load.max_gap(t0, t1),
            "pss_steady_mb": mem.peak(before0, t0) / 2**20, "pss_peak_during_mb": mem.peak(t0, t1 + 0.2) / 2**20,
            "t_start": t0 - origin, "t_end": t1 - origin,
        }
        rows.append(row)
        say(f"{label} {row['change']}: {row['seconds']:.2f}s, tok/s {row['tok_s_before']:.0f} / "
            f"{row['tok_s_during']:.0f} / {row['tok_s_after']:.0f}, max gap {row['max_gap_steady_s'] * 1000:.0f} -> "
            f"{row['max_gap_during_s'] * 1000:.0f} ms")
    load.finish()
    mem.stop()
    if load.errors:
        raise RuntimeError(f"{label}: {len(load.errors)} requests failed: {load.errors[:3]}")
    timeline[label] = {"origin": origin, "tokens": [t - origin for t in load.tokens],
                       "changes": [(r["t_start"], r["t_end"], r["change"]) for r in rows if r["setup"] == label]}


_CLUSTER_CHILD = """
import sys
from ray.cluster_utils import Cluster
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "node_ip_address": "127.0.0.1",
                                                  "include_dashboard": False})
c.add_node(num_cpus=4, node_ip_address="127.0.0.1")
c.wait_for_nodes()
print(c.address, flush=True)
sys.stdin.read()          # until the benchmark closes our stdin
c.shutdown()
"""

# Ray must use loopback only: a node started without an explicit address then picks 127.0.0.1
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def two_node_cluster() -> tuple[str, subprocess.Popen]:
    """Two raylets on this machine (Ray's own cluster_utils), both on loopback, in a child process."""
    child = subprocess.Popen([sys.executable, "-c", _CLUSTER_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, **LOOPBACK_RAY))
    address = child.stdout.readline().strip()
    if not address:
        raise RuntimeError("the two-node Ray cluster did not start")
    return address, child


def _descendants(pid: int) -> list[int]:
    import psutil  # ray depends on it

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _plot(timeline: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(timeline), 1, figsize=(9, 2.6 * len(timeline)), squeeze=False)
    for ax, (label, data) in zip(axes[:, 0], timeline.items()):
        ts = sorted(data["tokens"])
        if not ts:
            continue
        # tokens/s over the trailing second, every 0.1 s: a step delivers a burst of tokens, so
        # narrower bins would only show the step rhythm
        import bisect

        grid = [i * 0.1 for i in range(10, int(ts[-1] / 0.1) + 1)]
        rate = [bisect.bisect_right(ts, g) - bisect.bisect_right(ts, g - 1.0) for g in grid]
        ax.plot(grid, rate, lw=1)
        for t0, t1, name in data["changes"]:
            ax.axvspan(t0, t1, color="orange", alpha=0.3)
            ax.text(t0, ax.get_ylim()[1] * 0.9, name, fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_ylabel("tokens/s")
    axes[-1, 0].set_xlabel("seconds since the load started (shaded: change of topology, request -> commit); "
                           "tokens/s over the trailing second")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    say(f"wrote {path}")


def run(args: argparse.Namespace) -> int:
    from experts.model.spec import load_spec

    model = ensure_model(args.model, **SHAPE)
    spec = load_spec(model)
    say(f"{spec.family}: {len(spec.moe_layers) * spec.num_experts} experts of {spec.expert_bytes / 2**20:.1f} MiB "
        f"({len(spec.moe_layers) * spec.num_experts * spec.expert_bytes / 2**20:.0f} MiB); {STREAMS} streams")
    probe = FloorProbe()
    floor = {"idle": min(probe.measure() for _ in range(2))}
    say(f"floor: starting one Ray actor that imports torch takes {floor['idle']:.2f}s on an idle machine")

    def floor_under_load() -> None:
        floor["under_load"] = probe.measure()
        say(f"floor under the same load: {floor['under_load']:.2f}s")

    rows: list[dict] = []
    timeline: dict = {}
    for label, extra in (("one node", []), ("one node, standby 1", ["--standby", "1"])):
        say(f"{label}: starting a server with 2 workers")
        with ServerProcess(model, 2, "--ray-num-cpus", "4", *extra) as srv:
            if extra:
                time.sleep(5)   # the standby worker starts after the server is up
            run_changes(label, srv, spec.vocab_size, [3, 2] if extra else [3, 2, "rebalance"], rows, timeline,
                        under_load=None if extra else floor_under_load)
        if not extra:
            probe.close()
    say("two raylet nodes: starting a Ray cluster on this machine")
    address, cluster = two_node_cluster()
    try:
        with ServerProcess(model, 2, ray_address=address, env=LOOPBACK_RAY) as srv:
            run_changes("two nodes", srv, spec.vocab_size, [3], rows, timeline,
                        extra_pids=lambda: _descendants(cluster.pid))
    finally:
        cluster.stdin.close()
        cluster.wait(timeout=120)
    print()
    mb = 2**20
    print_table(["setup", "change", "s", "start", "plan", "transfer", "commit", "remap MB", "copy MB", "disk MB",
                 "tok/s before", "during", "after", "max gap ms steady", "during", "PSS MB steady", "peak"],
                [[r["setup"], r["change"], r["seconds"], r["phases"].get("start", 0.0), r["phases"].get("plan", 0.0),
                  r["phases"].get("transfer", 0.0), r["phases"].get("commit", 0.0), r["bytes_remapped"] / mb,
                  r["bytes_copied"] / mb, r["bytes_loaded"] / mb, r["tok_s_before"], r["tok_s_during"],
                  r["tok_s_after"], r["max_gap_steady_s"] * 1000, r["max_gap_during_s"] * 1000,
                  r["pss_steady_mb"], r["pss_peak_during_mb"]] for r in rows])
    print(f"\nfloor (one Ray actor importing torch): {floor['idle']:.2f}s idle, "
          f"{floor.get('under_load', float('nan')):.2f}s under the same load; one expert = {spec.expert_bytes / mb:.1f} MB; "
          f"'during' spans at least {DURING_MIN_S:g}s from the request; PSS = all processes of the server and its Ray")
    write_json(args.json, {"model": model, "floor_actor_start_s": floor, "expert_mb": spec.expert_bytes / mb,
                           "streams": STREAMS, "results": rows, "timeline": timeline})
    if args.plot:
        _plot(timeline, args.plot)
    return 0
