"""Framing shared by every internal connection (data plane, ring setup, peer transfer).

One byte order (little-endian, the order of every host we serve on, so payload arrays go on the
wire as they lie in memory), one `recv_exact`, one scatter send, one bound check, and one
acceptor that bounds what an unknown peer can cost a worker:

- a peer that has not proven itself (experts/wire/auth.py) costs no thread: the acceptor's one
  thread runs every pending handshake non-blocking, closes it at `handshake_timeout`, and keeps
  at most `max_pending` of them;
- a proven peer gets one thread, and at most `max_connections` of them live; more are refused;
- a message once started must arrive within `io_timeout` (a slow reader or writer cannot hold a
  thread), and a link idle past `idle_timeout` (when set) is closed.
"""
from __future__ import annotations

import logging
import select
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

log = logging.getLogger(__name__)

BYTE_ORDER = "<"


def frame(fmt: str) -> struct.Struct:
    """A header layout in the wire's byte order (`fmt` without an order character)."""
    if fmt[:1] in "<>!=@":
        raise ValueError(f"header format {fmt!r} must not choose its own byte order")
    return struct.Struct(BYTE_ORDER + fmt)


class FrameError(ValueError):
    """A peer sent a header outside the bounds of this server: the stream cannot be trusted."""


def check_bound(what: str, value: int, low: int, high: int) -> int:
    """`value` if low <= value <= high, else FrameError quoting it (before anything is allocated)."""
    if not low <= value <= high:
        raise FrameError(f"{what} {value!r} is outside [{low}, {high}]")
    return value


def remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def recv_exact(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill `view` from `sock`. With a deadline (time.monotonic), each receive waits only until it;
    without one, the socket's own timeout applies."""
    got, n = 0, len(view)
    while got < n:
        if deadline is not None:
            sock.settimeout(remaining(deadline))
        received = sock.recv_into(view[got:])
        if received == 0:
            raise ConnectionError(f"the peer closed the connection after {got} of {n} bytes")
        got += received


def peer_closed(sock: socket.socket) -> bool:
    """Whether `sock`'s other end closed (a ring's lifeline, an idle TCP link), without waiting (select, not a timed recv: a socket
    with a timeout would wait that long on an empty buffer)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def recv_bytes(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray(n)
    recv_exact(sock, memoryview(buf), deadline)
    return bytes(buf)


def recv_message_start(sock: socket.socket, view: memoryview, io_timeout: float,
                       idle_timeout: float | None) -> bool:
    """Receive a header that starts a message: wait for its first byte up to `idle_timeout`
    (None: for ever), then the rest within `io_timeout`. False when the peer closed between
    messages."""
    sock.settimeout(idle_timeout)
    first = sock.recv_into(view, len(view))
    if first == 0:
        return False
    if first < len(view):
        recv_exact(sock, view[first:], time.monotonic() + io_timeout)
    return True


def send_parts(sock: socket.socket, parts: list) -> None:
    """Send several buffers with one sendmsg in the common case, finishing a partial send."""
    views = [memoryview(p).cast("B") for p in parts]
    sent = sock.sendmsg(views)
    for v in views:
        if sent >= len(v):
            sent -= len(v)
            continue
        sock.sendall(v[sent:])
        sent = 0


def as_bytes(view: memoryview) -> memoryview:
    """A flat byte view of a C-contiguous buffer (ValueError otherwise)."""
    view = memoryview(view)
    if view.format == "B" and view.ndim == 1:
        return view
    if not view.c_contiguous:
        raise ValueError(f"wire buffers must be C-contiguous, got shape {view.shape}")
    return view.cast("B")


def nodelay(sock: socket.socket) -> socket.socket:
    """Small messages must not wait on Nagle's algorithm."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@dataclass(frozen=True)
class ConnectionLimits:
    """What one listener lets peers cost. Timeouts in seconds."""
    max_connections: int = 16          # proven peers served at once (one thread each)
    max_pending: int = 64              # handshakes in progress (no thread: the acceptor runs them)
    handshake_timeout: float = 2.0     # an unproven peer is closed after this
    io_timeout: float = 30.0           # a started message must arrive whole within this
    idle_timeout: float | None = None  # a proven link idle this long is closed (None: never)

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_pending"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("handshake_timeout", "io_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.idle_timeout is not None and not self.idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 or None, got {self.idle_timeout!r}")


class Handshake(Protocol):
    """The server side of a fixed-size handshake, driven by the acceptor without a thread."""

    def expects(self) -> int:
        """Bytes the next step needs (0 when finished)."""

    def feed(self, data: bytes) -> bytes:
        """Consume exactly `expects()` bytes; return what to send back (may be empty). Raises
        PermissionError for a peer that failed to prove itself."""

    def purpose(self) -> int:
        """What the proven peer asked for (valid once finished)."""


class BoundedAcceptor:
    """Accepts on `listener`, proves each peer with a fresh `handshake()`, then runs
    `serve(conn, purpose)` on a thread of its own, within `limits`."""

    def __init__(self, listener: socket.socket, handshake: Callable[[], Handshake],
                 serve: Callable[[socket.socket, int], None], limits: ConnectionLimits, name: str) -> None:
        self.limits = limits
        self.name = name
        self.refused = 0                       # connections closed unproven or over the limit
        self._listener = listener
        self._make_handshake = handshake
        self._serve = serve
        self._lock = threading.Lock()
        self._live: dict[socket.socket, threading.Thread] = {}
        self._stopping = False
        listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name=f"{name}-accept", daemon=True)
        self._thread.start()

    def live_connections(self) -> int:
        with self._lock:
            return len(self._live)

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        pending: dict[socket.socket, tuple[Handshake, bytearray, float]] = {}
        try:
            while not self._stopping:
                now = time.monotonic()
                wait = min((d for _, _, d in pending.values()), default=now + 1.0) - now
                for key, _ in sel.select(timeout=max(0.0, min(wait, 1.0))):
                    sock = key.fileobj
                    if sock is self._wake_r:
                        continue
                    if sock is self._listener:
                        self._accept(sel, pending)
                    else:
                        self._step(sel, pending, sock)  # type: ignore[arg-type]
                now = time.monotonic()
                for sock in [s for s, (_, _, d) in pending.items() if d <= now]:
                    self._drop(sel, pending, sock, "handshake timed out")
        finally:
            for sock in list(pending):
                self._drop(sel, pending, sock, "acceptor stopped")
            sel.close()

    def _accept(self, sel: selectors.BaseSelector, pending: dict) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return   # stop() closed the listener
            if len(pending) >= self.limits.max_pending:
                # evict the oldest unproven peer, not the newcomer: a flood of idle connections
                # then cannot keep a real peer (which proves itself in a millisecond) out
                oldest = min(pending, key=lambda s: pending[s][2])
                self._drop(sel, pending, oldest, "too many handshakes pending")
            conn.setblocking(False)
            handshake = self._make_handshake()
            pending[conn] = (handshake, bytearray(), time.monotonic() + self.limits.handshake_timeout)
            sel.register(conn, selectors.EVENT_READ, None)

    def _step(self, sel: selectors.BaseSelector, pending: dict, conn: socket.socket) -> None:
        handshake, buf, deadline = pending[conn]
        try:
            chunk = conn.recv(handshake.expects() - len(buf))
            if not chunk:
                raise ConnectionError("peer closed during the handshake")
            buf += chunk
            if len(buf) < handshake.expects():
                return
            reply = handshake.feed(bytes(buf))
            buf.clear()
            if reply and conn.send(reply) != len(reply):
                raise ConnectionError("handshake reply did not fit the socket buffer")
        except (OSError, PermissionError, ValueError) as exc:
            self._drop(sel, pending, conn, str(exc))
            return
        if handshake.expects():
            return
        sel.unregister(conn)
        del pending[conn]
        conn.setblocking(True)
        self._start_link(conn, handshake.purpose())

    def _start_link(self, conn: socket.socket, purpose: int) -> None:
        with self._lock:
            if self._stopping or len(self._live) >= self.limits.max_connections:
                self.refused += 1
                log.warning("%s: refusing a proven connection: %d live, limit %d", self.name,
                            len(self._live), self.limits.max_connections)
                conn.close()
                return
            thread = threading.Thread(target=self._run_link, args=(conn, purpose), daemon=True,
                                      name=f"{self.name}-conn-{conn.fileno()}")
            self._live[conn] = thread
        thread.start()

    def _run_link(self, conn: socket.socket, purpose: int) -> None:
        try:
            self._serve(conn, purpose)
        except (OSError, FrameError) as exc:
            # the peer went away, idled past its timeout, sent a header out of bounds, or stop()
            log.debug("%s: link closed: %s", self.name, exc)
        except Exception:
            log.exception("%s: link failed", self.name)
        finally:
            with self._lock:
                self._live.pop(conn, None)
            conn.close()

    def _drop(self, sel: selectors.BaseSelector, pending: dict, conn: socket.socket, why: str) -> None:
        self.refused += 1
        log.debug("%s: closing an unproven connection: %s", self.name, why)
        sel.unregister(conn)
        del pending[conn]
        conn.close()

    def stop(self) -> None:
        """Close the listener and every link, then join their threads. Idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            live = list(self._live.items())
        self._wake_w.send(b"x")
        self._thread.join(timeout=10.0)
        self._listener.close()
        # shutdown() wakes a thread blocked in recv/send; each thread closes its own socket, since
        # closing a descriptor another thread is blocked on may hit a reused fd.
        for conn, _ in live:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        me = threading.current_thread()
        for _, thread in live:
            if thread is not me:
                thread.join(timeout=10.0)
                if thread.is_alive():
                    log.warning("%s: link thread %s did not stop within 10 s", self.name, thread.name)
        self._wake_r.close()
        self._wake_w.close()
