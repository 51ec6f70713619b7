"""The driver of tests/test_public_bind.py: starts `elasticmoe serve --host 0.0.0.0` (Inference
public, no --admin-address), asks it over 127.0.0.1 where Admin and Inference answer, stalls one SSE
stream, stops the server with SIGINT, and writes what it saw as JSON.

`python -m tests.public_bind_probe MODEL OUT.json [--netns]`. With --netns it runs as the first
process of a private network namespace (`unshare -n`): it brings that namespace's loopback up and
shrinks its TCP buffers (per namespace, nothing outside changes), so a client that stops reading an
SSE stream fills them within kilobytes and the HTTP write deadline is reached. Without it the
server binds 0.0.0.0 of the host for the few seconds of the test, and only 127.0.0.1 is dialled.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from tests.conftest import generate

WRITE_TIMEOUT_S = 1.0
SMALL_TCP_BUFFERS = "4096 4096 4096"   # min default max, bytes


def free_port_pair() -> int:
    """A port P with P and P+1 free on 0.0.0.0 and 127.0.0.1 (Admin goes to P+1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("0.0.0.0", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def code_of(call) -> str:
    try:
        call()
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def wait_serving(address: str, server: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with {server.returncode} before serving")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"not serving on {address} within {timeout} s")


def metric(metrics_port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise KeyError(name)


def stall_an_sse_stream(http_port: int, metrics_port: int) -> dict[str, float]:
    """Open a long SSE completion, read nothing, and wait (bounded) until the server ends it."""
    before = {"cancelled": metric(metrics_port, "elasticmoe_requests_total", status="cancelled"),
              "ok": metric(metrics_port, "elasticmoe_requests_total", status="ok")}
    body = json.dumps({"prompt": [5, 17, 33], "max_tokens": 4000, "ignore_eos": True, "stream": True}).encode()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", http_port))
    try:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 120
        while metric(metrics_port, "elasticmoe_stream_write_timeouts_total", api="http") < 1 \
                or metric(metrics_port, "elasticmoe_requests_running") > 0:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        return {"stalls": metric(metrics_port, "elasticmoe_stream_write_timeouts_total", api="http"),
                "running": metric(metrics_port, "elasticmoe_requests_running"),
                "kv_usage": metric(metrics_port, "elasticmoe_kv_cache_usage_ratio"),
                "cancelled": metric(metrics_port, "elasticmoe_requests_total", status="cancelled") - before["cancelled"],
                "ok": metric(metrics_port, "elasticmoe_requests_total", status="ok") - before["ok"]}
    finally:
        client.close()


def main(model: str, out: str, netns: bool) -> int:
    if netns:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        for key in ("tcp_wmem", "tcp_rmem"):
            Path(f"/proc/sys/net/ipv4/{key}").write_text(SMALL_TCP_BUFFERS)
    port, http_port, metrics_port = (50051, 8000, 9400) if netns else (free_port_pair(), free_port(), free_port())
    server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", model, "--host", "0.0.0.0",
                               "--port", str(port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
                               "--workers", "1", "--kv-cache-tokens", "4096", "--ray-num-cpus", "2",
                               "--stream-write-timeout", str(WRITE_TIMEOUT_S), "--shutdown-grace", "2"])
    seen: dict[str, object] = {"netns": netns}
    try:
        inference, loopback = f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"
        wait_serving(inference, server)
        with grpc.insecure_channel(inference) as public, grpc.insecure_channel(loopback) as admin:
            topology = lambda ch: pb_grpc.AdminStub(ch).GetTopology(pb.GetTopologyRequest(), timeout=10)  # noqa: E731
            seen["admin_on_inference_port"] = code_of(lambda: topology(public))
            seen["admin_on_loopback"] = code_of(lambda: topology(admin))
            if seen["admin_on_loopback"] == "OK":
                seen["workers_on_loopback"] = len(topology(admin).workers)
            seen["generate_on_inference_port"] = len(generate(public, [5, 17, 33], max_tokens=3, ignore_eos=True,
                                                              timeout=30)[0])
            seen["generate_on_loopback"] = code_of(lambda: generate(admin, [5, 17, 33], max_tokens=3, timeout=30))
        if netns:
            seen["http_stall"] = stall_an_sse_stream(http_port, metrics_port)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            seen["exit_code"] = server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
            seen["exit_code"] = "killed"
        Path(out).write_text(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], "--netns" in sys.argv[3:]))
