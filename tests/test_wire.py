"""The wire: the data plane's exchange against the reference compute, the handshake that keeps
strangers out before any work byte is read, header bounds checked before anything is allocated,
connections that cost no thread until proven, and a transfer port that serves only proven peers."""
from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time

import numpy as np
import pytest
import torch

from experts.kernels.ffn import run_grouped
from experts.wire.auth import MAGIC as HELLO_MAGIC, PURPOSE_EXCHANGE, ServerHandshake, ServerSecret, client_handshake
from experts.wire.dataplane import DataPlaneServer, WorkerLink, open_link
from experts.wire.framing import ConnectionLimits
from experts.wire.messages import MAGIC, REPLY, REQUEST, ExchangeBounds, pack_request
from experts.wire.transfer import TransferClient, TransferServer, fetch

SPAWN = mp.get_context("spawn")
LOOPBACK = "127.0.0.1"
BOUNDS = ExchangeBounds(hidden=32, num_layers=2, num_experts=8, max_pairs=64)
INTER = 48
FAST = ConnectionLimits(max_connections=4, max_pending=64, handshake_timeout=0.5, io_timeout=2.0)



def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Equal up to float rounding: the worker process and this one may split a matmul over different
    thread counts (reductions in another order); a row routed or weighted wrongly is off by far more."""
    return got.shape == want.shape and torch.allclose(got, want, rtol=rtol, atol=1e-6)

def expert_weights(layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [2I, D], down [D, I] that name themselves: the same in every process."""
    g = torch.Generator().manual_seed(1000 * layer + expert)
    return (torch.randn(2 * INTER, BOUNDS.hidden, generator=g) / 8, torch.randn(BOUNDS.hidden, INTER, generator=g) / 8)


def reference(layer, x, ids, counts, weights, team=1, out=None) -> torch.Tensor:
    """run_grouped over the self-naming weights, in x's dtype (float32 or bfloat16); into `out`
    when the data plane gives one (a ring's reply slot), as a worker's compute does."""
    got = run_grouped(layer, x, ids, counts, weights, lambda l, e: tuple(t.to(x.dtype) for t in expert_weights(l, e)))
    return got if out is None else out.copy_(got)


def pairs(seed: int, m: int, experts: list[int]) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """x [m, D], expert ids, group sizes, weights of one exchange."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, BOUNDS.hidden, generator=g)
    cuts = sorted(torch.randperm(m - 1, generator=g)[:len(experts) - 1].add(1).tolist())
    counts = np.diff([0, *cuts, m])
    return x, np.array(experts), counts, torch.rand(m, generator=g).numpy()


def serve_child(conn, secret: ServerSecret, prefix: str) -> None:
    """A worker process: the reference compute behind a real DataPlaneServer."""
    server = DataPlaneServer(LOOPBACK, BOUNDS, reference, secret, ring_prefix=prefix)
    conn.send(server.address)
    conn.recv()
    server.stop()


@pytest.fixture
def worker_process():
    """(address, secret) of a DataPlaneServer in another process."""
    secret = ServerSecret.generate()
    parent, child_end = SPAWN.Pipe()
    child = SPAWN.Process(target=serve_child, args=(child_end, secret, f"emoe-wiretest-ring-{id(parent)}-"))
    child.start()
    try:
        assert parent.poll(60), "the worker process did not start"
        yield parent.recv(), secret
        parent.send("stop")
        child.join(timeout=30)
    finally:
        if child.is_alive():
            child.kill()


def exchange(link, layer: int, x, ids, counts, weights) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.float32)
    link.send(layer, x, ids, counts, weights)
    link.recv_into(layer, out)
    return out


def test_exchange_equals_run_grouped_across_processes(worker_process):
    address, secret = worker_process
    link = open_link("w1", address, secret, same_node=False)
    assert link.kind == "tcp"
    try:
        for seed, (m, experts) in enumerate([(1, [3]), (7, [0, 5, 7]), (BOUNDS.max_pairs, list(range(8)))]):
            x, ids, counts, w = pairs(seed, m, experts)
            layer = seed % BOUNDS.num_layers
            got = exchange(link, layer, x, ids, counts, w)
            want = reference(layer, x, ids.tolist(), counts.tolist(), torch.from_numpy(w))
            assert close(got, want), (m, experts)
        # two requests owed at once (two micro-batches), answered in order
        a, b = pairs(10, 5, [1, 2]), pairs(11, 6, [4])
        out_a, out_b = torch.empty(5, BOUNDS.hidden), torch.empty(6, BOUNDS.hidden)
        link.send(0, *a)
        link.send(1, *b)
        link.recv_into(0, out_a)
        link.recv_into(1, out_b)
        assert close(out_a, reference(0, a[0], a[1].tolist(), a[2].tolist(), torch.from_numpy(a[3])))
        assert close(out_b, reference(1, b[0], b[1].tolist(), b[2].tolist(), torch.from_numpy(b[3])))
    finally:
        link.close()


def _fake_worker(secret: ServerSecret, answer) -> tuple[tuple[str, int], threading.Thread]:
    """A one-shot worker that proves itself, reads one request and answers with `answer(seq)`."""
    listener = socket.create_server((LOOPBACK, 0))

    def run() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            handshake = ServerHandshake(secret, (PURPOSE_EXCHANGE,))
            while handshake.expects():
                conn.sendall(handshake.feed(conn.recv(handshake.expects(), socket.MSG_WAITALL)))
            head = conn.recv(REQUEST.size, socket.MSG_WAITALL)
            _, seq, _, m, g, _, _ = REQUEST.unpack(head)
            conn.recv(m * BOUNDS.hidden * 4 + (2 * g + m) * 4, socket.MSG_WAITALL)
            conn.sendall(answer(seq, m))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener.getsockname()[:2], thread


def test_out_of_step_reply_is_detected():
    secret = ServerSecret.generate()
    body = lambda m: bytes(m * BOUNDS.hidden * 4)   # noqa: E731
    address, thread = _fake_worker(secret, lambda seq, m: REPLY.pack(MAGIC, seq + 1, 0, m * BOUNDS.hidden * 4, 0)
                                   + body(m))
    link = WorkerLink("w7", address, secret, timeout=5)
    x, ids, counts, w = pairs(0, 4, [2])
    with pytest.raises(RuntimeError, match=r"worker w7: out of step on layer 1"):
        exchange(link, 1, x, ids, counts, w)
    link.close()
    thread.join(timeout=5)


def test_worker_error_is_reported_and_the_link_stays_in_step():
    secret = ServerSecret.generate()

    def compute(layer, x, ids, counts, weights, team=1, out=None):
        if layer == 1:
            raise KeyError(f"expert {ids[0]} is not held here")
        return reference(layer, x, ids, counts, weights, out=out)

    server = DataPlaneServer(LOOPBACK, BOUNDS, compute, secret, ring_prefix="emoe-wiretest-err-")
    link = WorkerLink("w3", server.address, secret, timeout=5)
    try:
        x, ids, counts, w = pairs(3, 6, [5, 6])
        with pytest.raises(RuntimeError, match=r"worker w3 failed on layer 1: KeyError: 'expert 5 is not held here'"):
            exchange(link, 1, x, ids, counts, w)
        got = exchange(link, 0, x, ids, counts, w)
        assert close(got, reference(0, x, ids.tolist(), counts.tolist(), torch.from_numpy(w)))
    finally:
        link.close()
        server.stop()


class CountingCompute:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, layer, x, ids, counts, weights, team=1, out=None) -> torch.Tensor:
        self.calls += 1
        return reference(layer, x, ids, counts, weights, out=out)


@pytest.fixture
def counted_server():
    compute, secret = CountingCompute(), ServerSecret.generate()
    server = DataPlaneServer(LOOPBACK, BOUNDS, compute, secret, "emoe-wiretest-cnt-", FAST)
    yield server, compute, secret
    server.stop()


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True when the peer closes `sock` within `within` seconds (anything it sends is read away)."""
    sock.settimeout(within)
    end = time.monotonic() + within
    try:
        while time.monotonic() < end:
            if not sock.recv(1 << 16):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def _work_bytes(m: int = 3) -> bytes:
    x, ids, counts, w = pairs(4, m, [1])
    head, xb, meta = pack_request(1, 0, x, ids, counts, w)
    return head + bytes(xb) + meta.tobytes()


def test_wrong_secret_is_refused_before_any_work_byte(counted_server):
    server, compute, secret = counted_server
    # a client with another server's secret: the worker's proof does not check out
    with socket.create_connection(server.address) as sock, pytest.raises(PermissionError, match="does not hold"):
        client_handshake(sock, ServerSecret.generate(), PURPOSE_EXCHANGE, timeout=5)
    # a client that answers the challenge with a wrong proof, work following in the same write
    with socket.create_connection(server.address) as sock:
        sock.sendall(HELLO_MAGIC + bytes([PURPOSE_EXCHANGE]) + bytes(32))
        assert len(sock.recv(64, socket.MSG_WAITALL)) == 64
        sock.sendall(bytes(32) + _work_bytes())
        assert _closed_by_peer(sock, 2.0)
    # no secret at all: straight to work
    with socket.create_connection(server.address) as sock:
        sock.sendall(_work_bytes())
        assert _closed_by_peer(sock, 2.0)
    # silent: closed at the handshake deadline
    with socket.create_connection(server.address) as sock:
        started = time.monotonic()
        assert _closed_by_peer(sock, 5.0)
        assert time.monotonic() - started < FAST.handshake_timeout + 1.0
    assert compute.calls == 0
    assert server.acceptor.refused == 4
    link = WorkerLink("w1", server.address, secret, timeout=5)   # the holder of the secret is served
    x, ids, counts, w = pairs(5, 4, [2, 3])
    assert close(exchange(link, 0, x, ids, counts, w),
                       reference(0, x, ids.tolist(), counts.tolist(), torch.from_numpy(w)))
    assert compute.calls == 1
    link.close()


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmSize"].split()[0]) * 1024


@pytest.mark.parametrize("field,value", [("pairs", 160_000_000), ("pairs", BOUNDS.max_pairs + 1), ("layer", 2),
                                         ("groups", 9), ("dtype", 7), ("pairs", 0), ("team", 0)])
def test_header_out_of_bounds_is_refused_before_allocation(counted_server, field, value):
    """A proven peer's 22-byte header claiming 160M pairs (20 GB of hidden states at D=32) closes
    the link with nothing reserved; so does every other field out of the model's bounds."""
    server, compute, secret = counted_server
    fields = {"layer": 0, "pairs": 4, "groups": 1, "dtype": 0, "team": 1} | {field: value}
    sock = socket.create_connection(server.address)
    client_handshake(sock, secret, PURPOSE_EXCHANGE, timeout=5)
    before = _vm_bytes()
    sock.sendall(REQUEST.pack(MAGIC, 1, fields["layer"], fields["pairs"], fields["groups"], fields["dtype"],
                              fields["team"]))
    grew = max(_vm_bytes() - before for _ in range(20) if time.sleep(0.005) is None)
    assert grew < 256 << 20, f"{grew / 2**30:.1f} GiB reserved for a header"
    assert _closed_by_peer(sock, 1.5), f"{field}={value} was accepted"
    sock.close()
    assert compute.calls == 0


def test_header_at_the_bound_is_served(counted_server):
    server, compute, secret = counted_server
    link = WorkerLink("w1", server.address, secret, timeout=5)
    x, ids, counts, w = pairs(6, BOUNDS.max_pairs, list(range(BOUNDS.num_experts)))
    assert close(exchange(link, 1, x, ids, counts, w),
                       reference(1, x, ids.tolist(), counts.tolist(), torch.from_numpy(w)))
    link.close()


def test_idle_connections_cost_no_thread_and_are_closed(counted_server):
    server, compute, secret = counted_server
    threads = threading.active_count()
    idle = [socket.create_connection(server.address) for _ in range(200)]
    time.sleep(0.2)
    assert threading.active_count() - threads <= 1, "a thread per unproven connection"
    # a real peer still gets in while the flood waits (the oldest unproven ones make room)
    link = WorkerLink("w1", server.address, secret, timeout=5)
    x, ids, counts, w = pairs(7, 3, [4])
    exchange(link, 0, x, ids, counts, w)
    started = time.monotonic()
    assert all(_closed_by_peer(s, 3.0) for s in idle), "an idle unproven connection stayed open"
    assert time.monotonic() - started < FAST.handshake_timeout + 2.0
    for s in idle:
        s.close()
    assert server.acceptor.live_connections() == 1
    link.close()


def test_proven_connections_are_bounded(counted_server):
    server, compute, secret = counted_server
    links = [WorkerLink(f"w{i}", server.address, secret, timeout=5) for i in range(FAST.max_connections)]
    extra = socket.create_connection(server.address)
    client_handshake(extra, secret, PURPOSE_EXCHANGE, timeout=5)
    assert _closed_by_peer(extra, 2.0), "a proven connection over the limit was served"
    assert server.acceptor.live_connections() == FAST.max_connections
    for link in links:
        link.close()


def test_a_started_message_must_arrive_within_io_timeout(counted_server):
    server, compute, secret = counted_server
    sock = socket.create_connection(server.address)
    client_handshake(sock, secret, PURPOSE_EXCHANGE, timeout=5)
    sock.sendall(_work_bytes(8)[:REQUEST.size + 10])   # a header and a few bytes, then nothing
    started = time.monotonic()
    assert _closed_by_peer(sock, FAST.io_timeout + 3.0)
    assert FAST.io_timeout - 0.5 < time.monotonic() - started < FAST.io_timeout + 2.0
    sock.close()
    assert compute.calls == 0


def test_transfer_port_refuses_an_unproven_fetch():
    secret, prefix = ServerSecret.generate(), "emoe-wiretest-"
    source = memoryview(bytes(range(256)) * 64)
    server = TransferServer(LOOPBACK, lambda name: source if name == prefix + "L0-E1" else None,
                            secret=secret, name_prefix=prefix, packing="plain/-/float32")
    address = server.start()
    dest = memoryview(bytearray(source.nbytes))
    try:
        with pytest.raises(RuntimeError, match="handshake failed"):
            fetch(address, prefix + "L0-E1", dest, timeout=5, secret=ServerSecret.generate(), packing="plain/-/float32")
        # a raw v1-style request without any handshake: not one byte of the segment comes back
        with socket.create_connection(address) as sock:
            sock.sendall(b"EMT3" + len(prefix + "L0-E1").to_bytes(2, "little") + bytes([15])
                         + source.nbytes.to_bytes(8, "little") + (prefix + "L0-E1").encode() + b"plain/-/float32")
            sock.settimeout(3.0)
            got = b""
            try:
                while chunk := sock.recv(1 << 16):
                    got += chunk
            except ConnectionResetError:   # closed with our unread request in its buffer
                pass
            assert got == b""
        assert bytes(dest) == bytes(source.nbytes)
        # a proven peer asking for a name outside this server's namespace gets nothing either
        with TransferClient(address, secret=secret) as client:
            with pytest.raises(RuntimeError, match="refused the request"):
                client.fetch("emoe-otherserver-L0-E1", dest, packing="plain/-/float32")
        assert fetch(address, prefix + "L0-E1", dest, secret=secret, packing="plain/-/float32").nbytes == source.nbytes
        assert bytes(dest) == bytes(source)
        assert server.refused == 2
    finally:
        server.stop()


@pytest.mark.parametrize("ids,counts,why", [([1, 1], [2, 2], "not distinct experts"), ([1, 9], [2, 2], "not distinct"),
                                            ([-1, 2], [2, 2], "not distinct"), ([1, 2], [3, 2], "do not add up"),
                                            ([1, 2], [4, 0], "do not add up")])
def test_groups_outside_the_model_are_refused_without_compute(counted_server, ids, counts, why):
    server, compute, secret = counted_server
    link = WorkerLink("w2", server.address, secret, timeout=5)
    x, _, _, w = pairs(8, 4, [0])
    with pytest.raises(RuntimeError, match=f"worker w2 failed on layer 1: FrameError: layer 1: .*{why}"):
        exchange(link, 1, x, np.array(ids), np.array(counts), w)
    assert compute.calls == 0
    good = exchange(link, 1, x, np.array([1, 2]), np.array([1, 3]), w)   # the link stays in step
    assert close(good, reference(1, x, [1, 2], [1, 3], torch.from_numpy(w)))
    link.close()


@pytest.mark.parametrize("same_node", [True, False])
def test_each_request_brings_its_team_to_the_workers_compute(same_node):
    """The engine says per request how many workers of the receiver's node compute that layer at
    once (they share the node's CPUs): the number reaches compute over the ring and over TCP."""
    seen = []

    def compute(layer, x, ids, counts, weights, team=1, out=None):
        seen.append(team)
        return reference(layer, x, ids, counts, weights, out=out)

    secret = ServerSecret.generate()
    server = DataPlaneServer(LOOPBACK, BOUNDS, compute, secret, "emoe-wiretest-team-", FAST)
    link = open_link("w0", server.address, secret, same_node)
    try:
        for team in (1, 3, 2):
            x, ids, counts, w = pairs(team, 5, [1, 4])
            link.send(0, x, ids, counts, w, team)
            out = torch.empty(5, BOUNDS.hidden)
            link.recv_into(0, out)
            assert torch.equal(out, reference(0, x, ids.tolist(), counts.tolist(), torch.from_numpy(w)))
        assert seen == [1, 3, 2]
    finally:
        link.close()
        server.stop()
