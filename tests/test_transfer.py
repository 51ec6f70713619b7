"""Peer copy of segments over TCP: exact values across processes, failures that end bounded."""
from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest
import torch

from memory.segments import ExpertSegment, ExpertShape, segment_name
from experts.wire.auth import PURPOSE_TRANSFER, ServerHandshake, ServerSecret
from experts.wire.transfer import PackingMismatch, TransferClient, TransferServer, fetch
from tests.test_segments import SMALL, SPAWN, _recv, expert_weights, fill, holds, namespace  # noqa: F401

LOOPBACK = "127.0.0.1"
BIG = ExpertShape(4096, 4352, torch.float32)  # 3 * 4096 * 4352 * 4 B = 214 MB
EXPERTS = [(0, 0), (0, 3), (2, 1)]
SECRET = ServerSecret.generate()   # a spawned child gets it as an argument: its import draws another
PACKING = "plain/-/float32"        # what both ends of these transfers say their bytes are packed for


def _serve_child(conn, namespace: str, secret: ServerSecret) -> None:
    """A peer worker: creates experts that name themselves, serves them until told to stop."""
    segs = {}
    for dtype, shape in SMALL.items():
        for layer, e in EXPERTS:
            seg = ExpertSegment.create(segment_name(namespace, layer, e, f"src_{str(dtype)[6:]}"), shape)
            fill(seg, layer, e)
            segs[seg.name] = seg
    big = ExpertSegment.create(segment_name(namespace, 9, 9, "src_big"), BIG)
    big.gate_up.fill_(9.5)
    big.down.copy_(torch.arange(BIG.down_numel, dtype=torch.float32).view_as(big.down))
    segs[big.name] = big
    server = TransferServer(LOOPBACK, lambda name: segs[name].buffer() if name in segs else None,
                            secret=secret, name_prefix=f"emoe-{namespace}-",
                            packing=PACKING)
    conn.send((server.start(), list(segs)))
    _recv(conn, timeout=120)
    server.stop()
    for seg in segs.values():
        seg.close()
        seg.unlink()
    conn.send("stopped")


def test_fetch_across_processes(namespace, capsys):
    parent, child_end = SPAWN.Pipe()
    child = SPAWN.Process(target=_serve_child, args=(child_end, namespace, SECRET))
    child.start()
    try:
        address, names = _recv(parent)
        route = f"{address[0]}:{address[1]} -> local"
        with TransferClient(address, secret=SECRET) as client:  # one connection, several fetches in sequence
            for dtype, shape in SMALL.items():
                for layer, e in EXPERTS:
                    src = segment_name(namespace, layer, e, f"src_{str(dtype)[6:]}")
                    with ExpertSegment.create(segment_name(namespace, layer, e, "dst"), shape) as dst:
                        result = client.fetch(src, dst.buffer(), packing=PACKING)
                        assert (result.name, result.nbytes) == (src, shape.nbytes)
                        assert holds(dst, layer, e)
                        dst.unlink()
            with pytest.raises(RuntimeError, match=rf"'emoe-{namespace}-no-such' {route} failed: the peer does not have it"):
                client.fetch(f"emoe-{namespace}-no-such", memoryview(bytearray(16)), packing=PACKING)
            with pytest.raises(RuntimeError, match=f"{route} failed: the peer holds"):
                client.fetch(names[0], memoryview(bytearray(16)), packing=PACKING)
            assert holds_after_refusals(client, names[0], SMALL[torch.float32])

        with ExpertSegment.create(segment_name(namespace, 9, 9, "dst_big"), BIG) as dst:
            for attempt in range(2):  # the first also pays for faulting in fresh destination pages
                result = fetch(address, segment_name(namespace, 9, 9, "src_big"), dst.buffer(), secret=SECRET,
                               packing=PACKING)
                with capsys.disabled():
                        print(f"\npeer copy {result.nbytes / 1e6:.0f} MB across processes: "
                          f"{result.seconds * 1e3:.0f} ms, {result.nbytes / result.seconds / 1e9:.2f} "
                          f"GB/s ({'fresh' if attempt == 0 else 'warm'} destination)")
            assert result.nbytes == BIG.nbytes
            assert (dst.gate_up == 9.5).all()
            assert torch.equal(dst.down, torch.arange(BIG.down_numel, dtype=torch.float32).view_as(dst.down))
        parent.send("stop")
        assert _recv(parent) == "stopped"
        child.join(timeout=30)
        assert child.exitcode == 0
        with pytest.raises(RuntimeError, match="cannot connect"):
            fetch(address, names[0], memoryview(bytearray(16)), timeout=5, secret=SECRET, packing=PACKING)
    finally:
        if child.is_alive():
            child.kill()


def holds_after_refusals(client: TransferClient, name: str, shape: ExpertShape) -> bool:
    """Refusals leave the connection usable: the next fetch on it still arrives whole."""
    layer, e = EXPERTS[0]
    dest = torch.zeros(shape.nbytes, dtype=torch.uint8)
    client.fetch(name, memoryview(dest.numpy()), packing=PACKING)
    gate_up, down = expert_weights(layer, e, shape)
    return torch.equal(dest, torch.cat([gate_up.flatten(), down.flatten()]).view(torch.uint8))


@pytest.fixture
def big_source():
    """256 MB whose first 8 MB are 0xFF; the rest is zeros."""
    data = bytearray(256 << 20)
    data[: 8 << 20] = b"\xff" * (8 << 20)
    return memoryview(data)


def test_server_stopped_mid_transfer_fails_the_fetch_bounded(big_source):
    server = TransferServer(LOOPBACK, lambda name: big_source if name == "big" else None, secret=SECRET, name_prefix="",
                            packing=PACKING)
    address = server.start()
    dest = memoryview(bytearray(big_source.nbytes))
    outcome: list = []

    def receive() -> None:
        try:
            # Small receives stretch the transfer (~0.25 s here) so stop() lands mid-way.
            outcome.append(fetch(address, "big", dest, timeout=30, chunk_bytes=8 << 10, secret=SECRET, packing=PACKING))
        except RuntimeError as e:
            outcome.append(e)

    receiver = threading.Thread(target=receive)
    receiver.start()
    deadline = time.monotonic() + 20
    while dest[64 << 10] == 0:  # wait until bytes are flowing, then pull the plug
        assert time.monotonic() < deadline, "the transfer never started"
        time.sleep(0.0005)
    started = time.monotonic()
    server.stop()
    receiver.join(timeout=10)
    assert not receiver.is_alive(), "fetch hung after the server stopped"
    assert time.monotonic() - started < 10
    [error] = outcome
    assert isinstance(error, RuntimeError), f"the transfer finished before stop: {error}"
    assert f"'big' {address[0]}:{address[1]} -> local failed after" in str(error)
    server.stop()  # idempotent


def _fake_peer(reply) -> tuple[tuple[str, int], threading.Thread, socket.socket]:
    """A one-shot peer that proves itself, reads a request and then does whatever `reply(conn)` does."""
    listener = socket.create_server((LOOPBACK, 0))

    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            handshake = ServerHandshake(SECRET, (PURPOSE_TRANSFER,))
            while handshake.expects():
                conn.sendall(handshake.feed(conn.recv(handshake.expects(), socket.MSG_WAITALL)))
            conn.recv(4096)
            reply(conn)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener.getsockname()[:2], thread, listener


def test_connection_dropped_mid_transfer():
    def half(conn: socket.socket) -> None:
        conn.sendall(struct.pack("<4sBBQ", b"EMT3", 0, len(PACKING), 1000) + PACKING.encode() + bytes(400))

    address, thread, listener = _fake_peer(half)
    with listener, pytest.raises(RuntimeError, match="'x' .* -> local failed after 400 of 1000 bytes"):
        fetch(address, "x", memoryview(bytearray(1000)), timeout=10, secret=SECRET, packing=PACKING)
    thread.join(timeout=5)


def test_silent_peer_times_out():
    release = threading.Event()
    address, thread, listener = _fake_peer(lambda conn: release.wait(10))
    started = time.monotonic()
    with listener, pytest.raises(RuntimeError, match="'x' .* -> local failed after 0 of 8 bytes: timed out"):
        fetch(address, "x", memoryview(bytearray(8)), timeout=0.5, secret=SECRET, packing=PACKING)
    assert time.monotonic() - started < 3
    release.set()
    thread.join(timeout=5)


def _wait_for(condition, what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.02)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _conn_threads() -> int:
    return sum(t.name.startswith("emoe-transfer-conn") for t in threading.enumerate())


def test_many_fetches_leak_no_threads_or_fds():
    source = memoryview(bytes(range(256)) * 1024)
    server = TransferServer(LOOPBACK, lambda name: source if name == "s" else None, secret=SECRET, name_prefix="",
                            packing=PACKING)
    address = server.start()
    dest = memoryview(bytearray(source.nbytes))
    fetch(address, "s", dest, secret=SECRET, packing=PACKING)  # warm up lazily created state before taking the baseline
    _wait_for(lambda: _conn_threads() == 0, "the warm-up connection to end")
    fds, threads = _open_fds(), threading.active_count()
    for _ in range(200):
        fetch(address, "s", dest, secret=SECRET, packing=PACKING)
        with pytest.raises(RuntimeError):
            fetch(address, "missing", dest, secret=SECRET, packing=PACKING)
    with TransferClient(address, secret=SECRET) as client:
        for _ in range(50):
            client.fetch("s", dest, packing=PACKING)
        assert _conn_threads() == 1, "one connection, one server thread"
    _wait_for(lambda: _open_fds() <= fds and threading.active_count() <= threads,
              f"fds ({fds}) and threads ({threads}) to return to their baseline")
    assert bytes(dest) == bytes(source)
    # stop() closes idle live connections too; the client sees a bounded failure.
    client = TransferClient(address, secret=SECRET)
    client.fetch("s", dest, packing=PACKING)
    server.stop()
    with pytest.raises(RuntimeError, match="failed after 0 of"):
        client.fetch("s", dest, timeout=5, packing=PACKING)
    assert _conn_threads() == 0 and not any(t.name.startswith("emoe-transfer") for t in threading.enumerate())


# ----- kernel-ready bytes: what workers hold after disk load, peer copy and remap -----

def test_workers_move_packed_bytes_and_compute_from_them(tiny_models, namespace):  # noqa: F811
    """Worker A loads experts from disk (packed once, for its kernel); B copies them from A, C
    remaps A's segments. Every slot of every worker holds, by value, the kernel's packing of that
    expert's checkpoint weights, and B's outputs equal the reference over the plain weights."""
    from experts.kernels.ffn import run_grouped
    from experts.kernels.moe import VllmCpuMoE, select_kernel
    from experts.model.checkpoint import Checkpoint
    from experts.model.spec import load_spec
    from experts.wire.config import WireConfig
    from experts.worker.actor import ExpertWorker, Incoming

    d = tiny_models["mixtral"]
    spec, ck, wire = load_spec(d), Checkpoint(d), WireConfig.generate()
    kernel = select_kernel(spec.hidden, spec.expert_intermediate, torch.float32).kernel

    def plain(layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up, down = ck.expert(spec, spec.moe_layers[layer], e)
        return torch.cat([gate, up]), down

    def packed(layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for w in plain(layer, e):
            p = torch.empty_like(w.unsqueeze(0))
            kernel.prepack(w.unsqueeze(0), p)
            out.append(p[0])
        return out[0], out[1]

    def holds_packed(w: ExpertWorker, layer: int, e: int) -> bool:
        slot, (gate_up, down) = w.pool.slot(layer, e), packed(layer, e)
        return torch.equal(w.ranges[layer].w13[slot], gate_up) and torch.equal(w.ranges[layer].w2[slot], down)

    workers = {k: ExpertWorker(k, namespace, str(d), spec, LOOPBACK, node_id="n", capacity=6, wire=wire)
               for k in ("a", "b", "c")}
    a, b, c = workers["a"], workers["b"], workers["c"]
    try:
        held = [(0, 5), (0, 2), (1, 7), (1, 0), (1, 3)]
        got = a.receive([Incoming(layer, e, "disk") for layer, e in held])
        assert got.bytes_loaded == len(held) * a.shape.nbytes
        b.receive([Incoming(layer, e, "peer", got.segments[layer, e], a.transfer.address) for layer, e in held[1:]])
        c.receive([Incoming(layer, e, "remap", got.segments[layer, e]) for layer, e in held[:3]])
        for w, mine in ((a, held), (b, held[1:]), (c, held[:3])):
            assert all(holds_packed(w, layer, e) for layer, e in mine), w.worker_id
        if isinstance(kernel, VllmCpuMoE):
            assert not torch.equal(a.ranges[0].w13[a.pool.slot(0, 5)], plain(0, 5)[0]), "bytes are packed"
        # A lets go of (0, 5); C's remapped slot keeps the bytes (the mapping outlives the name)
        a.release([(0, 5)], [True])
        assert holds_packed(c, 0, 5)
        # B computes from its packed slots what the reference computes from the plain weights
        g = torch.Generator().manual_seed(3)
        x, weights = torch.randn(9, spec.hidden, generator=g), torch.rand(9, generator=g)
        want = run_grouped(1, x.clone(), [0, 3, 7], [4, 1, 4], weights.clone(), plain)
        out = b._compute(1, x, [0, 3, 7], [4, 1, 4], weights)
        assert (out - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    finally:
        for w in workers.values():
            w.stop()


# ----- packing: bytes packed for one kernel never reach another -----

def test_a_source_packed_otherwise_is_refused_before_any_byte_moves():
    """Two nodes whose kernels pack differently (another op library build, another dtype): the
    source refuses, the receiver raises PackingMismatch naming both packings, its buffer keeps
    every byte it had, and the connection serves the next fetch."""
    source = memoryview(bytes(range(256)) * 64)
    amx, avx2 = "vllm-cpu-amx/_C@0.32.0/bfloat16", "vllm-cpu-vec/_C_AVX2@0.32.0/bfloat16"
    server = TransferServer(LOOPBACK, lambda name: source if name == "emoe-p-s" else None, secret=SECRET,
                            name_prefix="emoe-p-", packing=amx)
    address = server.start()
    dest = memoryview(bytearray(source.nbytes))
    try:
        with TransferClient(address, secret=SECRET) as client:
            with pytest.raises(PackingMismatch, match=rf"'emoe-p-s' .* refused: the source packs '{amx}' and this "
                                                      rf"worker '{avx2}'") as refused:
                client.fetch("emoe-p-s", dest, packing=avx2)
            assert (refused.value.source, refused.value.receiver) == (amx, avx2)
            assert bytes(dest) == bytes(source.nbytes), "a byte of the other packing arrived"
            assert client.fetch("emoe-p-s", dest, packing=amx).nbytes == source.nbytes
            assert bytes(dest) == bytes(source)
        with pytest.raises(ValueError, match="packing must be"):
            fetch(address, "emoe-p-s", dest, secret=SECRET, packing="")
    finally:
        server.stop()


def test_a_worker_repacks_from_the_checkpoint_what_a_peer_packed_otherwise(tiny_models, namespace):  # noqa: F811
    """A worker asked to copy an expert from a peer whose kernel packs otherwise (here a source
    that says so, serving bytes no kernel of ours packed) reads that expert from the checkpoint
    and packs it itself: its slot holds its own kernel's bytes, counted as loaded, not copied."""
    from experts.model.checkpoint import Checkpoint
    from experts.model.spec import load_spec
    from experts.wire.config import WireConfig
    from experts.worker.actor import ExpertWorker, Incoming

    d = tiny_models["mixtral"]
    spec, ck, wire = load_spec(d), Checkpoint(d), WireConfig.generate()
    b = ExpertWorker("b", namespace, str(d), spec, LOOPBACK, node_id="n", capacity=4, wire=wire)
    other = "vllm-cpu-amx/_C@0.0.0/float32" if b.packing != "vllm-cpu-amx/_C@0.0.0/float32" else PACKING
    theirs = {}
    for layer, e in ((0, 1), (1, 6)):
        gate, up, down = ck.expert(spec, spec.moe_layers[layer], e)
        seg = ExpertSegment.create(segment_name(namespace, layer, e, "other"), b.shape)
        seg.gate_up.copy_(-torch.cat([gate, up]))   # not what any kernel of ours packs
        seg.down.copy_(-down)
        theirs[seg.name] = seg
    peer = TransferServer(LOOPBACK, lambda name: theirs[name].buffer() if name in theirs else None,
                          secret=wire.secret, name_prefix=f"emoe-{namespace}-", packing=other)
    address = peer.start()
    try:
        got = b.receive([Incoming(layer, e, "peer", segment_name(namespace, layer, e, "other"), address)
                         for layer, e in ((0, 1), (1, 6))])
        assert (got.bytes_copied, got.bytes_loaded) == (0, 2 * b.shape.nbytes)
        for layer, e in ((0, 1), (1, 6)):
            gate, up, down = ck.expert(spec, spec.moe_layers[layer], e)
            want13 = torch.empty_like(torch.cat([gate, up]).unsqueeze(0))
            b.kernel.prepack(torch.cat([gate, up]).unsqueeze(0), want13)
            want2 = torch.empty_like(down.unsqueeze(0))
            b.kernel.prepack(down.unsqueeze(0), want2)
            slot = b.pool.slot(layer, e)
            assert torch.equal(b.ranges[layer].w13[slot], want13[0]) and torch.equal(b.ranges[layer].w2[slot], want2[0])
    finally:
        peer.stop()
        b.stop()
        for seg in theirs.values():
            seg.close()
            seg.unlink()
