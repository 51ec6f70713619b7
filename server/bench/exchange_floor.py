"""The exchange against its floor, measured in one run (`measure_exchange_floor`).

The floor is what the machine allows: per MoE layer, each worker process receives the same request
bytes and answers the same reply bytes, with nothing else (no handshake-proven framing, routing,
bounds or compute): over TCP, a length word then the bytes; through shared memory, a memcpy and a
futex doorbell each way. Ours is `RemoteExperts.start` + `finish` over real `DataPlaneServer`s
(whose compute is a near-free stand-in), minus the workers' own reported compute time. Both run
the same steps (same router choices, same pairs per worker) against worker processes of their own.
"""
from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from experts.model.profile import StepProfile
from experts.wire.auth import ServerSecret
from experts.wire.dataplane import DataPlaneServer, open_link
from experts.wire.doorbell import Doorbell
from experts.wire.framing import nodelay, recv_exact, send_parts
from experts.wire.messages import ExchangeBounds
from server.engine.exchange import RemoteExperts, Routing

_SPAWN = mp.get_context("spawn")
_LEN = struct.Struct("<II")   # request bytes, reply bytes: the least framing an echo needs


@dataclass(frozen=True)
class ExchangeFloor:
    transport: str        # "ring" (same node) | "tcp"
    workers: int
    layers: int
    tokens: int           # per step
    floor_ms: float       # per step: bare round trips of the same bytes
    exchange_ms: float    # per step: our exchange, less the workers' compute
    compute_ms: float     # per step: the workers' stand-in compute on the critical path (subtracted)
    floor_cpu_ms: float   # per step: the engine process's CPU time for the floor (steadier than wall
    exchange_cpu_ms: float  # time on a loaded machine) and for ours

    @property
    def ratio(self) -> float:
        return self.exchange_ms / self.floor_ms


def _stand_in(layer: int, x: torch.Tensor, ids: list[int], counts: list[int], w: torch.Tensor) -> torch.Tensor:
    return x.float().mul_(w.unsqueeze(1))


def _echo_tcp(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    nodelay(conn)
    head, buf = bytearray(_LEN.size), bytearray(64 << 20)
    try:
        while True:
            recv_exact(conn, memoryview(head))
            req, rep = _LEN.unpack(head)
            recv_exact(conn, memoryview(buf)[:req])
            conn.sendall(memoryview(buf)[:rep])
    except (ConnectionError, OSError):
        conn.close()


def _echo_ring(path: str, size: int, stop: threading.Event) -> None:
    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, size)
    os.close(fd)
    buf = np.frombuffer(mm, dtype=np.uint8)
    words = buf[:64].view(np.uint32)
    req_bell, rep_bell = Doorbell(words, 0, words.ctypes.data), Doorbell(words, 1, words.ctypes.data)
    half = (size - 4096) // 2
    seq = 1
    while not stop.is_set():
        if not req_bell.wait(seq, 0.05):
            continue
        req, rep = _LEN.unpack_from(mm, 8)
        buf[4096 + half:4096 + half + rep].fill(seq & 0xFF)   # the reply's bytes written, as a worker would
        rep_bell.ring(seq)
        seq += 1


def _worker_main(conn, secret: ServerSecret, bounds: ExchangeBounds, ring_path: str, ring_size: int) -> None:
    torch.set_num_threads(1)
    server = DataPlaneServer("127.0.0.1", bounds, _stand_in, secret, ring_prefix=f"emoe-floor{os.getpid()}-ring-")
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    threading.Thread(target=_echo_tcp, args=(listener,), daemon=True).start()
    threading.Thread(target=_echo_ring, args=(ring_path, ring_size, stop), daemon=True).start()
    conn.send((server.address, listener.getsockname()[:2]))
    conn.recv()
    stop.set()
    server.stop()


class _BareRing:
    def __init__(self, path: str, size: int) -> None:
        fd = os.open(path, os.O_RDWR)
        self.mm = mmap.mmap(fd, size)
        os.close(fd)
        self.buf = np.frombuffer(self.mm, dtype=np.uint8)
        words = self.buf[:64].view(np.uint32)
        self.req, self.rep = Doorbell(words, 0, words.ctypes.data), Doorbell(words, 1, words.ctypes.data)
        self.half, self.seq = (size - 4096) // 2, 0

    def send(self, payload: np.ndarray, reply_bytes: int) -> None:
        self.seq += 1
        _LEN.pack_into(self.mm, 8, payload.nbytes, reply_bytes)
        self.buf[4096:4096 + payload.nbytes] = payload
        self.req.ring(self.seq)

    def recv(self, into: np.ndarray) -> None:
        while not self.rep.wait(self.seq, 1.0):
            pass
        into[:] = self.buf[4096 + self.half:4096 + self.half + into.nbytes]


def measure_exchange_floor(hidden: int = 512, num_experts: int = 8, top_k: int = 2, tokens: int = 8,
                           layers: int = 8, workers: int = 2, steps: int = 50, transport: str = "ring",
                           dtype: torch.dtype = torch.float32, seed: int = 0) -> ExchangeFloor:
    """Per step: the floor and our exchange over `layers` MoE layers of `tokens` tokens, top-k
    routed at random (fixed seed) over experts split evenly between `workers` processes."""
    if transport not in ("ring", "tcp"):
        raise ValueError(f"transport must be 'ring' or 'tcp', got {transport!r}")
    torch.set_num_threads(1)   # as the engine's exchange runs: routing must not fork a parallel region
    bounds = ExchangeBounds(hidden, layers, num_experts, tokens * top_k)
    secret = ServerSecret.generate()
    ring_size = 4096 + 2 * (bounds.request_bytes() + bounds.reply_bytes())
    procs, pipes, paths = [], [], []
    try:
        for w in range(workers):
            path = f"/dev/shm/emoe-floor-{os.getpid()}-{w}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, ring_size)
            os.close(fd)
            paths.append(path)
            parent, child = _SPAWN.Pipe()
            p = _SPAWN.Process(target=_worker_main, args=(child, secret, bounds, path, ring_size), daemon=True)
            p.start()
            procs.append(p)
            pipes.append(parent)
        addresses = [p.recv() for p in pipes]
        gen = torch.Generator().manual_seed(seed)
        plan = [[(torch.randn(tokens, hidden, generator=gen).to(dtype),
                  torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)]),
                  torch.rand(tokens, top_k, generator=gen).to(dtype)) for _ in range(layers)] for _ in range(steps)]
        names = [f"w{i}" for i in range(workers)]
        experts_of = [[[e for e in range(num_experts) if e % workers == i]] * layers for i in range(workers)]
        routing = Routing.build(1, names, experts_of, layers, num_experts)
        bare = _Bare(plan, routing, addresses, paths, ring_size, transport, hidden)
        links = {n: open_link(n, a[0], secret, same_node=transport == "ring") for n, a in zip(names, addresses)}
        profile = StepProfile(enabled=True)
        backend = RemoteExperts(routing, links, {l: l for l in range(layers)}, hidden, profile)
        floor_s = ours_s = floor_cpu = ours_cpu = 0.0
        # step by step, alternating which goes first: the machine's load swings hit both alike
        for i, step in enumerate(plan[:5] + plan):
            if i == 5:
                floor_s = ours_s = floor_cpu = ours_cpu = 0.0
                profile.totals.clear()
            for first in ((True, False) if i % 2 else (False, True)):
                t0, c0 = time.perf_counter(), time.process_time()
                if first:
                    bare.step(i % len(plan) if i >= 5 else i)
                    floor_s += time.perf_counter() - t0
                    floor_cpu += time.process_time() - c0
                else:
                    for layer, (x, ids, w) in enumerate(step):
                        backend.finish(backend.start(layer, x, ids, w))
                    ours_s += time.perf_counter() - t0
                    ours_cpu += time.process_time() - c0
        compute = profile.totals["expert_ffn_on_worker"]
        bare.close()
        for link in links.values():
            link.close()
        return ExchangeFloor(transport, workers, layers, tokens, floor_s / steps * 1e3,
                             (ours_s - compute) / steps * 1e3, compute / steps * 1e3, floor_cpu / steps * 1e3,
                             ours_cpu / steps * 1e3)
    finally:
        for pipe in pipes:
            try:
                pipe.send("stop")
            except OSError:
                pass
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        for path in paths:
            os.unlink(path)


class _Bare:
    """The floor: per layer, each worker's request bytes out and its reply bytes back, nothing else."""

    def __init__(self, plan: list, routing: Routing, addresses: list, paths: list[str], ring_size: int,
                 transport: str, hidden: int) -> None:
        self.tcp = transport == "tcp"
        self.socks = [nodelay(socket.create_connection(a[1])) for a in addresses] if self.tcp else []
        self.rings = [] if self.tcp else [_BareRing(p, ring_size) for p in paths]
        self.steps = []   # per step, per layer: [(worker, request bytes, reply buffer)]
        for step in plan:
            layers = []
            for layer, (x, ids, _) in enumerate(step):
                flat = ids.numpy().reshape(-1)
                owner = routing.owners(layer, flat, ids.shape[1])
                per = []
                for w in sorted(set(owner.tolist())):
                    m, g = int((owner == w).sum()), len(set(flat[owner == w].tolist()))
                    per.append((w, np.zeros(m * hidden * x.element_size() + (2 * g + m) * 4 + 21, dtype=np.uint8),
                                np.empty(m * hidden * 4 + 29, dtype=np.uint8)))
                layers.append(per)
            self.steps.append(layers)

    def step(self, i: int) -> None:
        for per in self.steps[i]:
            for w, req, rep in per:
                if self.tcp:
                    send_parts(self.socks[w], [_LEN.pack(req.nbytes, rep.nbytes), req])
                else:
                    self.rings[w].send(req, rep.nbytes)
            for w, req, rep in per:
                if self.tcp:
                    recv_exact(self.socks[w], memoryview(rep))
                else:
                    self.rings[w].recv(rep)

    def close(self) -> None:
        for s in self.socks:
            s.close()
