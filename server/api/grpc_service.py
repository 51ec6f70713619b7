"""The gRPC servicers: validate, queue, stream. The only place that turns errors into status codes."""
from __future__ import annotations

import logging
import queue
import time
import uuid
from typing import Callable, Iterator, Protocol

import grpc

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from server.api.operations_proto import operation_to_proto, scale_response
from server.control.controller import Controller
from server.control.operations import Operation, OperationRegistry
from server.control.topology import ScaleRejected, Topology
from server.engine.loop import Engine
from server.engine.request import Output, Request
from server.engine.sampling import SamplingParams
from server.engine.scheduler import QueueFull

log = logging.getLogger(__name__)

FINISH = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP, "eos": pb.FINISH_REASON_EOS}
MAX_STOP_STRINGS = 16


def sampling_from_proto(s: pb.SamplingParams) -> SamplingParams:
    """ValueError naming the field for anything out of range."""
    if s.max_tokens < 1:
        raise ValueError(f"sampling.max_tokens must be >= 1, got {s.max_tokens}")
    if len(s.stop) > MAX_STOP_STRINGS:
        raise ValueError(f"sampling.stop: at most {MAX_STOP_STRINGS} strings, got {len(s.stop)}")
    if not 0.0 <= s.top_p <= 1.0:  # also rejects NaN
        raise ValueError(f"sampling.top_p must be in [0, 1], got {s.top_p}")
    return SamplingParams(
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop), ignore_eos=s.ignore_eos)


def topology_to_proto(topo: Topology | None, moe_layers: tuple[int, ...], num_experts: int) -> pb.Topology:
    msg = pb.Topology(num_layers=len(moe_layers), num_experts=num_experts)
    if topo is None:
        return msg
    msg.version = topo.version
    for w in topo.placement.workers:
        info = topo.workers[w]
        layers = [pb.LayerExperts(layer=moe_layers[l], experts=list(ex))
                  for l, ex in enumerate(topo.placement.held_by(w))]
        msg.workers.append(pb.Worker(worker_id=w, node_id=info.node_id, layers=layers))
    return msg


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, engine: Engine, tokenizer, observer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.observer = observer   # counts requests refused before they reach the engine

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        has_text, has_ids = bool(request.prompt), bool(request.prompt_token_ids)
        if has_text == has_ids:
            raise ValueError("prompt / prompt_token_ids: give exactly one of them"
                             + (" (both were set)" if has_text else " (neither was set, or it was empty)"))
        if has_ids:
            return list(request.prompt_token_ids)
        ids = self.tokenizer.encode(request.prompt).ids
        if not ids:
            raise ValueError("prompt: encodes to no tokens")
        return ids

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        rid = request.request_id or uuid.uuid4().hex
        try:
            if not request.HasField("sampling"):
                raise ValueError("sampling: required (sampling.max_tokens must be >= 1)")
            params = sampling_from_proto(request.sampling)
            req = Request(rid, self._prompt_ids(request), params)
            self.engine.submit(req)
        except ValueError as exc:
            self.observer.on_refused("invalid")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except QueueFull as exc:
            self.observer.on_refused("rejected")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"queue full: {exc}")
        # runs when the RPC ends for any reason: a client cancel or a passed deadline frees the
        # request's KV blocks at the next engine step; after a normal finish it is a no-op
        if not context.add_callback(lambda: self.engine.cancel(req)):
            self.engine.cancel(req)  # the RPC ended before the callback was in place: nobody reads on
            return
        while True:
            try:
                out: Output = req.outputs.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if out.finish in ("error", "cancelled"):
                if out.finish == "error":
                    context.abort(grpc.StatusCode.UNAVAILABLE if "shutting down" in out.error else grpc.StatusCode.INTERNAL,
                                  out.error or "request failed")
                return
            msg = pb.GenerateResponse(request_id=rid, token_ids=out.token_ids, text=out.text)
            if out.finish:
                msg.finish_reason = FINISH[out.finish]
                msg.prompt_tokens = out.prompt_tokens
                msg.completion_tokens = out.completion_tokens
                yield msg
                return
            yield msg


class Changes(Protocol):
    """What Admin asks of the server to change the topology (server/app.py's `Server`)."""

    def scale_operation(self, num_workers: int, operation_id: str = "", no_wait: bool = False) -> Operation: ...
    def rebalance(self, operation_id: str = "", no_wait: bool = False) -> Operation: ...


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, controller: Controller, changes: Changes, operations: OperationRegistry) -> None:
        self.controller = controller
        self.changes = changes
        self.operations = operations

    def _topology(self, topo: Topology | None = None) -> pb.Topology:
        """`topo`, or the committed topology, with the workers a scale-down of it removes."""
        c = self.controller
        topo = topo or c.topology
        msg = topology_to_proto(topo, c.spec.moe_layers, c.spec.num_experts)
        msg.removable_workers.extend(c.removable(topo))
        return msg

    def GetTopology(self, request: pb.GetTopologyRequest, context: grpc.ServicerContext) -> pb.Topology:
        return self._topology()

    def _change(self, what: str, start: Callable[[], Operation], context: grpc.ServicerContext) -> pb.ScaleResponse:
        try:
            op = start()
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ScaleRejected as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:  # the change aborted; the old topology serves on
            log.exception("%s failed", what)
            context.abort(grpc.StatusCode.ABORTED, f"change aborted, topology unchanged: {exc}")
        return scale_response(op, self._topology)

    def Scale(self, request: pb.ScaleRequest, context: grpc.ServicerContext) -> pb.ScaleResponse:
        return self._change(f"scale to {request.num_workers} workers", lambda: self.changes.scale_operation(
            request.num_workers, request.operation_id, request.no_wait), context)

    def Rebalance(self, request: pb.RebalanceRequest, context: grpc.ServicerContext) -> pb.ScaleResponse:
        return self._change("rebalance", lambda: self.changes.rebalance(request.operation_id, request.no_wait),
                            context)

    def GetOperation(self, request: pb.GetOperationRequest, context: grpc.ServicerContext) -> pb.Operation:
        op = self.operations.get(request.operation_id)
        if op is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"operation_id {request.operation_id!r}: no such operation "
                                                     f"(unknown, or older than the last {self.operations.history})")
        return operation_to_proto(op, self._topology)

    def ListOperations(self, request: pb.ListOperationsRequest,
                       context: grpc.ServicerContext) -> pb.ListOperationsResponse:
        return pb.ListOperationsResponse(operations=[operation_to_proto(op, self._topology)
                                                     for op in self.operations.recent()])

    def WatchOperations(self, request: pb.WatchOperationsRequest,
                        context: grpc.ServicerContext) -> Iterator[pb.Operation]:
        """One operation: its state now, then each phase, until final. None named: every update
        from now on (running operations first), until the client cancels."""
        reg, op_id = self.operations, request.operation_id
        if op_id:
            op = reg.get(op_id)
            if op is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"operation_id {op_id!r}: no such operation")
            seen = -1
            while context.is_active():
                op = reg.get(op_id)
                if op is None:   # dropped from the history while we watched (a very long watch)
                    return
                if op.seq != seen:
                    seen = op.seq
                    yield operation_to_proto(op, self._topology)
                if op.final:
                    return
                # wake at least once a second to notice a client that went away
                reg.wait(op_id, lambda o: o.seq != seen, timeout=1.0)
            return
        after = reg.seq
        for op in reg.recent():
            if not op.final:
                yield operation_to_proto(op, self._topology)
        while context.is_active():
            ops, after = reg.updates(after, timeout=1.0)
            for op in ops:
                yield operation_to_proto(op, self._topology)
