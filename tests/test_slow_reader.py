"""A slow reader cannot take the server down. The attack, over a raw HTTP/2 connection: initial
window 0 and never a WINDOW_UPDATE, 120 Generate streams that each get admitted and then can send
the client nothing. Before, each such stream held a gRPC pool thread until the connection closed,
and Health, Generate and GetTopology timed out. Now a stalled stream is a suspended coroutine:
everything else answers while the attack holds."""
from __future__ import annotations

import socket
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from tests.conftest import generate, running_server

STREAMS = 120
BATCH = 16          # opened in batches the engine admits at once (16 running + 16 waiting)


class StalledClient:
    """One HTTP/2 connection that opens Generate streams and reads nothing: its window is 0."""

    def __init__(self, port: int) -> None:
        import h2.config
        import h2.connection
        import h2.settings

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        self.conn.max_inbound_frame_size = 16384
        self.sock.sendall(self.conn.data_to_send())
        self.port = port
        self.streams: list[int] = []
        self.ended: set[int] = set()

    def open(self, request: pb.GenerateRequest) -> None:
        body = request.SerializeToString()
        frame = b"\x00" + len(body).to_bytes(4, "big") + body   # gRPC length-prefixed message
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [
            (":method", "POST"), (":scheme", "http"), (":path", "/elasticmoe.v1.Inference/Generate"),
            (":authority", f"127.0.0.1:{self.port}"), ("content-type", "application/grpc"), ("te", "trailers")])
        self.conn.send_data(sid, frame, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.streams.append(sid)

    def pump(self, seconds: float) -> None:
        """Take frames off the socket (settings, headers, resets, trailers) without ever opening
        the window: the server can still send no DATA."""
        import h2.events

        deadline = time.monotonic() + seconds
        self.sock.settimeout(0.1)
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return
            for ev in self.conn.receive_data(data):
                if isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    self.ended.add(ev.stream_id)
                # no acknowledge_received_data, no WINDOW_UPDATE: the window stays at 0
            out = self.conn.data_to_send()
            if out:
                self.sock.sendall(out)   # SETTINGS acks and PING replies only

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def server(tiny_models, ray_local):
    # 16 + 16 + 16 was the old pool: 48 threads, fewer than the attack's streams
    with running_server(tiny_models["mixtral"], workers=1, max_running=16, max_waiting=16) as s:
        yield s


def wait_engine_idle(server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not server.engine.idle:
        assert time.monotonic() < deadline, "the engine never finished the attacker's requests"
        time.sleep(0.05)


def attack(port: int, server) -> StalledClient:
    client = StalledClient(port)
    request = pb.GenerateRequest(prompt_token_ids=[5, 17, 33], sampling=pb.SamplingParams(max_tokens=4,
                                                                                          ignore_eos=True))
    for _ in range(STREAMS // BATCH + 1):
        for _ in range(min(BATCH, STREAMS - len(client.streams))):
            client.open(request)
        client.pump(0.2)
        # each request is generated to its end; only its stream stays, unable to send
        wait_engine_idle(server)
    assert len(client.streams) == STREAMS
    return client


def timed(what: str, call, took: dict[str, float]) -> None:
    t0 = time.perf_counter()
    call()
    took[what] = time.perf_counter() - t0


def test_health_generate_and_topology_answer_while_the_attack_holds(server):
    client = attack(server.port, server)
    took: dict[str, float] = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as fresh:
            health = health_pb2_grpc.HealthStub(fresh)
            timed("Health.Check", lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10), took)
            timed("Generate (8 tokens)",
                  lambda: generate(fresh, [5, 17, 33], max_tokens=8, ignore_eos=True, timeout=10), took)
            admin = pb_grpc.AdminStub(fresh)
            timed("GetTopology", lambda: admin.GetTopology(pb.GetTopologyRequest(), timeout=10), took)
        client.pump(0.1)
        assert not client.ended, "the attack's streams ended early: the attack did not hold"
    finally:
        client.close()
    print("\nwhile 120 zero-window streams hold: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in took.items()))
