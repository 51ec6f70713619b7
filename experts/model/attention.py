"""Attention over a paged KV cache for a batch that mixes prefill chunks and decode tokens: the
step's description shared by every kernel, rotary embeddings, and the contract a kernel keeps.

The step's T new tokens are laid flat (sequence after sequence). Each sequence b has `q_lens[b]`
new tokens and, after this step, `kv_lens[b]` tokens of context; its KV rows live in cache slots
`block_table[b][pos // block_size] * block_size + pos % block_size`. How a kernel lays the cache
out in memory is its own business (`PagedAttention.allocate`); slots and block tables are common.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch

from experts.kernels.pointwise import rope_inv_freq


@dataclass(frozen=True)
class AttentionBatch:
    positions: torch.Tensor        # [T] absolute position of each new token
    slot_mapping: torch.Tensor     # [T] cache slot each new token's K/V is written to
    last_index: torch.Tensor       # [B] index into T of each sequence's last new token
    query_start_loc: torch.Tensor  # [B + 1] int32: sequence b's new tokens are T[qsl[b]:qsl[b + 1]]
    seq_lens: torch.Tensor         # [B] int32: context of each sequence after this step (kv_lens)
    block_table: torch.Tensor      # [B, W] int32: each sequence's blocks, padded with 0
    block_size: int
    batch: int
    max_q: int
    rope_cache: dict = field(default_factory=dict)   # (d, theta, dtype) -> (cos, sin) [T, 1, d]; shared by all layers

    def rotary(self, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of this step's positions, computed once per step instead of once per layer."""
        key = (head_dim, theta, dtype)
        cached = self.rope_cache.get(key)
        if cached is None:
            freqs = self.positions.float()[:, None] * rope_inv_freq(head_dim, theta)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cached = self.rope_cache[key] = (emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :])
        return cached

    @staticmethod
    def build(q_lens: Sequence[int], kv_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
              block_size: int) -> "AttentionBatch":
        # vectorised over the batch: this runs once per step, before every layer
        q = np.asarray(q_lens, dtype=np.int64)
        kv = np.asarray(kv_lens, dtype=np.int64)
        b = len(q)
        assert (q > 0).all() and (q <= kv).all(), (q_lens, kv_lens)
        width = max(len(t) for t in block_tables)
        tables = np.zeros((b, width), dtype=np.int64)
        for i, t in enumerate(block_tables):
            assert len(t) * block_size >= kv[i], (len(t), kv[i])
            tables[i, :len(t)] = t
        seq = np.repeat(np.arange(b), q)                      # [T] sequence of each new token
        offset = np.arange(int(q.sum())) - np.repeat(np.cumsum(q) - q, q)
        positions = (kv - q)[seq] + offset
        slots = tables[seq, positions // block_size] * block_size + positions % block_size
        return AttentionBatch(
            positions=torch.from_numpy(positions),
            slot_mapping=torch.from_numpy(slots),
            last_index=torch.from_numpy(np.cumsum(q) - 1),
            query_start_loc=torch.from_numpy(np.concatenate(([0], np.cumsum(q))).astype(np.int32)),
            seq_lens=torch.from_numpy(kv.astype(np.int32)),
            block_table=torch.from_numpy(tables.astype(np.int32)),
            block_size=block_size,
            batch=b,
            max_q=int(q.max()),
        )


class StepAttention(Protocol):
    """One step's attention, prepared once for every layer of that step."""

    batch: AttentionBatch

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor) -> torch.Tensor:
        """Write the step's K/V into one layer's caches, then attend. q [T, Hq, d], k, v [T, Hkv, d]
        -> [T, Hq, d], causal within each sequence over its cached context."""
        ...


class PagedAttention(Protocol):
    """An attention kernel over the paged KV cache layout it chooses."""

    name: str

    def allocate(self, num_blocks: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer's K and V caches, zeroed, in this kernel's layout."""
        ...

    def prepare(self, batch: AttentionBatch) -> StepAttention:
        """What the kernel derives from the step's shape, once for all layers."""
        ...
