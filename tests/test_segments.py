"""Shared expert segments (remap across processes) and the worker's slot pool.

Weights name themselves: expert (layer, e) holds values derived from (layer, e), so every
check is by value and a misplaced or stale expert cannot pass.
"""
from __future__ import annotations

import errno
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import torch

from memory.owners import disown_namespace
from memory.segments import ExpertSegment, ExpertShape, segment_name, unlink_namespace
from memory.slot_range import HostSlotRange
from memory.slots import SlotPool

SPAWN = mp.get_context("spawn")
SMALL = {torch.float32: ExpertShape(64, 32, torch.float32),
         torch.bfloat16: ExpertShape(64, 32, torch.bfloat16)}


def expert_weights(layer: int, expert: int, shape: ExpertShape) -> tuple[torch.Tensor, torch.Tensor]:
    """The (gate_up, down) that logical expert (layer, expert) must hold.

    An integer per expert times a power of two per position (exact in bfloat16 too), negated
    in `down`: any two experts differ at every position, and a shifted copy does not match.
    """
    idx = torch.arange(shape.gate_up_numel + shape.down_numel, dtype=torch.int64)
    vals = float(layer * 64 + expert + 1) * torch.pow(2.0, ((idx * 37) % 101 % 9 - 4).float())
    vals[shape.gate_up_numel:] *= -1
    vals = vals.to(shape.dtype)
    inter, hidden = shape.intermediate, shape.hidden
    return vals[:shape.gate_up_numel].view(2 * inter, hidden), vals[shape.gate_up_numel:].view(hidden, inter)


def fill(seg: ExpertSegment, layer: int, expert: int) -> None:
    gate_up, down = expert_weights(layer, expert, seg.shape)
    seg.gate_up.copy_(gate_up)
    seg.down.copy_(down)


def holds(seg: ExpertSegment, layer: int, expert: int) -> bool:
    gate_up, down = expert_weights(layer, expert, seg.shape)
    return torch.equal(seg.gate_up, gate_up) and torch.equal(seg.down, down)


@pytest.fixture
def namespace():
    ns = f"t{os.getpid()}{uuid.uuid4().hex[:8]}"
    yield ns
    unlink_namespace(ns)
    disown_namespace(ns)   # an in-process worker claimed it (memory/owners.py)


def _recv(conn, timeout: float = 60.0):
    if not conn.poll(timeout):
        raise TimeoutError("no message from the other process")
    return conn.recv()


def protection(addr: int) -> str:
    """The permissions ("r--s", "rw-s", "---p" ...) of this process's mapping that holds `addr`."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= addr < end:
                return perms
    raise AssertionError(f"{addr:#x} is not mapped")


def _child(conn, items) -> None:
    """Attach the parent's segments (read-only: the parent created them) and check them by value
    at each step; the parent writes, always through its own mappings."""
    segs = [(ExpertSegment.attach(name, shape), layer, e) for name, shape, layer, e in items]
    conn.send([holds(s, layer, e) for s, layer, e in segs])
    _recv(conn)  # the parent wrote (layer, e + 50)
    perms = {protection(t.data_ptr()) for s, _, _ in segs for t in (s.gate_up, s.down)}
    conn.send(([holds(s, layer, e + 50) for s, layer, e in segs], perms, {s.buffer().readonly for s, _, _ in segs}))
    _recv(conn)  # the parent unlinked every name, then wrote (layer, e + 150)
    still = [holds(s, layer, e + 150) for s, layer, e in segs]
    errors = []
    for name, shape, _, _ in items:
        try:
            ExpertSegment.attach(name, shape)
            errors.append("attached")
        except FileNotFoundError as err:
            errors.append(str(err))
    conn.send((still, errors))
    for s, _, _ in segs:
        s.close()


def test_remap_across_processes_shares_bytes(namespace):
    items, segs = [], []
    for dtype, shape in SMALL.items():
        for layer, e in [(0, 0), (0, 5), (3, 1)]:
            seg = ExpertSegment.create(segment_name(namespace, layer, e, str(dtype)[6:]), shape)
            fill(seg, layer, e)
            segs.append((seg, layer, e))
            items.append((seg.name, shape, layer, e))
    parent, child_end = SPAWN.Pipe()
    child = SPAWN.Process(target=_child, args=(child_end, items))
    child.start()
    try:
        assert _recv(parent) == [True] * len(items), "the child must see the parent's values"
        for seg, layer, e in segs:
            fill(seg, layer, e + 50)
        parent.send("wrote")
        seen, perms, readonly = _recv(parent)
        assert seen == [True] * len(items), "parent writes must show in the child"
        assert perms == {"r--s"} and readonly == {True}, "the child attached, so it must map read-only"
        for seg, _, _ in segs:
            seg.unlink()
        for seg, layer, e in segs:
            fill(seg, layer, e + 150)
        parent.send("unlinked")
        still, errors = _recv(parent)
        assert still == [True] * len(items), "a mapping must survive unlink, still shared"
        for (name, *_), err in zip(items, errors):
            assert name in err and "not found" in err
        child.join(timeout=30)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()


@pytest.mark.parametrize("dtype", list(SMALL))
def test_create_attach_in_process(namespace, dtype):
    shape = SMALL[dtype]
    name = segment_name(namespace, 2, 7, "n0")
    seg = ExpertSegment.create(name, shape)
    assert seg.nbytes == shape.nbytes == 3 * 64 * 32 * dtype.itemsize
    assert seg.gate_up.shape == (64, 64) and seg.down.shape == (64, 32)
    assert seg.gate_up.dtype == seg.down.dtype == dtype
    assert not seg.gate_up.any() and not seg.down.any(), "a new segment is zero-filled"
    with pytest.raises(FileExistsError, match=name):
        ExpertSegment.create(name, shape)
    other = ExpertSegment.attach(name, shape)
    assert other.gate_up.data_ptr() != seg.gate_up.data_ptr(), "a second mapping, not the same tensor"
    assert seg.writable and not other.writable and other.buffer().readonly
    fill(seg, 2, 7)
    assert holds(other, 2, 7)
    # buffer() is the raw bytes of gate_up then down: writes through it land in the tensors.
    buf = seg.buffer()
    assert buf.format == "B" and buf.c_contiguous and not buf.readonly and buf.nbytes == seg.nbytes
    buf[: shape.gate_up_nbytes] = bytes(shape.gate_up_nbytes)
    assert not other.gate_up.any() and torch.equal(other.down, expert_weights(2, 7, shape)[1])
    # close drops only this object's references; the memoryview keeps the mapping alive.
    seg.close()
    seg.close()
    with pytest.raises(RuntimeError, match="closed"):
        seg.gate_up
    buf[shape.gate_up_nbytes:] = bytes(shape.nbytes - shape.gate_up_nbytes)
    assert not other.down.any()
    other.unlink()
    other.unlink()  # idempotent
    with pytest.raises(FileNotFoundError, match="not found"):
        ExpertSegment.attach(name, shape)


def test_attach_checks_size_without_growing_the_file(namespace):
    name = segment_name(namespace, 0, 0, "n0")
    ExpertSegment.create(name, SMALL[torch.bfloat16]).close()
    with pytest.raises(ValueError, match="bytes but"):
        ExpertSegment.attach(name, SMALL[torch.float32])
    assert os.path.getsize(f"/dev/shm/{name}") == SMALL[torch.bfloat16].nbytes


def test_create_on_a_full_shm_fails_clearly_and_leaves_nothing(namespace, monkeypatch):
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    name = segment_name(namespace, 0, 0, "n0")
    with pytest.raises(OSError, match=f"cannot allocate .* {name!r} in /dev/shm") as info:
        ExpertSegment.create(name, SMALL[torch.float32])
    assert info.value.errno == errno.ENOSPC
    assert not os.path.exists(f"/dev/shm/{name}")


def test_names_and_shapes_are_validated():
    assert segment_name("srv1", 3, 12, "node.7") == "emoe-srv1-node.7-L3-E12"
    for bad in ["a-b", "", "a/b", None]:
        with pytest.raises(ValueError, match="namespace"):
            segment_name(bad, 0, 0, "n")
    for bad in ["a/b", "", "x y"]:
        with pytest.raises(ValueError, match="node_tag"):
            segment_name("ns", 0, 0, bad)
    with pytest.raises(ValueError, match="layer"):
        segment_name("ns", -1, 0, "n")
    with pytest.raises(ValueError, match="expert"):
        segment_name("ns", 0, True, "n")
    with pytest.raises(ValueError, match="hidden"):
        ExpertShape(0, 4, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        ExpertShape(4, 4, torch.int8)
    with pytest.raises(ValueError, match="segment name"):
        ExpertSegment.attach("../etc/passwd", ExpertShape(4, 4, torch.float32))


def test_unlink_namespace_removes_only_its_own(namespace):
    shape = SMALL[torch.float32]
    for e in range(3):
        ExpertSegment.create(segment_name(namespace, 0, e, "n0"), shape).close()
    longer = namespace + "_b"  # shares a prefix: must survive
    keep = ExpertSegment.create(segment_name(longer, 0, 0, "n0"), shape)
    try:
        assert unlink_namespace(namespace) == 3
        assert unlink_namespace(namespace) == 0
        ExpertSegment.attach(keep.name, shape).close()
    finally:
        assert unlink_namespace(longer) == 1


# ----- SlotPool -----

def _segments(namespace: str, layer: int, experts: range) -> dict[int, ExpertSegment]:
    shape = SMALL[torch.float32]
    segs = {}
    for e in experts:
        segs[e] = ExpertSegment.create(segment_name(namespace, layer, e, "n0"), shape)
        fill(segs[e], layer, e)
    return segs


def test_slot_pool_lifecycle_and_errors(namespace):
    segs = _segments(namespace, 1, range(4))
    pool = SlotPool(num_layers=2, capacity=3)
    assert pool.free_slots(1) == 3 and pool.experts(1) == () and pool.used_bytes() == 0
    assert pool.reserve(1, 2) == 0 and pool.reserve(1, 0) == 1, "slot indices, lowest free first"
    with pytest.raises(RuntimeError, match="layer 1 expert 2: already reserved"):
        pool.reserve(1, 2)
    assert pool.reserve(1, 3) == 2
    with pytest.raises(RuntimeError, match="layer 1 expert 1: all 3 slots taken"):
        pool.reserve(1, 1)
    assert pool.free_slots(1) == 0 and pool.free_slots(0) == 3
    pool.cancel(1, 3)
    with pytest.raises(RuntimeError, match="layer 1 expert 3: not reserved"):
        pool.cancel(1, 3)
    with pytest.raises(RuntimeError, match="layer 1 expert 3: no slot reserved"):
        pool.install(1, 3, segs[3])
    with pytest.raises(RuntimeError, match="layer 1 expert 2 is not installed"):
        pool.get(1, 2)
    pool.install(1, 2, segs[2])
    pool.install(1, 0, segs[0])
    with pytest.raises(RuntimeError, match="layer 1 expert 0: already installed"):
        pool.reserve(1, 0)
    assert pool.experts(1) == (0, 2) and pool.free_slots(1) == 1
    assert all(holds(pool.get(1, e), 1, e) for e in pool.experts(1))
    assert pool.used_bytes() == 2 * segs[0].nbytes
    assert pool.reserve(1, 1) == 2, "the cancelled reservation's slot is reused"
    assert pool.snapshot() == {
        "capacity": 3, "used_bytes": 2 * segs[0].nbytes,
        "layers": [{"installed": [], "reserved": [], "slots": {}},
                   {"installed": [0, 2], "reserved": [1], "slots": {0: 1, 1: 2, 2: 0}}],
    }
    assert pool.slots_of(1, [2, 0, 2]) == [0, 1, 0]
    with pytest.raises(RuntimeError, match=r"layer 1 experts \[1\] are not installed"):
        pool.slots_of(1, [0, 1])   # reserved is not installed: the data plane must not see it
    assert pool.release(1, 2) is segs[2]
    with pytest.raises(RuntimeError, match="layer 1 expert 2: not installed"):
        pool.release(1, 2)
    assert pool.experts(1) == (0,) and pool.free_slots(1) == 1
    with pytest.raises(RuntimeError, match="layer 1 expert 2 holds no slot"):
        pool.slot(1, 2)
    pool.cancel(1, 1)
    assert pool.reserve(1, 3) == 0 and pool.slot(1, 0) == 1
    with pytest.raises(ValueError, match="layer"):
        pool.reserve(2, 0)
    with pytest.raises(ValueError, match="capacity"):
        SlotPool(1, 0)


def test_slot_pool_readers_never_see_a_half_installed_slot(namespace):
    segs = _segments(namespace, 0, range(6))
    pool = SlotPool(num_layers=1, capacity=4)
    first = {e: expert_weights(0, e, seg.shape)[1][0, 0].item() for e, seg in segs.items()}
    stop, seen, wrong = threading.Event(), [0], []

    def reader() -> None:
        while not stop.is_set():
            for e in range(6):
                try:
                    seg = pool.get(0, e)
                except RuntimeError:
                    continue
                seen[0] += 1
                if seg is not segs[e] or seg.down[0, 0].item() != first[e]:
                    wrong.append(e)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        round_, deadline = 0, time.monotonic() + 20
        while round_ < 300 or seen[0] < 1000:  # until the readers overlapped many installs
            assert time.monotonic() < deadline, f"readers saw only {seen[0]} segments"
            round_ += 1
            chosen = [(round_ + k) % 6 for k in range(4)]
            for e in chosen:
                pool.reserve(0, e)
                pool.install(0, e, segs[e])
            assert pool.experts(0) == tuple(sorted(chosen))
            for e in chosen:
                assert pool.release(0, e) is segs[e]
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=10)
    assert not wrong and seen[0] > 0
    assert pool.free_slots(0) == 4


def test_slot_pool_imports_no_torch():
    code = "import sys, memory.slots; assert 'torch' not in sys.modules, 'slots imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ----- slot range: a layer's slots as one reserved virtual range -----

def _slot_holds(rng: HostSlotRange, slot: int, layer: int, expert: int) -> bool:
    gate_up, down = expert_weights(layer, expert, rng.shape)
    return torch.equal(rng.w13[slot], gate_up) and torch.equal(rng.w2[slot], down)


@pytest.mark.parametrize("dtype", list(SMALL))
def test_slot_range_maps_segments_by_value_without_copying(namespace, dtype):
    shape = SMALL[dtype]
    segs = {e: ExpertSegment.create(segment_name(namespace, 2, e, "r"), shape) for e in range(5)}
    for e, seg in segs.items():
        fill(seg, 2, e)
    pool, rng = SlotPool(num_layers=3, capacity=4), HostSlotRange(4, shape)
    try:
        assert rng.contiguous and rng.w13.is_contiguous() and rng.w2.is_contiguous()
        for e in (3, 0, 4):
            rng.map(pool.reserve(2, e), segs[e].name)
            pool.install(2, e, segs[e])
        assert all(_slot_holds(rng, pool.slot(2, e), 2, e) for e in pool.experts(2))
        # the slot is the segment's pages: a write through one mapping shows in the other
        fill(segs[0], 2, 40)
        assert _slot_holds(rng, pool.slot(2, 0), 2, 40)
        segs[4].down.copy_(expert_weights(2, 41, shape)[1])
        assert torch.equal(rng.w2[pool.slot(2, 4)], expert_weights(2, 41, shape)[1])
        # release, then the freed slot takes another expert; the other slots keep theirs
        slot3 = pool.slot(2, 3)
        pool.release(2, 3)
        rng.unmap(slot3)
        assert not rng.mapped(slot3)
        assert pool.reserve(2, 1) == slot3
        rng.map(slot3, segs[1].name)
        pool.install(2, 1, segs[1])
        assert _slot_holds(rng, slot3, 2, 1) and _slot_holds(rng, pool.slot(2, 0), 2, 40)
        assert _slot_holds(rng, pool.slot(2, 4), 2, 4) is False   # its down was rewritten to 41
        with pytest.raises(ValueError, match="slot must be an int"):
            rng.map(4, segs[2].name)
        with pytest.raises(ValueError, match="holds"):
            rng.map(0, ExpertSegment.create(segment_name(namespace, 2, 9, "r"), SMALL[torch.float32]
                                            if dtype == torch.bfloat16 else ExpertShape(64, 64, dtype)).name)
    finally:
        rng.close()
    with pytest.raises(RuntimeError, match="closed"):
        rng.w13


def test_unmapped_slot_faults_instead_of_reading_stale_bytes(namespace):
    """An empty slot is PROT_NONE: reading it kills the reader (SIGSEGV) rather than hand the
    kernel another expert's bytes. In a child process, since the fault is fatal."""
    shape = SMALL[torch.float32]
    seg = ExpertSegment.create(segment_name(namespace, 0, 0, "r"), shape)
    fill(seg, 0, 0)
    code = (f"import torch; from memory.segments import ExpertShape; from memory.slot_range import HostSlotRange\n"
            f"r = HostSlotRange(2, ExpertShape(64, 32, torch.float32)); r.map(1, {seg.name!r})\n"
            f"print(r.w2[1].sum().item(), flush=True); r.unmap(1); print(r.w2[1].sum().item(), flush=True)\n")
    env = dict(os.environ)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == -11, (done.returncode, done.stderr[-500:])
    assert float(done.stdout.split()[0]) == expert_weights(0, 0, shape)[1].sum().item()
    assert len(done.stdout.split()) == 1, "the read after unmap must not return"


def test_slot_range_with_page_padded_parts(namespace):
    """Shapes whose parts are not whole pages: `down` starts at the next page in the segment file,
    the stacked views are strided, and every slot still reads back by value."""
    for shape in (ExpertShape(32, 32, torch.bfloat16),     # down: half a page
                  ExpertShape(24, 20, torch.float32)):     # gate_up: not whole pages either
        assert shape.down_offset % 4096 == 0 and shape.down_offset >= shape.gate_up_nbytes
        segs = [ExpertSegment.create(segment_name(namespace, 1, e, f"p{shape.hidden}"), shape) for e in range(3)]
        for e, seg in enumerate(segs):
            fill(seg, 1, e)
        rng = HostSlotRange(3, shape)
        try:
            assert not rng.contiguous
            for e in (2, 0, 1):
                rng.map(e, segs[e].name)
            assert all(_slot_holds(rng, e, 1, e) for e in range(3))
        finally:
            rng.close()


# ----- one writer: receivers map read-only -----

def test_receivers_map_read_only(namespace):
    """Only a segment's creator maps it writable; an attach (a remap, a failover takeover) and
    every slot of a slot range map it PROT_READ, while the creator's writes still show in them."""
    shape = SMALL[torch.float32]
    seg = ExpertSegment.create(segment_name(namespace, 0, 3, "src"), shape)
    fill(seg, 0, 3)
    other = ExpertSegment.attach(seg.name, shape)
    rng = HostSlotRange(3, shape)
    try:
        rng.map(1, seg.name)
        assert protection(seg.gate_up.data_ptr()) == protection(seg.down.data_ptr()) == "rw-s"
        assert protection(other.gate_up.data_ptr()) == protection(other.down.data_ptr()) == "r--s"
        assert protection(rng.w13[1].data_ptr()) == protection(rng.w2[1].data_ptr()) == "r--s"
        assert protection(rng.w13[0].data_ptr()) == "---p", "an empty slot stays PROT_NONE"
        fill(seg, 0, 4)   # the creator writes through its own mapping; every reader sees it
        assert holds(other, 0, 4) and _slot_holds(rng, 1, 0, 4)
    finally:
        rng.close()
        other.close()


def resident_kib(addr: int) -> tuple[int, int]:
    """(size, Rss) in KiB of this process's mapping that holds `addr`, from /proc/self/smaps."""
    with open("/proc/self/smaps") as f:
        inside = False
        size = None
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                start, end = (int(x, 16) for x in head[0].split("-"))
                inside = start <= addr < end
            elif inside and head[0] == "Size:":
                size = int(head[1])
            elif inside and head[0] == "Rss:":
                return size, int(head[1])
    raise AssertionError(f"{addr:#x} is not mapped")


def test_a_slot_is_resident_when_mapped_not_at_its_first_read(namespace):
    """Mapping an expert into a slot fills its page tables (MAP_POPULATE): the first step that
    reads a newly mapped expert (scale-up, rebalance, a failover's remap) takes no page fault per
    4 KiB page inside the kernel call, on the critical path of every stream."""
    shape = SMALL[torch.float32]
    seg = ExpertSegment.create(segment_name(namespace, 0, 5, "src"), shape)
    fill(seg, 0, 5)
    rng = HostSlotRange(2, shape)
    try:
        rng.map(1, seg.name)
        for addr in (rng.w13[1].data_ptr(), rng.w2[1].data_ptr()):   # nothing has read them yet
            size, rss = resident_kib(addr)
            assert rss == size > 0, f"slot mapped with {rss} of {size} KiB resident"
    finally:
        rng.close()


@pytest.mark.parametrize("through", ["slot", "attach"])
def test_a_write_through_a_receivers_mapping_faults_and_the_source_keeps_its_bytes(namespace, through):
    """A bug in a receiver that writes into an expert it did not create dies (SIGSEGV) instead of
    changing what the source serves. In a child process, since the fault is fatal."""
    shape = SMALL[torch.float32]
    seg = ExpertSegment.create(segment_name(namespace, 1, 2, "src"), shape)
    fill(seg, 1, 2)
    write = {"slot": "r = HostSlotRange(2, shape); r.map(1, name); t = r.w2[1]",
             "attach": "t = ExpertSegment.attach(name, shape).down"}[through]
    code = ("import torch\n"
            "from memory.segments import ExpertSegment, ExpertShape\n"
            "from memory.slot_range import HostSlotRange\n"
            f"shape, name = ExpertShape(64, 32, torch.float32), {seg.name!r}\n"
            f"{write}\n"
            "print(t.sum().item(), flush=True)\n"
            "t.fill_(7.0)\n"
            "print('wrote', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode in (-signal.SIGSEGV, -signal.SIGBUS), (done.returncode, done.stdout, done.stderr[-500:])
    assert float(done.stdout.split()[0]) == expert_weights(1, 2, shape)[1].sum().item(), "it read the expert"
    assert "wrote" not in done.stdout
    assert holds(seg, 1, 2), "the source's bytes changed"
