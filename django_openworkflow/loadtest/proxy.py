"""A loopback TCP proxy that can black-hole its traffic: network partitions for the chaos test.

``PartitionProxy(("127.0.0.1", 5432))`` listens on a free loopback port and
forwards every connection to the upstream address (PostgreSQL), byte for
byte, on one thread of its own (a ``selectors`` loop).

``partition(seconds)`` black-holes it, as a network partition does, not as a
crash does: every connection stays open and nothing passes either way. What
arrives is kept (TCP would retransmit it after the heal), up to a bound per
direction past which the proxy stops reading (the sender's window fills up).
A connection accepted during the partition reaches nobody: the upstream
connection is made at the heal. A side that closes during the partition is
not told to the other side (a partition drops the FIN too). ``heal()``, or
the end of the ``seconds``, lets the kept bytes flow again; then the peers of
the sides that went away are closed, after what was kept for them was
delivered.

The kernel still ACKs every byte and answers keepalive probes on both sides,
so TCP keepalives and ``tcp_user_timeout`` see nothing wrong: only a client
that times out a statement waiting for its answer notices (``liveness.py``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import selectors
import socket
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

# Bytes kept per direction of one connection during a partition before the proxy stops
# reading that side (its sender's buffers then fill up, as with a real partition).
KEEP_LIMIT = 4 * 1024 * 1024
# A chaos worker's settings (``worker_settings.py``): its engine database through this proxy.
PROXY_ENV = "OPENWORKFLOW_CHAOS_PROXY"
CHUNK = 65536


class _Side:
    """One socket of a connection and the bytes waiting to be written to it."""

    __slots__ = ("eof", "name", "pending", "sock")

    def __init__(self, sock: socket.socket | None, name: str) -> None:
        self.sock = sock
        self.pending = bytearray()  # to write to this socket
        self.eof = False  # it sent its FIN (or failed): nothing more comes from it
        self.name = name


class _Connection:
    def __init__(self, client: socket.socket) -> None:
        self.client = _Side(client, "client")
        self.server = _Side(None, "server")  # connected at once, or at the heal
        self.closed = False

    def peer(self, side: _Side) -> _Side:
        return self.server if side is self.client else self.client


class PartitionProxy:
    """Forward loopback connections to ``upstream``; black-hole them on demand."""

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1", port: int = 0):
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"the partition proxy listens on loopback only, not on {host!r}")
        self.upstream = upstream
        self._listener = socket.create_server((host, port))
        self._listener.setblocking(False)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._lock = threading.Lock()
        self._partitioned = False
        self._heal_at: float | None = None  # monotonic time of a bounded partition's end
        self._connections: list[_Connection] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.partitions = 0  # partitions begun
        self.connections_accepted = 0

    # --- control (any thread) ----------------------------------------------------

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def partitioned(self) -> bool:
        return self._partitioned

    def start(self) -> PartitionProxy:
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(
            target=self._loop, name=f"partition-proxy-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def partition(self, seconds: float | None = None) -> None:
        """Black-hole every connection, now and new ones; heal after ``seconds`` if given."""
        with self._lock:
            if not self._partitioned:
                self.partitions += 1
            self._partitioned = True
            self._heal_at = None if seconds is None else time.monotonic() + seconds
        self._wake()

    def heal(self) -> None:
        """Let the kept bytes flow again; close the peers of the sides that went away."""
        with self._lock:
            self._partitioned = False
            self._heal_at = None
        self._wake()

    def open_connections(self) -> int:
        with self._lock:
            return sum(not c.closed for c in self._connections)

    def held(self) -> int:
        """Bytes read from one side and not yet written to the other (held by a partition)."""
        with self._lock:
            connections = list(self._connections)
        return sum(len(c.client.pending) + len(c.server.pending) for c in connections)

    def upstream_ports(self, *, client_gone: bool = False) -> list[int]:
        """The local ports of the open upstream connections (the server's ``client_port``);
        with ``client_gone``, of those whose client closed its side (held by a partition)."""
        with self._lock:
            connections = list(self._connections)
        ports = []
        for conn in connections:
            sock = conn.server.sock
            if sock is not None and not conn.closed and (conn.client.eof or not client_gone):
                with contextlib.suppress(OSError):
                    ports.append(sock.getsockname()[1])
        return ports

    def stop(self) -> None:
        """Close every connection and the listening socket; end the thread."""
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(10)
        for conn in self._connections:
            self._close(conn)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    def __enter__(self) -> PartitionProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # --- the loop (the proxy's thread) ----------------------------------------------

    def _loop(self) -> None:
        while not self._stopping:
            with self._lock:
                heal_at = self._heal_at
            timeout = None if heal_at is None else max(0.0, heal_at - time.monotonic())
            events = self._selector.select(timeout)
            with self._lock:
                if self._heal_at is not None and time.monotonic() >= self._heal_at:
                    self._partitioned = False
                    self._heal_at = None
                partitioned = self._partitioned
            for key, mask in events:
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                else:
                    conn, side = key.data
                    if mask & selectors.EVENT_READ:
                        self._read(conn, side)
                    if mask & selectors.EVENT_WRITE and not partitioned:
                        self._write(conn, side)
            for conn in list(self._connections):
                self._settle(conn, partitioned)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(client)
            with self._lock:
                self._connections.append(conn)
                self.connections_accepted += 1
            self._selector.register(client, selectors.EVENT_READ, (conn, conn.client))

    def _connect_upstream(self, conn: _Connection) -> bool:
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError as exc:
            logger.warning("partition proxy cannot reach upstream=%s error=%s", self.upstream, exc)
            self._close(conn)
            return False
        server.setblocking(False)
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.server.sock = server
        self._selector.register(server, selectors.EVENT_READ, (conn, conn.server))
        return True

    def _read(self, conn: _Connection, side: _Side) -> None:
        """Read what ``side`` sent into its peer's pending bytes (partitioned or not)."""
        if conn.closed or side.sock is None or side.eof:
            return
        peer = conn.peer(side)
        try:
            data = side.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # a reset: as good as a FIN here
        if data:
            peer.pending += data
        else:
            side.eof = True

    def _write(self, conn: _Connection, side: _Side) -> None:
        if conn.closed or side.sock is None or not side.pending:
            return
        try:
            sent = side.sock.send(side.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            side.eof = True  # it cannot take more: the connection is over
            side.pending.clear()
            conn.peer(side).eof = True
            return
        del side.pending[:sent]

    def _settle(self, conn: _Connection, partitioned: bool) -> None:
        """Connect, close and (re)register one connection after the events of a pass."""
        if conn.closed:
            return
        if not partitioned:
            if conn.server.sock is None:
                if conn.client.eof and not conn.server.pending:
                    self._close(conn)  # it went away before reaching anyone
                    return
                if not self._connect_upstream(conn):
                    return
            # A side that went away: once what it sent is delivered, close the other.
            for side in (conn.client, conn.server):
                peer = conn.peer(side)
                if side.eof and not peer.pending:
                    self._close(conn)
                    return
        for side in (conn.client, conn.server):
            if side.sock is None:
                continue
            peer = conn.peer(side)
            events = 0
            if not side.eof and len(peer.pending) < KEEP_LIMIT:
                events |= selectors.EVENT_READ
            if side.pending and not partitioned:
                events |= selectors.EVENT_WRITE
            self._reregister(side.sock, events, (conn, side))

    def _reregister(self, sock: socket.socket, events: int, data: Any) -> None:
        try:
            key = self._selector.get_key(sock)
        except KeyError:
            if events:
                self._selector.register(sock, events, data)
            return
        if not events:
            self._selector.unregister(sock)
        elif key.events != events:
            self._selector.modify(sock, events, data)

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        for side in (conn.client, conn.server):
            if side.sock is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(side.sock)
            side.sock.close()
        with self._lock:
            self._connections = [c for c in self._connections if c is not conn]


def upstream_of(settings_dict: dict[str, Any]) -> tuple[str, int]:
    """The TCP address of a Django database's settings (HOST, PORT)."""
    host = settings_dict.get("HOST") or "127.0.0.1"
    if host.startswith("/"):
        raise ValueError(f"the partition proxy forwards to TCP only; HOST is a socket: {host}")
    return host, int(settings_dict.get("PORT") or 5432)
