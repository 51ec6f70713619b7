"""SIGTERM and SIGINT drain: intake stops (a new request is UNAVAILABLE), the stream in flight
finishes (or, past --shutdown-grace, ends UNAVAILABLE), and `elasticmoe serve` exits 0 with no
shared-memory segment and no Ray process of its own left. Before, SIGTERM ended in SIGABRT: Ray's
own SIGTERM handler ran inside the main thread."""
from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from tests.conftest import read_until

ROOT = Path(__file__).resolve().parents[1]


def _serve(model: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """`elasticmoe serve` of `model` with one worker on loopback, its segments in a directory of its
    own (others' servers share /dev/shm); (the process, that directory)."""
    shm = tmp_path / "shm"
    shm.mkdir()
    env = dict(os.environ, ELASTICMOE_SHM_DIR=str(shm))
    serve = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--workers", "1",
         "--port", "0", "--metrics-port", "-1", "--http-port", "-1", "--ray-num-cpus", "2", *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return serve, shm


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Stream(threading.Thread):
    """One Generate streamed to its end in the background; what it got and how it ended."""

    def __init__(self, channel: grpc.Channel, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.req = pb.GenerateRequest(prompt_token_ids=[5, 17, 33],
                                      sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        self.stub = pb_grpc.InferenceStub(channel)
        self.tokens: list[int] = []
        self.last: pb.GenerateResponse | None = None
        self.error: grpc.RpcError | None = None
        self.first = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            for msg in self.stub.Generate(self.req, timeout=180):
                self.tokens += msg.token_ids
                self.last = msg
                self.first.set()
        except grpc.RpcError as exc:
            self.error = exc
        self.first.set()


@pytest.mark.parametrize("sig, grace, max_tokens, completes", [
    (signal.SIGTERM, 60, 120, True),
    (signal.SIGINT, 60, 120, True),
    (signal.SIGTERM, 1, 4000, False),     # longer than the grace: cancelled, exit 0 all the same
], ids=["SIGTERM drains", "SIGINT drains", "SIGTERM past the grace"])
def test_signal_drains_and_exits_clean(tiny_models, tmp_path, sig, grace, max_tokens, completes):
    serve, shm = _serve(tiny_models["mixtral"], tmp_path, "--max-model-len", "4096", "--shutdown-grace", str(grace))
    lines: list[str] = []
    try:
        read_until(serve, lines, "Ctrl-C stops it")
        found = re.search(r"elasticmoe serving .* on 127\.0\.0\.1:(\d+)", "".join(lines))
        assert found, "".join(lines[-30:])
        port = int(found.group(1))
        children = psutil.Process(serve.pid).children(recursive=True)
        assert any("raylet" in p.name() for p in children), [p.name() for p in children]
        assert os.listdir(shm), "the server made no segment there: the leftover check would prove nothing"
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stream = Stream(channel, max_tokens)
        assert stream.first.wait(120) and stream.error is None, stream.error
        serve.send_signal(sig)
        # intake is closed while the stream drains
        refused = None
        deadline = time.monotonic() + 30
        while refused is None and time.monotonic() < deadline:
            try:
                list(pb_grpc.InferenceStub(channel).Generate(stream.req, timeout=10))
            except grpc.RpcError as exc:
                refused = exc
        assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE, refused
        stream.join(timeout=180)
        if completes:
            assert stream.error is None, (stream.error.code(), stream.error.details())
            assert len(stream.tokens) == max_tokens and stream.last.finish_reason == pb.FINISH_REASON_LENGTH
        else:
            assert stream.error is not None and stream.error.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in stream.error.details()
        channel.close()
        out, _ = serve.communicate(timeout=120)
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.communicate()
    lines.append(out)
    assert serve.returncode == 0, "".join(lines)[-3000:]
    assert "draining" in out and "shutting down" in out, out[-2000:]
    deadline = time.monotonic() + 30   # Ray's own processes may take a moment to exit
    while time.monotonic() < deadline and any(_alive(p) for p in children):
        time.sleep(0.5)
    assert not [p.name() for p in children if _alive(p)], "processes left behind"
    assert os.listdir(shm) == [], "shared memory left behind"


def test_sigterm_while_ray_starts_drains_and_exits_clean(tiny_models, tmp_path):
    """SIGTERM from the moment the server starts Ray until it drains (a SIGTERM every 0.1 s over the
    whole of ray.init and the first worker's start): every one reaches the server's own handler,
    never Ray's (before: Ray's Python handler's sys.exit, or its C++ handler's abort 3 s later)."""
    serve, shm = _serve(tiny_models["mixtral"], tmp_path)
    lines: list[str] = []
    seen: dict[psutil.Process, str] = {}   # every process of the server's tree (and its name), to check they end
    draining = threading.Event()

    def terminate_repeatedly() -> None:
        while not draining.wait(0.1) and serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            try:
                for p in psutil.Process(serve.pid).children(recursive=True):
                    if p not in seen:
                        seen[p] = p.name()
            except psutil.Error:
                pass

    sender = threading.Thread(target=terminate_repeatedly, daemon=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = serve.stdout.readline()
            if not line and serve.poll() is not None:
                break
            lines.append(line)
            if "starting an embedded Ray" in line and not sender.is_alive():
                sender.start()
            if "draining" in line:
                draining.set()
                break
        assert sender.is_alive() or draining.is_set(), "".join(lines[-30:])
        draining.set()
        out, _ = serve.communicate(timeout=120)
    finally:
        draining.set()
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.communicate()
    lines.append(out)
    text = "".join(lines)
    assert serve.returncode == 0, text[-3000:]
    assert "SIGTERM received" not in text and "draining" in text, text[-3000:]
    # ray.init starts the GCS first, then the raylet: either one seen means the SIGTERMs came while
    # Ray was starting (a drain can end it before the raylet is up, or between two looks)
    assert {"gcs_server", "raylet"} & set(seen.values()), "Ray had not started: the test proves nothing"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in seen):
        time.sleep(0.5)
    assert not [name for p, name in seen.items() if _alive(p)], "processes left behind"
    assert os.listdir(shm) == [], "shared memory left behind"


def _thread_taking(pid: int, sig: int) -> int:
    """A thread of process `pid` other than its main one that does not block `sig` (Ray's and
    gRPC's threads of the server are such): where the kernel may deliver a signal sent to the process."""
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")):
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        blocked = int(re.search(r"^SigBlk:\s*([0-9a-f]+)", status, re.M).group(1), 16)
        if tid != pid and not blocked & (1 << (sig - 1)):
            return tid
    raise AssertionError(f"every thread of {pid} blocks signal {sig}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_landing_on_another_thread_drains(tiny_models, tmp_path, sig):
    """The kernel hands a signal sent to a process to any thread that does not block it; sent here
    to one of the server's other threads on purpose (tgkill), it must still drain and exit 0. Before,
    the main thread slept in an untimed wait that only a signal landing on it interrupted, so its
    handler never ran: a SIGINT ignored for the whole 30 s of a CI test."""
    serve, shm = _serve(tiny_models["mixtral"], tmp_path)
    lines: list[str] = []
    out = ""
    try:
        assert read_until(serve, lines, "Ctrl-C stops it"), "".join(lines[-30:])
        tid = _thread_taking(serve.pid, sig)
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.tgkill(serve.pid, tid, sig) == 0, os.strerror(ctypes.get_errno())
        out, _ = serve.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            out += serve.communicate()[0]
    text = "".join(lines) + out
    assert serve.returncode == 0 and "draining" in out, text[-3000:]
    assert os.listdir(shm) == [], "shared memory left behind"
