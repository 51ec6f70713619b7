"""Attention over a paged KV cache for a batch that mixes prefill chunks and decode tokens.

The step's T new tokens are laid flat (sequence after sequence). Each sequence b has `q_lens[b]`
new tokens and, after this step, `kv_lens[b]` tokens of context; its KV rows live in cache slots
`block_table[b][pos // block_size] * block_size + pos % block_size`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionBatch:
    positions: torch.Tensor     # [T] absolute position of each new token
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    gather: torch.Tensor        # [B, K] cache slots of each sequence's context, padded with 0
    mask: torch.Tensor          # [B, 1, Q, K] bool, True = may attend
    q_index: torch.Tensor       # [T] index of each new token in the padded [B * Q] layout
    last_index: torch.Tensor    # [B] index into T of each sequence's last new token
    batch: int
    max_q: int
    rope_cache: dict = field(default_factory=dict)   # theta -> (cos, sin) [T, 1, d]; shared by all layers

    def rotary(self, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of this step's positions, computed once per step instead of once per layer."""
        key = (head_dim, theta, dtype)
        cached = self.rope_cache.get(key)
        if cached is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
            freqs = self.positions.float()[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cached = self.rope_cache[key] = (emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :])
        return cached

    @staticmethod
    def build(q_lens: Sequence[int], kv_lens: Sequence[int], block_tables: Sequence[Sequence[int]],
              block_size: int) -> "AttentionBatch":
        # vectorised over the batch: this runs once per step, before every layer
        q = np.asarray(q_lens, dtype=np.int64)
        kv = np.asarray(kv_lens, dtype=np.int64)
        b, max_q, max_k = len(q), int(q.max()), int(kv.max())
        assert (q > 0).all() and (q <= kv).all(), (q_lens, kv_lens)
        width = max(len(t) for t in block_tables)
        tables = np.zeros((b, width), dtype=np.int64)
        for i, t in enumerate(block_tables):
            assert len(t) * block_size >= kv[i], (len(t), kv[i])
            tables[i, :len(t)] = t
        pos = np.arange(max_k)
        gather = tables[:, np.minimum(pos // block_size, width - 1)] * block_size + pos % block_size
        gather[pos[None, :] >= kv[:, None]] = 0
        start = kv - q                                        # first new token's position, per sequence
        seq = np.repeat(np.arange(b), q)                      # [T] sequence of each new token
        offset = np.arange(int(q.sum())) - np.repeat(np.cumsum(q) - q, q)
        positions = start[seq] + offset
        rows = np.arange(max_q)
        # causal: new token i of sequence b (position start_b + i) sees context 0 ..= start_b + i
        mask = (pos[None, None, :] <= (start[:, None] + rows[None, :])[:, :, None]) & (rows[None, :, None] < q[:, None, None])
        # padded query rows attend to slot 0 only so that softmax stays finite; they are dropped
        mask[:, :, 0] |= rows[None, :] >= q[:, None]
        return AttentionBatch(
            positions=torch.from_numpy(positions),
            slot_mapping=torch.from_numpy(gather[seq, positions]),
            gather=torch.from_numpy(gather),
            mask=torch.from_numpy(mask[:, None]),
            q_index=torch.from_numpy(seq * max_q + offset),
            last_index=torch.from_numpy(np.cumsum(q) - 1),
            batch=b,
            max_q=max_q,
        )


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the Hugging Face (rotate-half) layout. x: [T, H, d]; cos, sin: [T, 1, d]."""
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionBatch) -> torch.Tensor:
    """Write the step's K/V into the cache, then attend. q: [T, Hq, d]; k, v: [T, Hkv, d];
    caches: [slots, Hkv, d]. Returns [T, Hq, d]."""
    k_cache[meta.slot_mapping] = k
    v_cache[meta.slot_mapping] = v
    t, hq, d = q.shape
    hkv = k.shape[1]
    decode_only = meta.max_q == 1   # every sequence feeds one token: no padding to lay out
    if decode_only:
        qp = q.unsqueeze(2)                                                # [B, Hq, 1, d]
    else:
        qp = q.new_zeros(meta.batch * meta.max_q, hq, d)
        qp[meta.q_index] = q
        qp = qp.view(meta.batch, meta.max_q, hq, d).transpose(1, 2)      # [B, Hq, Q, d]
    kp = k_cache[meta.gather].transpose(1, 2)                              # [B, Hkv, K, d]
    vp = v_cache[meta.gather].transpose(1, 2)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=meta.mask, enable_gqa=hq != hkv)
    if decode_only:
        return out.squeeze(2)
    out = out.transpose(1, 2).reshape(meta.batch * meta.max_q, hq, d)
    return out[meta.q_index]
