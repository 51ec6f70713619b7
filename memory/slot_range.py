"""A worker's slot pool for one MoE layer as one reserved virtual range the kernel reads stacked.

The range holds `S` slots laid out part-major: first the `gate_up` part of slots 0..S-1, then
the `down` part of slots 0..S-1. It is reserved once with `mmap(PROT_NONE, MAP_PRIVATE |
MAP_ANONYMOUS | MAP_NORESERVE)`: address space only, no memory. `map(slot, segment)` places
the segment file's two parts over that slot with `mmap(MAP_FIXED | MAP_SHARED)`, so the slot *is*
the segment's pages: a segment another worker created on this node costs 0 bytes copied. A slot
is mapped PROT_READ, whoever created the segment: the kernels only read the stacked tensors, the
segment's creator writes it through its own mapping (memory/segments.py), and a stray write
through a slot faults instead of corrupting an expert other workers serve. `unmap(slot)` puts
PROT_NONE back over it.

Every part's stride is rounded up to the page size (mmap places pages). When both parts of an
expert are whole pages (any shape vLLM's kernel accepts, in practice) `w13` [S, 2I, D] and `w2`
[S, D, I] are contiguous and one kernel call covers the layer; otherwise they are strided views
and the caller runs slot by slot (`contiguous` says which).

The contract (`SlotRange`) is small so a GPU pool can keep it: reserve a virtual range
(`cuMemAddressReserve`), map a physical allocation shared through IPC into a slot (`cuMemMap` +
`cuMemSetAccess`), unmap (`cuMemUnmap`), and expose the stacked tensors.

Lifetime: `close` releases the whole range; views taken from `w13`/`w2` must not be used after
it (the worker closes its ranges only once its data plane has stopped). Linux only.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import threading
from typing import Protocol

import torch

from memory.segments import ExpertShape, segment_path

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_FIXED = 0x10   # Linux; Python's mmap module does not export it
# the slot's page-table entries are filled when it is mapped (the segment's pages are in the page
# cache already): the first step that reads a newly mapped expert (after a scale-up, a rebalance,
# a failover's remap) would otherwise take a page fault per 4 KiB page inside the kernel call
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)
_PROT_NONE = 0   # Python's mmap module exports PROT_READ and PROT_WRITE only
_EMPTY = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE


def round_up(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


class StackedExperts(Protocol):
    """Experts stacked by slot: what a fused MoE kernel reads (experts/kernels/moe.py)."""

    @property
    def contiguous(self) -> bool: ...

    @property
    def w13(self) -> torch.Tensor: ...   # [S, 2I, D]

    @property
    def w2(self) -> torch.Tensor: ...    # [S, D, I]


class SlotRange(StackedExperts, Protocol):
    """S slots of one layer, each of which a segment can be mapped into, read as stacked tensors."""

    @property
    def slots(self) -> int: ...

    def map(self, slot: int, segment: str) -> None: ...

    def unmap(self, slot: int) -> None: ...

    def close(self) -> None: ...


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int, what: str) -> int:
    got = _libc.mmap(addr, length, prot, flags, fd, offset)
    if got == _MAP_FAILED or got is None:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap {what} ({length} bytes): {os.strerror(err)}")
    if addr is not None and got != addr:   # MAP_FIXED either lands exactly there or fails
        raise OSError(0, f"mmap {what} landed at {got:#x}, not {addr:#x}")
    return got


class HostSlotRange:
    """A `SlotRange` in host memory over `/dev/shm` segments (see the module docstring)."""

    def __init__(self, slots: int, shape: ExpertShape) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots <= 0:
            raise ValueError(f"slots must be a positive int, got {slots!r}")
        if shape.down_offset % PAGE:
            # the down part is mapped from this file offset, which mmap wants page aligned
            raise ValueError(f"{shape}: down part at byte {shape.down_offset}, not a multiple of the page ({PAGE})")
        self._slots = slots
        self.shape = shape
        self.stride13 = round_up(shape.gate_up_nbytes)
        self.stride2 = round_up(shape.down_nbytes)
        self.nbytes = slots * (self.stride13 + self.stride2)
        self._base: int | None = _mmap(None, self.nbytes, _PROT_NONE, _EMPTY, -1, 0, f"reserve {slots} slots")
        self._mapped = [False] * slots
        self._lock = threading.Lock()   # control threads map and unmap; the data plane only reads
        raw = torch.frombuffer((ctypes.c_char * self.nbytes).from_address(self._base), dtype=torch.uint8)
        inter, hidden, dt = shape.intermediate, shape.hidden, shape.dtype
        isz = dt.itemsize
        self._w13: torch.Tensor | None = raw[: slots * self.stride13].view(dt).as_strided(
            (slots, 2 * inter, hidden), (self.stride13 // isz, hidden, 1))
        self._w2: torch.Tensor | None = raw[slots * self.stride13:].view(dt).as_strided(
            (slots, hidden, inter), (self.stride2 // isz, inter, 1))

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def contiguous(self) -> bool:
        return self.stride13 == self.shape.gate_up_nbytes and self.stride2 == self.shape.down_nbytes

    @property
    def w13(self) -> torch.Tensor:
        if self._w13 is None:
            raise RuntimeError("slot range is closed")
        return self._w13

    @property
    def w2(self) -> torch.Tensor:
        if self._w2 is None:
            raise RuntimeError("slot range is closed")
        return self._w2

    def _addrs(self, slot: int) -> tuple[int, int]:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self._slots:
            raise ValueError(f"slot must be an int in [0, {self._slots}), got {slot!r}")
        if self._base is None:
            raise RuntimeError("slot range is closed")
        return self._base + slot * self.stride13, self._base + self._slots * self.stride13 + slot * self.stride2

    def map(self, slot: int, segment: str) -> None:
        """Map segment file `segment` (a name in `shm_dir()`) over `slot`, read-only, replacing
        what was there."""
        path = segment_path(segment)   # the name is checked: no path escapes the segment directory
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size != self.shape.nbytes:
                # a shared mapping past the end of a shorter file would fault (SIGBUS) on read
                raise ValueError(f"segment {segment!r} holds {size} bytes but {self.shape} needs {self.shape.nbytes}")
            with self._lock:
                a13, a2 = self._addrs(slot)
                ro, flags = mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED | _MAP_POPULATE
                _mmap(a13, self.stride13, ro, flags, fd, 0, f"slot {slot} gate_up of {segment!r}")
                try:
                    _mmap(a2, self.stride2, ro, flags, fd, self.shape.down_offset, f"slot {slot} down of {segment!r}")
                except OSError:
                    self._empty(a13, self.stride13, slot)
                    raise
                self._mapped[slot] = True
        finally:
            os.close(fd)   # the mappings hold the file, not the descriptor

    def unmap(self, slot: int) -> None:
        """Put PROT_NONE back over `slot` (the segment's other mappings are untouched). Idempotent."""
        with self._lock:
            a13, a2 = self._addrs(slot)
            if self._mapped[slot]:
                self._empty(a13, self.stride13, slot)
                self._empty(a2, self.stride2, slot)
                self._mapped[slot] = False

    def _empty(self, addr: int, length: int, slot: int) -> None:
        _mmap(addr, length, _PROT_NONE, _EMPTY | _MAP_FIXED, -1, 0, f"unmap slot {slot}")

    def mapped(self, slot: int) -> bool:
        self._addrs(slot)
        return self._mapped[slot]

    def close(self) -> None:
        """Release the whole range (every slot's mapping with it). Idempotent."""
        with self._lock:
            if self._base is not None:
                self._w13 = self._w2 = None
                _libc.munmap(self._base, self.nbytes)
                self._base = None
                self._mapped = [False] * self._slots
