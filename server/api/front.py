"""The gRPC front door: the servers, their ports and credentials, and how they stop.

One asyncio gRPC server for the public API on its own event-loop thread (a stream awaiting a slow
reader is a suspended coroutine, never a pool thread), with Admin on it, or on a second server of
its own address: `--admin-address`, or 127.0.0.1 on port+1 when Inference is bound beyond
loopback without one, so Admin is never public by accident. Both serve Health; reflection is on
unless `--no-reflection`. With `--tls-cert/--tls-key` every port speaks TLS (mutual with
`--tls-client-ca`); with `--admin-token` every Admin RPC needs `authorization: Bearer <token>`.
One HTTP/2 connection may hold `--max-streams-per-connection` streams open at once (its SETTINGS
say so; a stream beyond is refused with REFUSED_STREAM), so a client that stalls its streams holds
a bounded number of them per connection: the write deadline (`grpc_service.py`) cancels their
requests, but grpc.aio keeps each HTTP/2 stream until the client reads, cancels or disconnects.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.api import elasticmoe_pb2 as pb
from server.api import elasticmoe_pb2_grpc as pb_grpc
from server.api.grpc_service import AdminServicer, InferenceServicer
from server.api.security import AdminAuth, is_loopback, server_credentials
from server.config import ServerConfig

log = logging.getLogger(__name__)

INFERENCE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
ADMIN = pb.DESCRIPTOR.services_by_name["Admin"].full_name


@dataclass(frozen=True)
class Bound:
    port: int                 # the Inference port (the one asked for, or the one picked for 0)
    admin_address: str | None  # where Admin is served when not on the Inference port


def admin_address(c: ServerConfig) -> str | None:
    """Admin's own address, or None to serve it beside Inference."""
    if c.admin_address:
        return c.admin_address
    if is_loopback(c.host):
        return None
    return f"127.0.0.1:{c.port + 1 if c.port else 0}"


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class StreamContext:
    """What a plain (non-async) server-streaming handler gets as its context: `is_active()`, false
    once the client cancelled or the server stops, and `abort()`. grpc.aio runs such handlers in
    its thread pool with a context that has no `is_active()`, so a handler that polls it (Admin's
    WatchOperations) would never notice that its client went away and hold a thread for good."""

    def __init__(self) -> None:
        self._ended = threading.Event()

    def is_active(self) -> bool:
        return not self._ended.is_set()

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)

    def end(self) -> None:
        self._ended.set()


_DONE = object()


class PlainStreams(grpc.aio.ServerInterceptor):
    """Runs the plain server-streaming handlers of `service` from a coroutine: each next message
    is computed in `pool`, and a client cancel or a server stop (which cancel the coroutine) ends
    the handler's `StreamContext`."""

    def __init__(self, service: str, pool: ThreadPoolExecutor) -> None:
        self._prefix = f"/{service}/"
        self._pool = pool

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        h = await continuation(details)
        if h is None or not details.method.startswith(self._prefix) or h.unary_stream is None \
                or inspect.isasyncgenfunction(h.unary_stream):
            return h
        plain, pool = h.unary_stream, self._pool

        async def stream(request: object, context: grpc.aio.ServicerContext):
            ctx = StreamContext()
            loop = asyncio.get_running_loop()
            messages = plain(request, ctx)
            try:
                while True:
                    try:
                        msg = await loop.run_in_executor(pool, next, messages, _DONE)
                    except _Aborted as exc:
                        await context.abort(exc.code, exc.details)
                    if msg is _DONE:
                        return
                    yield msg
            finally:
                ctx.end()   # the handler's thread, if inside it, returns at its next is_active()

        return grpc.unary_stream_rpc_method_handler(stream, h.request_deserializer, h.response_serializer)


class GrpcFront:
    def __init__(self, config: ServerConfig, inference: InferenceServicer, admin: AdminServicer) -> None:
        self.config = config
        self.inference, self.admin = inference, admin
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-loop", daemon=True)
        # runs the plain (non-async) handlers: Admin's, whose Scale blocks for seconds
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="grpc-admin")
        self._servers: list[grpc.aio.Server] = []
        self._health: list[health.aio.HealthServicer] = []
        self.bound: Bound | None = None

    def _run(self, coro, timeout: float | None = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> Bound:
        """Bind every port (RuntimeError naming the address when one is taken) and start serving;
        health says NOT_SERVING until `set_serving(True)`."""
        self._thread.start()
        self.bound = self._run(self._start())
        return self.bound

    def _server(self, services: tuple[str, ...]) -> grpc.aio.Server:
        c = self.config
        # the credential check first: a refused call reaches nothing else
        interceptors = ([AdminAuth(c.admin_token)] if c.admin_token else []) + [PlainStreams(ADMIN, self._pool)]
        server = grpc.aio.server(migration_thread_pool=self._pool, interceptors=interceptors,
                                 options=[("grpc.so_reuseport", 0),
                                          ("grpc.max_concurrent_streams", c.max_streams_per_connection)])
        if INFERENCE in services:
            server.add_generic_rpc_handlers((self.inference.handlers(),))
        if ADMIN in services:
            pb_grpc.add_AdminServicer_to_server(self.admin, server)
        hs = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)
        self._health.append(hs)
        if c.reflection:
            reflection.enable_server_reflection((*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self._servers.append(server)
        return server

    def _bind(self, server: grpc.aio.Server, address: str) -> int:
        c = self.config
        try:
            if c.tls_cert:
                port = server.add_secure_port(address, server_credentials(c.tls_cert, c.tls_key, c.tls_client_ca))
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:   # grpc.aio raises where the sync server returns 0
            raise RuntimeError(f"cannot bind gRPC on {address}: {exc}") from exc
        if port == 0:
            raise RuntimeError(f"cannot bind gRPC on {address}")
        return port

    async def _start(self) -> Bound:
        c = self.config
        own = admin_address(c)
        main = self._server((INFERENCE,) if own else (INFERENCE, ADMIN))
        port = self._bind(main, f"{c.host}:{c.port}")
        bound_admin = None
        if own:
            host = own.rsplit(":", 1)[0]
            admin_port = self._bind(self._server((ADMIN,)), own)
            bound_admin = f"{host}:{admin_port}"
            log.info("Admin served on %s only%s", bound_admin,
                     "" if c.admin_address else f" (loopback: Inference is bound to {c.host}, beyond loopback)")
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        for server in self._servers:
            await server.start()
        return Bound(port, bound_admin)

    async def _set_all(self, status: int) -> None:
        for hs in self._health:
            for name in ("", INFERENCE, ADMIN):
                await hs.set(name, status)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self._run(self._set_all(status))

    def stop(self, grace: float) -> None:
        """Health NOT_SERVING for good, then close the ports: RPCs still open after `grace` seconds
        are cancelled. The caller drains the engine first; this is the last step."""
        if not self._thread.is_alive():
            return

        async def stop_all() -> None:
            for hs in self._health:
                await hs.enter_graceful_shutdown()
            await asyncio.gather(*(s.stop(grace) for s in self._servers))
            # what is left on the loop (the write deadline's watchdog between ticks) ends here, as
            # asyncio.run ends its tasks: a task still pending when the loop goes is reported
            # "destroyed but pending" at exit
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            if rest:
                await asyncio.wait(rest, timeout=1.0)

        self._run(stop_all(), timeout=grace + 30)
        # plain handlers still running wait on the loop (their writes, their end-of-call
        # callbacks): it must turn until they are done, or their threads block the process's exit
        drained = threading.Thread(target=self._pool.shutdown, kwargs={"cancel_futures": True}, daemon=True)
        drained.start()
        drained.join(timeout=10)
        if drained.is_alive():
            log.warning("Admin handlers still running 10 s after the gRPC servers stopped; leaving their loop on")
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def not_serving(self) -> None:
        """Health NOT_SERVING for good (a drain has begun); the ports stay open meanwhile."""
        async def leave() -> None:
            for hs in self._health:
                await hs.enter_graceful_shutdown()
        if self._thread.is_alive():
            self._run(leave())
