"""What a checkpoint's config says, normalised across the supported MoE families.

The config is parsed by transformers' own config classes (`AutoConfig`), so every key spelling and
default transformers accepts is accepted here too (Qwen3-MoE's `num_local_experts` beside
`num_experts`, `rope_parameters` beside the older `rope_theta` / `rope_scaling`). Parsed once, on
the engine: workers receive the `ModelSpec` (plain values, cheap to send through Ray) and never
import transformers, whose import costs seconds a worker's start would pay.

Words: a *logical expert* is `(layer, expert)` as numbered in the checkpoint, where `layer` is the
decoder layer index. Only decoder layers with a sparse MoE block have experts (`moe_layers`);
Qwen2-MoE and Qwen3-MoE may keep some layers dense (`mlp_only_layers`, `decoder_sparse_step`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# architecture name in config.json -> family (transformers' model_type)
FAMILIES: dict[str, str] = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
}
MODEL_TYPES = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}
DTYPES = ("float32", "bfloat16")
# The sizes a checkpoint must state itself (in any spelling transformers accepts): transformers
# would fill a missing one with its class default (a real model's size), which could only match
# the tensors by accident.
_REQUIRED = {
    "mixtral": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_local_experts",
                "num_experts_per_tok", "intermediate_size"),
    "qwen2_moe": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
                  "num_experts_per_tok", "moe_intermediate_size"),
    "qwen3_moe": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_local_experts",
                  "num_experts_per_tok", "moe_intermediate_size"),
    "olmoe": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
              "num_experts_per_tok", "intermediate_size"),
}


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
        sizes = {"vocab_size": self.vocab_size, "hidden_size": self.hidden, "num_hidden_layers": self.num_layers,
                 "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                 "head_dim": self.head_dim, "num_experts": self.num_experts,
                 "expert intermediate_size": self.expert_intermediate,
                 "max_position_embeddings": self.max_position}
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        for name, value in {"intermediate_size": self.dense_intermediate,
                            "shared_expert_intermediate_size": self.shared_intermediate}.items():
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be in [1, {self.num_experts}]")
        if not self.rms_eps > 0:   # also NaN
            raise ValueError(f"rms_norm_eps={self.rms_eps} must be > 0")
        if not 0 < self.rope_theta < float("inf"):
            raise ValueError(f"rope_theta={self.rope_theta} must be a positive number")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise ValueError(f"clip_qkv={self.clip_qkv} must be > 0 or null")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; use one of {DTYPES}")
        if not self.moe_layers:
            raise ValueError("the checkpoint has no sparse MoE layer")
        if any(not 0 <= layer < self.num_layers for layer in self.moe_layers):
            raise ValueError(f"moe_layers {self.moe_layers} outside [0, {self.num_layers})")

    @property
    def expert_bytes(self) -> int:
        """Bytes of one logical expert (gate, up, down)."""
        elem = 4 if self.dtype == "float32" else 2
        return 3 * self.hidden * self.expert_intermediate * elem

    @property
    def moe_index(self) -> dict[int, int]:
        """decoder layer -> position among the MoE layers (the planner's layer axis)."""
        return {layer: i for i, layer in enumerate(self.moe_layers)}


def _one_line(exc: BaseException) -> str:
    return re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({_one_line(exc)})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _hf_config(model_dir: Path) -> Any:
    """transformers' config object of the checkpoint; ValueError in one line for anything it refuses."""
    # imported here, not at module level: only the engine parses configs (see the module docstring)
    import transformers
    from transformers import AutoConfig

    hf_logging = transformers.utils.logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # its warnings would break the one-line error of a refused config
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as exc:   # bad types, unknown model_type, ...: the user's file, not our bug
        raise ValueError(f"{model_dir}/config.json: {_one_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _check_sizes_stated(raw: dict[str, Any], cfg: Any, path: Path) -> None:
    aliases: dict[str, str] = dict(type(cfg).attribute_map)   # alias -> attribute
    for name in _REQUIRED[cfg.model_type]:
        spellings = {name} | {a for a, attr in aliases.items() if attr == name} | {aliases.get(name, name)}
        if not spellings & raw.keys():
            raise ValueError(f"{path}: {' / '.join(sorted(spellings))} is missing")


def _rope_theta(cfg: Any) -> float:
    # transformers >= 5 folds the older rope_theta / rope_scaling keys into rope_parameters
    params = cfg.rope_parameters or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise ValueError(f"rope type {kind!r} is not supported (only the default rotary embedding)")
    return float(params["rope_theta"])


def _eos(eos: int | list[int] | None, vocab: int) -> tuple[int, ...]:
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return tuple(int(i) for i in ids if 0 <= i < vocab)


def _moe_layers(cfg: Any, family: str) -> tuple[int, ...]:
    layers = range(cfg.num_hidden_layers)
    if family in ("qwen2_moe", "qwen3_moe"):
        step = cfg.decoder_sparse_step
        if step < 1:
            raise ValueError(f"decoder_sparse_step={step} must be >= 1")
        dense = set(cfg.mlp_only_layers or [])
        return tuple(i for i in layers if i not in dense and (i + 1) % step == 0)
    return tuple(layers)


def load_spec(model_dir: str | Path, dtype: str | None = None) -> ModelSpec:
    """Read a checkpoint directory's `config.json` through transformers; refuse anything but the
    supported families, and any config transformers refuses, with a one-line ValueError."""
    d = Path(model_dir)
    path = d / "config.json"
    if not path.is_file():
        raise ValueError(f"{model_dir}: no config.json (expected a Hugging Face checkpoint directory)")
    raw = _read_json(path)
    family = raw.get("model_type")
    if family not in MODEL_TYPES:
        # checked before transformers sees it: an unknown model_type would get its multi-line advice
        supported = ", ".join(sorted(FAMILIES))
        raise ValueError(f"{model_dir}: architecture {raw.get('architectures') or family!r} is not supported; "
                         f"supported: {supported}")
    cfg = _hf_config(d)
    _check_sizes_stated(raw, cfg, path)
    if cfg.hidden_act != "silu":
        raise ValueError(f"{path}: hidden_act {cfg.hidden_act!r} is not supported (only silu)")
    # the family's own names (each config class has exactly these attributes)
    if family == "mixtral":
        experts, expert_inter, qkv_bias, sliding = cfg.num_local_experts, cfg.intermediate_size, False, cfg.sliding_window
    elif family == "olmoe":
        experts, expert_inter, qkv_bias, sliding = cfg.num_experts, cfg.intermediate_size, cfg.attention_bias, None
    elif family == "qwen2_moe":
        experts, expert_inter, qkv_bias, sliding = cfg.num_experts, cfg.moe_intermediate_size, cfg.qkv_bias, \
            cfg.use_sliding_window
    else:
        experts, expert_inter, qkv_bias, sliding = cfg.num_experts, cfg.moe_intermediate_size, cfg.attention_bias, \
            cfg.use_sliding_window
    if sliding:
        # Served as full attention would differ from the model past the window: refuse, do not guess.
        raise ValueError(f"{model_dir}: sliding-window attention is not supported")
    heads = cfg.num_attention_heads
    if heads < 1:
        raise ValueError(f"{path}: num_attention_heads={heads} must be >= 1")
    torch_dtype = cfg.dtype
    try:
        return ModelSpec(
            family=family,
            vocab_size=cfg.vocab_size,
            hidden=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=cfg.num_key_value_heads or heads,
            # as transformers' own modelling code reads it: absent or null means hidden / heads
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            num_experts=experts,
            top_k=cfg.num_experts_per_tok,
            expert_intermediate=expert_inter,
            dense_intermediate=cfg.intermediate_size or 0,
            shared_intermediate=(cfg.shared_expert_intermediate_size or 0) if family == "qwen2_moe" else 0,
            moe_layers=_moe_layers(cfg, family),
            norm_topk_prob=True if family == "mixtral" else bool(cfg.norm_topk_prob),
            qkv_bias=bool(qkv_bias),
            qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(family, ""),
            clip_qkv=None if family != "olmoe" or cfg.clip_qkv is None else float(cfg.clip_qkv),
            rms_eps=float(cfg.rms_norm_eps),
            rope_theta=_rope_theta(cfg),
            max_position=cfg.max_position_embeddings,
            tie_embeddings=bool(cfg.tie_word_embeddings),
            eos_token_ids=_eos(cfg.eos_token_id, cfg.vocab_size),
            dtype=dtype or (str(torch_dtype).removeprefix("torch.") if torch_dtype is not None else "float32"),
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
