"""Connections a worker's internal ports refuse are counted where an operator sees them:
`elasticmoe_internal_connections_refused_total{worker, listener}` on the server's /metrics, read
from each worker's `stats` when Prometheus scrapes."""
from __future__ import annotations

import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import ServerMetrics
from tests.conftest import running_server

REFUSED = "elasticmoe_internal_connections_refused"


def scrape(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.labels["worker"], s.labels["listener"]): s.value
            for f in text_string_to_metric_families(text) if f.name == REFUSED for s in f.samples
            if s.name == REFUSED + "_total"}


def knock(address: tuple[str, int]) -> None:
    """An unproven peer: a connection that sends a few bytes which are not the server's proof,
    then waits to be closed (the port refuses it at its first handshake step)."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64))
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass


def test_a_refused_connection_to_a_real_worker_shows_on_metrics(tiny_models, ray_local):
    with running_server(tiny_models["mixtral"], workers=1, metrics_port=0) as server:
        (worker, info), = server.controller.topology.workers.items()
        assert scrape(server.metrics_port) == {(worker, "data"): 0, (worker, "transfer"): 0}
        knock(info.data_address)
        knock(info.data_address)
        knock(info.transfer_address)
        deadline = time.monotonic() + 30
        while (seen := scrape(server.metrics_port)) != {(worker, "data"): 2, (worker, "transfer"): 1}:
            assert time.monotonic() < deadline, seen
            time.sleep(0.2)


def test_bad_listener_names_and_counts_fail_the_scrape_loudly():
    m = ServerMetrics()
    m.watch_worker_connections(lambda: {("w1", "ring"): 1})
    with pytest.raises(ValueError, match="listener='ring'"):
        m.render()
    m = ServerMetrics()
    m.watch_worker_connections(lambda: {("w1", "data"): -1})
    with pytest.raises(ValueError, match="count=-1"):
        m.render()
