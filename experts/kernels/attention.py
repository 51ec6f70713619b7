"""vLLM's CPU paged attention, behind typed functions (the ops come from `oplib.ops()`).

vLLM's cache layout, per decoder layer: K and V each `[num_blocks, Hkv, block_size, d]` (block
major, then head: one block of one head is a contiguous `[block_size, d]` tile the kernel streams).
A step is described the way vLLM's CPU backend describes it (v1/attention/backends/cpu_attn.py):
`query_start_loc [B + 1]` and `seq_lens [B]` (context after this step) as int32, `block_table
[B, W]` int32, and a scheduler metadata tensor built once per step for every layer.

What the kernels accept (vLLM 0.32, checked against the library): head sizes in
`SUPPORTED_HEAD_DIMS`; block sizes a multiple of 16 (the "vec16" kernels) or of 32 (the "vec" and
"amx" kernels); fp32, bf16 and fp16. `kernel_isa` answers None with the reason for anything else,
and the caller keeps the pure-torch reference (experts/model/torch_attention.py).

In bf16 the kernels keep q.k, the softmax and the sum over V in float32 and round the output once,
whatever the isa and block size (the same bits for "vec16" and "vec" at blocks of 16, 32 and 128 on
the bench model; tests/test_attention.py holds every output to a bf16 neighbour of the float64
result). vLLM itself never runs "vec16" for head_dim 64: its CPU backend takes blocks in multiples
of 32, and "vec" over 32-token blocks costs ~15-30% less per step than "vec16" over 16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from experts.kernels import oplib

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class KernelChoice:
    """`isa` the kernel family the ops take ("amx" | "vec" | "vec16"), or None and `reason`."""
    isa: str | None
    reason: str


def kernel_isa(dtype: torch.dtype, block_size: int, head_dim: int) -> KernelChoice:
    """The kernel family for this cache shape, chosen the way vLLM's `_get_attn_isa` chooses on x86."""
    lib = oplib.load()
    if isinstance(lib, oplib.Unavailable):
        return KernelChoice(None, lib.reason)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return KernelChoice(None, f"head_dim {head_dim} is not one of vLLM's CPU attention sizes {SUPPORTED_HEAD_DIMS}")
    if dtype not in SUPPORTED_DTYPES:
        return KernelChoice(None, f"dtype {dtype} is not supported by vLLM's CPU attention")
    if block_size % 16:
        return KernelChoice(None, f"block_size {block_size} is not a multiple of 16")
    if head_dim % 32:   # 80, 112: only the 16-wide kernels tile them
        return KernelChoice("vec16", f"head_dim {head_dim}")
    if block_size % 32:
        return KernelChoice("vec16", f"block_size {block_size}")
    if lib.isa == "amx" and dtype == torch.bfloat16:
        return KernelChoice("amx", "AMX tiles, bf16")
    return KernelChoice("vec", f"block_size {block_size}, head_dim {head_dim}")


def cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """One layer's K (or V) cache in vLLM's layout."""
    return (num_blocks, num_kv_heads, block_size, head_dim)


def cpu_attn_reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                               value_cache: torch.Tensor, slot_mapping: torch.Tensor, isa: str) -> None:
    """Write new rows into the caches. key, value [T, Hkv, d]; caches [N, Hkv, bs, d];
    slot_mapping [T] int64, slot = block * bs + offset."""
    oplib.ops().cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, isa, 1.0, 1.0, "auto")


def cpu_attn_scheduler_metadata(num_heads: int, num_kv_heads: int, head_dim: int, seq_lens: torch.Tensor,
                                query_start_loc: torch.Tensor, dtype: torch.dtype, isa: str) -> torch.Tensor:
    """How the kernel splits one step's work over the OpenMP threads (causal, no sliding window,
    KV split on as vLLM's default `VLLM_CPU_ATTN_SPLIT_KV=1`). Built once per step: it depends only
    on the batch's lengths, not on the layer. Build it on the thread and thread count that attends."""
    return oplib.ops().get_scheduler_metadata(seq_lens.shape[0], num_heads, num_kv_heads, head_dim, seq_lens,
                                              dtype, query_start_loc, True, -1, isa, True, None, "auto")


def cpu_attention_with_kv_cache(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                output: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                                block_table: torch.Tensor, scale: float, scheduler_metadata: torch.Tensor) -> None:
    """Causal attention of the step's new tokens over their cached context, into `output`.
    query, output [T, Hq, d]; caches [N, Hkv, bs, d]; query_start_loc [B + 1], seq_lens [B],
    block_table [B, W] int32. New token i of sequence b sits at position seq_lens[b] - q_len_b + i."""
    oplib.ops().cpu_attention_with_kv_cache(query, key_cache, value_cache, output, query_start_loc, seq_lens, scale,
                                            True, None, -1, block_table, 0.0, scheduler_metadata, None, None,
                                            1.0, 1.0, "auto")
