"""The pure-torch paged attention: the reference the vLLM kernels are tested against, and the
fallback where they do not load or do not cover the model's shape.

Cache layout: one row per slot, `[num_blocks * block_size, Hkv, d]`. A step gathers each
sequence's context into a padded `[B, Hkv, K, d]` and runs `scaled_dot_product_attention` under a
causal mask that also hides the padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from experts.model.attention import AttentionBatch


@dataclass(frozen=True)
class TorchStep:
    batch: AttentionBatch
    gather: torch.Tensor        # [B, K] cache slots of each sequence's context, padded with 0
    mask: torch.Tensor          # [B, 1, Q, K] bool, True = may attend
    q_index: torch.Tensor       # [T] index of each new token in the padded [B * Q] layout

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor) -> torch.Tensor:
        meta = self.batch
        k_cache[meta.slot_mapping] = k
        v_cache[meta.slot_mapping] = v
        t, hq, d = q.shape
        hkv = k.shape[1]
        decode_only = meta.max_q == 1   # every sequence feeds one token: no padding to lay out
        if decode_only:
            qp = q.unsqueeze(2)                                                # [B, Hq, 1, d]
        else:
            qp = q.new_zeros(meta.batch * meta.max_q, hq, d)
            qp[self.q_index] = q
            qp = qp.view(meta.batch, meta.max_q, hq, d).transpose(1, 2)      # [B, Hq, Q, d]
        kp = k_cache[self.gather].transpose(1, 2)                              # [B, Hkv, K, d]
        vp = v_cache[self.gather].transpose(1, 2)
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=self.mask, enable_gqa=hq != hkv)
        if decode_only:
            return out.squeeze(2)
        out = out.transpose(1, 2).reshape(meta.batch * meta.max_q, hq, d)
        return out[self.q_index]


class TorchAttention:
    """PagedAttention in pure torch."""

    name = "torch"

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype

    def allocate(self, num_blocks: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (num_blocks * block_size, self.num_kv_heads, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)

    def prepare(self, batch: AttentionBatch) -> TorchStep:
        return plan(batch)


def plan(batch: AttentionBatch) -> TorchStep:
    """The padded layout of one step, vectorised over the batch (it runs once per step)."""
    bs = batch.block_size
    q = np.diff(batch.query_start_loc.numpy()).astype(np.int64)
    kv = batch.seq_lens.numpy().astype(np.int64)
    tables = batch.block_table.numpy().astype(np.int64)
    b, max_q, max_k, width = batch.batch, batch.max_q, int(kv.max()), tables.shape[1]
    pos = np.arange(max_k)
    gather = tables[:, np.minimum(pos // bs, width - 1)] * bs + pos % bs
    gather[pos[None, :] >= kv[:, None]] = 0
    start = kv - q                                        # first new token's position, per sequence
    seq = np.repeat(np.arange(b), q)                      # [T] sequence of each new token
    offset = np.arange(int(q.sum())) - np.repeat(np.cumsum(q) - q, q)
    rows = np.arange(max_q)
    # causal: new token i of sequence b (position start_b + i) sees context 0 ..= start_b + i
    mask = (pos[None, None, :] <= (start[:, None] + rows[None, :])[:, :, None]) & (rows[None, :, None] < q[:, None, None])
    # padded query rows attend to slot 0 only so that softmax stays finite; they are dropped
    mask[:, :, 0] |= rows[None, :] >= q[:, None]
    return TorchStep(batch, torch.from_numpy(gather), torch.from_numpy(mask[:, None]),
                     torch.from_numpy(seq * max_q + offset))
