"""A slow reader cannot take the server down. The attack, over a raw HTTP/2 connection: initial
window 0 and never a WINDOW_UPDATE, as many Generate streams as one connection may open, each
admitted and then unable to send the client anything. Before, each such stream held a gRPC pool
thread until the connection closed, and Health, Generate and GetTopology timed out. Now a stalled
stream is a suspended coroutine: everything else answers while the attack holds. One connection
holds at most --max-streams-per-connection streams (one more is refused), and a stream whose
message waits unread past --stream-write-timeout ends: its request is cancelled, its running slot
and KV blocks freed, and it is counted."""
from __future__ import annotations

import socket
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from tests.conftest import generate, running_server
from tests.test_metrics import value

BATCH = 16          # opened in batches the engine admits at once (16 running + 16 waiting)
WRITE_TIMEOUT = 2.0
REFUSED_STREAM = 7  # HTTP/2 error code
LONG = 4000         # tokens: far more than the engine makes while the write deadline runs
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
        self.resets: dict[int, int] = {}                   # stream -> HTTP/2 error code
        self.trailers: dict[int, dict[bytes, bytes]] = {}  # stream -> its trailers (the gRPC status)

    def open(self, request: pb.GenerateRequest) -> int:
        body = request.SerializeToString()
        frame = b"\x00" + len(body).to_bytes(4, "big") + body   # gRPC length-prefixed message
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [
            (":method", "POST"), (":scheme", "http"), (":path", "/elasticmoe.v1.Inference/Generate"),
            (":authority", f"127.0.0.1:{self.port}"), ("content-type", "application/grpc"), ("te", "trailers")])
        self.conn.send_data(sid, frame, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.streams.append(sid)
        return sid

    def ignore_stream_limit(self) -> None:
        """Act as if the server had advertised no limit on concurrent streams (an attacker would)."""
        self.conn.remote_settings.max_concurrent_streams = 2**31 - 1
        self.conn.remote_settings.acknowledge()

    def read_again(self, sid: int) -> None:
        """Open the stream's window: the client reads again."""
        self.conn.increment_flow_control_window(2**20, stream_id=sid)
        self.conn.increment_flow_control_window(2**20)
        self.sock.sendall(self.conn.data_to_send())

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
                if isinstance(ev, h2.events.StreamReset):
                    self.resets[ev.stream_id] = ev.error_code
                if isinstance(ev, h2.events.TrailersReceived):
                    self.trailers[ev.stream_id] = {bytes(k): bytes(v) for k, v in ev.headers}
                # no acknowledge_received_data, no WINDOW_UPDATE: the window stays at 0
            out = self.conn.data_to_send()
            if out:
                self.sock.sendall(out)   # SETTINGS acks and PING replies only

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def server(tiny_models, ray_local):
    # 16 + 16 + 16 was the old pool: 48 threads, fewer than the attack's streams
    with running_server(tiny_models["mixtral"], workers=1, max_running=16, max_waiting=16,
                        stream_write_timeout_s=WRITE_TIMEOUT) as s:
        yield s


def wait_engine_idle(server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not server.engine.idle:
        assert time.monotonic() < deadline, "the engine never finished the attacker's requests"
        time.sleep(0.05)


def attack(port: int, server) -> StalledClient:
    """One connection, as many stalled Generate streams as it may hold."""
    client = StalledClient(port)
    client.pump(0.2)   # the server's SETTINGS
    cap = server.config.max_streams_per_connection
    request = pb.GenerateRequest(prompt_token_ids=[5, 17, 33], sampling=pb.SamplingParams(max_tokens=4,
                                                                                          ignore_eos=True))
    while len(client.streams) < cap:
        for _ in range(min(BATCH, cap - len(client.streams))):
            client.open(request)
        client.pump(0.2)
        # each request is generated to its end; only its stream stays, unable to send
        wait_engine_idle(server)
    return client


@pytest.fixture(scope="module")
def attacked(server):
    client = attack(server.port, server)
    yield client
    client.close()


def test_a_stream_its_client_stops_reading_is_ended_and_its_request_cancelled(server):
    """A long Generate on a zero-window stream: its first message cannot leave. After the write
    deadline the server cancels the request (running slot and KV blocks freed long before its
    tokens would have been made), counts the stall, and ends the stream with DEADLINE_EXCEEDED,
    which the client gets once it reads again."""
    m = server.metrics
    cancelled = value(m, "elasticmoe_requests_total", status="cancelled")
    ok = value(m, "elasticmoe_requests_total", status="ok")
    stalls = value(m, "elasticmoe_stream_write_timeouts_total", api="grpc")
    client = StalledClient(server.port)
    try:
        sid = client.open(pb.GenerateRequest(prompt_token_ids=[5, 17, 33],
                                             sampling=pb.SamplingParams(max_tokens=LONG, ignore_eos=True)))
        deadline = time.monotonic() + 10 * WRITE_TIMEOUT + 30
        while not (server.engine.idle and value(m, "elasticmoe_stream_write_timeouts_total", api="grpc") > stalls):
            assert time.monotonic() < deadline, "the stalled stream's request was never ended"
            client.pump(0.2)
        assert value(m, "elasticmoe_requests_total", status="cancelled") == cancelled + 1
        assert value(m, "elasticmoe_requests_total", status="ok") == ok
        # at least: streams of other tests' attacks may stall meanwhile
        assert value(m, "elasticmoe_stream_write_timeouts_total", api="grpc") >= stalls + 1
        assert server.engine.scheduler.num_running == 0 and server.engine.blocks.usage == 0
        client.read_again(sid)
        deadline = time.monotonic() + 10
        while sid not in client.trailers and time.monotonic() < deadline:
            client.pump(0.2)
        status = client.trailers.get(sid, {})
        assert status.get(b"grpc-status") == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0]).encode(), status
        assert b"--stream-write-timeout" in status.get(b"grpc-message", b""), status
    finally:
        client.close()


def timed(what: str, call, took: dict[str, float]) -> None:
    t0 = time.perf_counter()
    call()
    took[what] = time.perf_counter() - t0


def test_health_generate_and_topology_answer_while_the_attack_holds(server, attacked):
    took: dict[str, float] = {}
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as fresh:
        health = health_pb2_grpc.HealthStub(fresh)
        timed("Health.Check", lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10), took)
        timed("Generate (8 tokens)",
              lambda: generate(fresh, [5, 17, 33], max_tokens=8, ignore_eos=True, timeout=10), took)
        admin = pb_grpc.AdminStub(fresh)
        timed("GetTopology", lambda: admin.GetTopology(pb.GetTopologyRequest(), timeout=10), took)
    attacked.pump(0.1)
    assert not attacked.ended, "the attack's streams ended early: the attack did not hold"
    print(f"\nwhile {len(attacked.streams)} zero-window streams hold: "
          + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in took.items()))


def test_one_connection_holds_at_most_the_stream_cap(server, attacked):
    """The server advertises --max-streams-per-connection, and a stream opened beyond it anyway
    is refused, while the streams it already holds stay."""
    cap = server.config.max_streams_per_connection
    assert attacked.conn.remote_settings.max_concurrent_streams == cap
    assert len(attacked.streams) == cap
    attacked.ignore_stream_limit()
    extra = attacked.open(pb.GenerateRequest(prompt_token_ids=[5, 17, 33],
                                             sampling=pb.SamplingParams(max_tokens=4)))
    deadline = time.monotonic() + 10
    while extra not in attacked.resets and time.monotonic() < deadline:
        attacked.pump(0.2)
    assert attacked.resets.get(extra) == REFUSED_STREAM, attacked.resets
    assert not set(attacked.streams[:cap]) & attacked.ended
