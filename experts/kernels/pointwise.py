"""The engine's small per-layer ops in float32: RMSNorm and rotary embedding, as vLLM's CPU ops.

At decode sizes these ops are all overhead: torch's RMSNorm is five ops (pow, mean, rsqrt, mul, mul)
and rotate-half RoPE seven, where `_C::rms_norm` and `_C::rotary_embedding` are one each (measured,
one thread, 32 tokens: 21 -> 5 us per norm, 43 -> 6 us per q/k rope pair). Float32 only: the results
equal the reference to float32 rounding (both compute in float32), while in bfloat16 vLLM rounds
once where transformers rounds after each op, so bfloat16 keeps the reference and its tokens.
Without the op library (or for other dtypes) `select_pointwise` answers the reference.
"""
from __future__ import annotations

from typing import Callable

import torch

from experts.kernels import oplib


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """The rotary embedding's [head_dim / 2] inverse frequencies, as transformers computes them."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # computed in float32 as the reference implementations do, then cast back
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def ref_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the Hugging Face (rotate-half) layout. x: [T, H, d]; cos, sin: [T, 1, d]."""
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Pointwise:
    """RMSNorm and RoPE for one model: the reference, or vLLM's ops in float32."""

    def __init__(self, head_dim: int, theta: float, max_position: int, dtype: torch.dtype) -> None:
        lib = oplib.load()
        self.fused = isinstance(lib, oplib.OpLibrary) and dtype == torch.float32
        self.reason = ("vLLM's rms_norm and rotary_embedding ops" if self.fused else
                       lib.reason if isinstance(lib, oplib.Unavailable) else f"reference ops for {dtype}")
        self.head_dim = head_dim
        self._cos_sin: torch.Tensor | None = None
        if self.fused:
            freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * rope_inv_freq(head_dim, theta)[None, :]
            self._cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous()   # [P, d]: cos half, sin half
            self._ops = oplib.ops()

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not self.fused or not x.is_contiguous():
            return ref_rms_norm(x, weight, eps)
        out = torch.empty_like(x)
        self._ops.rms_norm(out, x, weight, eps)
        return out

    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
             rotary: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, d], k [T, Hk, d] rotated at `positions` [T]; `rotary()` gives the reference's
        (cos, sin) when it is the one that runs."""
        if not self.fused:
            cos, sin = rotary()
            return ref_rope(q, cos, sin), ref_rope(k, cos, sin)
        t = q.shape[0]
        q, k = q.reshape(t, -1).contiguous(), k.reshape(t, -1).contiguous()   # the op rotates in place
        self._ops.rotary_embedding(positions, q, k, self.head_dim, self._cos_sin, True, 0, False)
        return q.view(t, -1, self.head_dim), k.view(t, -1, self.head_dim)
