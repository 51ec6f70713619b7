"""Who owns a namespace's shared segments on this node, and reclaiming the segments nobody owns.

`/dev/shm` outlives the processes that fill it: a server killed with SIGKILL (or a worker that
dies) leaves its segments behind. Each process that creates segments of a namespace on a node
first records itself in the namespace's **owner file** beside them (`emoe-<namespace>.owners`,
one `pid starttime` line per process; the start time tells a live owner from a recycled pid).
A namespace is **orphaned** on a node when every process its owner file names is gone; anyone
may then remove its segments and the owner file (`sweep_orphans`, run when a server or a worker
starts). Namespaces without an owner file are never touched: their owner is unknown.

Every function works in `shm_dir` when given, else in memory/segments.shm_dir() as it is when
called ($ELASTICMOE_SHM_DIR, else /dev/shm): the owner file lies beside the segments it speaks for,
also on a node (a test cluster's raylet) whose segments live elsewhere.

`unlink_worker_segments` removes the segments one worker created on this node (their names carry
its id), minus those still in use: what a survivor runs for a dead worker after failover.
"""
from __future__ import annotations

import fcntl
import os
import re

from memory.segments import shm_dir as default_shm_dir

_OWNERS_SUFFIX = ".owners"
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_]+")
_TAG_RE = re.compile(r"[A-Za-z0-9_.]+")


def _check(what: str, value: str, pattern: re.Pattern) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{what} must match {pattern.pattern}, got {value!r}")


def owners_path(namespace: str, shm_dir: str | None = None) -> str:
    _check("namespace", namespace, _NAMESPACE_RE)
    return os.path.join(shm_dir or default_shm_dir(), f"emoe-{namespace}{_OWNERS_SUFFIX}")


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None if it is not running."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) may hold spaces and parentheses: fields after the last ")"
    fields = stat[stat.rfind(")") + 2:].split()
    if fields and fields[0] in ("Z", "X"):   # a zombie holds no mapping and creates nothing
        return None
    return fields[19] if len(fields) > 19 else None


def claim_namespace(namespace: str, pid: int | None = None, shm_dir: str | None = None) -> None:
    """Record `pid` (default: this process) as an owner of `namespace`'s segments on this node."""
    pid = os.getpid() if pid is None else pid
    started = _start_time(pid)
    if started is None:
        raise ValueError(f"pid {pid} is not a running process")
    fd = os.open(owners_path(namespace, shm_dir), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{pid} {started}\n".encode())   # one short O_APPEND write: never interleaved
    finally:
        os.close(fd)


def _alive_owner(path: str) -> bool:
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return True   # someone else is sweeping it right now
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and _start_time(int(parts[0])) == parts[1]:
            return True
    return False


def sweep_orphans(shm_dir: str | None = None) -> dict[str, int]:
    """Remove the segments of every namespace whose owners on this node are all gone.

    Returns namespace -> segments removed. Sweeps of two processes at once are serialised by a
    lock on the owner file, so a namespace is judged and removed by one of them."""
    shm_dir = shm_dir or default_shm_dir()
    removed: dict[str, int] = {}
    for entry in os.listdir(shm_dir):
        if not (entry.startswith("emoe-") and entry.endswith(_OWNERS_SUFFIX)):
            continue
        namespace = entry[len("emoe-"):-len(_OWNERS_SUFFIX)]
        if not _NAMESPACE_RE.fullmatch(namespace):
            continue
        path = os.path.join(shm_dir, entry)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _alive_owner(path):
                continue
            removed[namespace] = _unlink_prefix(shm_dir, f"emoe-{namespace}-", keep=frozenset())
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        finally:
            os.close(fd)
    return removed


def unlink_worker_segments(namespace: str, worker_id: str, keep: frozenset[str] = frozenset(),
                           shm_dir: str | None = None) -> int:
    """Remove the segments `worker_id` created on this node, except the names in `keep` (still
    mapped by the serving topology). Returns how many were removed."""
    _check("namespace", namespace, _NAMESPACE_RE)
    _check("worker_id", worker_id, _TAG_RE)
    # the trailing "-" ends the worker id: w1's prefix never matches w12's segments
    return _unlink_prefix(shm_dir or default_shm_dir(), f"emoe-{namespace}-{worker_id}-", keep)


def _unlink_prefix(shm_dir: str, prefix: str, keep: frozenset[str]) -> int:
    removed = 0
    for entry in os.listdir(shm_dir):
        if entry.startswith(prefix) and entry not in keep:
            try:
                os.unlink(os.path.join(shm_dir, entry))
                removed += 1
            except FileNotFoundError:   # another cleanup got there first
                pass
    return removed


def disown_namespace(namespace: str, shm_dir: str | None = None) -> None:
    """Remove the owner file of `namespace` on this node (its server has removed its segments)."""
    try:
        os.unlink(owners_path(namespace, shm_dir))
    except FileNotFoundError:
        pass
