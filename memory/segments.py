"""Shared-memory segments that hold one logical expert's weights for one layer.

A **segment** is a named file in `/dev/shm` holding an expert's `gate_up` [2I, D] (gate rows
first, then up rows) followed by its `down` [D, I], in one dtype and in the layout the worker's
kernel wants (prepacked once, at disk load; experts/kernels/moe.py): a peer copy or a remap moves
kernel-ready bytes. `down` starts at the first page boundary after `gate_up` (`down_offset`), so a
slot range (memory/slot_range.py) can map each part on its own; for every shape the fused kernel
accepts that is exactly the end of `gate_up`, and the file is the expert's size. Every process
on the node that maps the same name sees the same bytes, so a move between two workers on one
node is a **remap**: the receiver attaches by name and zero bytes are copied.

One writer: the process that `create`s a segment fills it (from disk, or a peer's copy) through
its own writable mapping. Every other mapping, `attach` (a remap, or a survivor taking over a
dead worker's segment) and a slot of a slot range, is PROT_READ, so a bug in a receiver faults
instead of corrupting the expert its source still serves.

Lifetime: the file lives until `unlink`; each mapping lives until its process drops every
tensor and memoryview taken from it. `close` only drops the segment's own references, so a
view handed out earlier stays valid (never a dangling pointer), and `unlink` while a process
still maps the bytes leaves that mapping working. `unlink_namespace` removes a whole server's
files after a crash, since `/dev/shm` outlives the processes that wrote it.

Linux only: mappings are made through `/proc/self/fd`, so the file we checked is the file we
map even if someone unlinks or recreates the name in between.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import re
from dataclasses import dataclass

import numpy as np

import torch

SHM_DIR = "/dev/shm"   # the default; `shm_dir()` is where this process's segments live
SHM_DIR_ENV = "ELASTICMOE_SHM_DIR"
PAGE = mmap.PAGESIZE
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)

# The namespace may not contain "-": it ends the prefix that unlink_namespace matches, so
# namespace "a" can never claim the files of namespace "a-b".
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_]+")
_NODE_TAG_RE = re.compile(r"[A-Za-z0-9_.-]+")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")


@dataclass(frozen=True)
class ExpertShape:
    """Shape of one expert: `hidden` D, `intermediate` I, and the dtype of both matrices."""

    hidden: int
    intermediate: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for field in ("hidden", "intermediate"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ExpertShape.{field} must be a positive int, got {value!r}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"ExpertShape.dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype!r}")

    @property
    def gate_up_numel(self) -> int:
        return 2 * self.intermediate * self.hidden

    @property
    def down_numel(self) -> int:
        return self.hidden * self.intermediate

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def gate_up_nbytes(self) -> int:
        return self.gate_up_numel * self.itemsize

    @property
    def down_nbytes(self) -> int:
        return self.down_numel * self.itemsize

    @property
    def down_offset(self) -> int:
        """Byte offset of `down`: `gate_up` rounded up to the page, since mmap maps from page offsets."""
        return -(-self.gate_up_nbytes // PAGE) * PAGE

    @property
    def nbytes(self) -> int:
        return self.down_offset + self.down_nbytes


def segment_name(namespace: str, layer: int, expert: int, node_tag: str) -> str:
    """The `/dev/shm` name of logical expert (layer, expert) of server `namespace` on a node."""
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise ValueError(f"namespace must match {_NAMESPACE_RE.pattern}, got {namespace!r}")
    if not isinstance(node_tag, str) or not _NODE_TAG_RE.fullmatch(node_tag):
        raise ValueError(f"node_tag must match {_NODE_TAG_RE.pattern}, got {node_tag!r}")
    for what, value in (("layer", layer), ("expert", expert)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return f"{_namespace_prefix(namespace)}{node_tag}-L{layer}-E{expert}"


def _namespace_prefix(namespace: str) -> str:
    return f"emoe-{namespace}-"


def shm_dir() -> str:
    """$ELASTICMOE_SHM_DIR, else /dev/shm. Read at every call, not at import: a worker inherits it
    from its raylet's environment, so each node (e.g. each raylet of a test cluster) can have its own."""
    return os.environ.get(SHM_DIR_ENV) or SHM_DIR


def segment_path(name: str) -> str:
    """The file of segment `name` in this process's segment directory (a slot range maps it)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"segment name must match {_NAME_RE.pattern}, got {name!r}")
    return os.path.join(shm_dir(), name)


_path = segment_path


def _map(fd: int, nbytes: int) -> torch.Tensor:
    # MAP_SHARED over the open descriptor's inode; torch closes its own descriptor after
    # mmap, so a mapping holds no file descriptor (thousands of segments stay under ulimit -n).
    return torch.from_file(f"/proc/self/fd/{fd}", shared=True, size=nbytes, dtype=torch.uint8)


def _map_readonly(fd: int, nbytes: int) -> torch.Tensor:
    """MAP_SHARED, PROT_READ: a write through the tensor faults (SIGSEGV) instead of landing in
    another process's expert. The tensor keeps the mapping alive and the mapping is released with
    the last view of it, as with `_map`."""
    mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    # torch.frombuffer of the read-only mmap itself works but warns, once per process, that the
    # tensor is writable anyway; a ctypes array over the same address says nothing and holds the mmap
    array = (ctypes.c_char * nbytes).from_address(np.frombuffer(mapping, dtype=np.uint8).ctypes.data)
    array.mapping = mapping
    return torch.frombuffer(array, dtype=torch.uint8)


class ExpertSegment:
    """One expert's weights in a named shared file; `gate_up` and `down` are views onto it."""

    def __init__(self, name: str, shape: ExpertShape, raw: torch.Tensor, writable: bool) -> None:
        assert raw.dtype == torch.uint8 and raw.numel() == shape.nbytes, (raw.dtype, raw.shape, shape)
        self.name = name
        self.shape = shape
        self.nbytes = shape.nbytes
        self.writable = writable   # created here (the one writer), not attached
        self._raw: torch.Tensor | None = raw
        inter, hidden, split = shape.intermediate, shape.hidden, shape.down_offset
        self._gate_up: torch.Tensor | None = raw[:shape.gate_up_nbytes].view(shape.dtype).view(2 * inter, hidden)
        self._down: torch.Tensor | None = raw[split:].view(shape.dtype).view(hidden, inter)

    @classmethod
    def create(cls, name: str, shape: ExpertShape) -> ExpertSegment:
        """Create `/dev/shm/<name>`, zero-filled; FileExistsError if the name is taken.

        OSError (ENOSPC) naming the segment if /dev/shm cannot hold it; no file is left behind.
        """
        path = _path(name)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except FileExistsError:
            raise FileExistsError(
                f"expert segment {name!r} already exists in {shm_dir()}: a live server's, or a "
                f"leftover of a crashed one (unlink_namespace removes those)"
            ) from None
        try:
            # Allocate now rather than ftruncate a sparse file: on a full /dev/shm (Docker's
            # default is 64 MB) a write into a sparse mapping dies of SIGBUS, not an error.
            try:
                os.posix_fallocate(fd, 0, shape.nbytes)
            except OSError as e:
                raise OSError(e.errno, f"cannot allocate {shape.nbytes} bytes for expert segment "
                              f"{name!r} in {shm_dir()} ({os.strerror(e.errno)}): enlarge it, e.g. "
                              f"docker --shm-size") from e
            raw = _map(fd, shape.nbytes)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(name, shape, raw, writable=True)

    @classmethod
    def attach(cls, name: str, shape: ExpertShape) -> ExpertSegment:
        """Map an existing segment read-only (a remap: no bytes copied). Its size must match `shape`.

        Its tensors and `buffer()` are views of a PROT_READ mapping: only its creator writes it."""
        path = _path(name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"expert segment {name!r} not found in {shm_dir()}: never created on this node, "
                f"or already unlinked"
            ) from None
        try:
            size = os.fstat(fd).st_size
            if size != shape.nbytes:
                # Checked before mapping: a shared mapping larger than the file would grow it.
                raise ValueError(
                    f"expert segment {name!r} holds {size} bytes but {shape} needs {shape.nbytes}"
                )
            raw = _map_readonly(fd, shape.nbytes)
        finally:
            os.close(fd)
        return cls(name, shape, raw, writable=False)

    @property
    def closed(self) -> bool:
        return self._raw is None

    @property
    def gate_up(self) -> torch.Tensor:
        """[2I, D]: gate rows then up rows."""
        if self._gate_up is None:
            raise RuntimeError(f"expert segment {self.name!r} is closed")
        return self._gate_up

    @property
    def down(self) -> torch.Tensor:
        """[D, I]."""
        if self._down is None:
            raise RuntimeError(f"expert segment {self.name!r} is closed")
        return self._down

    def buffer(self) -> memoryview:
        """The whole segment's bytes, C-contiguous, format 'B' (transfers use it); writable only
        for the segment's creator (`writable`).

        The memoryview keeps the mapping alive on its own, even after `close`.
        """
        if self._raw is None:
            raise RuntimeError(f"expert segment {self.name!r} is closed")
        view = memoryview(self._raw.numpy())
        return view if self.writable else view.toreadonly()

    def close(self) -> None:
        """Drop this segment's references to the mapping; idempotent.

        The pages are unmapped once no tensor or memoryview taken from it is alive either.
        """
        self._raw = self._gate_up = self._down = None

    def unlink(self) -> None:
        """Remove the name; mappings that exist stay valid. Idempotent."""
        try:
            os.unlink(_path(self.name))
        except FileNotFoundError:
            pass

    def __enter__(self) -> ExpertSegment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open" if self.writable else "open read-only"
        return f"ExpertSegment({self.name!r}, {self.shape}, {state})"


def unlink_namespace(namespace: str) -> int:
    """Remove every `/dev/shm` file of server `namespace`; returns how many were removed."""
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise ValueError(f"namespace must match {_NAMESPACE_RE.pattern}, got {namespace!r}")
    prefix = _namespace_prefix(namespace)
    removed = 0
    directory = shm_dir()
    for entry in os.listdir(directory):
        if entry.startswith(prefix):
            try:
                os.unlink(os.path.join(directory, entry))
                removed += 1
            except FileNotFoundError:  # another process's cleanup got there first
                pass
    return removed
