"""The engine's RMSNorm and rotary embedding: vLLM's ops in float32 equal the reference to float32
rounding; bfloat16 and strided inputs keep the reference (experts/kernels/pointwise.py)."""
from __future__ import annotations

import pytest
import torch

from experts.kernels import oplib
from experts.kernels.pointwise import Pointwise, ref_rms_norm, ref_rope

needs_ops = pytest.mark.skipif(isinstance(oplib.load(), oplib.Unavailable), reason="vLLM CPU ops not loadable here")
D, THETA = 64, 10000.0


def _rotary(positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (THETA ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


@needs_ops
@pytest.mark.parametrize("t", [1, 7, 64])
def test_fused_float32_equals_the_reference(t):
    g = torch.Generator().manual_seed(t)
    pw = Pointwise(D, THETA, 4096, torch.float32)
    assert pw.fused
    x, w = torch.randn(t, 512, generator=g), 1 + 0.1 * torch.randn(512, generator=g)
    assert torch.allclose(pw.rms_norm(x, w, 1e-6), ref_rms_norm(x, w, 1e-6), atol=2e-6)
    q, k = torch.randn(t, 8, D, generator=g), torch.randn(t, 4, D, generator=g)
    positions = torch.randint(0, 4000, (t,), generator=g)
    cos, sin = _rotary(positions, torch.float32)
    got_q, got_k = pw.rope(q.clone(), k.clone(), positions, lambda: (cos, sin))
    assert got_q.shape == q.shape and got_k.shape == k.shape
    assert torch.allclose(got_q, ref_rope(q, cos, sin), atol=2e-5)
    assert torch.allclose(got_k, ref_rope(k, cos, sin), atol=2e-5)


@needs_ops
def test_strided_q_and_k_are_rotated_from_their_own_values():
    """q and k come from one qkv projection split along its last dimension (strided views)."""
    t, pw = 5, Pointwise(D, THETA, 4096, torch.float32)
    qkv = torch.randn(t, 16 * D)
    q, k, _ = qkv.split([8 * D, 4 * D, 4 * D], dim=-1)
    q, k = q.view(t, 8, D), k.view(t, 4, D)
    positions = torch.arange(10, 10 + t)
    cos, sin = _rotary(positions, torch.float32)
    want_q, want_k = ref_rope(q, cos, sin), ref_rope(k, cos, sin)
    got_q, got_k = pw.rope(q, k, positions, lambda: (cos, sin))
    assert torch.allclose(got_q, want_q, atol=2e-5) and torch.allclose(got_k, want_k, atol=2e-5)


def test_bfloat16_keeps_the_reference_bit_for_bit():
    """vLLM rounds once where transformers rounds after each op: bf16 keeps transformers' order."""
    pw = Pointwise(D, THETA, 4096, torch.bfloat16)
    assert not pw.fused
    x, w = torch.randn(3, 512).bfloat16(), torch.ones(512).bfloat16()
    assert torch.equal(pw.rms_norm(x, w, 1e-6), ref_rms_norm(x, w, 1e-6))
    q, k, positions = torch.randn(3, 8, D).bfloat16(), torch.randn(3, 4, D).bfloat16(), torch.tensor([0, 5, 9])
    cos, sin = _rotary(positions, torch.bfloat16)
    got_q, got_k = pw.rope(q, k, positions, lambda: (cos, sin))
    assert torch.equal(got_q, ref_rope(q, cos, sin)) and torch.equal(got_k, ref_rope(k, cos, sin))
