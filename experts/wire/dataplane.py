"""The exchange between the engine and a worker: one request and one reply per MoE layer per step.

The messages are experts/wire/messages.py's (no pickling). A worker's `DataPlaneServer` listens on
one port, behind experts/wire/framing.BoundedAcceptor: every connection proves it belongs to this
server (auth.py) before a byte of work is read, then is either an exchange over that TCP stream
(`WorkerLink`, across nodes) or the lifeline of a shared-memory ring (`RingLink`, ring.py, on the
engine's own node). `open_link` picks one by node. One engine link per worker; a worker serves a
few (for example a standby link opened during prepare).
"""
from __future__ import annotations

import socket
import threading
import time
from collections import deque
from typing import Protocol

import numpy as np
import torch

from experts.wire.auth import PURPOSE_EXCHANGE, PURPOSE_RING, ServerHandshake, ServerSecret, client_handshake
from experts.wire.framing import (BoundedAcceptor, ConnectionLimits, nodelay, peer_closed, recv_exact,
                                  recv_message_start, send_parts)
from experts.wire.messages import (ERROR, MAGIC, OK, REPLY, REQUEST, Compute, ExchangeBounds, WorkerLost, check_groups,
                                   check_request, error_text, pack_request, tensor_bytes)
from experts.wire.ring import RingLink, serve_ring

__all__ = ["Compute", "DataPlaneServer", "ExchangeLink", "WorkerLink", "WorkerLost", "open_link"]

# The engine's links are idle whenever nothing is served, and proven: they are never timed out
# between messages; a message once started must arrive within io_timeout.
DATA_LIMITS = ConnectionLimits(max_connections=8, max_pending=64, handshake_timeout=2.0, io_timeout=30.0)


class ExchangeLink(Protocol):
    """The engine's side of one worker, whatever carries the bytes."""
    worker_id: str
    kind: str                 # "tcp" | "ring"
    last_compute_s: float     # the worker's own compute time for the last reply

    def send(self, layer: int, x: torch.Tensor, expert_ids: np.ndarray, counts: np.ndarray,
             weights: np.ndarray, team: int = 1) -> None: ...

    def recv_into(self, layer: int, out: torch.Tensor) -> None: ...

    def send_rows(self, layer: int, hidden: torch.Tensor, rows: torch.Tensor, expert_ids: np.ndarray,
                  counts: np.ndarray, weights: np.ndarray, team: int = 1) -> None:
        """`send` of x = hidden[rows] (rows: int64 [M]), gathered where the link's bytes go."""
        ...

    def recv_scatter(self, layer: int, dest: torch.Tensor, rows: torch.Tensor) -> None:
        """The oldest owed reply's row i into dest[rows[i]] (dest: float32 [N, D])."""
        ...

    def alive(self) -> bool:
        """False once the worker is known gone (its link closed, its process exiting); asks
        without waiting, for a link with no exchange owed."""
        ...

    def close(self) -> None: ...


def open_link(worker_id: str, address: tuple[str, int], secret: ServerSecret, same_node: bool,
              timeout: float = 60.0) -> ExchangeLink:
    """A ring when the worker shares the engine's node (its /dev/shm), TCP otherwise."""
    if same_node:
        return RingLink(worker_id, address, secret, timeout)
    return WorkerLink(worker_id, address, secret, timeout)


class DataPlaneServer:
    """A worker's side: prove each peer, then answer each of its requests with `compute`."""

    def __init__(self, host: str, bounds: ExchangeBounds, compute: Compute, secret: ServerSecret,
                 ring_prefix: str, limits: ConnectionLimits = DATA_LIMITS) -> None:
        self.bounds = bounds
        self.compute = compute
        self.limits = limits
        self._ring_prefix = ring_prefix
        self._rings = 0
        self._lock = threading.Lock()
        self._stopped = False
        listener = socket.create_server((host, 0), backlog=128)
        self.address: tuple[str, int] = listener.getsockname()[:2]
        self.acceptor = BoundedAcceptor(listener, lambda: ServerHandshake(secret, (PURPOSE_EXCHANGE, PURPOSE_RING)),
                                        self._serve, limits, f"dataplane-{self.address[1]}")

    def _serve(self, conn: socket.socket, purpose: int) -> None:
        nodelay(conn)
        if purpose == PURPOSE_RING:
            with self._lock:
                self._rings += 1
                name = f"{self._ring_prefix}{self._rings}"
            serve_ring(conn, name, self.bounds, self.compute, self.limits.io_timeout, lambda: self._stopped)
            return
        head = bytearray(REQUEST.size)
        hidden = self.bounds.hidden
        while recv_message_start(conn, memoryview(head), self.limits.io_timeout, self.limits.idle_timeout):
            req = check_request(head, self.bounds)   # nothing below is allocated before this passed
            deadline = time.monotonic() + self.limits.io_timeout
            x = torch.empty((req.pairs, hidden), dtype=req.dtype)
            recv_exact(conn, tensor_bytes(x), deadline)
            meta = np.empty(req.meta_count(), dtype=np.int32)
            recv_exact(conn, memoryview(meta).cast("B"), deadline)
            conn.settimeout(self.limits.io_timeout)   # a reader that stops reading cannot hold us
            t0 = time.perf_counter_ns()
            try:
                ids, counts = check_groups(req, meta, self.bounds)
                weights = torch.from_numpy(meta[2 * req.groups:].view(np.float32))
                out = self.compute(req.layer, x, ids, counts, weights, req.team, None)
                if out.shape != (req.pairs, hidden) or out.dtype != torch.float32:
                    raise RuntimeError(f"compute returned {out.dtype} {tuple(out.shape)}, not float32 "
                                       f"{(req.pairs, hidden)}")
                body = tensor_bytes(out)
                send_parts(conn, [REPLY.pack(MAGIC, req.seq, OK, len(body), time.perf_counter_ns() - t0), body])
            except OSError:
                raise
            except Exception as exc:  # reported to the engine, which raises it there
                msg = error_text(exc)
                conn.sendall(REPLY.pack(MAGIC, req.seq, ERROR, len(msg), 0) + msg)

    def stop(self) -> None:
        self._stopped = True   # ring links notice within ring.LIFELINE_CHECK_S
        self.acceptor.stop()


class WorkerLink:
    """The engine's side of one worker over TCP: `send` then `recv_into`, so several workers
    compute at once."""
    kind = "tcp"

    def __init__(self, worker_id: str, address: tuple[str, int], secret: ServerSecret, timeout: float = 60.0) -> None:
        self.worker_id = worker_id
        self.address = address
        self.sock = nodelay(socket.create_connection(address, timeout=timeout))
        try:
            client_handshake(self.sock, secret, PURPOSE_EXCHANGE, timeout)
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(timeout)
        self._seq = 0
        self._owed: deque[int] = deque()   # requests sent and not yet answered, oldest first
        self.last_compute_s = 0.0

    def send(self, layer: int, x: torch.Tensor, expert_ids: np.ndarray, counts: np.ndarray,
             weights: np.ndarray, team: int = 1) -> None:
        """x [M, D] grouped by expert; expert_ids, counts [G]; weights [M] (float32); team: the
        processes of its node busy with this layer (experts/kernels/threads.py)."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        head, xb, meta = pack_request(self._seq, layer, x, expert_ids, counts, weights, team)
        self._owed.append(self._seq)
        try:
            send_parts(self.sock, [head, xb, memoryview(meta)])
        except OSError as exc:   # ConnectionError included
            raise WorkerLost(self.worker_id, f"send on layer {layer}: {exc}") from exc

    def send_rows(self, layer: int, hidden: torch.Tensor, rows: torch.Tensor, expert_ids: np.ndarray,
                  counts: np.ndarray, weights: np.ndarray, team: int = 1) -> None:
        self.send(layer, hidden.index_select(0, rows), expert_ids, counts, weights, team)

    def recv_scatter(self, layer: int, dest: torch.Tensor, rows: torch.Tensor) -> None:
        reply = torch.empty((rows.shape[0], dest.shape[1]), dtype=torch.float32)
        self.recv_into(layer, reply)
        dest.index_copy_(0, rows, reply)

    def recv_into(self, layer: int, out: torch.Tensor) -> None:
        """Receive the reply straight into `out` ([M, D] float32, contiguous)."""
        try:
            self._recv_into(layer, out)
        except OSError as exc:   # ConnectionError and socket timeouts included
            raise WorkerLost(self.worker_id, f"reply on layer {layer}: {exc}") from exc

    def _recv_into(self, layer: int, out: torch.Tensor) -> None:
        head = bytearray(REPLY.size)
        recv_exact(self.sock, memoryview(head))
        magic, seq, status, size, spent = REPLY.unpack(head)
        self.last_compute_s = spent / 1e9
        expected = self._owed.popleft() if self._owed else None
        if magic != MAGIC or seq != expected:
            raise RuntimeError(f"worker {self.worker_id}: out of step on layer {layer} ({magic!r}, {seq})")
        if status != OK:
            if size > 1 << 16:
                raise RuntimeError(f"worker {self.worker_id}: an error reply of {size} bytes on layer {layer}")
            msg = bytearray(size)
            recv_exact(self.sock, memoryview(msg))
            raise RuntimeError(f"worker {self.worker_id} failed on layer {layer}: {msg.decode(errors='replace')}")
        ob = tensor_bytes(out)
        if not out.is_contiguous() or size != len(ob):
            raise RuntimeError(f"worker {self.worker_id}: a reply of {size} bytes on layer {layer}, "
                               f"expected {len(ob)}")
        recv_exact(self.sock, ob)

    def alive(self) -> bool:
        return not peer_closed(self.sock)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
