"""Every internal connection proves it belongs to this server before any byte of work is read.

The server (controller) draws a random 32-byte secret at start and hands it to its workers through
Ray at actor start; nothing else knows it. On connect both sides prove they hold it, with fresh
nonces from both sides so that no proof can be replayed on another connection or reflected back:

    client -> server   HELLO: magic b"EMA1", u8 purpose, 32-byte client nonce          (37 bytes)
    server -> client   32-byte server nonce, HMAC(secret, "server"|purpose|cn|sn)      (64 bytes)
    client -> server   HMAC(secret, "client"|purpose|sn|cn)                            (32 bytes)
    server -> client   b"\\x01" accepted                                                (1 byte)

Every message has a fixed size, so an unproven peer makes the server allocate nothing it chose;
comparisons are constant-time (`hmac.compare_digest`); the purpose (which service the peer asks
for) is inside the proofs, so a proof for one service does not open another.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import time
from dataclasses import dataclass, field

from experts.wire.framing import frame, recv_bytes

MAGIC = b"EMA1"
SECRET_BYTES = 32
NONCE_BYTES = 32
PROOF_BYTES = 32
ACCEPTED = b"\x01"
_HELLO = frame(f"4sB{NONCE_BYTES}s")

# what a proven connection is for
PURPOSE_EXCHANGE = 1   # engine <-> worker exchange over this TCP stream
PURPOSE_RING = 2       # engine <-> worker exchange through a shared-memory ring; this stream stays as its lifeline
PURPOSE_TRANSFER = 3   # worker <-> worker peer copy of segment bytes
PURPOSES = (PURPOSE_EXCHANGE, PURPOSE_RING, PURPOSE_TRANSFER)


@dataclass(frozen=True)
class ServerSecret:
    """The per-server key of every internal connection. Its repr hides the bytes (logs, Ray's
    error messages)."""
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != SECRET_BYTES:
            raise ValueError(f"a server secret is {SECRET_BYTES} bytes, got {type(self.key).__name__} "
                             f"of length {len(self.key) if isinstance(self.key, bytes) else '?'}")

    @staticmethod
    def generate() -> ServerSecret:
        return ServerSecret(secrets.token_bytes(SECRET_BYTES))

    def proof(self, side: bytes, purpose: int, first: bytes, second: bytes) -> bytes:
        return hmac.new(self.key, side + bytes([purpose]) + first + second, hashlib.sha256).digest()


class ServerHandshake:
    """The accepting side, fed by experts/wire/framing.BoundedAcceptor (no thread of its own)."""

    def __init__(self, secret: ServerSecret, allowed: tuple[int, ...]) -> None:
        self._secret = secret
        self._allowed = allowed
        self._state = "hello"
        self._purpose = 0
        self._client_nonce = b""
        self._server_nonce = b""

    def expects(self) -> int:
        return {"hello": _HELLO.size, "proof": PROOF_BYTES}.get(self._state, 0)

    def purpose(self) -> int:
        assert self._state == "done", self._state
        return self._purpose

    def feed(self, data: bytes) -> bytes:
        if self._state == "hello":
            magic, purpose, nonce = _HELLO.unpack(data)
            if magic != MAGIC:
                raise PermissionError(f"not a handshake: magic {magic!r}")
            if purpose not in self._allowed:
                raise PermissionError(f"purpose {purpose} is not served here (serves {self._allowed})")
            self._purpose, self._client_nonce = purpose, nonce
            self._server_nonce = secrets.token_bytes(NONCE_BYTES)
            self._state = "proof"
            return self._server_nonce + self._secret.proof(b"server", purpose, nonce, self._server_nonce)
        if self._state == "proof":
            expected = self._secret.proof(b"client", self._purpose, self._server_nonce, self._client_nonce)
            if not hmac.compare_digest(data, expected):
                self._state = "refused"
                raise PermissionError("the peer does not hold this server's secret")
            self._state = "done"
            return ACCEPTED
        raise PermissionError(f"handshake fed in state {self._state}")


def client_handshake(sock: socket.socket, secret: ServerSecret, purpose: int, timeout: float = 10.0) -> None:
    """Prove ourselves to the server on `sock` and check that it proves itself too. Raises
    PermissionError when the server does not hold the secret or refuses ours."""
    deadline = time.monotonic() + timeout
    nonce = secrets.token_bytes(NONCE_BYTES)
    sock.settimeout(timeout)
    sock.sendall(_HELLO.pack(MAGIC, purpose, nonce))
    try:
        answer = recv_bytes(sock, NONCE_BYTES + PROOF_BYTES, deadline)
    except ConnectionError as exc:
        raise PermissionError(f"the server refused the handshake: {exc}") from exc
    server_nonce, proof = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
    if not hmac.compare_digest(proof, secret.proof(b"server", purpose, nonce, server_nonce)):
        raise PermissionError("the server does not hold this server's secret")
    sock.sendall(secret.proof(b"client", purpose, server_nonce, nonce))
    try:
        verdict = recv_bytes(sock, 1, deadline)
    except ConnectionError as exc:
        raise PermissionError(f"the server refused our proof: {exc}") from exc
    if verdict != ACCEPTED:
        raise PermissionError(f"the server answered {verdict!r} to our proof")
    sock.settimeout(None)
