"""One engine step (server/engine/step.py): a step split in micro-batches gives the logits of the
whole batch at once, and a step that fails between starting and finishing the experts leaves no
started exchange owed (each is finished or abandoned exactly once, oldest first)."""
from __future__ import annotations

import pytest
import torch

from experts.model.attention import AttentionBatch
from experts.model.backend import WorkerLost
from experts.model.checkpoint import Checkpoint
from experts.model.decoder import MoEModel
from experts.model.kv_cache import KVCache
from experts.model.local_experts import LocalExperts
from experts.model.spec import load_spec
from server.engine.step import ModelRunner, StepInput

BS = 4
PROMPTS = ([5, 17, 33], [100, 7, 9, 11, 250, 3, 44], [8, 19])


def setup(model_dir):
    spec = load_spec(model_dir)
    ck = Checkpoint(model_dir)

    def lookup(layer, e):
        gate, up, down = ck.expert(spec, spec.moe_layers[layer], e)
        return torch.cat([gate, up]), down

    return spec, MoEModel(spec, ck.dense_state(torch.float32)), lookup


def inputs(prompts, first_block):
    tables = [list(range(first_block + 4 * i, first_block + 4 * i + 4)) for i in range(len(prompts))]
    lens = [len(p) for p in prompts]
    batch = AttentionBatch.build(lens, lens, tables, BS)
    return StepInput(torch.tensor([t for p in prompts for t in p]), batch)


def test_micro_batches_equal_one_batch(tiny_models):
    spec, model, lookup = setup(tiny_models["qwen2_moe"])   # a shared expert runs between start and finish
    experts = LocalExperts(lookup, spec.moe_index, spec.num_experts)
    whole = ModelRunner(model, KVCache(spec, 32, BS)).run([inputs(PROMPTS, 0)], experts)
    split = ModelRunner(model, KVCache(spec, 32, BS)).run([inputs(PROMPTS[:1], 0), inputs(PROMPTS[1:], 4)], experts)
    assert whole.shape == split.shape == (len(PROMPTS), spec.vocab_size)
    assert torch.allclose(whole, split, atol=1e-5), (whole - split).abs().max()
    counts = experts.take_expert_counts()
    assert sorted(counts) == list(range(len(spec.moe_layers)))
    # every token's top-k choices were counted, once per run
    assert all(int(c.sum()) == 2 * sum(map(len, PROMPTS)) * spec.top_k for c in counts.values())
    assert experts.take_expert_counts() == {}


class FailingFinish(LocalExperts):
    """The reference backend with one failure: `finish` of the n-th started call raises WorkerLost
    (what a transport raises when a worker dies mid-exchange). Records what was settled."""

    def __init__(self, *args, fail_at: int) -> None:
        super().__init__(*args)
        self.fail_at = fail_at
        self.started: list[object] = []
        self.finished: list[object] = []
        self.abandoned: list[object] = []

    def start(self, *args):
        handle = super().start(*args)
        self.started.append(handle)
        return handle

    def finish(self, handle):
        self.finished.append(handle)
        if len(self.finished) == self.fail_at:
            raise WorkerLost("w1", "reply on layer 0: peer closed the connection")
        return super().finish(handle)

    def abandon(self, handle):
        self.abandoned.append(handle)


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_failed_step_settles_every_started_call_once(tiny_models, fail_at):
    spec, model, lookup = setup(tiny_models["mixtral"])
    experts = FailingFinish(lookup, spec.moe_index, spec.num_experts, fail_at=fail_at)
    runner = ModelRunner(model, KVCache(spec, 32, BS))
    with pytest.raises(WorkerLost):
        runner.run([inputs(PROMPTS[:1], 0), inputs(PROMPTS[1:], 4)], experts)
    settled = experts.finished + experts.abandoned
    assert sorted(map(id, settled)) == sorted(map(id, experts.started)), "a started call left owed or settled twice"
    # both micro-batches start each layer before the first finishes; the failed finish is not abandoned
    assert experts.finished[-1] is experts.started[fail_at - 1]
    assert list(map(id, experts.abandoned)) == list(map(id, experts.started[fail_at:]))
