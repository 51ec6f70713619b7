"""The MoE decoder for every supported family, without the routed experts, as named phases.

The engine runs these (server/engine/step.py strings them into one step): `embed`, then per
decoder layer `attention_block` and either `dense_mlp` or, at an MoE layer, `route` (the routed
experts themselves are the expert backend's, experts/model/backend.py) and `shared_expert`;
finally `logits`. No parallelism in here: whether the experts are local, on one worker or on ten
is the backend's business.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from experts.kernels.linear import Linear, select_linear
from experts.kernels.pointwise import Pointwise
from experts.kernels.pointwise import ref_rms_norm as rms_norm   # q/k norms: views of the qkv output
from experts.model.attention import AttentionBatch, StepAttention
from experts.model.kv_cache import KVCache
from experts.model.spec import ModelSpec


log = logging.getLogger(__name__)


def swiglu(x: torch.Tensor, gate_up: Linear, down: Linear) -> torch.Tensor:
    """down(silu(gate x) * up x), gate and up as one matmul (one read of x)."""
    g, u = gate_up(x).chunk(2, dim=-1)
    return down(F.silu(g) * u)


class MoEModel:
    """Weights are the checkpoint's non-expert tensors, by their Hugging Face names. Every phase
    runs under torch.inference_mode (the caller need not). Every matrix becomes a `Linear`
    (experts/kernels/linear.py: vLLM's oneDNN matmul over a weight packed once, or F.linear);
    `self.w` keeps the rest (embeddings, norms)."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor]) -> None:
        self.spec = spec
        self.w = weights
        dtype = weights["model.embed_tokens.weight"].dtype
        make, why = select_linear(dtype)
        log.info("dense layers: %s (%s)", make.__name__, why)
        self.pw = Pointwise(spec.head_dim, spec.rope_theta, spec.max_position, dtype)
        log.info("norms and rotary embedding: %s", self.pw.reason)
        if spec.tie_embeddings and "lm_head.weight" not in weights:
            self.w["lm_head.weight"] = weights["model.embed_tokens.weight"]
        self.linear: dict[str, Linear] = {"lm_head": make(self.w.pop("lm_head.weight"), None)}
        # q, k and v as one matrix: one matmul reads x once instead of three times
        q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self._qkv_split = (q_out, kv_out, kv_out)
        block = "block_sparse_moe" if spec.family == "mixtral" else "mlp"
        self._moe_prefix = {layer: f"model.layers.{layer}.{block}" for layer in spec.moe_layers}
        for layer in range(spec.num_layers):
            p = f"model.layers.{layer}.self_attn"
            qkv = torch.cat([self.w.pop(f"{p}.{n}_proj.weight") for n in "qkv"])
            bias = torch.cat([self.w.pop(f"{p}.{n}_proj.bias") for n in "qkv"]) if spec.qkv_bias else None
            self.linear[f"{p}.qkv"] = make(qkv, bias)
            self.linear[f"{p}.o_proj"] = make(self.w.pop(f"{p}.o_proj.weight"), None)
            if layer in self._moe_prefix:
                m = self._moe_prefix[layer]
                self.linear[f"{m}.gate"] = make(self.w.pop(f"{m}.gate.weight"), None)
                if spec.shared_intermediate:
                    self._mlp(make, f"{m}.shared_expert")
                    self.linear[f"{m}.shared_expert_gate"] = make(self.w.pop(f"{m}.shared_expert_gate.weight"), None)
            else:
                self._mlp(make, f"model.layers.{layer}.mlp")

    def _mlp(self, make, p: str) -> None:
        """A SwiGLU MLP's three matrices as two layers: gate and up stacked, then down."""
        gate_up = torch.cat([self.w.pop(f"{p}.gate_proj.weight"), self.w.pop(f"{p}.up_proj.weight")])
        self.linear[f"{p}.gate_up"] = make(gate_up, None)
        self.linear[f"{p}.down"] = make(self.w.pop(f"{p}.down_proj.weight"), None)

    def is_moe(self, layer: int) -> bool:
        return layer in self._moe_prefix

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> hidden [T, D]."""
        return F.embedding(input_ids, self.w["model.embed_tokens.weight"])

    @torch.inference_mode()
    def attention_block(self, layer: int, h: torch.Tensor, attn: StepAttention,
                        cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream h [T, D] through the layer's attention -> (h, x), x = h normed for
        the layer's MLP or experts. Writes the step's K/V rows of this layer into the cache."""
        spec, w = self.spec, self.w
        p = f"model.layers.{layer}"
        x = self.pw.rms_norm(h, w[f"{p}.input_layernorm.weight"], spec.rms_eps)
        h = h + self._attention(layer, x, attn, cache)
        return h, self.pw.rms_norm(h, w[f"{p}.post_attention_layernorm.weight"], spec.rms_eps)

    def _attention(self, layer: int, x: torch.Tensor, attn: StepAttention, cache: KVCache) -> torch.Tensor:
        spec, w = self.spec, self.w
        p = f"model.layers.{layer}.self_attn"
        t = x.shape[0]
        q, k, v = self.linear[f"{p}.qkv"](x).split(self._qkv_split, dim=-1)
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
        b = attn.batch
        q, k = self.pw.rope(q, k, b.positions, lambda: b.rotary(spec.head_dim, spec.rope_theta, q.dtype))
        out = attn(q, k, v, cache.k[layer], cache.v[layer])
        return self.linear[f"{p}.o_proj"](out.reshape(t, -1))

    @torch.inference_mode()
    def dense_mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """A dense layer's MLP: x [T, D] -> [T, D], to add to the residual stream."""
        p = f"model.layers.{layer}.mlp"
        return swiglu(x, self.linear[f"{p}.gate_up"], self.linear[f"{p}.down"])

    @torch.inference_mode()
    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router: x [T, D] -> (topk_ids [T, A], topk_weights [T, A] in x's dtype)."""
        spec = self.spec
        logits = self.linear[f"{self._moe_prefix[layer]}.gate"](x)
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_i = torch.topk(probs, spec.top_k, dim=-1)
        if spec.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return top_i, top_w.to(x.dtype)

    @torch.inference_mode()
    def shared_expert(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Qwen2-MoE's shared expert, gated: x [T, D] -> [T, D]; None for families without one."""
        if not self.spec.shared_intermediate:
            return None
        p = self._moe_prefix[layer]
        shared = swiglu(x, self.linear[f"{p}.shared_expert.gate_up"], self.linear[f"{p}.shared_expert.down"])
        return torch.sigmoid(self.linear[f"{p}.shared_expert_gate"](x)) * shared

    @torch.inference_mode()
    def logits(self, h: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        """h [T, D] -> float32 logits [B, V] of each sequence's last new token."""
        h = self.pw.rms_norm(h[batch.last_index], self.w["model.norm.weight"], self.spec.rms_eps)
        return self.linear["lm_head"](h).float()
