"""What the benchmarks share: a server in its own process, streaming clients, metrics, output."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_model(model_dir: str, **shape) -> str:
    """Use the checkpoint at `model_dir`, writing a demo one there first if it has none."""
    if not (Path(model_dir) / "config.json").is_file():
        from experts.model.demo import DemoShape, write_demo_model

        say(f"no checkpoint in {model_dir}: writing a random-weight Mixtral there ({shape or 'default shape'})")
        write_demo_model(model_dir, "mixtral", seed=0, shape=DemoShape(**shape), progress=say)
    return model_dir


class ServerProcess:
    """`elasticmoe serve` in a child process on loopback; stops it with SIGINT like Ctrl-C."""

    def __init__(self, model: str, workers: int, *extra: str, ray_address: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        cmd = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--workers", str(workers),
               "--port", str(self.port), "--metrics-port", str(self.metrics_port),
               "--http-port", str(self.http_port), *extra]
        if ray_address:
            cmd += ["--ray-address", ray_address]
        self.log = open(os.devnull, "w") if not os.environ.get("ELASTICMOE_BENCH_LOG") else None
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=dict(os.environ, **(env or {})))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.address = f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} while starting")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.5)
        raise RuntimeError(f"server not ready within {timeout}s")

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {'name{labels}': value}."""
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def pids(self) -> list[int]:
        """The server and every process below it (Ray and its workers included)."""
        try:
            import psutil  # ray depends on it

            parent = psutil.Process(self.proc.pid)
            return [parent.pid] + [c.pid for c in parent.children(recursive=True)]
        except Exception:
            return [self.proc.pid]

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.log:
            self.log.close()

    def __enter__(self) -> "ServerProcess":
        try:
            self.wait_ready()
        except Exception:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class StreamLog:
    """Arrival times of every token of one stream."""
    start: float
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    error: str = ""


def run_batch(address: str, prompts: list[list[int]], max_tokens: int,
              nice: int = 0, stream_interval: int = 1) -> tuple[float, list[StreamLog]]:
    """Start all streams at once; return wall seconds and their logs. Every stream runs on one
    asyncio loop in one thread of its own (grpc.aio): one thread wakes for a step's burst of tokens,
    not one per stream (a thread per stream cost 3.2 vs 2.0 ms of client CPU per step at batch 32,
    on the 2 cores the server computes on: 1066/1081 vs 1118 tok/s in an A/B). `nice` > 0: the
    client runs at that niceness, so that a load generator sharing the server's cores takes the
    CPU the server leaves idle rather than preempting its engine and workers (a client on another
    machine costs the server nothing). `stream_interval`: as `GenerateRequest.stream_interval` (1: a
    message per token; max_tokens: each completion whole, after its first token)."""
    import asyncio

    async def one(stub, prompt_ids: list[int], log: StreamLog) -> None:
        req = pb.GenerateRequest(prompt_token_ids=prompt_ids, stream_interval=stream_interval,
                                 sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        try:
            async for msg in stub.Generate(req, timeout=600):
                now = time.monotonic()
                for t in msg.token_ids:
                    log.times.append(now)
                    log.tokens.append(t)
        except grpc.RpcError as exc:
            log.error = f"{exc.code().name}: {exc.details()}"

    async def main() -> tuple[float, list[StreamLog]]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            await channel.channel_ready()
            logs = [StreamLog(time.monotonic()) for _ in prompts]
            t0 = time.monotonic()
            await asyncio.gather(*(one(stub, p, log) for p, log in zip(prompts, logs)))
            return time.monotonic() - t0, logs

    def client() -> None:   # a thread of its own: its niceness goes with it
        if nice:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        result.append(asyncio.run(main()))

    result: list[tuple[float, list[StreamLog]]] = []
    thread = threading.Thread(target=client, name="bench-client")
    thread.start()
    thread.join()
    if not result:
        raise RuntimeError("the benchmark's client failed (see its traceback above)")
    return result[0]


def write_json(path: str | None, data: object) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
        say(f"wrote {path}")


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
