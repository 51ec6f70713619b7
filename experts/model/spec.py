"""What a checkpoint's `config.json` says, normalised across the supported MoE families.

Words: a *logical expert* is `(layer, expert)` as numbered in the checkpoint, where `layer` is the
decoder layer index. Only decoder layers with a sparse MoE block have experts (`moe_layers`);
Qwen2-MoE and Qwen3-MoE may keep some layers dense (`mlp_only_layers`, `decoder_sparse_step`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# architecture name in config.json -> family
FAMILIES: dict[str, str] = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
}
MODEL_TYPES = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate: int
    dense_intermediate: int          # for dense layers (mlp_only_layers)
    shared_intermediate: int         # Qwen2-MoE shared expert; 0 = none
    moe_layers: tuple[int, ...]      # decoder layer indices with sparse MoE blocks
    norm_topk_prob: bool
    qkv_bias: bool
    qk_norm: str                     # "" | "head" (Qwen3-MoE) | "full" (OLMoE)
    clip_qkv: float | None
    rms_eps: float
    rope_theta: float
    max_position: int
    tie_embeddings: bool
    eos_token_ids: tuple[int, ...]
    dtype: str                       # "float32" | "bfloat16"

    def __post_init__(self) -> None:
        if self.family not in MODEL_TYPES:
            raise ValueError(f"unsupported family {self.family!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be in [1, {self.num_experts}]")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; use one of {DTYPES}")
        if not self.moe_layers:
            raise ValueError("the checkpoint has no sparse MoE layer")

    @property
    def expert_bytes(self) -> int:
        """Bytes of one logical expert (gate, up, down)."""
        elem = 4 if self.dtype == "float32" else 2
        return 3 * self.hidden * self.expert_intermediate * elem

    @property
    def moe_index(self) -> dict[int, int]:
        """decoder layer -> position among the MoE layers (the planner's layer axis)."""
        return {layer: i for i, layer in enumerate(self.moe_layers)}


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise ValueError(f"rope type {kind!r} is not supported (only the default rotary embedding)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _eos(cfg: dict[str, Any], vocab: int) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return tuple(i for i in ids if 0 <= i < vocab)


def load_spec(model_dir: str | Path, dtype: str | None = None) -> ModelSpec:
    """Read `config.json` of a checkpoint directory; refuse anything but the supported families."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{model_dir}: no config.json (expected a Hugging Face checkpoint directory)")
    cfg = json.loads(path.read_text())
    archs = cfg.get("architectures") or []
    family = cfg.get("model_type")
    if family not in MODEL_TYPES:
        supported = ", ".join(sorted(FAMILIES))
        raise ValueError(f"{model_dir}: architecture {archs or family!r} is not supported; "
                         f"supported: {supported}")
    if cfg.get("use_sliding_window") or (family == "mixtral" and cfg.get("sliding_window")):
        # Served as full attention would differ from the model past the window: refuse, do not guess.
        raise ValueError(f"{model_dir}: sliding-window attention is not supported")
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    layers = int(cfg["num_hidden_layers"])
    if family == "mixtral":
        experts, expert_inter = int(cfg["num_local_experts"]), int(cfg["intermediate_size"])
    elif family == "olmoe":
        experts, expert_inter = int(cfg["num_experts"]), int(cfg["intermediate_size"])
    else:
        experts, expert_inter = int(cfg["num_experts"]), int(cfg["moe_intermediate_size"])
    if family in ("qwen2_moe", "qwen3_moe"):
        step = int(cfg.get("decoder_sparse_step", 1))
        dense = set(cfg.get("mlp_only_layers") or [])
        moe_layers = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
    else:
        moe_layers = tuple(range(layers))
    vocab = int(cfg["vocab_size"])
    torch_dtype = dtype or str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return ModelSpec(
        family=family,
        vocab_size=vocab,
        hidden=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        num_experts=experts,
        top_k=int(cfg["num_experts_per_tok"]),
        expert_intermediate=expert_inter,
        dense_intermediate=int(cfg.get("intermediate_size", 0)),
        shared_intermediate=int(cfg.get("shared_expert_intermediate_size", 0)) if family == "qwen2_moe" else 0,
        moe_layers=moe_layers,
        norm_topk_prob=True if family == "mixtral" else bool(cfg.get("norm_topk_prob", False)),
        qkv_bias=bool(cfg.get("qkv_bias", True)) if family == "qwen2_moe" else bool(cfg.get("attention_bias", False)),
        qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(family, ""),
        clip_qkv=cfg.get("clip_qkv") if family == "olmoe" else None,
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg),
        max_position=int(cfg.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=_eos(cfg, vocab),
        dtype=torch_dtype,
    )
