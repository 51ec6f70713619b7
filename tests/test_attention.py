"""The vectorised AttentionBatch.build equals a plain per-sequence construction, on random mixes
of prefill chunks and decode tokens with scattered KV blocks."""
from __future__ import annotations

import random

import torch

from experts.model.attention import AttentionBatch


def reference(q_lens, kv_lens, tables, block_size):
    b, max_q, max_k = len(q_lens), max(q_lens), max(kv_lens)
    positions, slots, q_index, last = [], [], [], []
    gather = torch.zeros(b, max_k, dtype=torch.long)
    mask = torch.zeros(b, 1, max_q, max_k, dtype=torch.bool)
    t = 0
    for i, (q, k, table) in enumerate(zip(q_lens, kv_lens, tables)):
        pos = torch.arange(k)
        ctx = torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size
        gather[i, :k] = ctx
        start = k - q
        positions.append(pos[start:])
        slots.append(ctx[start:])
        q_index.append(torch.arange(q) + i * max_q)
        mask[i, 0, :q, :k] = pos[None, :] <= (start + torch.arange(q))[:, None]
        mask[i, 0, q:, 0] = True
        t += q
        last.append(t - 1)
    return torch.cat(positions), torch.cat(slots), gather, mask, torch.cat(q_index), torch.tensor(last)


def test_build_matches_the_plain_construction():
    rng = random.Random(0)
    for _ in range(300):
        b, bs = rng.randint(1, 6), rng.choice([1, 4, 16])
        q = [rng.randint(1, 20) for _ in range(b)]
        kv = [x + rng.randint(0, 40) for x in q]
        tables = [rng.sample(range(500), -(-k // bs) + rng.randint(0, 2)) for k in kv]
        got = AttentionBatch.build(q, kv, tables, bs)
        want = reference(q, kv, tables, bs)
        for name, w in zip(("positions", "slot_mapping", "gather", "mask", "q_index", "last_index"), want):
            assert torch.equal(getattr(got, name), w), name
        assert got.batch == b and got.max_q == max(q)
