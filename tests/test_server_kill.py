"""A server killed with SIGKILL (no handler runs) leaves nothing running, and the next server on the
node removes the shared memory it left: issue 9's tenth failure (64 segments and Ray's agents stayed
until someone removed them by hand).

Ray's processes die with the thread that started them (the server's "ray-owner" thread, through
PR_SET_PDEATHSIG) and the workers with their raylet; the segments cannot clean themselves up, so
a starting server sweeps the namespaces whose owner is gone (memory/owners.py). The server runs
with a segment directory of its own, so every file in it is this test's."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.bench.common import free_port


def _serve(model, shm_dir: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--workers", "2",
                             "--port", str(port), "--http-port", "-1", "--metrics-port", "-1", "--ray-num-cpus", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, ELASTICMOE_SHM_DIR=shm_dir))
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode} while starting"
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                return proc, port
        except grpc.RpcError:
            time.sleep(0.5)
    raise AssertionError("server not SERVING in 240 s")


def _living(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
        except psutil.Error:
            pass
    return out


def test_a_sigkilled_server_leaves_no_process_and_its_segments_go_at_the_next_start(tiny_models, tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    first, _ = _serve(tiny_models["mixtral"], str(shm))
    tree = psutil.Process(first.pid).children(recursive=True)
    left_files: set[str] = set()
    try:
        assert any("raylet" in " ".join(p.cmdline()) for p in tree), "the server started no Ray of its own"
        segments = {f for f in os.listdir(shm) if not f.endswith(".owners")}
        assert segments, "the workers made no segment in the server's directory"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        deadline = time.monotonic() + 90
        while _living(tree) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _living(tree) == [], "processes of a SIGKILLed server still run"
        left_files = set(os.listdir(shm))
        assert segments <= left_files   # nothing could remove them: the next start must
    finally:
        for p in tree:   # only what this test's server started, should the assertion have failed
            try:
                p.kill()
            except psutil.Error:
                pass
    second, _ = _serve(tiny_models["mixtral"], str(shm))
    try:
        now = set(os.listdir(shm))
        assert not (left_files & now), f"the dead server's files are still there: {sorted(left_files & now)[:5]}"
    finally:
        os.killpg(second.pid, signal.SIGINT)
        assert second.wait(timeout=120) == 0
    assert os.listdir(shm) == [], "a server stopped with SIGINT left files behind"
