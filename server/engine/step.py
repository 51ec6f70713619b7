"""One engine step through the model, in one place: the decoder's named phases layer by layer, the
expert backend started and finished around the engine's own share of each MoE layer.

A step may come in micro-batches (`--overlap`): at each layer every micro-batch runs its attention
and starts its experts, then each in turn finishes. So while the workers compute one micro-batch's
experts the engine runs the next one's attention. With one micro-batch this is the plain forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from experts.model.attention import AttentionBatch, StepAttention
from experts.model.backend import ExpertBackend
from experts.model.decoder import MoEModel
from experts.model.kv_cache import KVCache
from experts.model.profile import NO_PROFILE, StepProfile


@dataclass(frozen=True)
class StepInput:
    """One micro-batch: its new tokens [T] laid flat and their attention batch."""
    input_ids: torch.Tensor
    batch: AttentionBatch


@dataclass
class _InFlight:
    """A micro-batch between its layers: the residual stream, and at an MoE layer the normed
    input of its experts and the backend's handle for them."""
    attn: StepAttention
    h: torch.Tensor
    x: torch.Tensor | None = None
    handle: object = None


class ModelRunner:
    def __init__(self, model: MoEModel, cache: KVCache, profile: StepProfile = NO_PROFILE) -> None:
        self.model = model
        self.cache = cache
        self.profile = profile

    @torch.inference_mode()
    def run(self, inputs: list[StepInput], experts: ExpertBackend) -> torch.Tensor:
        """Logits [B, V] of every sequence's last new token, micro-batches in order. A failure
        (e.g. WorkerLost) leaves no exchange owed on the backend."""
        model, prof = self.model, self.profile
        with prof("inputs"):
            flights = [_InFlight(self.cache.prepare(i.batch), model.embed(i.input_ids)) for i in inputs]
        for layer in range(model.spec.num_layers):
            if model.is_moe(layer):
                self._moe_layer(layer, flights, experts)
                continue
            for f in flights:
                with prof("attention"):
                    f.h, x = model.attention_block(layer, f.h, f.attn, self.cache)
                with prof("dense_mlp"):
                    f.h = f.h + model.dense_mlp(layer, x)
        with prof("lm_head"):
            return torch.cat([model.logits(f.h, f.attn.batch) for f in flights])

    def _moe_layer(self, layer: int, flights: list[_InFlight], experts: ExpertBackend) -> None:
        model, prof = self.model, self.profile
        started: list[_InFlight] = []     # handles owed, oldest first: finished or abandoned in order
        try:
            for f in flights:
                with prof("attention"):
                    f.h, f.x = model.attention_block(layer, f.h, f.attn, self.cache)
                with prof("router"):
                    topk_ids, topk_weights = model.route(layer, f.x)
                with prof("experts"):
                    f.handle = experts.start(layer, f.x, topk_ids, topk_weights)
                started.append(f)
            while started:
                f = started[0]
                with prof("shared_expert"):   # on the engine, while the workers run theirs
                    shared = model.shared_expert(layer, f.x)
                started.pop(0)     # finish settles the handle whether it returns or raises
                with prof("experts"):
                    routed = experts.finish(f.handle)
                f.h = f.h + (routed if shared is None else routed + shared)
        except BaseException:
            for f in started:
                experts.abandon(f.handle)
            raise
