"""The same-node exchange: request and reply through a shared-memory ring, a futex as doorbell.

Between the engine and a worker on one node, TCP costs two trips through the kernel's network
stack per message and a copy on each side; the ring costs one memcpy into shared memory and a
wake-up. Setup runs over the worker's data-plane port: the engine proves itself (auth.py,
purpose RING), the worker creates a 0600 file in /dev/shm sized for the largest exchange
(`ExchangeBounds`), sends its name, the engine maps it and acknowledges, and the worker unlinks
the name at once: only the two proven processes ever hold it. The TCP stream stays open as the
link's lifeline: each side notices the other's death by its close, never by a timeout alone.

Layout: one page of 32-bit control words (the engine's request counter, the worker's reply
counter), then `depth` request slots and `depth` reply slots, each holding one message of
experts/wire/messages.py (header padded to 64 bytes). Request `seq` goes in slot `seq % depth`;
the engine never has more than `depth` requests owed (two micro-batches per step need two).
"""
from __future__ import annotations

import mmap
import os
import socket
import stat
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from experts.wire.auth import PURPOSE_RING, ServerSecret, client_handshake
from experts.wire.doorbell import Doorbell
from experts.wire.framing import FrameError, frame, nodelay, peer_closed, recv_bytes
from experts.wire.messages import (ERROR, MAGIC, MAX_ERROR_BYTES, OK, REPLY, REQUEST, Compute, ExchangeBounds, WorkerLost,
                                   check_groups, check_request, error_text, pack_head)

SHM_DIR = "/dev/shm"
PAGE = mmap.PAGESIZE
HEAD_ROOM = 64                  # a message's header, padded so that its payload is aligned
DEPTH = 2
REQ_WORD, REP_WORD = 0, 1       # control words: request counter (engine rings), reply counter (worker rings)
LIFELINE_CHECK_S = 0.05         # how often a waiting side looks at the lifeline
REPLY_CHECK_S = 0.005           # how often the engine, owed a reply, looks whether the worker lives
# An exchange of at most SMALL_PAIRS pairs (decode at batch 1-2, top-2) is all latency: the engine
# sends the whole layer to one worker (server/engine/replicas.py), so one worker and the engine
# take turns, one core each, and their waits spin up to SMALL_SPIN_S before they sleep: a futex
# wake-up of a sleeping process costs 100-400 us on this VM against a few us spinning (measured
# in the server, 2 cores, 2 workers, batch 1: the exchange beyond the worker's compute 3.7-4.8 ->
# 2.3-2.4 ms per step). The worker spins only after a small request, the engine only for one.
SMALL_PAIRS = 4
SMALL_SPIN_S = 0.0015
PF_EXITING = 0x4                # /proc/<pid>/stat flags: the process is being torn down
_SETUP = frame("HIQQQ")         # name length, depth, request slot bytes, reply slot bytes, file bytes
MAX_NAME = 255


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


@dataclass(frozen=True)
class RingLayout:
    depth: int
    req_slot: int
    rep_slot: int

    @staticmethod
    def of(bounds: ExchangeBounds, depth: int = DEPTH) -> RingLayout:
        room = HEAD_ROOM - min(REQUEST.size, REPLY.size)   # headers sit in HEAD_ROOM, not in the payload
        return RingLayout(depth, _pages(bounds.request_bytes() + room + 8), _pages(bounds.reply_bytes() + room))

    @property
    def total(self) -> int:
        return PAGE + self.depth * (self.req_slot + self.rep_slot)

    def request_at(self, seq: int) -> int:
        return PAGE + (seq % self.depth) * self.req_slot

    def reply_at(self, seq: int) -> int:
        return PAGE + self.depth * self.req_slot + (seq % self.depth) * self.rep_slot


class _Mapped:
    """Both sides' view of one ring file."""

    def __init__(self, fd: int, layout: RingLayout) -> None:
        self.layout = layout
        self.mm = mmap.mmap(fd, layout.total)   # MAP_SHARED
        self.buf = np.frombuffer(self.mm, dtype=np.uint8)
        words = self.buf[:PAGE].view(np.uint32)
        base = words.ctypes.data
        self.requests = Doorbell(words, REQ_WORD, base)
        self.replies = Doorbell(words, REP_WORD, base)

    def tensor(self, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
        """A tensor over the shared bytes at `offset` (no copy)."""
        return torch.from_numpy(self.buf[offset:offset + count * dtype.itemsize]).view(dtype)

    def close(self) -> None:
        self.requests = self.replies = None  # type: ignore[assignment]
        self.buf = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:   # a tensor over it is still alive somewhere: the GC unmaps it later
            pass


def _exiting(stat_fd: int) -> bool:
    """Whether the process whose /proc/<pid>/stat `stat_fd` holds is exiting or gone. The fd names
    that process, not its pid: once it is reaped the read fails, and a reused pid is never read."""
    try:
        fields = os.pread(stat_fd, 512, 0).rsplit(b")", 1)[-1].split()   # after the name, which may hold anything
        return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & PF_EXITING)
    except (OSError, IndexError, ValueError):   # ESRCH: reaped
        return True


def serve_ring(conn: socket.socket, name: str, bounds: ExchangeBounds, compute: Compute, io_timeout: float,
               stopping: Callable[[], bool]) -> None:
    """The worker's side of one ring link, on the link's thread, until the engine closes the
    lifeline or `stopping()`."""
    layout = RingLayout.of(bounds)
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.ftruncate(fd, layout.total)
            ring = _Mapped(fd, layout)
        finally:
            os.close(fd)
        encoded = name.encode()
        conn.sendall(_SETUP.pack(len(encoded), layout.depth, layout.req_slot, layout.rep_slot, layout.total) + encoded)
        if recv_bytes(conn, 1, time.monotonic() + io_timeout) != b"\x01":
            raise FrameError("the engine did not acknowledge the ring")
        conn.settimeout(None)
    finally:
        os.unlink(path)   # mapped by both (or failed): the name has done its job
    try:
        seq, spin = 1, 0.0
        while not stopping():
            if not ring.requests.wait(seq, LIFELINE_CHECK_S, spin):
                spin = 0.0   # idle: sleep from now on
                if peer_closed(conn):
                    return
                continue
            pairs = _answer(ring, seq, bounds, compute)
            ring.replies.ring(seq)
            seq = (seq + 1) & 0xFFFFFFFF
            spin = SMALL_SPIN_S if 0 < pairs <= SMALL_PAIRS else 0.0
    finally:
        ring.close()


def _answer(ring: _Mapped, seq: int, bounds: ExchangeBounds, compute: Compute) -> int:
    """Answer request `seq`; its pairs (0 when it failed)."""
    at, rep = ring.layout.request_at(seq), ring.layout.reply_at(seq)
    t0 = time.perf_counter_ns()
    try:
        req = check_request(ring.buf[at:at + REQUEST.size].tobytes(), bounds)
        if req.seq != seq:
            raise FrameError(f"request {req.seq} in the slot of request {seq}")
        x_at = at + HEAD_ROOM
        x = ring.tensor(x_at, req.pairs * bounds.hidden, req.dtype).view(req.pairs, bounds.hidden)
        meta_at = x_at + -(-req.x_bytes(bounds.hidden) // 8) * 8
        meta = ring.buf[meta_at:meta_at + 4 * req.meta_count()].view(np.int32)
        ids, counts = check_groups(req, meta, bounds)
        weights = torch.from_numpy(meta[2 * req.groups:].view(np.float32))
        # the reply is computed into its slot: no copy on either side of the ring
        slot = ring.tensor(rep + HEAD_ROOM, req.pairs * bounds.hidden, torch.float32).view(req.pairs, bounds.hidden)
        out = compute(req.layer, x, ids, counts, weights, req.team, slot)
        if out.data_ptr() != slot.data_ptr() or out.shape != slot.shape or out.dtype != torch.float32:
            raise RuntimeError(f"compute answered {out.dtype} {tuple(out.shape)} beside the reply slot, not "
                               f"float32 {(req.pairs, bounds.hidden)} in it")
        REPLY.pack_into(ring.mm, rep, MAGIC, seq, OK, out.numel() * 4, time.perf_counter_ns() - t0)
        return req.pairs
    except Exception as exc:  # reported to the engine, which raises it there
        msg = error_text(exc)
        ring.buf[rep + HEAD_ROOM:rep + HEAD_ROOM + len(msg)] = np.frombuffer(msg, dtype=np.uint8)
        REPLY.pack_into(ring.mm, rep, MAGIC, seq, ERROR, len(msg), 0)
        return 0


class RingLink:
    """The engine's side of one same-node worker: `send` then `recv_into`, like WorkerLink."""
    kind = "ring"

    def __init__(self, worker_id: str, address: tuple[str, int], secret: ServerSecret, timeout: float = 60.0) -> None:
        self.worker_id = worker_id
        self.address = address
        self.timeout = timeout
        self.last_compute_s = 0.0
        self._seq = 0
        self._owed: deque[tuple[int, int]] = deque()   # (seq, pairs) of each request owed a reply
        self.ring: _Mapped | None = None
        self._stat_fd: int | None = None   # the worker's /proc/<pid>/stat, once followed
        self.sock = nodelay(socket.create_connection(address, timeout=timeout))
        try:
            client_handshake(self.sock, secret, PURPOSE_RING, timeout)
            self.ring = self._map(timeout)
        except BaseException:
            self.sock.close()
            raise

    def _map(self, timeout: float) -> _Mapped:
        deadline = time.monotonic() + timeout
        name_len, depth, req_slot, rep_slot, total = _SETUP.unpack(recv_bytes(self.sock, _SETUP.size, deadline))
        if not 1 <= name_len <= MAX_NAME or not 1 <= depth <= 16:
            raise FrameError(f"worker {self.worker_id}: ring setup with a name of {name_len} bytes, depth {depth}")
        name = recv_bytes(self.sock, name_len, deadline).decode()
        layout = RingLayout(depth, req_slot, rep_slot)
        if "/" in name or name.startswith(".") or layout.total != total:
            raise FrameError(f"worker {self.worker_id}: ring setup {name!r} of {total} bytes")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
        try:
            st = os.fstat(fd)
            # ours alone: a file another user could read or swap would leak hidden states
            if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077 or st.st_size != total:
                raise PermissionError(f"worker {self.worker_id}: ring file {name!r} is uid {st.st_uid} "
                                      f"mode {oct(st.st_mode)} size {st.st_size}")
            ring = _Mapped(fd, layout)
        finally:
            os.close(fd)
        self.sock.sendall(b"\x01")
        self.sock.settimeout(None)
        return ring

    def follow(self, pid: int) -> None:
        """Also watch the worker's process (same node: same pids). A SIGKILLed worker is exiting
        within a millisecond, but its end of the lifeline closes only once the kernel has torn down
        its address space (60-160 ms measured for a worker with its experts mapped, 2 loaded cores):
        a reply owed by an exiting process is not waited for."""
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        if self._stat_fd is not None:
            os.close(self._stat_fd)
        self._stat_fd = fd

    def send(self, layer: int, x: torch.Tensor, expert_ids: np.ndarray, counts: np.ndarray,
             weights: np.ndarray, team: int = 1) -> None:
        """x [M, D] grouped by expert; expert_ids, counts [G]; weights [M] (float32); team: the
        processes of its node busy with this layer (experts/kernels/threads.py)."""
        self._send(layer, x.shape, x.dtype, lambda slot: slot.copy_(x), expert_ids, counts, weights, team)

    def send_rows(self, layer: int, hidden: torch.Tensor, rows: torch.Tensor, expert_ids: np.ndarray,
                  counts: np.ndarray, weights: np.ndarray, team: int = 1) -> None:
        """`send` of x = hidden[rows], gathered straight into the request slot."""
        self._send(layer, (rows.shape[0], hidden.shape[1]), hidden.dtype,
                   lambda slot: torch.index_select(hidden, 0, rows, out=slot),
                   expert_ids, counts, weights, team)

    def _send(self, layer: int, shape: tuple[int, int], dtype: torch.dtype, write_x: Callable[[torch.Tensor], object],
              expert_ids: np.ndarray, counts: np.ndarray, weights: np.ndarray, team: int) -> None:
        """One request of x [pairs, D] = `shape`, which `write_x` writes into the slot's view."""
        pairs, width = shape
        ring = self.ring
        if ring is None:
            raise WorkerLost(self.worker_id, f"send on layer {layer}: the link is closed")
        layout = ring.layout
        if len(self._owed) >= layout.depth:
            raise RuntimeError(f"worker {self.worker_id}: {len(self._owed)} exchanges owed on layer {layer}, "
                               f"the ring holds {layout.depth}")
        seq = (self._seq + 1) & 0xFFFFFFFF
        head, meta = pack_head(seq, layer, pairs, dtype, expert_ids, counts, weights, team)
        at = layout.request_at(seq)
        x_bytes = pairs * width * dtype.itemsize
        meta_at = at + HEAD_ROOM + -(-x_bytes // 8) * 8
        if meta_at + meta.nbytes > at + layout.req_slot:
            raise ValueError(f"worker {self.worker_id}: layer {layer} exchange of {pairs} pairs does not fit "
                             f"the ring's {layout.req_slot}-byte slot")
        buf = ring.buf
        write_x(ring.tensor(at + HEAD_ROOM, pairs * width, dtype).view(pairs, width))
        buf[at:at + len(head)] = np.frombuffer(head, dtype=np.uint8)
        buf[meta_at:meta_at + meta.nbytes] = meta.view(np.uint8)
        self._seq = seq
        self._owed.append((seq, pairs))
        ring.requests.ring(seq)

    def recv_into(self, layer: int, out: torch.Tensor) -> None:
        """Wait for the oldest owed reply and copy it into `out` ([M, D] float32, contiguous)."""
        assert out.is_contiguous() and out.dtype == torch.float32, (out.dtype, out.stride())
        out.copy_(self._reply(layer, out.shape[0], out.shape[1]))

    def recv_scatter(self, layer: int, dest: torch.Tensor, rows: torch.Tensor) -> None:
        """Wait for the oldest owed reply and copy its row i to dest[rows[i]], from the ring itself."""
        dest.index_copy_(0, rows, self._reply(layer, rows.shape[0], dest.shape[1]))

    def _reply(self, layer: int, pairs: int, width: int) -> torch.Tensor:
        """The oldest owed reply, [pairs, D] float32, as a view of its slot: read before the request
        `depth` later is sent (the worker writes that one's reply there)."""
        if not self._owed:
            raise RuntimeError(f"worker {self.worker_id}: a reply read on layer {layer} with none owed")
        expected, sent = self._owed.popleft()
        spin = SMALL_SPIN_S if sent <= SMALL_PAIRS else 0.0
        ring = self.ring
        if ring is None:
            raise WorkerLost(self.worker_id, f"reply on layer {layer}: the link is closed")
        deadline = time.monotonic() + self.timeout
        while not ring.replies.wait(expected, REPLY_CHECK_S, spin):
            spin = 0.0
            if self._stat_fd is not None and _exiting(self._stat_fd):
                raise WorkerLost(self.worker_id, f"ring reply on layer {layer}: the worker's process exited")
            if peer_closed(self.sock):
                raise WorkerLost(self.worker_id, f"ring reply on layer {layer}: the worker closed its link")
            if time.monotonic() > deadline:
                raise WorkerLost(self.worker_id, f"ring reply on layer {layer}: none in {self.timeout} s")
        at = ring.layout.reply_at(expected)
        magic, seq, status, size, spent = REPLY.unpack_from(ring.mm, at)
        self.last_compute_s = spent / 1e9
        if magic != MAGIC or seq != expected:
            raise RuntimeError(f"worker {self.worker_id}: out of step on layer {layer} ({magic!r}, {seq})")
        if status != OK:
            body = ring.buf[at + HEAD_ROOM:at + HEAD_ROOM + min(size, MAX_ERROR_BYTES)]
            raise RuntimeError(f"worker {self.worker_id} failed on layer {layer}: {body.tobytes().decode(errors='replace')}")
        if sent != pairs or size != pairs * width * 4:
            raise RuntimeError(f"worker {self.worker_id}: a reply of {size} bytes on layer {layer} for {sent} pairs "
                               f"sent, {pairs} expected")
        return ring.tensor(at + HEAD_ROOM, pairs * width, torch.float32).view(pairs, width)

    def alive(self) -> bool:
        if self.ring is None or (self._stat_fd is not None and _exiting(self._stat_fd)):
            return False
        return not peer_closed(self.sock)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        fd, self._stat_fd = self._stat_fd, None
        if fd is not None:
            os.close(fd)
        ring, self.ring = self.ring, None
        if ring is not None:
            ring.close()
