"""The same-node exchange through a shared-memory ring: the same bytes as TCP, a file only the two
proven processes hold, a dead worker noticed through the lifeline, and chosen by node."""
from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
import torch

from experts.wire.auth import PURPOSE_RING, ServerSecret, client_handshake
from experts.wire.dataplane import DataPlaneServer, open_link
from experts.wire.messages import WorkerLost
from experts.wire.ring import SHM_DIR, RingLink
from tests.test_wire import (BOUNDS, LOOPBACK, SPAWN, close, exchange, pairs, reference, serve_child,  # noqa: F401
                             worker_process)


def _ring_files(prefix: str) -> list[str]:
    return [f for f in os.listdir(SHM_DIR) if f.startswith(prefix)]


def test_ring_equals_tcp_and_run_grouped_across_processes(worker_process):
    address, secret = worker_process
    ring = open_link("w1", address, secret, same_node=True)
    tcp = open_link("w1", address, secret, same_node=False)
    assert (ring.kind, tcp.kind) == ("ring", "tcp")
    try:
        for seed, (m, experts) in enumerate([(1, [3]), (9, [0, 5, 7]), (BOUNDS.max_pairs, list(range(8)))]):
            x, ids, counts, w = pairs(seed, m, experts)
            layer = seed % BOUNDS.num_layers
            want = reference(layer, x, ids.tolist(), counts.tolist(), torch.from_numpy(w))
            assert close(exchange(ring, layer, x, ids, counts, w), want), (m, experts)
            assert close(exchange(tcp, layer, x, ids, counts, w), want), (m, experts)
            x16 = x.bfloat16()
            assert close(exchange(ring, layer, x16, ids, counts, w), exchange(tcp, layer, x16, ids, counts, w), rtol=2e-2)
        # two exchanges owed at once (two micro-batches of a step) fill both slots of the ring
        a, b = pairs(20, 5, [1, 2]), pairs(21, 6, [4])
        out_a, out_b = torch.empty(5, BOUNDS.hidden), torch.empty(6, BOUNDS.hidden)
        ring.send(0, *a)
        ring.send(1, *b)
        with pytest.raises(RuntimeError, match="2 exchanges owed on layer 0, the ring holds 2"):
            ring.send(0, *a)
        ring.recv_into(0, out_a)
        ring.recv_into(1, out_b)
        assert close(out_a, reference(0, a[0], a[1].tolist(), a[2].tolist(), torch.from_numpy(a[3])))
        assert close(out_b, reference(1, b[0], b[1].tolist(), b[2].tolist(), torch.from_numpy(b[3])))
        for _ in range(300):   # many laps around the ring's slots stay in step
            x, ids, counts, w = pairs(30, 4, [6])
            exchange(ring, 1, x, ids, counts, w)
    finally:
        ring.close()
        tcp.close()


def test_ring_file_is_private_and_gone_once_mapped():
    secret, prefix = ServerSecret.generate(), f"emoe-ringtest-{os.getpid()}-"
    modes: list[int] = []

    def compute(layer, x, ids, counts, weights, team=1, out=None):
        return reference(layer, x, ids, counts, weights, out=out)

    server = DataPlaneServer(LOOPBACK, BOUNDS, compute, secret, ring_prefix=prefix)
    try:
        # an unproven peer asking for a ring gets no file made and no name
        with socket.create_connection(server.address) as sock, pytest.raises(PermissionError):
            client_handshake(sock, ServerSecret.generate(), PURPOSE_RING, timeout=5)
        assert _ring_files(prefix) == []
        # the proven engine: the name it is sent is 0600 while it opens it, and unlinked after
        original = os.open

        def spying_open(path, flags, *args):
            fd = original(path, flags, *args)
            if os.path.basename(str(path)).startswith(prefix):
                modes.append(os.fstat(fd).st_mode & 0o777)
            return fd

        os.open = spying_open
        try:
            link = RingLink("w1", server.address, secret, timeout=5)
        finally:
            os.open = original
        assert modes and all(m == 0o600 for m in modes), [oct(m) for m in modes]
        deadline = time.monotonic() + 5
        while _ring_files(prefix) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _ring_files(prefix) == [], "the ring's name outlived its setup"
        x, ids, counts, w = pairs(2, 3, [1])
        assert close(exchange(link, 0, x, ids, counts, w),
                           reference(0, x, ids.tolist(), counts.tolist(), torch.from_numpy(w)))
        link.close()
    finally:
        server.stop()


def test_worker_error_through_the_ring_keeps_it_in_step():
    secret = ServerSecret.generate()

    def compute(layer, x, ids, counts, weights, team=1, out=None):
        if layer == 1:
            raise KeyError(f"expert {ids[0]} is not held here")
        return reference(layer, x, ids, counts, weights, out=out)

    server = DataPlaneServer(LOOPBACK, BOUNDS, compute, secret, ring_prefix=f"emoe-ringtest-{os.getpid()}-err-")
    link = RingLink("w3", server.address, secret, timeout=5)
    try:
        x, ids, counts, w = pairs(3, 6, [5, 6])
        with pytest.raises(RuntimeError, match=r"worker w3 failed on layer 1: KeyError: 'expert 5 is not held here'"):
            exchange(link, 1, x, ids, counts, w)
        assert close(exchange(link, 0, x, ids, counts, w),
                           reference(0, x, ids.tolist(), counts.tolist(), torch.from_numpy(w)))
    finally:
        link.close()
        server.stop()


def test_dead_worker_is_noticed_through_the_lifeline():
    secret = ServerSecret.generate()
    parent, child_end = SPAWN.Pipe()
    child = SPAWN.Process(target=serve_child, args=(child_end, secret, f"emoe-ringtest-{os.getpid()}-dead-"))
    child.start()
    try:
        assert parent.poll(60)
        link = RingLink("w9", parent.recv(), secret, timeout=60)
        x, ids, counts, w = pairs(1, 4, [2])
        exchange(link, 0, x, ids, counts, w)
        child.kill()
        child.join(timeout=10)
        started = time.monotonic()
        with pytest.raises(WorkerLost, match="worker w9: ring reply on layer 0: the worker closed its link"):
            exchange(link, 0, x, ids, counts, w)
        assert time.monotonic() - started < 2.0, "noticed by the timeout, not the lifeline"
        link.close()
    finally:
        if child.is_alive():
            child.kill()


def _generate_tokens(model_dir, monkeypatch, same_node: bool) -> tuple[list[list[int]], set[str], set[str]]:
    from server.control import cluster
    from tests.conftest import generate, running_server

    if not same_node:   # the engine believes it sits on another node: every link goes over TCP
        monkeypatch.setattr(cluster, "this_node", lambda: "another-node")
    with running_server(model_dir, workers=2) as server:
        links = server.controller._links
        kinds = {link.kind for link in links.values()}
        hosts = {info.data_address[0] for info in server.controller.topology.workers.values()} | \
                {info.transfer_address[0] for info in server.controller.topology.workers.values()}
        outs = [generate(server.channel, prompt_ids=[5 + i, 17, 3 * i + 1], max_tokens=8)[0] for i in range(3)]
    monkeypatch.undo()
    return outs, kinds, hosts


def test_server_uses_the_ring_on_its_node_and_gets_the_tcp_tokens(tiny_models, ray_local, monkeypatch):
    ring_tokens, ring_kinds, hosts = _generate_tokens(tiny_models["mixtral"], monkeypatch, same_node=True)
    assert ring_kinds == {"ring"}
    assert hosts == {"127.0.0.1"}, "workers listen beyond loopback on a one-node server"
    tcp_tokens, tcp_kinds, _ = _generate_tokens(tiny_models["mixtral"], monkeypatch, same_node=False)
    assert tcp_kinds == {"tcp"}
    assert ring_tokens == tcp_tokens and all(len(t) == 8 for t in ring_tokens)


@pytest.fixture
def two_workers():
    """Two worker processes behind real DataPlaneServers: [(address, secret)] with one secret."""
    secret = ServerSecret.generate()
    procs, addresses = [], []
    try:
        for i in range(2):
            parent, child_end = SPAWN.Pipe()
            child = SPAWN.Process(target=serve_child, args=(child_end, secret, f"emoe-ringtest-{os.getpid()}-two{i}-"))
            child.start()
            procs.append((parent, child))
        for parent, _ in procs:
            assert parent.poll(60)
            addresses.append(parent.recv())
        yield addresses, secret
    finally:
        for parent, child in procs:
            parent.send("stop")
            child.join(timeout=30)
            if child.is_alive():
                child.kill()


@pytest.mark.parametrize("same_node", [True, False])
def test_remote_experts_equal_each_tokens_weighted_experts(two_workers, same_node):
    """The engine's backend over two workers (experts split, expert 3 on both) equals, token by
    token, the weighted sum of its chosen experts computed alone."""
    from server.engine.exchange import RemoteExperts, Routing

    addresses, secret = two_workers
    held = [[0, 1, 2, 3], [3, 4, 5, 6, 7]]
    routing = Routing.build(1, ["w0", "w1"], [[h] * BOUNDS.num_layers for h in held], BOUNDS.num_layers,
                            BOUNDS.num_experts)
    links = {f"w{i}": open_link(f"w{i}", a, secret, same_node) for i, a in enumerate(addresses)}
    backend = RemoteExperts(routing, links, {10: 0, 11: 1}, BOUNDS.hidden)
    try:
        g = torch.Generator().manual_seed(3)
        for tokens in (1, 5, 32):
            hidden = torch.randn(tokens, BOUNDS.hidden, generator=g)
            ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(tokens)])
            ids[::2, 0] = 3   # the replicated expert, on both workers by token index
            ids[::2, 1] = torch.where(ids[::2, 1] == 3, 4, ids[::2, 1])
            weights = torch.rand(tokens, 2, generator=g)
            got = backend.finish(backend.start(11, hidden, ids, weights))
            want = torch.zeros(tokens, BOUNDS.hidden)
            for t in range(tokens):
                for k in range(2):
                    e = int(ids[t, k])
                    want[t] += reference(1, hidden[t:t + 1], [e], [1], weights[t, k:k + 1])[0]
            # rows computed together may round differently from rows alone: close, not bitwise
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        counts = backend.take_expert_counts()
        assert counts[1].sum() == 2 * (1 + 5 + 32) and counts[1][3] >= 19
        assert {link.kind for link in links.values()} == {"ring" if same_node else "tcp"}
    finally:
        for link in links.values():
            link.close()


def test_the_smallest_exchanges_spin_and_the_rest_sleep(monkeypatch):
    """A request of at most SMALL_PAIRS pairs: the engine spins for its reply and the worker, having
    answered it, spins for the next request (a futex wake-up costs 100-400 us on a VM); larger ones
    sleep at once (their cores are busy)."""
    from experts.wire import doorbell
    from experts.wire.ring import REP_WORD, REQ_WORD, SMALL_PAIRS, SMALL_SPIN_S

    waits: list[tuple[int, float]] = []   # (which counter, spin asked)
    real = doorbell.Doorbell.wait

    def recording(self, target, timeout, spin_s=0.0):
        waits.append((self._index, spin_s))
        return real(self, target, timeout, spin_s)

    monkeypatch.setattr(doorbell.Doorbell, "wait", recording)
    secret = ServerSecret.generate()
    server = DataPlaneServer(LOOPBACK, BOUNDS, reference, secret, ring_prefix=f"emoe-ringtest-{os.getpid()}-spin-")
    link = RingLink("w4", server.address, secret, timeout=5)
    try:
        for m, spins in ((SMALL_PAIRS, True), (SMALL_PAIRS + 2, False), (1, True)):
            waits.clear()
            x, ids, counts, w = pairs(m, m, [5, 6] if m > 1 else [5])
            assert close(exchange(link, 0, x, ids, counts, w),
                         reference(0, x, ids.tolist(), counts.tolist(), torch.from_numpy(w)))
            deadline = time.monotonic() + (5 if spins else 0.05)
            while time.monotonic() < deadline:   # the worker's wait after its reply: it may be recorded before
                worker = [s for i, s in waits if i == REQ_WORD]   # or after the engine's, idle waits between
                if spins and SMALL_SPIN_S in worker:
                    break
                time.sleep(0.001)
            engine = [s for i, s in waits if i == REP_WORD]
            assert engine[0] == (SMALL_SPIN_S if spins else 0.0), (m, waits)
            assert (SMALL_SPIN_S in worker) == spins and set(worker) <= {0.0, SMALL_SPIN_S}, (m, waits)
    finally:
        link.close()
        server.stop()


@pytest.mark.parametrize("same_node", [True, False], ids=["ring", "tcp"])
def test_rows_gathered_by_the_link_and_replies_scattered_by_it_equal_send_and_recv(same_node):
    """send_rows (x = hidden[rows], gathered straight into a ring's request slot) and recv_scatter
    (reply row i to dest[rows[i]], out of the reply slot) give the bytes send + recv_into give with
    the gather and scatter done beside them."""
    secret = ServerSecret.generate()
    server = DataPlaneServer(LOOPBACK, BOUNDS, reference, secret, ring_prefix=f"emoe-ringtest-{os.getpid()}-rows-")
    link = open_link("w0", server.address, secret, same_node, timeout=5)
    try:
        g = torch.Generator().manual_seed(7)
        hidden = torch.randn(9, BOUNDS.hidden, generator=g)
        rows = torch.tensor([4, 0, 4, 7, 2, 8])               # a row may go twice (two of its experts here)
        ids, counts = np.array([3, 5]), np.array([2, 4])
        w = torch.rand(6, generator=g).numpy()
        dest_rows = torch.tensor([10, 3, 0, 7, 11, 5])        # where each reply row belongs, of 12
        link.send_rows(1, hidden, rows, ids, counts, w)
        got = torch.full((12, BOUNDS.hidden), float("nan"))
        link.recv_scatter(1, got, dest_rows)
        link.send(1, hidden[rows], ids, counts, w)
        plain = torch.empty(6, BOUNDS.hidden)
        link.recv_into(1, plain)
        want = torch.full((12, BOUNDS.hidden), float("nan"))
        want[dest_rows] = plain
        assert torch.equal(got[dest_rows], want[dest_rows])
        assert torch.isnan(got[[1, 2, 4, 6, 8, 9]]).all()       # rows not named stay untouched
        assert torch.equal(plain, reference(1, hidden[rows], ids.tolist(), counts.tolist(), torch.from_numpy(w)))
    finally:
        link.close()
        server.stop()


def test_a_compute_that_answers_beside_the_reply_slot_is_an_error_and_the_ring_stays_in_step():
    """The worker computes its reply into the ring's reply slot (no copy after); a compute that
    returns another tensor is refused with a clear error, and the link serves on."""
    secret = ServerSecret.generate()
    calls = []

    def compute(layer, x, ids, counts, weights, team=1, out=None):
        calls.append(layer)
        got = reference(layer, x, ids, counts, weights)
        return got if layer == 1 else out.copy_(got)

    server = DataPlaneServer(LOOPBACK, BOUNDS, compute, secret, ring_prefix=f"emoe-ringtest-{os.getpid()}-beside-")
    link = RingLink("w4", server.address, secret, timeout=5)
    try:
        x, ids, counts, w = pairs(5, 4, [2])
        with pytest.raises(RuntimeError, match="worker w4 failed on layer 1: RuntimeError: compute answered .* "
                                               "beside the reply slot"):
            exchange(link, 1, x, ids, counts, w)
        assert torch.equal(exchange(link, 0, x, ids, counts, w), reference(0, x, ids.tolist(), counts.tolist(),
                                                                          torch.from_numpy(w)))
        assert calls == [1, 0]
    finally:
        link.close()
        server.stop()
