"""The OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (SSE when `stream`),
/v1/models, /health. Starlette routes on uvicorn, on their own thread and event loop inside the
server process; the same engine, limits, request rules (`requests.py`) and metrics as gRPC.

A stream is a coroutine, not a thread: the engine thread hands each output to the event loop
(`LoopOutputs`), so a thousand idle clients cost no threads. A client that goes away (its
connection closes) cancels its request, which frees its KV blocks at the next engine step; so does
one that stops reading an SSE stream for the write deadline (`deadline.py`). Over TCP that deadline
only starts once the socket buffers are full (megabytes on Linux loopback), and the connection then
stays until the client leaves: uvicorn closes it only after flushing what it holds.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from server.api import openai_schema as oa
from server.api.chat_template import ChatTemplate
from server.api.deadline import StalledReader, WriteDeadline
from server.api.requests import InvalidField, LoopOutputs, refusal_of
from server.engine.loop import Engine
from server.engine.request import EngineObserver, Output, Request

log = logging.getLogger(__name__)
STATUS = {"invalid": 400, "queue_full": 429, "unavailable": 503}
KIND = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
        429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(oa.error_body(self.message, KIND[self.status], self.param, self.code), self.status)


class DeadlineStream(StreamingResponse):
    """A streamed response whose every send has the write deadline. A stalled client ends it: the
    body's generator is closed (its `finally` cancels the request) and the response is left
    unfinished, which uvicorn logs and answers by closing the connection."""

    def __init__(self, content: AsyncIterator[str], deadline: WriteDeadline, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.deadline = deadline

    async def stream_response(self, send: Callable[[Any], Any]) -> None:
        async def send_by_deadline(message: Any) -> None:
            await self.deadline.write(send(message))

        try:
            await super().stream_response(send_by_deadline)
        except StalledReader as exc:
            log.warning("HTTP stream: %s", exc)
            await self.body_iterator.aclose()


class HttpApi:
    """The routes. `encode` turns a text prompt into ids (ValueError naming `prompt` if it cannot);
    `chat` is the checkpoint's chat template (None: /v1/chat/completions answers 400); `deadline`
    bounds how long one SSE message may wait for its client."""

    def __init__(self, engine: Engine, encode: Callable[[str], list[int]], observer: EngineObserver,
                 model_id: str, chat: ChatTemplate | None, deadline: WriteDeadline,
                 api_key: str | None = None, stream_interval: int = 1) -> None:
        self.engine = engine
        self.deadline = deadline
        self._api_key = api_key.encode() if api_key else None
        self.encode = encode
        self.observer = observer   # counts requests refused before they reach the engine
        self.model_id = model_id
        self.chat = chat
        self.stream_interval = stream_interval   # new tokens per SSE chunk of a stream (--stream-interval)
        self.serving = False       # False until the experts are placed, and again once draining
        self.created = oa.now()
        # tokenizing and template rendering take milliseconds per KB: off the event loop
        self._cpu = ThreadPoolExecutor(max_workers=2, thread_name_prefix="http-tokenize")
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ])

    def close(self) -> None:
        self._cpu.shutdown(wait=False)

    # -- routes -----------------------------------------------------------------------------
    async def health(self, _: HttpRequest) -> Response:
        if not self.serving:
            return ApiError(503, "not serving: starting (experts not placed yet) or shutting down").response()
        return JSONResponse({"status": "ok"})

    def _check_key(self, http: HttpRequest) -> None:
        """401 unless the request carries the configured key (OpenAI clients send their api_key
        as `Authorization: Bearer ...`); compared in constant time."""
        if self._api_key is None:
            return
        scheme, _, given = http.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._api_key):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", None, "invalid_api_key")

    async def models(self, http: HttpRequest) -> Response:
        try:
            self._check_key(http)
        except ApiError as exc:
            return exc.response()
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "elasticmoe",
             "max_model_len": self.engine.max_model_len}]})

    async def completions(self, http: HttpRequest) -> Response:
        return await self._serve(http, chat=False)

    async def chat_completions(self, http: HttpRequest) -> Response:
        return await self._serve(http, chat=True)

    # -- one request ------------------------------------------------------------------------
    async def _serve(self, http: HttpRequest, chat: bool) -> Response:
        try:
            req, common, outputs = await self._admit(http, chat)
        except ApiError as exc:
            return exc.response()
        created = oa.now()
        rid = ("chatcmpl-" if chat else "cmpl-") + req.request_id
        try:
            first = await outputs.queue.get()
        except BaseException:
            self.engine.cancel(req)
            raise
        if first.finish in ("error", "cancelled", "rejected"):
            return self._failed(first).response()
        if common.stream:
            return DeadlineStream(self._events(req, outputs, first, rid, created, chat, common.include_usage),
                                  self.deadline, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            text, out = first.text, first
            while out.finish is None:
                out = await outputs.queue.get()
                text += out.text
        finally:
            self.engine.cancel(req)   # a no-op after a finish; frees the request if the client left
        if out.finish in ("error", "cancelled", "rejected"):
            return self._failed(out).response()
        use = oa.usage(out.prompt_tokens, out.completion_tokens)
        finish = oa.FINISH[out.finish]
        body = (oa.chat_object(rid, self.model_id, created, text, finish, use) if chat else
                oa.completion_object(rid, self.model_id, created, text, finish, use))
        return JSONResponse(body)

    async def _admit(self, http: HttpRequest, chat: bool) -> tuple[Request, oa.Common, LoopOutputs]:
        """Read, check and submit; ApiError (counted as refused where it is one) otherwise."""
        self._check_key(http)
        if not self.serving:
            raise ApiError(503, "not serving: starting (experts not placed yet) or shutting down")
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.observer.on_refused("invalid")
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        loop = asyncio.get_running_loop()
        try:
            if chat:
                common, messages = oa.read_chat(body)
                if self.chat is None:
                    raise InvalidField("messages", "this model has no chat template (tokenizer_config.json has no "
                                       "chat_template): use /v1/completions")
                ids = await loop.run_in_executor(self._cpu, self._chat_ids, messages)
            else:
                common, prompt = oa.read_completion(body)
                ids = prompt if isinstance(prompt, list) else await loop.run_in_executor(self._cpu, self.encode, prompt)
            if common.model is not None and common.model != self.model_id:
                raise ApiError(404, f"The model `{common.model}` does not exist; this server serves "
                               f"`{self.model_id}`", "model", "model_not_found")
            blocks = self.engine.blocks   # a chat without max_tokens gets what the context and the cache leave
            room = min(self.engine.max_model_len, blocks.num_blocks * blocks.block_size) - len(ids)
            params = common.params(default_max_tokens=max(room, 1))
            outputs = LoopOutputs(loop)
            # a response without `stream` is read whole: its tokens come in one output after the first
            req = Request(uuid.uuid4().hex, ids, params, outputs=outputs,   # type: ignore[arg-type]
                          stream_interval=self.stream_interval if common.stream else params.max_tokens)
            self.engine.submit(req)
            return req, common, outputs
        except ApiError:
            self.observer.on_refused("invalid")
            raise
        except Exception as exc:
            refused = refusal_of(exc)
            if refused is None:
                log.exception("HTTP request failed before reaching the engine")
                raise ApiError(500, f"internal error: {exc}") from None
            self.observer.on_refused(refused.status)
            raise ApiError(STATUS[refused.kind], refused.message, refused.field,
                           "rate_limit_exceeded" if refused.kind == "queue_full" else None) from None

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        assert self.chat is not None
        return self.encode(self.chat.render(messages, add_generation_prompt=True))

    def _failed(self, out: Output) -> ApiError:
        if out.finish == "rejected":
            return ApiError(429, out.error or "queue full", code="rate_limit_exceeded")
        if "shutting down" in out.error:
            return ApiError(503, out.error)
        return ApiError(500, out.error or f"request {out.finish}")

    async def _events(self, req: Request, outputs: LoopOutputs, first: Output, rid: str, created: int, chat: bool,
                      with_usage: bool) -> AsyncIterator[str]:
        """The SSE stream of one request: a chunk per output, the usage chunk if asked, [DONE]."""
        def event(body: dict[str, Any]) -> str:
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if chat:   # OpenAI opens a chat stream with the role
                yield event(oa.chat_chunk(rid, self.model_id, created, {"role": "assistant", "content": ""}, None,
                                          None, with_usage))
            out = first
            while True:
                if out.finish in ("error", "cancelled", "rejected"):
                    err = self._failed(out)
                    yield event(oa.error_body(err.message, KIND[err.status]))
                    break
                finish = oa.FINISH[out.finish] if out.finish else None
                if out.text or finish:
                    yield event(oa.chat_chunk(rid, self.model_id, created, {"content": out.text} if out.text else {},
                                              finish, None, with_usage) if chat else
                                oa.completion_chunk(rid, self.model_id, created, out.text, finish, None, with_usage))
                if finish:
                    if with_usage:
                        use = oa.usage(out.prompt_tokens, out.completion_tokens)
                        yield event(oa.chat_chunk(rid, self.model_id, created, None, None, use, True) if chat else
                                    oa.completion_chunk(rid, self.model_id, created, None, None, use, True))
                    break
                out = await outputs.queue.get()
            yield "data: [DONE]\n\n"
        finally:
            self.engine.cancel(req)   # the client went away mid-stream: free its KV blocks now


class HttpFront:
    """uvicorn serving an `HttpApi` on its own thread and event loop. The port is bound in the
    constructor, so a port already taken fails the server's start before anything else runs."""

    def __init__(self, api: HttpApi, host: str, port: int, grace_s: float = 2.0) -> None:
        self.api = api
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        self._sock = socket.socket(family, kind, proto)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind(addr)
        except OSError as exc:
            self._sock.close()
            raise RuntimeError(f"cannot bind HTTP on {host}:{port}: {exc.strerror}") from None
        self.port: int = self._sock.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(
            api.app, log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=max(1, int(grace_s))))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="http", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)

    def set_serving(self, serving: bool) -> None:
        self.api.serving = serving

    def stop(self) -> None:
        """No new connections; streams still open get the grace period, then are cancelled (which
        cancels their requests)."""
        self.api.serving = False
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self._sock.close()
        self.api.close()
