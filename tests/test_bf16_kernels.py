"""bfloat16 through BOTH of vLLM's CPU kernels (paged attention and the fused MoE, as the engine and
a worker call them) against the float32 oracle: transformers in float32 on the same bf16 weights.

What bf16 can promise, and what this holds us to (issue 8): every logit within bf16's rounding of
the oracle's, and the oracle's greedy token wherever that choice is not a near tie. It cannot
promise transformers' own bf16 tokens: two faithful bf16 computations round differently, and a
token whose router has two experts within a hair of each other may take the other one, which moves
that token's whole hidden state. The bench model's prompt 0 does exactly that at layer 4 with both
kernels on (first token 390, not 496), though each kernel is within rounding of the oracle; nudging
a quarter of the attention outputs by one bf16 ulp flips it the same way on the pure-torch path.
Positions whose own routing is such a tie are left out of the strict checks.

On a random model attention is nearly uniform, so a wrong softmax scale of a few percent stays
inside this tolerance (x2 does not); tests/test_attention.py's `rounds_once` holds the attention
kernel to the exact result per output instead.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pytest
import torch

from experts.kernels.attention import kernel_isa
from experts.kernels.ffn import group_pairs
from experts.kernels.moe import VllmCpuMoE, run_slots, select_kernel
from experts.model.attention import AttentionBatch
from experts.model.checkpoint import Checkpoint
from experts.model.decoder import MoEModel
from experts.model.demo import DemoShape, write_demo_model
from experts.model.kv_cache import KVCache
from experts.model.profile import NO_PROFILE
from experts.model.spec import ModelSpec, load_spec
from server.config import ServerConfig
from server.engine.step import ModelRunner, StepInput

# head_dim 32 and hidden/intermediate multiples of 32: a shape both vLLM kernels serve
SHAPE = DemoShape(hidden=128, layers=4, experts=8, top_k=2, intermediate=128, heads=4, kv_heads=2, vocab=512,
                  dtype="bfloat16", shard_mb=64)
BLOCK_SIZE = next(f.default for f in fields(ServerConfig) if f.name == "block_size")   # the engine's default
PROMPTS = [[(31 * i + 7 * j) % 500 + 3 for j in range(12 + 3 * i)] for i in range(6)]
DECODE_STEPS = 6          # teacher-forced with the oracle's tokens, so one slip cannot cascade
# Where no routing flips, bf16 is off the oracle by at most ~0.03 on logits up to ~5 here. A
# position's routing is a near tie when the oracle's top_k-th and next expert are closer than
# ROUTER_GAP at some layer; its token is checked only when its best two logits are further apart
# than 2 * LOGIT_TOL.
LOGIT_TOL = 0.05
ROUTER_GAP = 0.02


class FusedExperts:
    """The expert backend the way the engine and a worker split it: the worker's `run_slots` over
    prepacked stacked experts (top-1 rows, router weight applied in float32), the engine's sum of
    each token's top-k rows in choice order, in float32, cast to the model dtype."""

    def __init__(self, spec: ModelSpec, ck: Checkpoint, dtype: torch.dtype) -> None:
        self.kernel = select_kernel(spec.hidden, spec.expert_intermediate, dtype).kernel
        self.profile = NO_PROFILE
        self.stacked = {}
        for layer in spec.moe_layers:
            w = [ck.expert(spec, layer, e) for e in range(spec.num_experts)]
            w13 = torch.stack([torch.cat([g, u]) for g, u, _ in w]).to(dtype)
            w2 = torch.stack([d for _, _, d in w]).to(dtype)
            p13, p2 = torch.empty_like(w13), torch.empty_like(w2)
            self.kernel.prepack(w13, p13)
            self.kernel.prepack(w2, p2)
            self.stacked[layer] = _Stacked(p13, p2)

    def start(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        t, a = topk_ids.shape
        order, tokens, groups, counts = group_pairs(topk_ids)
        pairs = run_slots(self.kernel, self.stacked[layer], hidden[tokens].contiguous(), groups.tolist(),
                          counts.tolist(), topk_weights.float().reshape(-1)[order])
        back = torch.empty_like(order)
        back[order] = torch.arange(len(order))
        return pairs[back].view(t, a, -1).sum(dim=1).to(hidden.dtype)

    def finish(self, handle: object) -> torch.Tensor:
        assert isinstance(handle, torch.Tensor)
        return handle

    def abandon(self, handle: object) -> None:
        pass

    def check_standby(self) -> None:
        pass

    def take_expert_counts(self) -> dict[int, np.ndarray]:
        return {}


@dataclass(frozen=True)
class _Stacked:
    """Every expert of a layer in slots 0..E-1 (memory.slot_range.StackedExperts)."""
    w13: torch.Tensor
    w2: torch.Tensor
    contiguous: bool = True


def ours(model: MoEModel, cache: KVCache, experts: FusedExperts, prompt: list[int],
         forced: list[int]) -> torch.Tensor:
    """float32 logits [len(forced) + 1, V]: after the prompt (one prefill step), then after each
    forced token (one decode step each), through the KV cache."""
    runner = ModelRunner(model, cache)
    table = list(range(-(-(len(prompt) + len(forced)) // BLOCK_SIZE)))[::-1]   # blocks out of order
    out, n = [], len(prompt)
    batch = AttentionBatch.build([n], [n], [table], BLOCK_SIZE)
    out.append(runner.run([StepInput(torch.tensor(prompt), batch)], experts)[0])
    for tok in forced:
        n += 1
        batch = AttentionBatch.build([1], [n], [table], BLOCK_SIZE)
        out.append(runner.run([StepInput(torch.tensor([tok]), batch)], experts)[0])
    return torch.stack(out)


def oracle(hf, prompt: list[int]) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """transformers in float32: logits of every position, the greedy continuation, and each
    position's smallest router gap (top_k-th minus next expert's logit) over the layers."""
    gates = []
    # transformers' Mixtral router returns (router_logits, scores, indices)
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: gates.append(o[0])) for layer in hf.model.layers]
    with torch.no_grad():
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=DECODE_STEPS, do_sample=False,
                          pad_token_id=0)[0].tolist()
        gates.clear()
        full = hf(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    k = hf.config.num_experts_per_tok
    gaps = []
    for g in gates:
        g = g.reshape(len(ids), -1).float()
        top = g.topk(k + 1, dim=-1).values
        gaps.append(top[:, k - 1] - top[:, k])
    # the token's own routing: a flip at an earlier token reaches it only through attention, diluted
    gap = torch.stack(gaps).min(dim=0).values
    start = len(prompt) - 1
    return full.logits[0, start:-1].float(), ids[len(prompt):], gap[start:-1]


needs_both = pytest.mark.skipif(
    kernel_isa(torch.bfloat16, BLOCK_SIZE, SHAPE.hidden // SHAPE.heads).isa is None
    or not isinstance(select_kernel(SHAPE.hidden, SHAPE.intermediate, torch.bfloat16).kernel, VllmCpuMoE),
    reason="vLLM's CPU attention or fused MoE is not available here")


@needs_both
def test_bf16_through_both_vllm_kernels_is_within_rounding_of_the_float32_oracle(tmp_path):
    from transformers import AutoModelForCausalLM

    d = write_demo_model(tmp_path / "mixtral", "mixtral", seed=11, shape=SHAPE)
    spec = load_spec(d)
    assert spec.dtype == "bfloat16"
    ck = Checkpoint(d)
    model = MoEModel(spec, ck.dense_state(torch.bfloat16))
    experts = FusedExperts(spec, ck, torch.bfloat16)
    assert isinstance(experts.kernel, VllmCpuMoE)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)   # bf16 weights, fp32 maths
    hf.generation_config.eos_token_id = None    # EOS is an ordinary token here

    checked = tokens_checked = skipped = 0
    for prompt in PROMPTS:
        cache = KVCache(spec, num_blocks=16, block_size=BLOCK_SIZE)
        assert cache.attention.name == "vllm"
        want, forced, gap = oracle(hf, prompt)
        got = ours(model, cache, experts, prompt, forced[:-1])
        assert got.shape == want.shape
        err = (got - want).abs().max(dim=-1).values
        top2 = want.topk(2, dim=-1).values
        clear = gap >= ROUTER_GAP
        skipped += int((~clear).sum())
        for pos in clear.nonzero().flatten().tolist():
            assert err[pos] <= LOGIT_TOL, f"prompt {prompt[:3]}..., position {pos}: max |logit error| {err[pos]:.4f}"
            checked += 1
            if top2[pos, 0] - top2[pos, 1] > 2 * LOGIT_TOL:
                assert int(got[pos].argmax()) == int(want[pos].argmax()), f"prompt {prompt[:3]}..., position {pos}"
                tokens_checked += 1
    # the checks have teeth: near ties are the exception
    assert checked >= 3 * skipped and tokens_checked >= checked // 2, (checked, tokens_checked, skipped)
