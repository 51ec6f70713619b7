"""The engine's dense layers: vLLM's oneDNN matmul (weight packed once) against F.linear, and the
choice between them (experts/kernels/linear.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from experts.kernels import oplib
from experts.kernels.linear import OneDnnLinear, TorchLinear, select_linear

needs_ops = pytest.mark.skipif(isinstance(oplib.load(), oplib.Unavailable), reason="vLLM CPU ops not loadable here")
# float32: summation order only; bfloat16: the output's own rounding (both accumulate in float32)
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}


def _weights(n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    return w, (torch.randn(n, generator=g).to(dtype) if bias else None)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n,bias", [(1, 512, 1024, False), (32, 512, 1536, True), (7, 128, 8, False),
                                        (200, 256, 571, True)])
def test_onednn_equals_f_linear(dtype, m, k, n, bias):
    w, b = _weights(n, k, dtype, bias)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = OneDnnLinear(w.clone(), b)(x)
    assert got.dtype == dtype and got.shape == (m, n)
    scale = want.abs().max().item()
    assert (got.float() - want).abs().max().item() <= TOL[dtype] * max(scale, 1.0)
    assert torch.allclose(TorchLinear(w, b)(x).float(), want, atol=TOL[dtype] * max(scale, 1.0))


@needs_ops
def test_onednn_keeps_leading_dims_views_and_empty_batches():
    w, _ = _weights(64, 32, torch.float32, False)
    lin = OneDnnLinear(w)
    x = torch.randn(3, 5, 32)
    assert torch.allclose(lin(x), F.linear(x, w), atol=1e-5)
    wide = torch.randn(6, 64)
    view = wide[:, ::2]          # not contiguous: packed rows must be made so before the call
    assert torch.allclose(lin(view), F.linear(view, w), atol=1e-5)
    assert lin(torch.empty(0, 32)).shape == (0, 64)
    with pytest.raises(TypeError, match="bfloat16"):
        lin(x.bfloat16())


@needs_ops
def test_the_packed_copy_outlives_the_weight():
    """The handler owns the packed weight: the engine drops the checkpoint's tensor after packing."""
    w, _ = _weights(128, 64, torch.float32, False)
    want = F.linear(torch.ones(2, 64), w)
    lin = OneDnnLinear(w.clone())
    import gc
    gc.collect()
    assert torch.allclose(lin(torch.ones(2, 64)), want, atol=1e-5)


def test_the_choice_follows_the_library():
    lib = oplib.load()
    make, why = select_linear(torch.float32)
    if isinstance(lib, oplib.Unavailable):
        assert make is TorchLinear and why == lib.reason
    else:
        assert make is OneDnnLinear and lib.variant in why
    assert select_linear(torch.float16)[0] is TorchLinear
    # the switch the tests use to compare both paths reaches the dense layers too
    code = ("import torch; from experts.kernels.linear import select_linear, TorchLinear; "
            "assert select_linear(torch.float32)[0] is TorchLinear; print('torch')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, ELASTICMOE_KERNELS="torch"), timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "torch", out.stderr[-2000:]
