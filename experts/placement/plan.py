"""What the planner reads and returns: a `Placement` (phy2log per worker), the `Move`s that fill new
slots before a commit, and the `Plan` that holds both. Pure data: no torch, no ray."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """phy2log: for each worker id, for each MoE layer, the logical experts it holds (sorted tuple).

    workers: [W] worker ids, in order. experts: [W][L] -> sorted logical expert ids held by worker w
    in layer l (lists are accepted and normalised to sorted tuples). num_layers (L) and num_experts
    (1 + the largest expert id held; a valid placement holds every expert) are derived properties.
    """

    workers: tuple[str, ...]
    experts: tuple[tuple[tuple[int, ...], ...], ...]

    def __post_init__(self) -> None:
        workers = tuple(self.workers)
        experts = tuple(tuple(tuple(sorted(es)) for es in layers) for layers in self.experts)
        if len(set(workers)) != len(workers) or len(experts) != len(workers) or len({len(x) for x in experts}) > 1:
            raise ValueError(f"need distinct workers, each with experts for the same number of layers: "
                             f"{list(workers)}, layers {[len(x) for x in experts]}")
        for w, l, es in ((w, l, es) for w, ls in zip(workers, experts) for l, es in enumerate(ls)):
            if len(set(es)) != len(es) or (es and es[0] < 0):
                raise ValueError(f"worker {w!r} layer {l} holds {list(es)}: ids must be distinct, >= 0")
        object.__setattr__(self, "workers", workers)
        object.__setattr__(self, "experts", experts)

    @property
    def num_layers(self) -> int:
        return len(self.experts[0]) if self.experts else 0

    @property
    def num_experts(self) -> int:
        return 1 + max((e for layers in self.experts for es in layers for e in es), default=-1)

    def log2phy(self, layer: int) -> dict[int, tuple[int, ...]]:
        """expert -> indices into ``workers`` holding it, in worker order; held experts only."""
        out: dict[int, tuple[int, ...]] = {}
        for w, layers in enumerate(self.experts):
            for e in layers[layer]:
                out[e] = out.get(e, ()) + (w,)
        return dict(sorted(out.items()))

    def holders(self, layer: int, expert: int) -> tuple[str, ...]:
        """Ids of the workers holding ``expert`` in ``layer``, in worker order."""
        return tuple(w for w, layers in zip(self.workers, self.experts) if expert in layers[layer])

    def held_by(self, worker: str) -> tuple[tuple[int, ...], ...]:
        """[L] -> sorted experts held by ``worker``."""
        if worker not in self.workers:
            raise ValueError(f"unknown worker {worker!r}; workers are {list(self.workers)}")
        return self.experts[self.workers.index(worker)]


@dataclass(frozen=True)
class Move:
    """One slot to fill before commit: logical expert (layer, expert) arrives at ``dst``."""

    layer: int
    expert: int
    dst: str  # worker receiving a copy
    src: str | None  # a current holder; None = read from the checkpoint (no live copy exists)
    same_node: bool  # src and dst on one node -> zero-copy remap; False when src is None


@dataclass(frozen=True)
class Plan:
    """The new placement, the moves that must arrive before commit, the slots freed after it."""

    placement: Placement
    moves: tuple[Move, ...]  # by layer, then dst in worker order, then expert
    releases: tuple[tuple[str, int, int], ...]  # (worker, layer, expert) held now, not in the new placement

    def moved_experts(self) -> int:
        """Slots filled by the change, over all layers (one per move)."""
        return len(self.moves)
