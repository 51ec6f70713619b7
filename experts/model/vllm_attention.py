"""Paged attention through vLLM's CPU kernels (experts/kernels/attention.py), in their cache layout:
K and V of a layer each `[num_blocks, Hkv, block_size, d]`. The kernels split every step over the
process's OpenMP threads, so the engine's attention uses all the cores it is given."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from experts.kernels import attention as kernels
from experts.model.attention import AttentionBatch


@dataclass(frozen=True)
class VllmStep:
    batch: AttentionBatch
    scheduler_metadata: torch.Tensor
    isa: str
    scale: float

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor) -> torch.Tensor:
        meta = self.batch
        kernels.cpu_attn_reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping, self.isa)
        out = torch.empty_like(q)
        kernels.cpu_attention_with_kv_cache(q, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens,
                                            meta.block_table, self.scale, self.scheduler_metadata)
        return out


class VllmAttention:
    """PagedAttention over vLLM's CPU ops; build it only for a shape `kernels.kernel_isa` accepts."""

    name = "vllm"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, isa: str) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dtype, self.isa = dtype, isa
        self.scale = head_dim ** -0.5

    def allocate(self, num_blocks: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = kernels.cache_shape(num_blocks, block_size, self.num_kv_heads, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)

    def prepare(self, batch: AttentionBatch) -> VllmStep:
        md = kernels.cpu_attn_scheduler_metadata(self.num_heads, self.num_kv_heads, self.head_dim, batch.seq_lens,
                                                 batch.query_start_loc, self.dtype, self.isa)
        return VllmStep(batch, md, self.isa, self.scale)
