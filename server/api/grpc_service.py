"""The gRPC servicers: validate, queue, stream. The only place that turns errors into status codes.

Inference runs on an asyncio gRPC server (`front.py`): a stream waiting for its reader (a slow or
stalled client) is a suspended coroutine, not a thread, so it cannot starve Health, Admin or other
streams; and a write its client leaves unread past the write deadline (`deadline.py`) ends the
stream and cancels its request. Admin's methods are plain functions run in that server's thread
pool (a Scale blocks for seconds).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Protocol

import grpc

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from server.api.deadline import StalledReader, WriteDeadline
from server.api.operations_proto import operation_to_proto, scale_response
from server.api.lenient import Undecodable, decode_generate
from server.api.prompts import PromptEncoder
from server.api.requests import LoopOutputs, choose_prompt, sampling_params
from server.control.controller import Controller
from server.control.operations import Operation, OperationRegistry
from server.control.topology import ScaleRejected, Topology
from server.engine.loop import Engine, IntakeClosed
from server.engine.request import EngineObserver, Output, Request
from server.engine.sampling import SamplingParams
from server.engine.scheduler import QueueFull

log = logging.getLogger(__name__)

FINISH = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP, "eos": pb.FINISH_REASON_EOS}


def sampling_from_proto(s: pb.SamplingParams) -> SamplingParams:
    """The rules every API shares (requests.py); ValueError naming `sampling.<field>`."""
    return sampling_params(s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed if s.HasField("seed") else None,
                           s.stop, s.ignore_eos, prefix="sampling.")


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


class InferenceServicer:
    """Inference.Generate."""

    def __init__(self, engine: Engine, prompts: PromptEncoder, observer: EngineObserver,
                 deadline: WriteDeadline, stream_interval: int = 1) -> None:
        self.engine = engine
        self.stream_interval = stream_interval   # of a request that leaves its own at 0
        self.prompts = prompts
        self.observer = observer   # counts requests refused before they reach the engine
        self.deadline = deadline   # how long one message may wait for its client to read it
        # tokenizing takes milliseconds per KB: off the event loop, so streams keep flowing meanwhile
        self._tokenize = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")

    def handlers(self) -> grpc.GenericRpcHandler:
        """Generate with a request decoder that turns bad UTF-8 into INVALID_ARGUMENT (grpc's
        generated one answers INTERNAL before any handler runs)."""
        generate = grpc.unary_stream_rpc_method_handler(
            self.Generate, request_deserializer=decode_generate,
            response_serializer=pb.GenerateResponse.SerializeToString)
        return grpc.method_handlers_generic_handler(
            pb.DESCRIPTOR.services_by_name["Inference"].full_name, {"Generate": generate})

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        prompt = choose_prompt(request.prompt, request.prompt_token_ids)
        return prompt if isinstance(prompt, list) else self.prompts.encode(prompt)

    async def _refuse(self, context: grpc.aio.ServicerContext, status: str, code: grpc.StatusCode, why: str) -> None:
        self.observer.on_refused(status)
        await context.abort(code, why)

    async def Generate(self, request: pb.GenerateRequest | Undecodable, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, Undecodable):
            await self._refuse(context, "invalid", grpc.StatusCode.INVALID_ARGUMENT, request.error)
        rid = request.request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        outputs = LoopOutputs(loop)
        try:
            if not request.HasField("sampling"):
                raise ValueError("sampling: required (sampling.max_tokens must be >= 1)")
            params = sampling_from_proto(request.sampling)
            self.prompts.check_size(request.prompt)   # before a thread is spent on it
            ids = await loop.run_in_executor(self._tokenize, self._prompt_ids, request)
            req = Request(rid, ids, params, outputs=outputs, stream_interval=request.stream_interval or self.stream_interval)
            self.engine.submit(req)
        except ValueError as exc:
            await self._refuse(context, "invalid", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except QueueFull as exc:
            await self._refuse(context, "rejected", grpc.StatusCode.RESOURCE_EXHAUSTED, f"queue full: {exc}")
        except IntakeClosed as exc:
            await self._refuse(context, "rejected", grpc.StatusCode.UNAVAILABLE, str(exc))
        try:
            await self._stream(req, outputs, context)
        except StalledReader as exc:
            log.warning("Generate %s: %s", rid, exc)
            self.engine.cancel(req)   # now, not after the status had its second
            await self._end_stalled(context, str(exc))
        finally:
            # the RPC ended for any reason (a client cancel and a passed deadline cancel this
            # coroutine): the request's KV blocks are freed at the next engine step; after a
            # normal finish it is a no-op
            self.engine.cancel(req)

    async def _stream(self, req: Request, outputs: LoopOutputs, context: grpc.aio.ServicerContext) -> None:
        # headers first, on their own: then a stalled stream can still be given its status (a
        # status would otherwise have to carry the headers, which wait behind the pending write)
        await self.deadline.write(context.send_initial_metadata(()))
        while True:
            out = await outputs.queue.get()
            if out.finish == "rejected":   # counted by the engine
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, out.error)
            if out.finish in ("error", "cancelled"):
                if out.finish == "error":
                    await context.abort(grpc.StatusCode.UNAVAILABLE if "shutting down" in out.error
                                        else grpc.StatusCode.INTERNAL, out.error or "request failed")
                return
            msg = pb.GenerateResponse(request_id=req.request_id, token_ids=out.token_ids, text=out.text)
            if out.finish:
                msg.finish_reason = FINISH[out.finish]
                msg.prompt_tokens = out.prompt_tokens
                msg.completion_tokens = out.completion_tokens
            # a client that reads nothing (a zero HTTP/2 window) suspends this coroutine here and
            # holds no thread, until the write deadline
            await self.deadline.write(context.write(msg))
            if out.finish:
                return

    @staticmethod
    async def _end_stalled(context: grpc.aio.ServicerContext, why: str) -> None:
        """End a stalled stream with DEADLINE_EXCEEDED. grpc.aio has no server-side cancel: the
        status is queued behind the message the client never read, and a client that reads again
        gets both; one that does not holds that HTTP/2 stream (one of
        --max-streams-per-connection) until it cancels, its deadline passes or its connection
        closes. Whatever `abort` raises (its status not sent within a second, or refused while
        the headers are still pending), grpc.aio ends the RPC by the abort it records first."""
        try:
            async with asyncio.timeout(1.0):
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, why)
        except Exception:   # noqa: BLE001 - see above; a CancelledError (client gone) still propagates
            pass


def _planned(op: Operation | None) -> bool:
    """Readers see an operation once it is planned: one refused before that never existed."""
    return op is not None and op.phase != ""


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
        if topo is not None:
            computing = c.computing(topo)
            for w in msg.workers:
                w.computing = w.worker_id in computing
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
        if not _planned(op):
            context.abort(grpc.StatusCode.NOT_FOUND, f"operation_id {request.operation_id!r}: no such operation "
                                                     f"(unknown, or older than the last {self.operations.history})")
        return operation_to_proto(op, self._topology)

    def ListOperations(self, request: pb.ListOperationsRequest,
                       context: grpc.ServicerContext) -> pb.ListOperationsResponse:
        return pb.ListOperationsResponse(operations=[operation_to_proto(op, self._topology)
                                                     for op in self.operations.recent() if _planned(op)])

    def WatchOperations(self, request: pb.WatchOperationsRequest,
                        context: grpc.ServicerContext) -> Iterator[pb.Operation]:
        """One operation: its state now, then each phase, until final. None named: every update
        from now on (running operations first), until the client cancels."""
        reg, op_id = self.operations, request.operation_id
        if op_id:
            op = reg.get(op_id)
            if not _planned(op):
                context.abort(grpc.StatusCode.NOT_FOUND, f"operation_id {op_id!r}: no such operation")
            seen = -1
            while context.is_active():
                op = reg.get(op_id)
                if op is None:   # dropped from the history while we watched (a very long watch)
                    return
                if op.seq != seen and _planned(op):
                    seen = op.seq
                    yield operation_to_proto(op, self._topology)
                if op.final:
                    return
                # wake at least once a second to notice a client that went away
                reg.wait(op_id, lambda o: o.seq != seen, timeout=1.0)
            return
        after = reg.seq
        for op in reg.recent():
            if _planned(op) and not op.final:
                yield operation_to_proto(op, self._topology)
        while context.is_active():
            ops, after = reg.updates(after, timeout=1.0)
            for op in ops:
                if _planned(op):
                    yield operation_to_proto(op, self._topology)
