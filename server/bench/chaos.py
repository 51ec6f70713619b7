"""`elasticmoe bench chaos`: concurrent greedy streams while a driver randomly SIGKILLs and
SIGSTOPs workers, scales up and down, and cancels clients.

The server runs in this process (the driver needs its workers' pids); its workers are Ray actors
as in `serve`. Every completed stream is compared with the tokens the same prompt had before any
fault. Prints requests served/failed/cancelled, identical tokens, the longest token gap across each
loss (p50/max), and /dev/shm bytes, RSS and threads before and after; JSON with --json, PNG with
--plot.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field

import grpc

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from server.bench.common import ensure_model, say, write_json

PROMPTS = [[5, 17, 33, 8], [100, 7, 9, 11, 250, 3], list(range(40, 60)), [3, 1, 4, 1, 5, 9, 2, 6],
           [77, 78, 79], [400, 12, 300, 7, 9]]
MAX_TOKENS = 32
LAST_WORKER = " (the last worker)"   # a kill event's suffix when no worker survives it


@dataclass
class Tally:
    served: int = 0
    failed: int = 0
    cancelled: int = 0
    mismatched: int = 0
    errors: list[str] = field(default_factory=list)
    gaps: list[tuple[float, float]] = field(default_factory=list)   # (previous token, this token)
    events: list[tuple[float, str]] = field(default_factory=list)   # (time, what the driver did)


def _shm_bytes(prefix: str = "emoe-") -> int:
    total = 0
    for f in os.listdir("/dev/shm"):
        if f.startswith(prefix):
            try:
                total += os.stat(os.path.join("/dev/shm", f)).st_size
            except FileNotFoundError:
                pass
    return total


def _rss_threads() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["Threads"])


def _client(channel: grpc.Channel, expected: list[list[int]], tally: Tally, lock: threading.Lock,
            stop: threading.Event, rng: random.Random) -> None:
    stub = pb_grpc.InferenceStub(channel)
    while not stop.is_set():
        i = rng.randrange(len(PROMPTS))
        cancel_after = rng.randrange(1, MAX_TOKENS) if rng.random() < 0.1 else None
        call = stub.Generate(pb.GenerateRequest(prompt_token_ids=PROMPTS[i], sampling=pb.SamplingParams(
            max_tokens=MAX_TOKENS, ignore_eos=True)), timeout=300)
        tokens, last, gaps = [], time.monotonic(), []   # a stall before the first token counts too
        try:
            for msg in call:
                now = time.monotonic()
                gaps.append((last, now))
                last = now
                tokens += msg.token_ids
                if cancel_after is not None and len(tokens) >= cancel_after:
                    call.cancel()
                    break
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED or cancel_after is None:
                with lock:
                    tally.failed += 1
                    tally.errors.append(f"{exc.code().name}: {exc.details()}")
                continue
        with lock:
            tally.gaps += gaps
            if cancel_after is not None:
                tally.cancelled += 1
            elif tokens == expected[i]:
                tally.served += 1
            else:
                tally.mismatched += 1
                tally.served += 1


def _driver(server, tally: Tally, stop: threading.Event, rng: random.Random, max_workers: int,
            worker_timeout: float) -> None:
    while not stop.wait(rng.uniform(4.0, 8.0)):
        topo = server.controller.topology
        if server.failover.state().degraded or topo is None:
            continue
        action = rng.choice(["kill", "kill", "stop", "scale"])
        victim = rng.choice(topo.placement.workers)
        pid = topo.workers[victim].pid
        now = time.monotonic()
        try:
            if action == "kill":
                # the last worker's experts have no live process left to be remapped into: its
                # replacement is a process start (seconds), which the failover goal does not cover
                tally.events.append((now, f"kill {victim}" + (LAST_WORKER if len(topo.workers) == 1 else "")))
                os.kill(pid, signal.SIGKILL)
            elif action == "stop":
                tally.events.append((now, f"stop {victim}"))
                os.kill(pid, signal.SIGSTOP)
                stop.wait(worker_timeout + 2.0)
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            else:
                n = rng.choice([k for k in range(1, max_workers + 1) if k != len(topo.workers)] or [1])
                tally.events.append((now, f"scale {len(topo.workers)}->{n}"))
                server.scale(n)
        except Exception as exc:   # a scale refused while a failover runs: the driver tries later
            tally.events.append((time.monotonic(), f"{action} failed: {exc}"))


def _loss_gaps(tally: Tally, kind: str, last_worker: bool | None = None) -> list[float]:
    """For each event of `kind` (kill, stop; of the last worker or not, or either when None): the
    longest wait for a token of one stream that spans the moment of the fault (a stall it causes
    lengthens exactly those waits)."""
    out = []
    for t, what in tally.events:
        if what.startswith(f"{kind} w") and last_worker in (None, what.endswith(LAST_WORKER)):
            out.append(max((b - a for a, b in tally.gaps if a <= t + 0.05 and b >= t), default=0.0))
    return out


def run(args: argparse.Namespace) -> int:
    from server.app import Server
    from server.config import ServerConfig
    from server.control import cluster

    model = ensure_model(args.model)
    rng = random.Random(0)
    cluster.connect(None)
    server = Server(ServerConfig(model=model, workers=2, port=0, metrics_port=-1, http_port=-1, worker_timeout_s=2.0))
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        expected = [[t for m in pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
            prompt_token_ids=p, sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)))
            for t in m.token_ids] for p in PROMPTS]
        mine = f"emoe-{server.namespace}-"
        shm0, (rss0, threads0) = _shm_bytes(mine), _rss_threads()
        tally, lock, stop = Tally(), threading.Lock(), threading.Event()
        clients = [threading.Thread(target=_client, args=(channel, expected, tally, lock, stop, random.Random(i)))
                   for i in range(args.clients)]
        for t in clients:
            t.start()
        driver = threading.Thread(target=_driver, args=(server, tally, stop, rng, 3, 2.0))
        driver.start()
        say(f"chaos for {args.minutes} min: {args.clients} clients, kills, stops, scales, cancels")
        stop.wait(args.minutes * 60)
        stop.set()
        driver.join()
        for t in clients:
            t.join(timeout=300)
        server.failover.wait_idle(120)
        time.sleep(2.0)   # reclaim runs beside serving, after the commit
        topo = server.controller.topology
        in_use = sum(os.stat(os.path.join("/dev/shm", n)).st_size for n in set(topo.segments.values()))
        shm1, (rss1, threads1) = _shm_bytes(mine), _rss_threads()
        # loss reported -> topology without the lost worker committed, over every failover of the run
        failovers = server.metrics.registry.get_sample_value("elasticmoe_failover_seconds_count") or 0
        failover_s = server.metrics.registry.get_sample_value("elasticmoe_failover_seconds_sum") or 0.0
    finally:
        channel.close()
        server.shutdown()
    shm_after_shutdown = _shm_bytes(f"emoe-{server.namespace}")
    gaps, stops = _loss_gaps(tally, "kill"), _loss_gaps(tally, "stop")
    survived, last = _loss_gaps(tally, "kill", last_worker=False), _loss_gaps(tally, "kill", last_worker=True)
    result = {
        "minutes": args.minutes, "clients": args.clients, "served": tally.served, "failed": tally.failed,
        "cancelled": tally.cancelled, "mismatched": tally.mismatched, "errors": tally.errors[:10],
        "kills": len(gaps), "kill_gap_p50_s": statistics.median(gaps) if gaps else None,
        "kill_gap_max_s": max(gaps) if gaps else None, "kill_gaps_s": gaps,
        "kills_with_a_survivor": len(survived),
        "kill_with_a_survivor_gap_p50_s": statistics.median(survived) if survived else None,
        "kill_with_a_survivor_gap_max_s": max(survived) if survived else None,
        "kills_of_the_last_worker": len(last), "kill_of_the_last_worker_gap_max_s": max(last) if last else None,
        "stops": len(stops),
        "failovers": failovers, "failover_mean_s": failover_s / failovers if failovers else None,
        "stop_gap_max_s": max(stops) if stops else None, "events": [w for _, w in tally.events],
        "shm_bytes_before": shm0, "shm_bytes_after": shm1, "shm_bytes_in_topology_after": in_use,
        "shm_bytes_after_shutdown": shm_after_shutdown,
        "rss_before": rss0, "rss_after": rss1, "threads_before": threads0, "threads_after": threads1,
    }
    say(f"served {tally.served} (identical tokens: {tally.served - tally.mismatched}), failed {tally.failed}, "
        f"cancelled by clients {tally.cancelled}")
    if gaps:
        say(f"{len(gaps)} SIGKILLs: longest token gap across each p50 {statistics.median(gaps) * 1000:.0f} ms, "
            f"max {max(gaps) * 1000:.0f} ms")
    if survived:
        say(f"  {len(survived)} with a survivor to remap into: p50 {statistics.median(survived) * 1000:.0f} ms, "
            f"max {max(survived) * 1000:.0f} ms")
    if last:
        say(f"  {len(last)} of the last worker (a process start): max {max(last) * 1000:.0f} ms")
    if failovers:
        say(f"{failovers:.0f} failovers: loss -> commit {failover_s / failovers * 1000:.0f} ms on average")
    if stops:
        say(f"{len(stops)} SIGSTOPs (worker timeout 2 s): longest gap max {max(stops) * 1000:.0f} ms")
    say(f"/dev/shm of this server: {shm0} B before, {shm1} B after ({in_use} B in the serving topology), "
        f"{shm_after_shutdown} B of this server after shutdown")
    say(f"RSS {rss0 >> 20} -> {rss1 >> 20} MiB, threads {threads0} -> {threads1}")
    write_json(args.json, result)
    if args.plot:
        _plot(args.plot, tally, gaps)
    return 0 if tally.failed == 0 and tally.mismatched == 0 else 1


def _plot(path: str, tally: Tally, gaps: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min((a for a, _ in tally.gaps), default=0.0)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot([b - t0 for _, b in tally.gaps], [(b - a) * 1000 for a, b in tally.gaps], ".", ms=2)
    for t, what in tally.events:
        ax.axvline(t - t0, color="red" if what.startswith(("kill", "stop")) else "gray", lw=0.8)
    ax.set_xlabel("seconds")
    ax.set_ylabel("token gap (ms)")
    ax.set_yscale("log")
    ax.set_title("chaos: token gaps; red = worker killed or stopped, gray = scale")
    fig.tight_layout()
    fig.savefig(path)
    say(f"wrote {path}")
