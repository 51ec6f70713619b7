"""Small random-weight checkpoints in each family's real on-disk format.

No model can be downloaded here, so tests and `make serve` build their own: `config.json` as the
family's Hugging Face config, tensors under the family's real names in safetensors shards with an
index, and a byte-level BPE `tokenizer.json`. `transformers` loads them as it loads the real ones.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from experts.model.checkpoint import expert_tensor_names, moe_prefix
from experts.model.dtypes import TORCH_DTYPES
from experts.model.spec import load_spec

FAMILY_ARCH = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}

_CORPUS = """\
Once upon a time, in a city of glass towers, a small team built a server that could grow and
shrink while it spoke. The experts moved from one worker to another, and the streams of words
never stopped. Requests arrived, tokens flowed, and the engine counted every step. When the load
rose the controller asked for more workers; when it fell the workers went home. The quick brown
fox jumps over the lazy dog. Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 2026 appear too, and so do
words in other tongues: café, naïve, über, smörgåsbord, 東京, 北京, こんにちは, привет, 🙂.
def forward(x): return x * 2 + 1  # code shows up in prompts as well
"""


@dataclass(frozen=True)
class DemoShape:
    hidden: int = 512
    layers: int = 8
    experts: int = 8
    top_k: int = 2
    intermediate: int = 1024
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 2048            # upper bound; the tokenizer decides the real size
    max_position: int = 4096
    dtype: str = "float32"
    shard_mb: int = 256

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "experts", "top_k", "intermediate", "heads", "kv_heads", "vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden={self.hidden}, heads={self.heads}, kv_heads={self.kv_heads} do not divide")
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} > experts={self.experts}")


# A plain chat format, so the demo serves /v1/chat/completions: one line per message, each closed
# by the end-of-sequence token, and the assistant's turn opened when a reply is wanted.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def train_tokenizer(vocab: int) -> "object":
    """A byte-level BPE `tokenizers.Tokenizer` of at most `vocab` tokens, with `<s>` and `</s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


def _config(family: str, s: DemoShape, vocab: int, eos: int, bos: int) -> dict:
    cfg = {
        "architectures": [FAMILY_ARCH[family]], "model_type": family, "vocab_size": vocab,
        "hidden_size": s.hidden, "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "num_experts_per_tok": s.top_k, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": s.max_position, "tie_word_embeddings": False,
        "hidden_act": "silu", "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": s.dtype,
        "initializer_range": 0.02, "attention_dropout": 0.0,
    }
    if family == "mixtral":
        cfg.update(num_local_experts=s.experts, intermediate_size=s.intermediate, sliding_window=None,
                   router_jitter_noise=0.0)
    elif family == "olmoe":
        cfg.update(num_experts=s.experts, intermediate_size=s.intermediate, norm_topk_prob=False,
                   clip_qkv=None, attention_bias=False)
    else:
        cfg.update(num_experts=s.experts, moe_intermediate_size=s.intermediate,
                   intermediate_size=2 * s.intermediate, decoder_sparse_step=1, mlp_only_layers=[],
                   norm_topk_prob=family == "qwen3_moe", use_sliding_window=False)
        if family == "qwen2_moe":
            cfg.update(shared_expert_intermediate_size=s.intermediate, qkv_bias=True)
        else:
            cfg.update(head_dim=s.hidden // s.heads, attention_bias=False)
    return cfg


def _tensors(model_dir: Path, gen: torch.Generator, dtype: torch.dtype):
    """Yield (name, tensor) for every tensor of the checkpoint, in a stable order."""
    spec = load_spec(model_dir)
    d, hd = spec.hidden, spec.head_dim
    q_out, kv_out = spec.num_heads * hd, spec.num_kv_heads * hd

    def rand(*shape: int, std: float = 0.05) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, generator=gen)).to(dtype)

    yield "model.embed_tokens.weight", rand(spec.vocab_size, d, std=1.0)
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}"
        yield f"{p}.input_layernorm.weight", ones(d)
        yield f"{p}.post_attention_layernorm.weight", ones(d)
        a = f"{p}.self_attn"
        for proj, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            yield f"{a}.{proj}.weight", rand(out, d)
            if spec.qkv_bias:
                yield f"{a}.{proj}.bias", rand(out, std=0.02)
        yield f"{a}.o_proj.weight", rand(d, q_out)
        if spec.qk_norm:
            yield f"{a}.q_norm.weight", ones(hd if spec.qk_norm == "head" else q_out)
            yield f"{a}.k_norm.weight", ones(hd if spec.qk_norm == "head" else kv_out)
        m = moe_prefix(spec, layer)
        yield f"{m}.gate.weight", rand(spec.num_experts, d, std=0.2)
        for e in range(spec.num_experts):
            gate, up, down = expert_tensor_names(spec, layer, e)
            yield gate, rand(spec.expert_intermediate, d)
            yield up, rand(spec.expert_intermediate, d)
            yield down, rand(d, spec.expert_intermediate)
        if spec.shared_intermediate:
            for proj, shape in (("gate_proj", (spec.shared_intermediate, d)), ("up_proj", (spec.shared_intermediate, d)),
                                ("down_proj", (d, spec.shared_intermediate))):
                yield f"{m}.shared_expert.{proj}.weight", rand(*shape)
            yield f"{m}.shared_expert_gate.weight", rand(1, d)
    yield "model.norm.weight", ones(d)
    yield "lm_head.weight", rand(spec.vocab_size, d, std=0.1)


def write_demo_model(model_dir: str | Path, family: str = "mixtral", seed: int = 0,
                     shape: DemoShape = DemoShape(), progress: Callable[[str], None] | None = None) -> Path:
    """Write a random-weight checkpoint of `family` into `model_dir` and return its path."""
    if family not in FAMILY_ARCH:
        raise ValueError(f"family {family!r} is not one of {sorted(FAMILY_ARCH)}")
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(shape.vocab)
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    cfg = _config(family, shape, vocab, eos=tok.token_to_id("</s>"), bos=tok.token_to_id("<s>"))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    gen = torch.Generator().manual_seed(seed)
    dtype = TORCH_DTYPES[shape.dtype]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, limit = 0, shape.shard_mb << 20
    for name, tensor in _tensors(out, gen, dtype):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        if progress:
            progress(f"wrote {fname} ({i + 1}/{len(shards)})")
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return out
