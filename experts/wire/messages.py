"""The exchange's messages (one request and one reply per MoE layer per step) and their bounds.

Request: header, then x [M, D] (the model's dtype) grouped by expert, then int32 meta
[expert id of each group G | pairs in each group G | router weight of each pair M (float32 bits)].
Reply: header, then float32 [M, D] (status OK) or a UTF-8 error message (status ERROR).
The same layout goes over TCP and through a shared-memory ring. Every header field is checked
against the model spec before a byte of payload is allocated or read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from experts.model.backend import WorkerLost
from experts.model.dtypes import WIRE_DTYPES
from experts.model.spec import ModelSpec
from experts.wire.framing import FrameError, check_bound, frame

__all__ = ["Compute", "ExchangeBounds", "Request", "WorkerLost", "check_groups", "check_request", "pack_head", "pack_request"]

# (MoE layer, x [M, D] grouped by expert, expert ids [G], group sizes [G], weights [M], team, out) -> float32
# [M, D]: `out`, a float32 [M, D] the reply is written into when given (a ring's reply slot), else a new tensor
Compute = Callable[[int, torch.Tensor, list[int], list[int], torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]

MAGIC = b"EMX3"   # 3: the request carries its team
REQUEST = frame("4sIiiiBB")   # magic, seq, MoE layer, pairs M, groups G, dtype code, team
MAX_TEAM = 255                # processes of one node busy with one layer at once (a byte)
REPLY = frame("4sIBQQ")       # magic, seq, status, payload bytes, worker compute ns
OK, ERROR = 0, 1
MAX_ERROR_BYTES = 4096        # an error message longer than this is cut
CODE_DTYPES = dict(enumerate(WIRE_DTYPES))
DTYPE_CODES = {v: k for k, v in CODE_DTYPES.items()}


@dataclass(frozen=True)
class ExchangeBounds:
    """What one request may hold: from the model spec and the engine's step budget."""
    hidden: int
    num_layers: int        # MoE layers
    num_experts: int
    max_pairs: int         # max step tokens x top_k: every pair of a step sent to one worker

    def __post_init__(self) -> None:
        for name in ("hidden", "num_layers", "num_experts", "max_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")

    @staticmethod
    def of(spec: ModelSpec, max_step_tokens: int) -> ExchangeBounds:
        if max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be >= 1, got {max_step_tokens!r}")
        return ExchangeBounds(spec.hidden, len(spec.moe_layers), spec.num_experts, max_step_tokens * spec.top_k)

    def request_bytes(self) -> int:
        """The largest request: header, x in the widest wire dtype, meta."""
        widest = max(d.itemsize for d in WIRE_DTYPES)
        return REQUEST.size + self.max_pairs * self.hidden * widest + (2 * self.num_experts + self.max_pairs) * 4

    def reply_bytes(self) -> int:
        return REPLY.size + max(self.max_pairs * self.hidden * 4, MAX_ERROR_BYTES)


@dataclass(frozen=True)
class Request:
    seq: int
    layer: int
    pairs: int
    groups: int
    dtype: torch.dtype
    team: int = 1          # processes of the receiver's node busy with this layer, the receiver included

    def x_bytes(self, hidden: int) -> int:
        return self.pairs * hidden * self.dtype.itemsize

    def meta_count(self) -> int:
        return 2 * self.groups + self.pairs


def check_request(head: bytes | memoryview, bounds: ExchangeBounds) -> Request:
    """Parse a request header; FrameError for anything outside `bounds`."""
    magic, seq, layer, m, g, code, team = REQUEST.unpack(head)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r}")
    check_bound("layer", layer, 0, bounds.num_layers - 1)
    check_bound("pairs", m, 1, bounds.max_pairs)
    check_bound("groups", g, 1, min(bounds.num_experts, m))
    if code not in CODE_DTYPES:
        raise FrameError(f"dtype code {code!r} is not one of {sorted(CODE_DTYPES)}")
    check_bound("team", team, 1, MAX_TEAM)
    return Request(seq, layer, m, g, CODE_DTYPES[code], team)


def check_groups(req: Request, meta: np.ndarray, bounds: ExchangeBounds) -> tuple[list[int], list[int]]:
    """Expert ids and group sizes from a request's meta ([2G + M] int32), checked: experts known
    and distinct, every group non-empty, the sizes adding up to the pairs."""
    g = req.groups
    ids, counts = meta[:g], meta[g:2 * g]
    if ids.min() < 0 or ids.max() >= bounds.num_experts or np.bincount(ids).max() > 1:
        raise FrameError(f"layer {req.layer}: expert ids {ids.tolist()} are not distinct experts of "
                         f"[0, {bounds.num_experts})")
    if counts.min() < 1 or int(counts.sum()) != req.pairs:
        raise FrameError(f"layer {req.layer}: group sizes {counts.tolist()} do not add up to {req.pairs} pairs")
    return ids.tolist(), counts.tolist()


def pack_request(seq: int, layer: int, x: torch.Tensor, expert_ids: np.ndarray, counts: np.ndarray,
                 weights: np.ndarray, team: int = 1) -> tuple[bytes, memoryview, np.ndarray]:
    """(header, x's bytes, meta) of one request. `team`: how many processes of the receiver's node
    are busy with this layer (the receiver included): they share the node's CPUs."""
    head, meta = pack_head(seq, layer, x.shape[0], x.dtype, expert_ids, counts, weights, team)
    return head, tensor_bytes(x), meta


def pack_head(seq: int, layer: int, pairs: int, dtype: torch.dtype, expert_ids: np.ndarray, counts: np.ndarray,
              weights: np.ndarray, team: int = 1) -> tuple[bytes, np.ndarray]:
    """(header, meta) of a request of `pairs` rows of `dtype`, for a sender that writes x itself."""
    meta = np.empty(2 * len(expert_ids) + len(weights), dtype=np.int32)
    g = len(expert_ids)
    meta[:g] = expert_ids
    meta[g:2 * g] = counts
    meta[2 * g:] = weights.astype(np.float32, copy=False).view(np.int32)
    return REQUEST.pack(MAGIC, seq, layer, pairs, g, DTYPE_CODES[dtype], min(team, MAX_TEAM)), meta


def tensor_bytes(t: torch.Tensor) -> memoryview:
    if not t.is_contiguous():
        t = t.contiguous()
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def error_text(exc: BaseException) -> bytes:
    return f"{type(exc).__name__}: {exc}".encode()[:MAX_ERROR_BYTES]
