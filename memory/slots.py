"""A worker's expert **slots**: a fixed number per layer, each holding one logical expert.

A change of topology fills slots in two steps so that capacity is claimed before any byte
moves: `reserve` during **prepare** (fails at once if the layer is full), then `install` once
the segment is mapped or copied; `cancel` undoes a reservation when the change aborts.
`release` hands a segment back after **commit**; closing or unlinking it is the caller's call,
since only the caller knows whether another worker still maps the same bytes.

Each expert in a layer has a **slot index** in [0, capacity) from its reservation until its
release: the place in the layer's slot range (memory/slot_range.py) its segment is mapped into,
and what the worker hands the fused kernel in place of the logical expert id (`slots_of`). A
freed index is reused by the next reservation (lowest first).

Bookkeeping only: no torch here (segments are held, never touched), so this module imports
without a device.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memory.segments import ExpertSegment


class SlotPool:
    """A worker's expert slots: a fixed capacity per layer, holding ExpertSegments by (layer, expert).

    Thread-safe: the data-plane thread calls `get` while control threads reserve, install and
    release. Every method runs under one lock, and `install` publishes a segment with a single
    store after it is fully built, so `get` sees an expert either absent or whole.
    """

    def __init__(self, num_layers: int, capacity: int) -> None:
        for what, value in (("num_layers", num_layers), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SlotPool {what} must be a positive int, got {value!r}")
        self.num_layers = num_layers
        self.capacity = capacity
        self._lock = threading.Lock()
        self._installed: list[dict[int, ExpertSegment]] = [{} for _ in range(num_layers)]
        self._reserved: list[set[int]] = [set() for _ in range(num_layers)]
        self._slot: list[dict[int, int]] = [{} for _ in range(num_layers)]   # expert -> slot index

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def reserve(self, layer: int, expert: int) -> int:
        """Claim a slot of `layer` for `expert`, which must be neither installed nor reserved;
        returns the slot's index."""
        self._check_layer(layer)
        with self._lock:
            installed, reserved = self._installed[layer], self._reserved[layer]
            if expert in installed:
                raise RuntimeError(f"cannot reserve layer {layer} expert {expert}: already installed")
            if expert in reserved:
                raise RuntimeError(f"cannot reserve layer {layer} expert {expert}: already reserved")
            if len(installed) + len(reserved) >= self.capacity:
                raise RuntimeError(
                    f"cannot reserve layer {layer} expert {expert}: all {self.capacity} slots taken "
                    f"(installed {sorted(installed)}, reserved {sorted(reserved)})"
                )
            reserved.add(expert)
            taken = set(self._slot[layer].values())
            index = next(i for i in range(self.capacity) if i not in taken)
            self._slot[layer][expert] = index
            return index

    def install(self, layer: int, expert: int, segment: ExpertSegment) -> None:
        """Fill the slot reserved for (layer, expert); from now on `get` returns `segment`."""
        self._check_layer(layer)
        with self._lock:
            reserved = self._reserved[layer]
            if expert not in reserved:
                raise RuntimeError(f"cannot install layer {layer} expert {expert}: no slot reserved")
            reserved.remove(expert)
            self._installed[layer][expert] = segment

    def cancel(self, layer: int, expert: int) -> None:
        """Undo the reservation of (layer, expert): the abort path of a change."""
        self._check_layer(layer)
        with self._lock:
            reserved = self._reserved[layer]
            if expert not in reserved:
                raise RuntimeError(f"cannot cancel layer {layer} expert {expert}: not reserved")
            reserved.remove(expert)
            del self._slot[layer][expert]

    def get(self, layer: int, expert: int) -> ExpertSegment:
        self._check_layer(layer)
        with self._lock:
            segment = self._installed[layer].get(expert)
        if segment is None:
            raise RuntimeError(f"layer {layer} expert {expert} is not installed in this pool")
        return segment

    def release(self, layer: int, expert: int) -> ExpertSegment:
        """Empty the slot of (layer, expert) and return its segment; the caller closes or unlinks it."""
        self._check_layer(layer)
        with self._lock:
            segment = self._installed[layer].pop(expert, None)
            if segment is not None:
                del self._slot[layer][expert]
        if segment is None:
            raise RuntimeError(f"cannot release layer {layer} expert {expert}: not installed")
        return segment

    def slot(self, layer: int, expert: int) -> int:
        """The slot index of a reserved or installed expert."""
        self._check_layer(layer)
        with self._lock:
            index = self._slot[layer].get(expert)
        if index is None:
            raise RuntimeError(f"layer {layer} expert {expert} holds no slot in this pool")
        return index

    def slots_of(self, layer: int, experts: list[int]) -> list[int]:
        """Slot indices of installed `experts` of `layer`, in order (the data plane's translation)."""
        self._check_layer(layer)
        with self._lock:
            installed, slot = self._installed[layer], self._slot[layer]
            missing = [e for e in experts if e not in installed]
            if not missing:
                return [slot[e] for e in experts]
        raise RuntimeError(f"layer {layer} experts {missing} are not installed in this pool")

    def experts(self, layer: int) -> tuple[int, ...]:
        """Installed experts of `layer`, sorted (reservations are not included)."""
        self._check_layer(layer)
        with self._lock:
            return tuple(sorted(self._installed[layer]))

    def free_slots(self, layer: int) -> int:
        """Slots of `layer` neither installed nor reserved."""
        self._check_layer(layer)
        with self._lock:
            return self.capacity - len(self._installed[layer]) - len(self._reserved[layer])

    def used_bytes(self) -> int:
        """Bytes of installed segments (a segment installed in two layers counts twice)."""
        with self._lock:
            return sum(seg.nbytes for layer in self._installed for seg in layer.values())

    def snapshot(self) -> dict:
        """For stats: {"capacity", "used_bytes", "layers": [{"installed": [...], "reserved": [...],
        "slots": {expert: slot index}}]}."""
        with self._lock:
            layers = [
                {"installed": sorted(installed), "reserved": sorted(reserved), "slots": dict(sorted(slot.items()))}
                for installed, reserved, slot in zip(self._installed, self._reserved, self._slot)
            ]
            used = sum(seg.nbytes for layer in self._installed for seg in layer.values())
        return {"capacity": self.capacity, "used_bytes": used, "layers": layers}
