"""The MoE decoder for every supported family, without the experts themselves.

The engine runs this: embeddings, attention over the paged KV cache, norms, the router, the
shared expert (Qwen2-MoE) or dense MLPs, and the LM head. At each MoE layer it asks an
`ExpertBackend` for the routed experts' combined output: whether the experts are local, on one
worker or on ten is the backend's business (no parallelism in here).
"""
from __future__ import annotations

from collections import deque
from typing import Generator, Protocol

import torch
import torch.nn.functional as F

from experts.model.attention import AttentionBatch, paged_attention, rope
from experts.model.profile import NO_PROFILE, StepProfile
from experts.model.dtypes import TORCH_DTYPES
from experts.model.spec import ModelSpec


class ExpertBackend(Protocol):
    def __call__(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, D], topk_ids [T, A], topk_weights [T, A] -> sum of weighted expert outputs [T, D]."""
        ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # computed in float32 as the reference implementations do, then cast back
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class KVCache:
    """K and V rows for every decoder layer: [slots, Hkv, d] each, slots = blocks * block_size."""

    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int) -> None:
        dtype = TORCH_DTYPES[spec.dtype]
        shape = (num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(spec.num_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks


class MoEModel:
    """Weights are the checkpoint's non-expert tensors, by their Hugging Face names."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor]) -> None:
        self.spec = spec
        self.w = weights
        if spec.tie_embeddings and "lm_head.weight" not in weights:
            self.w["lm_head.weight"] = weights["model.embed_tokens.weight"]
        # q, k and v as one matrix: one matmul reads x once instead of three times
        q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self._qkv_split = (q_out, kv_out, kv_out)
        for layer in range(spec.num_layers):
            p = f"model.layers.{layer}.self_attn"
            self.w[f"{p}.qkv.weight"] = torch.cat([self.w.pop(f"{p}.{n}_proj.weight") for n in "qkv"])
            if spec.qkv_bias:
                self.w[f"{p}.qkv.bias"] = torch.cat([self.w.pop(f"{p}.{n}_proj.bias") for n in "qkv"])
        moe = set(spec.moe_layers)
        self._moe_prefix = {}
        for layer in range(spec.num_layers):
            if layer in moe:
                block = "block_sparse_moe" if spec.family == "mixtral" else "mlp"
                self._moe_prefix[layer] = f"model.layers.{layer}.{block}"

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionBatch, cache: KVCache,
                experts: ExpertBackend, timer: StepProfile = NO_PROFILE) -> torch.Tensor:
        """input_ids [T] -> logits [B, V] of each sequence's last new token."""
        return run_steps([self.steps(input_ids, meta, cache, timer)], experts, timer)[0]

    def steps(self, input_ids: torch.Tensor, meta: AttentionBatch, cache: KVCache,
              timer: StepProfile = NO_PROFILE) -> ModelSteps:
        """The forward pass as a generator that hands each MoE layer's routed experts to its driver:
        it yields ("start", layer, x, topk_ids, topk_weights) and gets a handle back, does the
        engine's own share of the layer (the shared expert), then yields ("finish", handle) and gets
        the experts' output. Returns the logits. Who runs the experts, and what the driver does
        while they run (another micro-batch), is not the model's business."""
        spec, w = self.spec, self.w
        with torch.inference_mode():
            h = F.embedding(input_ids, w["model.embed_tokens.weight"])
        for layer in range(spec.num_layers):
            p = f"model.layers.{layer}"
            with torch.inference_mode(), timer("attention"):
                x = rms_norm(h, w[f"{p}.input_layernorm.weight"], spec.rms_eps)
                h = h + self._attention(layer, x, meta, cache)
                x = rms_norm(h, w[f"{p}.post_attention_layernorm.weight"], spec.rms_eps)
            if layer in self._moe_prefix:
                with torch.inference_mode(), timer("router"):
                    top_i, top_w = self.route(layer, x)
                handle = yield ("start", layer, x, top_i, top_w)
                with torch.inference_mode():
                    shared = self._shared_expert(layer, x)
                routed = yield ("finish", handle)
                with torch.inference_mode():
                    h = h + (routed if shared is None else routed + shared)
            else:
                with torch.inference_mode(), timer("dense_mlp"):
                    h = h + swiglu(x, w[f"{p}.mlp.gate_proj.weight"], w[f"{p}.mlp.up_proj.weight"],
                                   w[f"{p}.mlp.down_proj.weight"])
        with torch.inference_mode(), timer("lm_head"):
            h = rms_norm(h[meta.last_index], w["model.norm.weight"], spec.rms_eps)
            return F.linear(h, w["lm_head.weight"]).float()

    def _attention(self, layer: int, x: torch.Tensor, meta: AttentionBatch, cache: KVCache) -> torch.Tensor:
        spec, w = self.spec, self.w
        p = f"model.layers.{layer}.self_attn"
        t = x.shape[0]
        q, k, v = F.linear(x, w[f"{p}.qkv.weight"], w.get(f"{p}.qkv.bias")).split(self._qkv_split, dim=-1)
        if spec.qk_norm == "full":  # OLMoE: over the whole projection, before the head split
            q = rms_norm(q, w[f"{p}.q_norm.weight"], spec.rms_eps)
            k = rms_norm(k, w[f"{p}.k_norm.weight"], spec.rms_eps)
        if spec.clip_qkv is not None:
            q, k, v = (z.clamp(-spec.clip_qkv, spec.clip_qkv) for z in (q, k, v))
        q = q.view(t, spec.num_heads, spec.head_dim)
        k = k.view(t, spec.num_kv_heads, spec.head_dim)
        v = v.view(t, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm == "head":  # Qwen3-MoE: per head
            q = rms_norm(q, w[f"{p}.q_norm.weight"], spec.rms_eps)
            k = rms_norm(k, w[f"{p}.k_norm.weight"], spec.rms_eps)
        cos, sin = meta.rotary(spec.head_dim, spec.rope_theta, q.dtype)
        q = rope(q, cos, sin)
        k = rope(k, cos, sin)
        out = paged_attention(q, k, v, cache.k[layer], cache.v[layer], meta)
        return F.linear(out.reshape(t, -1), w[f"{p}.o_proj.weight"])

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router: x [T, D] -> (topk_ids [T, A], topk_weights [T, A] in x's dtype)."""
        spec = self.spec
        logits = F.linear(x, self.w[f"{self._moe_prefix[layer]}.gate.weight"])
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_i = torch.topk(probs, spec.top_k, dim=-1)
        if spec.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return top_i, top_w.to(x.dtype)

    def _shared_expert(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Qwen2-MoE's shared expert, gated; it runs on the engine while the workers run theirs."""
        if not self.spec.shared_intermediate:
            return None
        p = self._moe_prefix[layer]
        shared = swiglu(x, self.w[f"{p}.shared_expert.gate_proj.weight"], self.w[f"{p}.shared_expert.up_proj.weight"],
                        self.w[f"{p}.shared_expert.down_proj.weight"])
        return torch.sigmoid(F.linear(x, self.w[f"{p}.shared_expert_gate.weight"])) * shared


# ("start", layer, x, topk_ids, topk_weights) | ("finish", handle); sent: handle | output; returns logits
ModelSteps = Generator[tuple, object, torch.Tensor]


def run_steps(passes: list[ModelSteps], experts: ExpertBackend, timer: StepProfile = NO_PROFILE) -> list[torch.Tensor]:
    """Drive forward passes to their logits. With one pass this is a plain forward; with two
    (micro-batches of one step), while the workers run one pass's experts the engine runs the other
    pass's attention, so neither side waits for the other."""
    start = getattr(experts, "start", None)
    finish = getattr(experts, "finish", None)
    if start is None:   # a backend without the split: compute at start, hand back at finish
        start, finish = (lambda *call: experts(*call)), (lambda handle: handle)
    results: list[torch.Tensor | None] = [None] * len(passes)
    waiting: deque[tuple[int, object]] = deque()

    def advance(i: int, value: object) -> None:
        """Run pass i until it must wait for its experts (queued) or ends (result kept)."""
        try:
            msg = passes[i].send(value)
            while msg[0] == "start":
                with torch.inference_mode(), timer("experts"):
                    handle = start(*msg[1:])
                msg = passes[i].send(handle)
            waiting.append((i, msg[1]))
        except StopIteration as done:
            results[i] = done.value

    try:
        for i in range(len(passes)):
            advance(i, None)
        while waiting:
            i, handle = waiting.popleft()
            with torch.inference_mode(), timer("experts"):
                out = finish(handle)
            advance(i, out)
    except BaseException:
        abandon = getattr(experts, "abandon", None)
        for _, handle in waiting:   # replies still owed on the links must be read before a retry
            if abandon is not None:
                abandon(handle)
        raise
    return results  # type: ignore[return-value]
