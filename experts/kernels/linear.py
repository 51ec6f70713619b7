"""The engine's dense matmuls (attention projections, router, LM head, dense and shared MLPs).

vLLM's CPU build runs every unquantized linear layer through oneDNN with the weight reordered once
into oneDNN's blocked layout (`_C::create_onednn_mm_handler`, then `_C::onednn_mm` per call); we
do the same when the op library loaded (experts/kernels/oplib.py). Measured on this machine
(AVX-512, one thread, M=32 tokens, K=512): 2.5x `F.linear` in float32 (N=1024: 157 vs 392 us CPU),
1.5x in bfloat16. The handler owns its packed copy, so the caller drops the original weight.
Without the library every layer is `F.linear` (`TorchLinear`); the choice is made once, logged.
"""
from __future__ import annotations

import logging
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from experts.kernels import oplib

log = logging.getLogger(__name__)

# oneDNN primitives cached per handler, one per distinct row count M seen (decode batches and
# prefill chunks); a miss rebuilds the primitive (tens of microseconds), never a wrong answer
PRIMITIVE_CACHE = 128


class Linear(Protocol):
    """y = x W^T (+ b) over the last dimension of x."""
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class TorchLinear:
    """The reference: F.linear over the weight as given."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class OneDnnLinear:
    """vLLM's oneDNN matmul over a weight [N, K] packed once here."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if weight.dim() != 2:
            raise ValueError(f"a linear weight is 2-D, got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.bias = None if bias is None else bias.to(weight.dtype).contiguous()
        c = oplib.ops()
        # the handler is a C++ object owning the packed weight; its address lives in a tensor
        self._handler = torch.tensor(c.create_onednn_mm_handler(weight.t(), PRIMITIVE_CACHE), dtype=torch.int64)
        self._mm = c.onednn_mm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise TypeError(f"linear of {self.dtype} weights called with {x.dtype} input")
        rows = x.reshape(-1, self.in_features)
        out = torch.empty(rows.shape[0], self.out_features, dtype=self.dtype)
        if rows.shape[0]:
            self._mm(out, rows.contiguous(), self.bias, self._handler)
        return out.view(*x.shape[:-1], self.out_features)


LinearFactory = Callable[[torch.Tensor, "torch.Tensor | None"], Linear]


def select_linear(dtype: torch.dtype) -> tuple[LinearFactory, str]:
    """How this process builds its dense layers for `dtype` weights, and why."""
    lib = oplib.load()
    if isinstance(lib, oplib.Unavailable):
        return TorchLinear, lib.reason
    if dtype not in (torch.float32, torch.bfloat16):
        return TorchLinear, f"oneDNN matmul is used for float32 and bfloat16, not {dtype}"
    if not hasattr(oplib.ops(), "create_onednn_mm_handler"):
        return TorchLinear, f"{lib.variant} has no oneDNN matmul"
    return OneDnnLinear, f"{lib.variant} loaded"
