"""Peer copy of segment bytes from worker to worker across nodes, over TCP.

Bytes go socket to socket: `sendall` from the source segment's memoryview, `recv_into` the
receiver's memoryview, in chunks, so neither side makes an intermediate copy and nothing passes
through the driver or Ray's object store (pickled tensors through it measured 0.09 GB/s here).

Every connection first proves it belongs to this server (experts/wire/auth.py, purpose TRANSFER):
a process that does not hold the server's secret gets no byte of any expert. Then, in the wire's
byte order (experts/wire/framing.py):
    request: magic b"EMT3", u16 name length (<= 255), u8 packing length, u64 expected bytes,
             then the UTF-8 name, then the ASCII packing
    reply:   magic b"EMT3", u8 status, u8 packing length, u64 bytes, then the source's packing,
             then that many bytes if status OK
Only names of this server's namespace are served. The receiver states the size it expects, so a
mismatch is refused before any byte moves (the reply carries the source's size).

A segment's bytes are kernel-ready: packed by the source's kernel (experts/kernels/moe.py), whose
packing may depend on the op library build the node's CPU loaded. Bytes packed one way are
garbage to a kernel that packs another way, and nothing in them says so. So both sides name the
**packing** they hold and want (an opaque label: kernel layout, build, dtype; experts/worker/
actor.py makes it), and the source refuses a request for another packing before any byte moves:
`fetch` raises `PackingMismatch`, naming both, and the connection stays usable. A connection
serves requests in sequence until the peer closes it, it idles past `io_timeout`, or the server
stops. `TransferClient` reuses one connection; `fetch` opens a fresh one per call: a handshake
well under a millisecond against megabytes moved. A failure mid-transfer closes the connection,
since the stream position is lost.
"""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Callable

from experts.wire.auth import PURPOSE_TRANSFER, ServerHandshake, ServerSecret, client_handshake
from experts.wire.framing import (BoundedAcceptor, ConnectionLimits, as_bytes, frame, nodelay, recv_bytes,
                                  recv_message_start, remaining)

log = logging.getLogger(__name__)

MAGIC = b"EMT3"
MAX_NAME = 255
MAX_PACKING = 255
_REQUEST = frame("4sHBQ")
_REPLY = frame("4sBBQ")
OK, NOT_FOUND, SIZE_MISMATCH, BAD_REQUEST, PACKING_MISMATCH = 0, 1, 2, 3, 4  # reply status


class PackingMismatch(RuntimeError):
    """The source holds the segment packed for another kernel than the receiver's: no byte moved."""

    def __init__(self, message: str, source: str, receiver: str) -> None:
        super().__init__(message)
        self.source, self.receiver = source, receiver


def _packing_bytes(packing: str) -> bytes:
    """The wire form of a packing label (ValueError quoting a bad one)."""
    if not isinstance(packing, str) or not packing.isascii() or not 1 <= len(packing) <= MAX_PACKING:
        raise ValueError(f"packing must be 1 to {MAX_PACKING} ASCII characters, got {packing!r}")
    return packing.encode("ascii")


def transfer_limits(io_timeout: float) -> ConnectionLimits:
    # peers fetch from a handful of connections at once (one per source a receiver copies from)
    return ConnectionLimits(max_connections=32, max_pending=64, handshake_timeout=2.0, io_timeout=io_timeout,
                            idle_timeout=io_timeout)


@dataclass(frozen=True)
class TransferResult:
    """One segment received: its name, its bytes, and seconds from request sent to last byte."""

    name: str
    nbytes: int
    seconds: float


class TransferServer:
    """Serves segments' bytes to proven peers, one thread per live connection (bounded).

    `lookup(name)` returns the segment's bytes (a C-contiguous memoryview, e.g.
    `ExpertSegment.buffer()`) or None. It runs on connection threads, so it must be thread-safe.
    Only names starting with `name_prefix` (this server's namespace) are looked up, and only for
    receivers that want the `packing` every segment here is in.
    """

    def __init__(self, host: str, lookup: Callable[[str], memoryview | None], chunk_bytes: int = 4 << 20,
                 port: int = 0, io_timeout: float = 30.0, *, secret: ServerSecret, name_prefix: str,
                 packing: str) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes!r}")
        self.packing = packing
        self._packing = _packing_bytes(packing)
        self.host, self.port = host, port
        self.chunk_bytes, self.io_timeout = chunk_bytes, io_timeout
        self.limits = transfer_limits(io_timeout)
        self._lookup = lookup
        self._secret = secret
        self._prefix = name_prefix
        self._stopping = False
        self._acceptor: BoundedAcceptor | None = None
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._address is not None, "TransferServer.start() first"
        return self._address

    def start(self) -> tuple[str, int]:
        """Bind and listen (port 0 picks a free one); returns the address peers fetch from."""
        if self._acceptor is not None or self._stopping:
            raise RuntimeError(f"TransferServer cannot start twice (address {self._address})")
        listener = socket.create_server((self.host, self.port), backlog=128)
        self._address = listener.getsockname()[:2]
        self._acceptor = BoundedAcceptor(listener, lambda: ServerHandshake(self._secret, (PURPOSE_TRANSFER,)),
                                         self._serve, self.limits, "emoe-transfer")
        return self._address

    @property
    def refused(self) -> int:
        return self._acceptor.refused if self._acceptor is not None else 0

    def stop(self) -> None:
        """Close the listener and every live connection, then join the threads. Idempotent."""
        self._stopping = True
        if self._acceptor is not None:
            self._acceptor.stop()

    def _serve(self, conn: socket.socket, purpose: int) -> None:
        nodelay(conn)
        head = bytearray(_REQUEST.size)
        while not self._stopping and recv_message_start(conn, memoryview(head), self.limits.io_timeout,
                                                        self.limits.idle_timeout):
            magic, name_len, packing_len, expected = _REQUEST.unpack(head)
            if magic != MAGIC or not 1 <= name_len <= MAX_NAME or not 1 <= packing_len:
                self._reply(conn, BAD_REQUEST, 0)
                return
            raw = recv_bytes(conn, name_len + packing_len, time.monotonic() + self.io_timeout)
            raw, wanted = raw[:name_len], raw[name_len:]
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                name = ""
            if not name.startswith(self._prefix) or "/" in name:
                log.warning("transfer: refused a request for %r (not of this server)", raw[:64])
                self._reply(conn, BAD_REQUEST, 0)
                return
            if wanted != self._packing:
                log.warning("transfer: refused segment %r to a receiver that packs %r (here: %r)", name,
                            wanted.decode("ascii", errors="replace"), self.packing)
                self._reply(conn, PACKING_MISMATCH, 0)
                continue   # no byte of the segment was sent: the stream is still in step
            self._answer(conn, name, expected)

    def _reply(self, conn: socket.socket, status: int, nbytes: int) -> None:
        conn.sendall(_REPLY.pack(MAGIC, status, len(self._packing), nbytes) + self._packing)

    def _answer(self, conn: socket.socket, name: str, expected: int) -> None:
        try:
            found = self._lookup(name)
            view = None if found is None else as_bytes(found)
        except Exception:
            log.exception("transfer lookup of segment %r failed", name)
            view = None
        if view is None:
            self._reply(conn, NOT_FOUND, 0)
            return
        nbytes = view.nbytes
        if nbytes != expected:
            self._reply(conn, SIZE_MISMATCH, nbytes)
            return
        self._reply(conn, OK, nbytes)
        for offset in range(0, nbytes, self.chunk_bytes):
            if self._stopping:
                raise ConnectionAbortedError(f"server stopping, segment {name!r} cut short")
            conn.sendall(view[offset:offset + self.chunk_bytes])


class TransferClient:
    """One proven connection to a peer's TransferServer, reused by the fetches made through it."""

    def __init__(self, address: tuple[str, int], timeout: float = 30.0, *, secret: ServerSecret) -> None:
        self.address = address
        self._route = f"{address[0]}:{address[1]} -> local"
        try:
            sock = nodelay(socket.create_connection(address, timeout=timeout))
        except OSError as e:
            raise RuntimeError(f"transfer {self._route}: cannot connect: {e}") from e
        try:
            client_handshake(sock, secret, PURPOSE_TRANSFER, timeout)
        except OSError as e:   # PermissionError (refused) and timeouts included
            sock.close()
            raise RuntimeError(f"transfer {self._route}: handshake failed: {e}") from e
        self._sock: socket.socket | None = sock

    def fetch(self, name: str, dest: memoryview, timeout: float = 30.0,
              chunk_bytes: int = 4 << 20, *, packing: str) -> TransferResult:
        """Receive segment `name`, packed as `packing` (the receiver's kernel's), straight into
        `dest`, whose size must equal the segment's.

        `timeout` bounds the whole fetch. Raises RuntimeError naming the segment and the route;
        `PackingMismatch` (leaving `dest` and the connection untouched) when the source's bytes
        are packed otherwise.
        """
        what = f"transfer of segment {name!r} {self._route}"
        if self._sock is None:
            raise RuntimeError(f"{what}: client is closed")
        wanted = _packing_bytes(packing)
        dest, encoded = as_bytes(dest), name.encode("utf-8")
        if dest.readonly or chunk_bytes <= 0 or not 1 <= len(encoded) <= MAX_NAME:
            raise ValueError(f"{what}: need a writable dest, chunk_bytes > 0 and a name of 1 to {MAX_NAME} "
                             f"bytes, got readonly={dest.readonly}, chunk_bytes={chunk_bytes}, "
                             f"name of {len(encoded)} bytes")
        nbytes, sock, got = dest.nbytes, self._sock, 0
        deadline = (start := time.monotonic()) + timeout
        try:
            sock.settimeout(remaining(deadline))
            sock.sendall(_REQUEST.pack(MAGIC, len(encoded), len(wanted), nbytes) + encoded + wanted)
            magic, status, packing_len, size = _REPLY.unpack(recv_bytes(sock, _REPLY.size, deadline))
            if magic != MAGIC:
                raise ConnectionError(f"not a transfer reply: {magic!r}")
            held = recv_bytes(sock, packing_len, deadline).decode("ascii", errors="replace")
            if status == PACKING_MISMATCH or (status == OK and held != packing):
                raise PackingMismatch(f"{what} refused: the source packs {held!r} and this worker {packing!r}; "
                                      f"bytes packed for one kernel are garbage to the other (load the expert "
                                      f"from the checkpoint instead)", held, packing)
            if status == SIZE_MISMATCH:
                raise RuntimeError(f"{what} failed: the peer holds {size} bytes, dest has {nbytes}")
            if status == NOT_FOUND:
                raise RuntimeError(f"{what} failed: the peer does not have it")
            if status != OK:
                raise ConnectionError(f"the peer refused the request (status {status})")
            if size != nbytes:
                raise ConnectionError(f"the peer offers {size} bytes for a {nbytes}-byte request")
            while got < nbytes:
                sock.settimeout(remaining(deadline))
                received = sock.recv_into(dest[got:got + chunk_bytes])
                if received == 0:
                    raise ConnectionError("the peer closed the connection")
                got += received
        except PackingMismatch:
            if status == OK:   # a source that sends what was not asked for is out of step
                self.close()
            raise
        except OSError as e:  # includes TimeoutError and ConnectionError
            self.close()
            why = f"timed out after {timeout} s" if isinstance(e, TimeoutError) else str(e)
            raise RuntimeError(f"{what} failed after {got} of {nbytes} bytes: {why}") from e
        return TransferResult(name=name, nbytes=nbytes, seconds=time.monotonic() - start)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> TransferClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch(address: tuple[str, int], name: str, dest: memoryview, timeout: float = 30.0,
          chunk_bytes: int = 4 << 20, *, secret: ServerSecret, packing: str) -> TransferResult:
    """Fetch segment `name`, packed as `packing`, from the peer at `address` into `dest` over a
    fresh connection.

    `timeout` bounds connecting, then (separately) the fetch.
    """
    with TransferClient(address, timeout=timeout, secret=secret) as client:
        return client.fetch(name, dest, timeout=timeout, chunk_bytes=chunk_bytes, packing=packing)
