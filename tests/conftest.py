"""Shared fixtures: tiny checkpoints of each family, a local Ray, and in-process servers over real gRPC."""
from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest

# Ray must only ever use loopback here: with this, a node started without an explicit address
# (a second raylet of ray.cluster_utils.Cluster, the GCS client) picks 127.0.0.1, not the host's IP.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from experts.model.demo import DemoShape, write_demo_model

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
TINY = DemoShape(hidden=64, layers=2, experts=8, top_k=2, intermediate=128, heads=4, kv_heads=2, vocab=512,
                 shard_mb=1)   # several shards with an index: the multi-file path is always exercised


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {f: write_demo_model(root / f, f, seed=7, shape=TINY) for f in FAMILIES}


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """One embedded single-node Ray per test module (on loopback only)."""
    import ray

    from server.control import cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster.connect(None, num_cpus=8)
    yield
    ray.shutdown()


@contextlib.contextmanager
def running_server(model_dir: Path | str, workers: int = 2, **overrides) -> Iterator["object"]:
    """A real server in this process: engine, Ray workers, gRPC on an ephemeral loopback port."""
    from server.app import Server
    from server.config import ServerConfig

    # HTTP off unless a test asks (port 0: any free port); the default 8000 would collide across tests
    cfg = dict(model=str(model_dir), workers=workers, port=0, metrics_port=-1, http_port=-1, kv_cache_tokens=4096)
    cfg.update(overrides)
    server = Server(ServerConfig(**cfg))
    try:
        server.start()
        server.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        yield server
    finally:
        if getattr(server, "channel", None) is not None:
            server.channel.close()
        server.shutdown()


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def read_until(proc: subprocess.Popen, lines: list[str], marker: str, timeout: float = 240.0) -> bool:
    """Read `proc`'s text output line by line into `lines` until a line holds `marker` (True), the
    output ends or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            return False
        lines.append(line)
        if marker in line:
            return True
    return False


def leftover_segments(namespace: str) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(f"emoe-{namespace}")]


def generate(channel: grpc.Channel, prompt_ids: list[int] | None = None, prompt: str = "", timeout: float = 120.0,
             **sampling) -> tuple[list[int], str, "object"]:
    """One streamed completion: (token ids, text, last message)."""
    from server.api import elasticmoe_pb2 as pb
    from server.api import elasticmoe_pb2_grpc as pb_grpc

    sampling.setdefault("max_tokens", 16)
    req = pb.GenerateRequest(prompt=prompt, prompt_token_ids=prompt_ids or [],
                             sampling=pb.SamplingParams(**sampling))
    tokens, text, last = [], "", None
    for msg in pb_grpc.InferenceStub(channel).Generate(req, timeout=timeout):
        tokens += msg.token_ids
        text += msg.text
        last = msg
    return tokens, text, last


class Traffic:
    """Clients streaming the reference prompts in a loop until stopped; records any mismatch."""

    def __init__(self, server, prompts: list[list[int]], expected: list[list[int]], max_tokens: int = 16) -> None:
        self.prompts, self.max_tokens = prompts, max_tokens
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.done = 0
        self.threads = [threading.Thread(target=self._run, args=(server, i, expected[i])) for i in range(len(prompts))]
        for t in self.threads:
            t.start()

    def _run(self, server, i: int, want: list[int]) -> None:
        while not self.stop.is_set():
            try:
                got = generate(server.channel, self.prompts[i], max_tokens=self.max_tokens, ignore_eos=True)[0]
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")
                return
            if got != want:
                self.errors.append(f"prompt {i}: tokens differ")
            self.done += 1

    def finish(self) -> None:
        time.sleep(0.3)
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        assert not self.errors, self.errors
        assert self.done > 0
