"""A worker that dies while serving: the requests in flight keep their KV cache and their place,
the controller replaces the lost worker's experts (from surviving copies, or from the checkpoint
where the dead worker held the only copy), and every stream completes with the tokens it would have
had. One long stream is shown to be mid-generation when the worker is dead (the engine holds it
with some but not all of its tokens) and completes with transformers' greedy tokens."""
from __future__ import annotations

import os
import signal
import time

import pytest
import ray
import torch

from experts.wire.auth import ServerSecret
from experts.wire.messages import WorkerLost
from experts.wire.ring import RingLink
from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from tests.conftest import Traffic, generate, running_server
from tests.test_wire import SPAWN, exchange, pairs, serve_child

PROMPTS = [[5, 17, 33, 8], [100, 7, 9, 11, 250, 3], list(range(40, 60)), [3, 1, 4, 1, 5, 9, 2, 6]]
LONG_PROMPT, LONG_TOKENS = [21, 8, 300, 42, 7], 160


def hf_greedy(model_dir, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None   # like ignore_eos
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_streams_survive_a_worker_killed_while_serving(tiny_models, ray_local):
    model = tiny_models["qwen3_moe"]
    long_expected = hf_greedy(model, LONG_PROMPT, LONG_TOKENS)
    with running_server(model, workers=2) as server:
        expected = [generate(server.channel, p, max_tokens=24, ignore_eos=True)[0] for p in PROMPTS]
        version = server.controller.topology.version
        victim = server.controller.topology.placement.workers[1]
        victim_handle = server.controller._live[victim].handle
        traffic = Traffic(server, PROMPTS, expected, max_tokens=24)
        long = pb_grpc.InferenceStub(server.channel).Generate(pb.GenerateRequest(
            request_id="in-flight", prompt_token_ids=LONG_PROMPT, sampling=pb.SamplingParams(max_tokens=LONG_TOKENS, ignore_eos=True)),
            timeout=300)
        first = next(long)
        streamed = list(first.token_ids)
        assert streamed and first.finish_reason == pb.FINISH_REASON_UNSPECIFIED
        ray.kill(victim_handle)   # no goodbye: the process is gone
        # ray.kill is asynchronous: a call submitted at once may still be answered; poll until the
        # worker really is dead...
        deadline = time.monotonic() + 60
        while True:
            try:
                ray.get(victim_handle.stats.remote(), timeout=10)
            except ray.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, f"worker {victim} still answers 60 s after ray.kill"
            time.sleep(0.05)
        seq = server.engine.scheduler.running.get("in-flight")
        assert seq is not None and 0 < len(seq.output) < LONG_TOKENS, "...while the long stream was mid-generation"
        last = first
        for msg in long:
            streamed += msg.token_ids
            last = msg
        assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.completion_tokens == LONG_TOKENS
        assert streamed == long_expected, "the stream in flight kept transformers' tokens"
        traffic.finish()   # no other stream failed, every one has the tokens it had before
        topo = server.controller.topology
        assert topo.version > version and victim not in topo.workers
        for layer in range(len(server.spec.moe_layers)):
            assert {e for w in topo.placement.workers for e in topo.placement.held_by(w)[layer]} == set(range(8))
        text = server.metrics.render().decode()
        assert 'elasticmoe_expert_bytes_moved_total{path="disk"}' in text
        assert [generate(server.channel, p, max_tokens=24, ignore_eos=True)[0] for p in PROMPTS] == expected


def test_a_worker_whose_process_exits_is_lost_by_its_exit_not_its_socket():
    """The engine's ring link follows the worker's process (same node, same pids): a SIGKILLed worker
    is exiting within a millisecond, while its end of the lifeline closes only once the kernel has torn
    down its address space (60-160 ms for a serving worker on 2 loaded cores). The reply it owes is not
    waited for: the link checks the process first, so the loss is named by the exit."""
    secret = ServerSecret.generate()
    parent, child_end = SPAWN.Pipe()
    child = SPAWN.Process(target=serve_child, args=(child_end, secret, f"emoe-losstest-{os.getpid()}-"))
    child.start()
    try:
        assert parent.poll(60), "the worker process did not start"
        link = RingLink("w7", parent.recv(), secret, timeout=60)
        link.follow(child.pid)
        x, ids, counts, w = pairs(1, 4, [2])
        exchange(link, 0, x, ids, counts, w)
        os.kill(child.pid, signal.SIGKILL)   # not joined: a zombie, as a dead Ray worker is until reaped
        started = time.monotonic()
        with pytest.raises(WorkerLost, match="worker w7: ring reply on layer 0: the worker's process exited"):
            exchange(link, 0, x, ids, counts, w)
        assert time.monotonic() - started < 5.0, "noticed by the timeout, not the exit"
        link.close()
    finally:
        if child.is_alive():
            child.kill()
        child.join(timeout=30)
