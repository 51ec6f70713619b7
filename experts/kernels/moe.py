"""Fused routed-expert kernels over stacked expert weights: vLLM's CPU MoE op and its pure-torch twin.

Layouts (as vLLM's `CPUUnquantizedExperts` uses them):
- `w13` [E, 2I, D]: gate rows first, then up rows; `w2` [E, D, I]; both in the activation dtype
  (float32 or bfloat16), **prepacked** by `prepack_moe_weight` into the kernel's panels. A packed
  tensor has the shape and byte size of the plain one, and experts pack independently, so one
  expert can be packed alone (at disk load) and later sit in any slot of a stacked tensor.
- `input` [M, D], `output` [M, D] in the same dtype; `topk_ids` [M, K] int32 indexes the E axis;
  `topk_weights` [M, K] float32. `skip_weighted=True` (K=1 only) leaves the router weight out.
- `act`: "silu" (SwiGLU: silu(gate) * up).

`MoEKernel` is the contract both implementations satisfy; `select_kernel` picks one per process
(vLLM's when `oplib.load()` succeeds and the shape meets its alignment, else the reference) and
says why. The reference's "packing" is the identity, so bytes packed by one kernel are only
meaningful to that kernel: `MoEKernel.layout` names them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from experts.kernels import oplib
from memory.slot_range import StackedExperts

log = logging.getLogger(__name__)

ACTIVATIONS = ("silu",)
DTYPES = (torch.float32, torch.bfloat16)
# vLLM's CPU grouped GEMM tiles D and I in 32s (CPUUnquantizedExperts.output_alignment)
ALIGNMENT = 32


def _check(output: torch.Tensor, input: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
           topk_weights: torch.Tensor, topk_id: torch.Tensor, skip_weighted: bool, act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if input.dtype not in DTYPES or {w13.dtype, w2.dtype, output.dtype} != {input.dtype}:
        raise ValueError(f"input, output, w13, w2 must share one dtype of {DTYPES}, got "
                         f"{input.dtype}, {output.dtype}, {w13.dtype}, {w2.dtype}")
    if input.dim() != 2 or output.shape != input.shape:
        raise ValueError(f"input and output must be [M, D] alike, got {tuple(input.shape)}, {tuple(output.shape)}")
    m, d = input.shape
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0] or w13.shape[2] != d \
            or w2.shape[1] != d or w13.shape[1] != 2 * w2.shape[2]:
        raise ValueError(f"w13 must be [E, 2I, D] and w2 [E, D, I] with D={d}, got {tuple(w13.shape)}, {tuple(w2.shape)}")
    if topk_id.dtype != torch.int32 or topk_id.dim() != 2 or topk_id.shape[0] != m:
        raise ValueError(f"topk_id must be int32 [M={m}, K], got {topk_id.dtype} {tuple(topk_id.shape)}")
    if topk_weights.dtype != torch.float32 or topk_weights.shape != topk_id.shape:
        raise ValueError(f"topk_weights must be float32 {tuple(topk_id.shape)}, got {topk_weights.dtype} "
                         f"{tuple(topk_weights.shape)}")
    if skip_weighted and topk_id.shape[1] != 1:   # vLLM's CPU op refuses it too
        raise ValueError(f"skip_weighted needs K=1, got topk_id {tuple(topk_id.shape)}")
    # the op reads raw pointers with contiguous strides: a strided view would be read wrongly, silently
    for name, t in (("input", input), ("output", output), ("w13", w13), ("w2", w2)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def prepack_moe_weight(weight: torch.Tensor, packed: torch.Tensor, isa: str) -> None:
    """vLLM: write `weight` [E, N, K] into `packed` (same shape and dtype) in the kernel's layout."""
    if weight.dim() != 3 or packed.shape != weight.shape or packed.dtype != weight.dtype or weight.dtype not in DTYPES:
        raise ValueError(f"prepack needs weight [E, N, K] of {DTYPES} and packed alike, got "
                         f"{weight.dtype} {tuple(weight.shape)} -> {packed.dtype} {tuple(packed.shape)}")
    oplib.ops().prepack_moe_weight(weight.contiguous(), packed, isa)


def cpu_fused_moe(output: torch.Tensor, input: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  w13_bias: torch.Tensor | None, w2_bias: torch.Tensor | None, topk_weights: torch.Tensor,
                  topk_id: torch.Tensor, skip_weighted: bool, act: str, isa: str) -> None:
    """vLLM: output[m] = sum_k (weight[m, k] unless skip_weighted) * FFN_{topk_id[m, k]}(input[m])."""
    _check(output, input, w13, w2, topk_weights, topk_id, skip_weighted, act)
    if skip_weighted:
        # the op overwrites topk_weights with 1.0 when it skips them (its schema does not say so):
        # hand it a scratch tensor, never the caller's weights
        topk_weights = torch.ones_like(topk_weights)
    oplib.ops().cpu_fused_moe(output, input, w13, w2, w13_bias, w2_bias, topk_weights, topk_id,
                              skip_weighted, act, isa)


def ref_prepack_moe_weight(weight: torch.Tensor, packed: torch.Tensor, isa: str) -> None:
    """The reference's layout is the plain one."""
    if packed.shape != weight.shape or packed.dtype != weight.dtype:
        raise ValueError(f"packed must match weight, got {packed.dtype} {tuple(packed.shape)} for "
                         f"{weight.dtype} {tuple(weight.shape)}")
    packed.copy_(weight)


def ref_cpu_fused_moe(output: torch.Tensor, input: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      w13_bias: torch.Tensor | None, w2_bias: torch.Tensor | None, topk_weights: torch.Tensor,
                      topk_id: torch.Tensor, skip_weighted: bool, act: str, isa: str) -> None:
    """The pure-torch twin of `cpu_fused_moe` over plain weights: the reference it is tested against.

    Each (row, expert) output is computed in the input dtype, as `F.linear` would for that row
    alone (bfloat16 stays bfloat16), and the K outputs of a row are summed in float32."""
    _check(output, input, w13, w2, topk_weights, topk_id, skip_weighted, act)
    inter = w2.shape[2]
    acc = torch.zeros(input.shape, dtype=torch.float32)
    for e in torch.unique(topk_id).tolist():
        rows, ks = (topk_id == e).nonzero(as_tuple=True)
        gu = F.linear(input[rows], w13[e], None if w13_bias is None else w13_bias[e])
        y = F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], w2[e], None if w2_bias is None else w2_bias[e]).float()
        if not skip_weighted:
            y = y * topk_weights[rows, ks].unsqueeze(1)
        acc.index_add_(0, rows, y)
    output.copy_(acc)


class MoEKernel(Protocol):
    """What a worker needs of a fused MoE kernel: a name for logs, the layout its packed bytes
    are in (bytes are exchanged between workers only within one layout), packing, and the op."""

    @property
    def name(self) -> str: ...

    @property
    def layout(self) -> str: ...

    def prepack(self, weight: torch.Tensor, packed: torch.Tensor) -> None: ...

    def fused_moe(self, output: torch.Tensor, input: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_id: torch.Tensor, skip_weighted: bool) -> None: ...


@dataclass(frozen=True)
class VllmCpuMoE:
    """vLLM's `cpu_fused_moe` with weights prepacked for `isa`."""
    isa: str

    @property
    def name(self) -> str:
        return f"vllm cpu_fused_moe (isa {self.isa})"

    @property
    def layout(self) -> str:
        return f"vllm-cpu-{self.isa}"

    def prepack(self, weight: torch.Tensor, packed: torch.Tensor) -> None:
        prepack_moe_weight(weight, packed, self.isa)

    def fused_moe(self, output: torch.Tensor, input: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_id: torch.Tensor, skip_weighted: bool) -> None:
        cpu_fused_moe(output, input, w13, w2, None, None, topk_weights, topk_id, skip_weighted, "silu", self.isa)


@dataclass(frozen=True)
class TorchMoE:
    """The pure-torch reference over plain weights."""

    @property
    def name(self) -> str:
        return "pure-torch reference"

    @property
    def layout(self) -> str:
        return "plain"

    def prepack(self, weight: torch.Tensor, packed: torch.Tensor) -> None:
        ref_prepack_moe_weight(weight, packed, "")

    def fused_moe(self, output: torch.Tensor, input: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_id: torch.Tensor, skip_weighted: bool) -> None:
        ref_cpu_fused_moe(output, input, w13, w2, None, None, topk_weights, topk_id, skip_weighted, "silu", "")


def run_slots(kernel: MoEKernel, experts: StackedExperts, x: torch.Tensor, slots: list[int], counts: list[int],
              weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, D] grouped by slot; slots, counts [G]; weights [M] -> weighted outputs [M, D], float32,
    written into `out` when given (a ring's reply slot: no copy after), else into a new tensor.

    Each pair is one row with top-1 = its slot, unweighted (skip_weighted): the kernel writes it in
    the model dtype, as F.linear of that row alone would, and a row's result does not depend on the
    other rows (tested bitwise), so how experts are spread over workers cannot change it. The
    router weight is applied here in float32, and the engine sums in float32."""
    x = x.contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32)
    elif out.shape != x.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 {tuple(x.shape)}, got {out.dtype} {tuple(out.shape)}")
    y = out if x.dtype == torch.float32 else torch.empty(x.shape, dtype=x.dtype)   # the kernel's own dtype
    w = weights.float().unsqueeze(1)
    if experts.contiguous:
        # numpy, not torch.repeat_interleave: that validates its counts with two more ops (~100 us
        # per call on this path, more than the rest of it together)
        ids = torch.from_numpy(np.repeat(np.asarray(slots, dtype=np.int32), counts)[:, None])
        kernel.fused_moe(y, x, experts.w13, experts.w2, w, ids, True)
    else:   # page-padded slots: the stacked view is strided, so one slot (a contiguous [1, ...]) at a time
        start = 0
        for s, n in zip(slots, counts):
            kernel.fused_moe(y[start:start + n], x[start:start + n], experts.w13[s:s + 1], experts.w2[s:s + 1],
                             w[start:start + n], torch.zeros((n, 1), dtype=torch.int32), True)
            start += n
    return torch.mul(y, w, out=out)   # in float32 (a bfloat16 y is widened first, as y.float() would)


@dataclass(frozen=True)
class KernelChoice:
    kernel: MoEKernel
    reason: str


def select_kernel(hidden: int, intermediate: int, dtype: torch.dtype) -> KernelChoice:
    """vLLM's kernel when its library loaded and the shape fits it, else the reference; with why."""
    lib = oplib.load()
    if isinstance(lib, oplib.Unavailable):
        return KernelChoice(TorchMoE(), lib.reason)
    if hidden % ALIGNMENT or intermediate % ALIGNMENT:
        return KernelChoice(TorchMoE(), f"hidden {hidden} / intermediate {intermediate} not multiples of {ALIGNMENT}")
    # AMX tiles take bfloat16 only (vLLM's X86CPUUnquantizedExperts); float32 runs the vector kernel
    isa = lib.isa if dtype == torch.bfloat16 else "vec"
    return KernelChoice(VllmCpuMoE(isa), f"{lib.variant} loaded")
