"""Checkpoints as transformers itself writes them (`save_pretrained` of the installed version) load,
serve transformers' own greedy tokens through a real server, and never make a worker import
transformers; a config transformers or we refuse is a one-line error and exit 2 from `serve`."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experts.model.demo import CHAT_TEMPLATE, train_tokenizer
from experts.model.spec import load_spec
from tests.conftest import FAMILIES, generate, running_server
from tests.test_parity import hf_greedy

PROMPTS = ([5, 17, 33], [100, 7, 9, 11, 250, 3, 44, 61, 8, 19, 27])
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             num_experts_per_tok=2, max_position_embeddings=1024,
             initializer_range=0.2)   # well apart logits: greedy choices are no near-ties


def save_hf_checkpoint(out: Path, family: str, seed: int = 11) -> Path:
    """A random model built and saved by transformers' own classes, with a tokenizer beside it."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = train_tokenizer(512)
    experts = {"mixtral": dict(num_local_experts=8, intermediate_size=96),
               "olmoe": dict(num_experts=8, intermediate_size=96),
               "qwen2_moe": dict(num_experts=8, moe_intermediate_size=96, shared_expert_intermediate_size=96),
               "qwen3_moe": dict(num_experts=8, moe_intermediate_size=96)}[family]
    cfg = AutoConfig.for_model(family, vocab_size=tok.get_vocab_size(), eos_token_id=tok.token_to_id("</s>"),
                               bos_token_id=tok.token_to_id("<s>"), **SIZES, **experts)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            chat_template=CHAT_TEMPLATE).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_saved")
    return {f: save_hf_checkpoint(root / f, f) for f in FAMILIES}


def test_saved_configs_read_as_transformers_reads_them(hf_saved):
    from transformers import AutoConfig

    for family, d in hf_saved.items():
        raw = json.loads((d / "config.json").read_text())
        spec, hf = load_spec(d), AutoConfig.from_pretrained(d)
        assert spec.family == family and spec.hidden == 64 and spec.num_layers == 2
        assert spec.num_experts == 8 and spec.top_k == 2 and spec.expert_intermediate == 96
        assert spec.rope_theta == hf.rope_parameters["rope_theta"] and spec.rms_eps == hf.rms_norm_eps
        assert spec.eos_token_ids == (raw["eos_token_id"],)
    # the case: this transformers names Qwen3-MoE's expert count num_local_experts
    assert "num_local_experts" in json.loads((hf_saved["qwen3_moe"] / "config.json").read_text())


def _rewrite(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_older_spellings_give_the_same_spec(hf_saved, tmp_path):
    saved = hf_saved["qwen3_moe"]

    def older(cfg: dict) -> None:   # as transformers 4.x wrote it
        cfg["num_experts"] = cfg.pop("num_local_experts")
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
        cfg["torch_dtype"] = cfg.pop("dtype")

    assert load_spec(_rewrite(saved, tmp_path / "old", older)) == load_spec(saved)
    other = load_spec(_rewrite(saved, tmp_path / "theta", lambda c: c.update(rope_parameters={"rope_theta": 5e5, "rope_type": "default"})))
    assert other.rope_theta == 5e5
    with pytest.raises(ValueError, match="rope type 'linear' is not supported"):
        load_spec(_rewrite(saved, tmp_path / "linear", lambda c: (c.pop("rope_parameters"), c.update(
            rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0}))))


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_serves_transformers_greedy_tokens(hf_saved, ray_local, family):
    import ray

    d = hf_saved[family]
    expected = [hf_greedy(d, p) for p in PROMPTS]
    with running_server(d, workers=2) as server:
        for prompt, want in zip(PROMPTS, expected):
            assert generate(server.channel, prompt, max_tokens=len(want), ignore_eos=True)[0] == want, family
        # workers got the parsed spec from the controller: none of them imported transformers
        handles = [live.handle for live in server.controller._live.values()]
        assert len(handles) == 2
        imported = ray.get([h.__ray_call__.remote(lambda _self: "transformers" in sys.modules) for h in handles])
        assert imported == [False, False]


def _bad_configs(src: Path, root: Path) -> dict[str, tuple[Path, str]]:
    bad_json = root / "bad_json"
    shutil.copytree(src, bad_json)
    (bad_json / "config.json").write_text('{"model_type": "qwen3_moe", "hidden_size": ')
    return {
        "bad JSON": (bad_json, "not a readable JSON file"),
        "missing hidden size": (_rewrite(src, root / "no_hidden", lambda c: c.pop("hidden_size")), "hidden_size"),
        "negative value": (_rewrite(src, root / "negative", lambda c: c.update(num_hidden_layers=-2)),
                           "num_hidden_layers=-2"),
        "wrong type": (_rewrite(src, root / "wrong_type", lambda c: c.update(hidden_size="wide")), "hidden_size"),
        "unsupported architecture": (_rewrite(src, root / "llama", lambda c: c.update(
            model_type="llama", architectures=["LlamaForCausalLM"])), "not supported"),
    }


def test_malformed_configs_are_one_line_errors_with_exit_2(hf_saved, tmp_path):
    for case, (d, says) in _bad_configs(hf_saved["qwen3_moe"], tmp_path).items():
        with pytest.raises(ValueError, match=says):
            load_spec(d)
        done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(d), "--port", "0",
                               "--metrics-port", "-1"], capture_output=True, text=True, timeout=180)
        errors = [line for line in done.stderr.splitlines() if line.startswith("elasticmoe: error: ")]
        assert done.returncode == 2, (case, done.stderr)
        # one line says it all (start-up INFO logging may precede it); no traceback, no multi-line advice
        assert len(errors) == 1 and says in errors[0], (case, done.stderr)
        assert "Traceback" not in done.stderr and not done.stderr.split(errors[0])[1].strip(), (case, done.stderr)
