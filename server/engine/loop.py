"""The engine loop: one thread that runs steps of the continuously batched model.

Everything that changes engine state arrives through its inbox (new requests, cancels, a new
topology) and is applied between two steps, so a step always runs against one topology version
and one consistent batch. Outputs go to each request's own queue, read by the gRPC servicer.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from typing import Callable

import numpy as np
import torch

from experts.model.attention import AttentionBatch
from experts.model.backend import ExpertBackend, WorkerLost
from experts.model.decoder import MoEModel
from experts.model.kv_cache import KVCache
from experts.model.profile import StepProfile
from memory.kv_blocks import KVBlockTable
from server.engine.detokenize import IncrementalDetokenizer
from server.engine.request import EngineObserver, Output, Request
from server.engine.sampling import Sampler, SamplingParams
from server.engine.scheduler import QueueFull, Scheduled, Scheduler, Sequence
from server.engine.step import ModelRunner, StepInput
from server.engine.threads import StepThreads

log = logging.getLogger(__name__)

# how often the loop asks whether a worker standing by is still there (a few syscalls each)
STANDBY_CHECK_S = 0.1


class IntakeClosed(Exception):
    """The server is shutting down and takes no new requests."""


class Engine:
    def __init__(self, model: MoEModel, tokenizer, blocks: KVBlockTable, cache: KVCache, scheduler: Scheduler,
                 max_model_len: int, observer: EngineObserver | None = None, overlap: bool = False,
                 threads: StepThreads | None = None) -> None:
        self.model = model
        self.spec = model.spec
        self.tokenizer = tokenizer
        self.blocks = blocks
        self.cache = cache
        self.scheduler = scheduler
        self.max_model_len = max_model_len
        self.observer = observer or EngineObserver()
        self.overlap = overlap
        self.threads = threads          # None: the thread count set at start, every step
        self.steps_by_threads: Counter[int] = Counter()   # steps run at each thread count
        self.backend: ExpertBackend | None = None
        self.version = 0
        self._inbox: "queue.SimpleQueue[tuple[str, object]]" = queue.SimpleQueue()
        self._wake = threading.Event()
        self._requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._samplers: dict[str, Sampler] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._pending_lock = threading.Lock()
        self._pending_count = 0          # requests submitted but not yet taken from the inbox
        self._live: set[str] = set()     # ids submitted and not yet ended (under _pending_lock)
        # outputs of the last step, handed to the API's event loops once the next step's inputs are
        # built (or the loop idles): the API's writes then run beside the next step's forward, not
        # beside its Python bookkeeping (both take the GIL)
        self._outbox: list[tuple[Request, Output]] = []
        self._outbox_lock = threading.Lock()
        self._closed = False             # intake closed at shutdown (set once, read without the lock)
        self.expert_load = np.zeros((len(self.spec.moe_layers), self.spec.num_experts), dtype=np.int64)
        # a lost worker stalls stepping (requests keep their KV cache and their place) until the
        # controller commits a topology without it; `on_worker_lost` asks it to
        self.on_worker_lost: Callable[[str], None] | None = None
        self.recovery_timeout_s = 120.0
        self._lost: tuple[str, float] | None = None
        self._standby_checked = 0.0      # when the standing-by workers were last looked at
        # always on: ~30 timed sections a step cost microseconds against steps of milliseconds,
        # and dashboards see where step time goes (elasticmoe_engine_step_phase_seconds_total)
        self.profile = StepProfile(enabled=True)
        self.runner = ModelRunner(model, cache, self.profile)

    # -- called from other threads --------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError naming the field when the request can never be served."""
        if not prompt_ids:
            raise ValueError("prompt: must not be empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"prompt_token_ids: {bad[:5]} outside the vocabulary [0, {self.spec.vocab_size})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"sampling.max_tokens: prompt ({len(prompt_ids)} tokens) + max_tokens "
                             f"({params.max_tokens}) = {total} exceeds the model's context of {self.max_model_len}")
        seq = Sequence("", prompt_ids, params.max_tokens)
        if not self.scheduler.fits_ever(seq):
            cap = self.blocks.num_blocks * self.blocks.block_size
            raise ValueError(f"sampling.max_tokens: prompt + max_tokens = {total} tokens exceeds the KV cache "
                             f"({cap} tokens)")
        # top_k is a uint32 on the wire: a client's -1 arrives as 2**32-1. Above the vocabulary it
        # could only mean "off", which is spelled 0; refusing says so instead of guessing.
        if params.top_k > self.spec.vocab_size:
            raise ValueError(f"sampling.top_k: {params.top_k} is more than the vocabulary "
                             f"({self.spec.vocab_size} tokens); 0 turns top-k off")

    def submit(self, req: Request) -> None:
        """Queue a validated request. QueueFull when it cannot possibly be admitted; IntakeClosed
        while shutting down. A request that gets past here may still be refused at the next step
        (its stream then ends with finish "rejected") when `max_waiting` requests already wait for
        a running slot or KV blocks: only the engine thread knows what the running pool frees."""
        if self._closed:
            raise IntakeClosed("server shutting down: not taking new requests")
        self.validate(req.prompt_ids, req.params)
        with self._pending_lock:
            # the id keys the request's KV blocks, stream and cancel: two live ones cannot share it
            if req.request_id in self._live:
                raise ValueError(f"request_id: {req.request_id!r} is in use by a request not yet finished")
            # a cheap upper bound, so a flood cannot grow the inbox: more than running + waiting
            # can never be admitted (a racing read can let one too many through; the step refuses it)
            queued = self.scheduler.num_running + self.scheduler.num_waiting + self._pending_count
            if queued >= self.scheduler.capacity:
                raise QueueFull(f"{queued} requests running or waiting (limit --max-running "
                                f"{self.scheduler.max_running} + --max-waiting {self.scheduler.max_waiting})")
            self._pending_count += 1
            self._live.add(req.request_id)
        self._inbox.put(("add", req))
        self._wake.set()

    def close_intake(self) -> None:
        """From now on submit() raises IntakeClosed; requests already taken run on."""
        self._closed = True

    @property
    def idle(self) -> bool:
        """No request taken and not yet ended."""
        with self._pending_lock:
            return not self._live

    def cancel(self, req: Request) -> None:
        """End `req` and free its blocks at the next step; a no-op once it has ended. By object, not
        by id: a late cancel must not hit a newer request that reuses the id."""
        self._inbox.put(("cancel", req))
        self._wake.set()

    def commit(self, backend: ExpertBackend, version: int, timeout: float = 60.0) -> None:
        """Switch to a new topology between two steps; returns once no step uses the old one."""
        done = threading.Event()
        self._inbox.put(("commit", (backend, version, done)))
        self._wake.set()
        deadline = time.monotonic() + timeout
        # a stopped engine takes nothing: say so at once rather than hold a change (and the
        # shutdown waiting for it) for the whole timeout
        while not done.wait(0.05):
            if self._stop.is_set():
                raise RuntimeError(f"engine stopped: topology v{version} not taken")
            if time.monotonic() > deadline:
                raise RuntimeError(f"engine did not take topology v{version} within {timeout}s")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self._drain_inbox()   # requests submitted during the last step get their end too
        for req in list(self._requests.values()):
            self._end(req, "error", error="server shutting down")
        self._flush()

    @property
    def steps(self) -> int:
        """Engine steps run so far."""
        return self.profile.steps

    def counts(self) -> tuple[int, int]:
        return self.scheduler.num_running, self.scheduler.num_waiting + self._pending_count

    # -- the loop -------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                req = item
                self._requests[req.request_id] = req
                self._detok[req.request_id] = IncrementalDetokenizer(self.tokenizer, req.params.stop)
                self._samplers[req.request_id] = Sampler(req.params)
                # one step under the lock: submit() must see the request as pending or as waiting,
                # never as neither, or it admits one too many and scheduler.add raises QueueFull here
                with self._pending_lock:
                    self._pending_count -= 1
                    try:
                        self.scheduler.add(Sequence(req.request_id, req.prompt_ids, req.params.max_tokens))
                        full = None
                    except QueueFull as exc:
                        full = exc
                if full is not None:
                    self._end(req, "rejected", error=f"queue full: {full}")
            elif kind == "cancel":
                req = item
                if self._requests.get(req.request_id) is req:
                    self.scheduler.cancel(req.request_id)
                    self._end(req, "cancelled")
            elif kind == "commit":
                backend, version, done = item
                backend.profile = self.profile
                self.backend, self.version = backend, version
                self._lost = None
                done.set()

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        # OpenMP keeps a thread count per thread: this one takes the process's (set at start), or
        # vLLM's kernels, which ask OpenMP rather than torch, could run on fewer cores
        torch.set_num_threads(torch.get_num_threads())
        while not self._stop.is_set():
            self._drain_inbox()
            self._check_standby()
            if self._lost is not None and self._recovery_overdue():
                self._flush()
                continue
            with self.profile("schedule"):
                plan = self.scheduler.schedule() if self.backend is not None and self._lost is None else []
            if not plan:
                self._flush()
                self.observer.on_step(self.scheduler.num_running, self.scheduler.num_waiting,
                                      self.blocks.usage, 0)
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                with self.profile("step"):
                    self._step(plan)
            except WorkerLost as exc:
                # Nothing of this step was recorded: its K/V rows are rewritten identically when
                # it runs again on the new topology, so every request carries on.
                log.error("%s; holding %d requests until the controller replaces it", exc, len(plan))
                self._lost = (exc.worker_id, time.monotonic())
                if self.on_worker_lost is not None:
                    self.on_worker_lost(exc.worker_id)
            except Exception as exc:  # a step that cannot run fails its requests, not the server
                log.exception("engine step failed")
                for item in plan:
                    self.scheduler.finish(item.seq.seq_id)
                    req = self._requests.get(item.seq.seq_id)
                    if req is not None:
                        self._end(req, "error", error=f"engine step failed: {exc}")

    def _check_standby(self) -> None:
        """Every STANDBY_CHECK_S: a lost worker that stands by (sent no work, so no exchange will
        notice) is reported like any other, but nothing is held: the workers serving go on."""
        now = time.monotonic()
        if self.backend is None or now - self._standby_checked < STANDBY_CHECK_S:
            return
        self._standby_checked = now
        try:
            self.backend.check_standby()
        except WorkerLost as exc:
            log.error("%s; serving on while the controller takes it out", exc)
            if self.on_worker_lost is not None:
                self.on_worker_lost(exc.worker_id)

    def _recovery_overdue(self) -> bool:
        """While stalled: True (skip this turn) until recovery commits or times out; on time-out
        the running requests fail and stepping resumes."""
        worker, since = self._lost
        if time.monotonic() - since < self.recovery_timeout_s:
            self._wake.wait(0.05)
            self._wake.clear()
            return True
        for seq_id in list(self.scheduler.running):
            req = self._requests.get(seq_id)
            if req is not None:
                self._end(req, "error", error=f"expert worker {worker} was lost and not replaced in time")
        self._lost = None
        return False

    def _step(self, plan: list[Scheduled]) -> None:
        """Schedule is done: run the model over the plan, count the experts' load, sample, stream."""
        prof = self.profile
        # --overlap: two micro-batches, the engine runs one's attention while the workers run the
        # other's experts
        parts = _split(plan) if self.overlap and len(plan) >= 2 else [plan]
        with prof("inputs"):
            inputs = [self._inputs(part) for part in parts]
        self._flush()   # the last step's outputs
        plan = [item for part in parts for item in part]
        if self.threads is not None:
            want = self.threads.for_tokens(sum(int(i.input_ids.shape[0]) for i in inputs))
            if torch.get_num_threads() != want:
                torch.set_num_threads(want)
        self.steps_by_threads[torch.get_num_threads()] += 1
        logits = self.runner.run(inputs, self.backend)
        prof.steps += 1
        for layer, routed in self.backend.take_expert_counts().items():
            self.expert_load[layer] += routed
            self.observer.on_expert_tokens(self.spec.moe_layers[layer], routed)  # checkpoint numbering
        now = time.monotonic()
        generated = 0
        with prof("sample_and_stream"):
            greedy = logits.argmax(dim=-1).tolist()   # one op for every greedy row of the batch
            for i, item in enumerate(plan):
                token = None
                if item.samples:
                    sampler = self._samplers[item.seq.seq_id]
                    token = greedy[i] if sampler.params.greedy else sampler(logits[i])
                self.scheduler.advance(item, token)
                if token is not None:
                    generated += 1
                    self._emit(self._requests[item.seq.seq_id], item.seq, token, now)
        self.observer.on_step(self.scheduler.num_running, self.scheduler.num_waiting, self.blocks.usage, generated)

    def _inputs(self, part: list[Scheduled]) -> StepInput:
        ids, q_lens, kv_lens, tables = [], [], [], []
        for item in part:
            ids.extend(item.seq.tokens[item.start:item.start + item.num_tokens])
            q_lens.append(item.num_tokens)
            kv_lens.append(item.start + item.num_tokens)
            tables.append(self.blocks.blocks(item.seq.seq_id))
        batch = AttentionBatch.build(q_lens, kv_lens, tables, self.blocks.block_size)
        return StepInput(torch.tensor(ids, dtype=torch.long), batch)

    def _emit(self, req: Request, seq: Sequence, token: int, now: float) -> None:
        if req.first_token is None:
            req.first_token = now
            self.observer.on_first_token(now - req.arrival)
        else:
            self.observer.on_token_gap(now - (req.last_token or now))
        req.last_token = now
        req.completion += 1
        detok = self._detok[req.request_id]
        p = req.params
        if not p.ignore_eos and token in self.spec.eos_token_ids:
            self._end(req, "eos", [token], detok.flush())
            return
        text = detok.add(token)
        if detok.stopped:
            self._end(req, "stop", [token], text)
        elif len(seq.output) >= p.max_tokens:
            self._end(req, "length", [token], text + detok.flush())
        else:
            due = req.deliver(token, text)
            if due is not None:
                self._post(req, due)

    def _end(self, req: Request, finish: str, tokens: list[int] | None = None, text: str = "",
             error: str = "") -> None:
        """Close a request's stream (exactly once) with its last message, and free what it held."""
        if self._requests.pop(req.request_id, None) is None:
            return
        with self._pending_lock:
            self._live.discard(req.request_id)
        self.scheduler.finish(req.request_id)
        self._detok.pop(req.request_id, None)
        self._samplers.pop(req.request_id, None)
        held = req.take_held()   # delivered with the finish; dropped with an error (the stream ends in a status)
        self._post(req, Output(held.token_ids + (tokens or []), held.text + text, finish=finish, error=error,
                               prompt_tokens=len(req.prompt_ids), completion_tokens=req.completion))
        status = {"length": "ok", "stop": "ok", "eos": "ok"}.get(finish, finish)
        self.observer.on_finish(req, status, req.completion)

    def _post(self, req: Request, out: Output) -> None:
        with self._outbox_lock:
            self._outbox.append((req, out))

    def _flush(self) -> None:
        """Hand every output posted so far to its stream, in order."""
        with self._outbox_lock:
            batch, self._outbox = self._outbox, []
        for req, out in batch:
            req.outputs.put(out)


def _split(plan: list[Scheduled]) -> list[list[Scheduled]]:
    """Two halves of a step with about as many tokens each (both non-empty)."""
    total = sum(item.num_tokens for item in plan)
    acc, cut = 0, 1
    for i, item in enumerate(plan[:-1]):
        acc += item.num_tokens
        cut = i + 1
        if acc * 2 >= total:
            break
    return [plan[:cut], plan[cut:]]
