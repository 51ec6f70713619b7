"""The exchange between the engine and a worker: one request and one reply per MoE layer per step.

A plain TCP stream with a fixed binary framing (no pickling): the engine sends one row of hidden
state per (token, expert) pair, grouped by expert, with each group's expert id and size and each
pair's router weight; the worker answers with one weighted float32 output row per pair. TCP_NODELAY keeps each small message from waiting on Nagle's algorithm. One engine link per
worker; a worker serves any number of links (for example a standby link opened during prepare).
"""
from __future__ import annotations

import socket
from collections import deque
import struct
import threading
import time
from typing import Callable

import numpy as np
import torch

from experts.model.dtypes import WIRE_DTYPES

MAGIC = b"EMX1"
_REQ = struct.Struct("<4sIiiiB")   # magic, seq, layer, pairs M, groups G, dtype code
_REP = struct.Struct("<4sIBQQ")    # magic, seq, status (0 ok, 1 error), payload bytes, compute ns
CODE_DTYPES = dict(enumerate(WIRE_DTYPES))
DTYPE_CODES = {v: k for k, v in CODE_DTYPES.items()}

# (layer, x [M, D] grouped by expert, expert ids [G], group sizes [G], weights [M]) -> float32 [M, D]
Compute = Callable[[int, torch.Tensor, list[int], list[int], torch.Tensor], torch.Tensor]


class WorkerLost(RuntimeError):
    """The connection to a worker broke: the worker died or its node went away."""

    def __init__(self, worker_id: str, detail: str) -> None:
        super().__init__(f"lost expert worker {worker_id}: {detail}")
        self.worker_id = worker_id


def recv_exact(sock: socket.socket, buf: memoryview) -> None:
    got = 0
    while got < len(buf):
        n = sock.recv_into(buf[got:])
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n


def send_parts(sock: socket.socket, parts: list) -> None:
    """sendmsg that finishes a partial send: one syscall in the common case."""
    views = [memoryview(p).cast("B") for p in parts]
    sent = sock.sendmsg(views)
    for v in views:
        if sent >= len(v):
            sent -= len(v)
            continue
        sock.sendall(v[sent:])
        sent = 0


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, memoryview]:
    t = torch.empty(shape, dtype=dtype)
    return t, memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


class DataPlaneServer:
    """A worker's side: accept links, answer each request with `compute`."""

    def __init__(self, host: str, hidden: int, compute: Compute) -> None:
        self.hidden = hidden
        self.compute = compute
        self._listener = socket.create_server((host, 0))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, name="dataplane-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="dataplane-link", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        head = bytearray(_REQ.size)
        try:
            while True:
                recv_exact(conn, memoryview(head))
                magic, seq, layer, m, g, code = _REQ.unpack(head)
                if magic != MAGIC:
                    raise ConnectionError(f"bad magic {magic!r}")
                x, xb = _empty((m, self.hidden), CODE_DTYPES[code])
                meta, mb = _empty((2 * g + m,), torch.int32)
                recv_exact(conn, xb)
                recv_exact(conn, mb)
                groups = meta[:2 * g].tolist()
                weights = meta[2 * g:].view(torch.float32)
                try:
                    t0 = time.perf_counter_ns()
                    out = self.compute(layer, x, groups[:g], groups[g:], weights)
                    body = _bytes_of(out.float())
                    spent = time.perf_counter_ns() - t0
                    send_parts(conn, [_REP.pack(MAGIC, seq, 0, len(body), spent), body])
                except Exception as exc:  # reported to the engine, which raises it there
                    msg = f"{type(exc).__name__}: {exc}".encode()
                    conn.sendall(_REP.pack(MAGIC, seq, 1, len(msg), 0) + msg)
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
        with self._lock:
            for c in self._conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._conns.clear()


class WorkerLink:
    """The engine's side of one worker: `send` then `recv`, so several workers compute at once."""

    def __init__(self, worker_id: str, address: tuple[str, int], timeout: float = 60.0) -> None:
        self.worker_id = worker_id
        self.address = address
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._seq = 0
        self._owed: deque[int] = deque()   # requests sent and not yet answered, oldest first
        self.last_compute_s = 0.0   # the worker's own compute time for the last reply

    def send(self, layer: int, x: torch.Tensor, expert_ids: np.ndarray, counts: np.ndarray,
             weights: np.ndarray) -> None:
        """x [M, D] grouped by expert; expert_ids, counts [G]; weights [M] (float32)."""
        self._seq += 1
        self._owed.append(self._seq)
        meta = np.concatenate([expert_ids.astype(np.int32), counts.astype(np.int32),
                               weights.astype(np.float32).view(np.int32)])
        head = _REQ.pack(MAGIC, self._seq, layer, x.shape[0], expert_ids.shape[0], DTYPE_CODES[x.dtype])
        try:
            send_parts(self.sock, [head, _bytes_of(x), memoryview(meta)])
        except OSError as exc:   # ConnectionError included
            raise WorkerLost(self.worker_id, f"send on layer {layer}: {exc}") from exc

    def recv_into(self, layer: int, out: torch.Tensor) -> None:
        """Receive the reply straight into `out` ([M, D] float32, contiguous)."""
        try:
            self._recv_into(layer, out)
        except OSError as exc:   # ConnectionError and socket timeouts included
            raise WorkerLost(self.worker_id, f"reply on layer {layer}: {exc}") from exc

    def _recv_into(self, layer: int, out: torch.Tensor) -> None:
        head = bytearray(_REP.size)
        recv_exact(self.sock, memoryview(head))
        magic, seq, status, size, spent = _REP.unpack(head)
        self.last_compute_s = spent / 1e9
        expected = self._owed.popleft() if self._owed else None
        if magic != MAGIC or seq != expected:
            raise RuntimeError(f"worker {self.worker_id}: out of step on layer {layer} ({magic!r}, {seq})")
        if status:
            msg = bytearray(size)
            recv_exact(self.sock, memoryview(msg))
            raise RuntimeError(f"worker {self.worker_id} failed on layer {layer}: {msg.decode()}")
        ob = memoryview(out.view(torch.uint8).numpy()).cast("B")
        assert out.is_contiguous() and size == len(ob), (size, len(ob))
        recv_exact(self.sock, ob)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
