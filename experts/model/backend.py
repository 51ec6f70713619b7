"""The expert backend contract: what the engine asks of whoever runs the routed experts.

At each MoE layer of a step the engine `start`s the layer's routed experts, does its own share of
the layer (the shared expert) while they run, then `finish`es them for their combined output. A
started call the engine will not finish (its step failed) is `abandon`ed, so a backend with
connections reads what they still owe and stays in step for the next call. Whether the experts
are in this process (`experts/model/local_experts.py`) or on ten workers
(`server/engine/exchange.py`) is the backend's business.

`layer` is the decoder layer in the checkpoint's numbering; expert counts are keyed by MoE layer
index (0 .. number of MoE layers - 1), as the engine's load table and the controller count them.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from experts.model.profile import StepProfile


class WorkerLost(RuntimeError):
    """A backend lost the worker that held some of a layer's experts (the worker died or its node
    went away). The step did not happen; the engine holds its requests until the controller
    commits a topology without that worker. Transports raise this class or a subclass of it."""

    def __init__(self, worker_id: str, detail: str) -> None:
        super().__init__(f"lost expert worker {worker_id}: {detail}")
        self.worker_id = worker_id


class ExpertBackend(Protocol):
    # where the backend books its own phases (e.g. workers' compute); the engine hands it its
    # profile when it commits the backend
    profile: StepProfile

    def start(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> object:
        """Begin one MoE layer: hidden [T, D], topk_ids [T, A] logical experts, topk_weights [T, A]
        in hidden's dtype. Returns a handle, opaque to the caller, for `finish` or `abandon`.
        Raises WorkerLost when a worker cannot be reached (nothing is then owed)."""
        ...

    def finish(self, handle: object) -> torch.Tensor:
        """The started layer's sum of weighted expert outputs [T, D], in hidden's dtype. Each handle
        is finished or abandoned exactly once, in the order started."""
        ...

    def abandon(self, handle: object) -> None:
        """Drop a started layer whose output is no longer wanted; never raises."""
        ...

    def check_standby(self) -> None:
        """Raise WorkerLost for a worker that holds experts but is sent no work (a node-mate
        standing by for its node's computing worker) once it is known gone; returns at once.
        Serving never touches such a worker, so only this notices its loss."""
        ...

    def take_expert_counts(self) -> dict[int, np.ndarray]:
        """Routed (token, expert) pairs per expert [E] of each MoE layer since the last call, and
        start counting afresh."""
        ...
