"""The engine's KV cache: K and V for every decoder layer, in the layout of the attention kernel
chosen for this model, once, at start (vLLM's CPU kernels when they load and cover the shape,
else the pure-torch reference; ELASTICMOE_KERNELS=torch forces the reference)."""
from __future__ import annotations

import logging

import torch

from experts.kernels.attention import kernel_isa
from experts.model.attention import AttentionBatch, PagedAttention, StepAttention
from experts.model.dtypes import TORCH_DTYPES
from experts.model.spec import ModelSpec
from experts.model.torch_attention import TorchAttention
from experts.model.vllm_attention import VllmAttention

log = logging.getLogger(__name__)


def choose_attention(spec: ModelSpec, block_size: int) -> PagedAttention:
    """vLLM's kernels where they apply, else the reference; says which and why in the log."""
    dtype = TORCH_DTYPES[spec.dtype]
    choice = kernel_isa(dtype, block_size, spec.head_dim)
    if choice.isa is None:
        log.info("attention: pure-torch reference (%s)", choice.reason)
        return TorchAttention(spec.num_kv_heads, spec.head_dim, dtype)
    log.info("attention: vLLM CPU kernels, isa %s (%s)", choice.isa, choice.reason)
    return VllmAttention(spec.num_heads, spec.num_kv_heads, spec.head_dim, dtype, choice.isa)


class KVCache:
    """K and V rows of every decoder layer for `num_blocks` blocks of `block_size` tokens."""

    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int,
                 attention: PagedAttention | None = None) -> None:
        self.attention = attention or choose_attention(spec, block_size)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for _ in range(spec.num_layers):
            k, v = self.attention.allocate(num_blocks, block_size)
            self.k.append(k)
            self.v.append(v)

    def prepare(self, batch: AttentionBatch) -> StepAttention:
        """The step's attention over this cache, prepared once for all layers."""
        assert batch.block_size == self.block_size, (batch.block_size, self.block_size)
        return self.attention.prepare(batch)
