"""The front door's credentials: TLS from PEM files, and the Admin credential checked on every
Admin RPC by a server interceptor (by service name, so Admin RPCs added later are covered too)."""
from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path
from typing import Awaitable, Callable

import grpc

ADMIN_SERVICE = "elasticmoe.v1.Admin"


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path!r}: {exc.strerror}") from exc


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """TLS with this certificate; with a client CA, mutual TLS: a client without a certificate
    signed by that CA cannot complete the handshake."""
    pair = (_read(key, "--tls-key"), _read(cert, "--tls-cert"))
    ca = _read(client_ca, "--tls-client-ca") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(ca: str | None, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    """For clients (the CLI): trust `ca` (None: the system's roots); a client certificate for mTLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "--tls-ca") if ca else None,
        private_key=_read(key, "--tls-key") if key else None,
        certificate_chain=_read(cert, "--tls-cert") if cert else None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False   # a name other than localhost may resolve to anything: treat it as public


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the Admin credential."""
    return (("authorization", f"Bearer {token}"),)


class AdminAuth(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for any Admin RPC without `authorization: Bearer <token>`; other services
    (Inference, Health, reflection) pass untouched."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("--admin-token must not be empty")
        self._token = token.encode()
        self._prefix = f"/{ADMIN_SERVICE}/"

    def _allowed(self, metadata: tuple | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                if given.startswith(b"Bearer ") and hmac.compare_digest(given[7:], self._token):
                    return True
        return False

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefix) or self._allowed(details.invocation_metadata):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that refuses before reading the request."""
    async def refuse(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "admin credential missing or wrong (metadata `authorization: Bearer <token>`)")

    async def refuse_stream(request: object, context: grpc.aio.ServicerContext):
        await refuse(request, context)
        yield  # an async generator, as a streaming handler must be

    if handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
        return make(refuse_stream)
    make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
    return make(refuse)
