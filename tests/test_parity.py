"""Our tokens equal transformers' greedy tokens, for every family, at 1, 2 and 3 workers, through
real gRPC and real Ray workers; and one forward pass's float32 logits match within 1e-4."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import grpc
import pytest
import torch

from experts.model.attention import AttentionBatch
from experts.model.checkpoint import Checkpoint
from experts.model.decoder import MoEModel
from experts.model.kv_cache import KVCache
from experts.model.local_experts import LocalExperts
from experts.model.spec import load_spec
from server.engine.step import ModelRunner, StepInput
from experts.model.demo import write_demo_model
from tests.conftest import FAMILIES, TINY, generate, running_server

PROMPTS = ([5, 17, 33], [100, 7, 9, 11, 250, 3, 44, 61, 8, 19, 27], list(range(40, 90)))
NEW_TOKENS = 32


def hf_greedy(model_dir, prompt: list[int]) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # like our ignore_eos: EOS is an ordinary token (min_new_tokens would mask it out instead)
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert out.shape[1] == len(prompt) + NEW_TOKENS
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny_models, family):
    from transformers import AutoModelForCausalLM

    d = tiny_models[family]
    spec = load_spec(d)
    ck = Checkpoint(d)
    model = MoEModel(spec, ck.dense_state(torch.float32))

    def lookup(layer, e):
        gate, up, down = ck.expert(spec, spec.moe_layers[layer], e)
        return torch.cat([gate, up]), down

    experts = LocalExperts(lookup, spec.moe_index, spec.num_experts)
    prompt = PROMPTS[1]
    cache = KVCache(spec, num_blocks=8, block_size=4)
    meta = AttentionBatch.build([len(prompt)], [len(prompt)], [[3, 1, 6, 0]], 4)  # scattered blocks
    ours = ModelRunner(model, cache).run([StepInput(torch.tensor(prompt), meta)], experts)[0]
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1]
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_transformers_at_1_2_3_workers(tiny_models, ray_local, family):
    d = tiny_models[family]
    expected = [hf_greedy(d, p) for p in PROMPTS]
    with running_server(d, workers=1) as server:
        for workers in (1, 2, 3):
            if workers > 1:
                server.scale(workers)
            assert len(server.controller.topology.workers) == workers
            for prompt, want in zip(PROMPTS, expected):
                got, _, last = generate(server.channel, prompt, max_tokens=NEW_TOKENS, ignore_eos=True)
                assert got == want, f"{family} at {workers} workers, prompt of {len(prompt)}"
                assert last.completion_tokens == NEW_TOKENS and last.prompt_tokens == len(prompt)
        # concurrent requests get the same tokens as each alone
        with ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(generate, server.channel, p, max_tokens=NEW_TOKENS, ignore_eos=True)
                    for p in PROMPTS * 2]
            for fut, want in zip(futs, expected * 2):
                assert fut.result()[0] == want


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_overlapped_micro_batches_give_the_same_tokens(tiny_models, ray_local, family):
    """--overlap splits each step in two micro-batches; every stream's tokens stay transformers'."""
    d = tiny_models[family]
    expected = [hf_greedy(d, p) for p in PROMPTS]
    with running_server(d, workers=2, overlap=True) as server:
        with ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(generate, server.channel, p, max_tokens=NEW_TOKENS, ignore_eos=True)
                    for p in PROMPTS * 2]
            for fut, want in zip(futs, expected * 2):
                assert fut.result()[0] == want
        server.scale(3)   # a change of topology between micro-batched steps
        assert generate(server.channel, PROMPTS[1], max_tokens=NEW_TOKENS, ignore_eos=True)[0] == expected[1]
        routed = server.engine.expert_load.sum()
        assert routed > 0


# head_dim 32 (TINY's is 16, which vLLM's CPU attention does not tile): a shape its kernels serve
KERNEL_SHAPE = dataclasses.replace(TINY, hidden=128, heads=4, kv_heads=2)
ATTENTION_LOG = {"default": "attention: vLLM CPU kernels", "torch": "attention: pure-torch reference"}


@contextlib.contextmanager
def served(model_dir, env: dict[str, str], log_path) -> Iterator[grpc.Channel]:
    """`elasticmoe serve` in its own process (the attention path is chosen once per process),
    2 workers, its log in `log_path`; the channel once it is SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from server.bench.common import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--workers", "2",
           "--port", str(port), "--metrics-port", "-1", "--http-port", "-1", "--ray-num-cpus", "4"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, open(log_path).read()[-3000:]
            assert time.monotonic() < deadline, "server not SERVING in 300 s"
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        yield channel
    finally:
        channel.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)   # the group this test started: server, Ray, workers
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_vllm_and_torch_attention_give_transformers_tokens(tmp_path, family):
    """The same checkpoint served twice: vLLM's CPU attention (the default) and the pure-torch path
    (ELASTICMOE_KERNELS=torch). Concurrent streams mix prefill and decode of ragged lengths in one
    step; every stream's greedy tokens equal transformers' on both, and each log names its path."""
    d = write_demo_model(tmp_path / family, family, seed=7, shape=KERNEL_SHAPE)
    assert load_spec(d).head_dim == 32
    expected = [hf_greedy(d, p) for p in PROMPTS]
    base = {k: v for k, v in os.environ.items() if k != "ELASTICMOE_KERNELS"}
    for path, env in (("default", base), ("torch", dict(base, ELASTICMOE_KERNELS="torch"))):
        log_path = tmp_path / f"{path}.log"
        with served(d, env, log_path) as channel:
            with ThreadPoolExecutor(6) as pool:
                futs = [pool.submit(generate, channel, p, max_tokens=NEW_TOKENS, ignore_eos=True) for p in PROMPTS * 2]
                for fut, want in zip(futs, expected * 2):
                    assert fut.result()[0] == want, f"{family}, {path} attention"
        assert ATTENTION_LOG[path] in log_path.read_text(), f"{path}: the server did not log its attention path"
