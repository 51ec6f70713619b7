"""Checkpoint reading: the families we serve, the ones we refuse, bfloat16, sharded files, and who
reads which tensors (the engine no expert, each worker only its own)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from experts.model.checkpoint import Checkpoint, is_expert_tensor
from experts.model.demo import write_demo_model
from experts.model.spec import load_spec
from tests.conftest import TINY, generate, running_server


def test_unsupported_architecture_is_refused_naming_the_supported(tiny_models, tmp_path):
    d = tmp_path / "llama"
    shutil.copytree(tiny_models["mixtral"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        load_spec(d)
    for name in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM"):
        assert name in str(err.value)
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(d), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not supported" in done.stderr and "Traceback" not in done.stderr


def test_sharded_checkpoint_and_engine_reads_no_expert(tiny_models):
    d = tiny_models["qwen2_moe"]
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 1
    spec = load_spec(d)
    dense = Checkpoint(d).dense_state(torch.float32)
    assert not [n for n in dense if is_expert_tensor(n)]
    assert "model.layers.0.mlp.shared_expert.up_proj.weight" in dense   # the shared expert is the engine's
    gate, up, down = Checkpoint(d).expert(spec, 1, 5)
    assert gate.shape == (spec.expert_intermediate, spec.hidden) and down.shape == (spec.hidden, spec.expert_intermediate)


def test_workers_hold_only_their_experts(tiny_models, ray_local):
    import ray

    with running_server(tiny_models["mixtral"], workers=3) as server:
        topo = server.controller.topology
        per_expert = server.spec.expert_bytes
        for w, live in server.controller._live.items():
            stats = ray.get(live.handle.stats.remote())
            held = topo.placement.held_by(w)
            assert [layer["installed"] for layer in stats["slots"]["layers"]] == [list(x) for x in held]
            assert stats["used_bytes"] == per_expert * sum(len(x) for x in held)


def test_bfloat16_checkpoint_serves_the_same_at_any_worker_count(tmp_path, ray_local):
    from dataclasses import replace

    d = write_demo_model(tmp_path / "bf16", "qwen3_moe", seed=3, shape=replace(TINY, dtype="bfloat16"))
    spec = load_spec(d)
    assert spec.dtype == "bfloat16"
    prompt = [5, 17, 33, 100, 7]
    with running_server(d, workers=1) as server:
        one = generate(server.channel, prompt, max_tokens=24, ignore_eos=True)[0]
        server.scale(3)
        three = generate(server.channel, prompt, max_tokens=24, ignore_eos=True)[0]
    assert len(one) == 24 and one == three
    # and the first token is transformers' own bfloat16 greedy choice
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    with torch.no_grad():
        assert int(hf(torch.tensor([prompt])).logits[0, -1].argmax()) == one[0]
