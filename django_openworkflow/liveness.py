"""How a worker notices a dead database connection, within bounds it sets itself (PostgreSQL).

A network partition does not reset a TCP connection: the bytes just stop. A
worker blocked on such a connection (inside a step's commit, a claim, a
lease renewal) would wait for the kernel's retransmission timeout, many
minutes. Three layers bound that wait; each is an ``OPENWORKFLOW`` setting
(seconds, ``None`` turns it off) that the worker applies to its own
connections to ``OPENWORKFLOW["DATABASE"]``:

- libpq parameters, added to the alias's ``OPTIONS`` at the worker's start
  unless the project's ``DATABASES`` sets them already (the project's win):
  ``connect_timeout`` (``CONNECT_TIMEOUT``), ``keepalives``,
  ``keepalives_idle/interval/count`` (``TCP_KEEPALIVE``), ``tcp_user_timeout``
  (``TCP_USER_TIMEOUT``). The kernel then ends a connection whose peer stops
  acknowledging (a real partition, a dead host).
- the same keepalives and ``tcp_user_timeout`` on the server's side of each
  session (``set_config(..., false)``, one query per new connection), so the
  server ends the orphaned session of a partitioned worker and its locks go;
  with the watchdog on, ``client_connection_check_interval`` too (PostgreSQL
  14+), so a session whose statement the watchdog ended stops waiting.
  Not behind a pooler in transaction mode (``pooler.behind_pooler``): a
  session setting would leak to other clients there.
- a statement watchdog, ``STATEMENT_TIMEOUT``: a thread of the worker
  samples its connections about once a second; one whose statement was sent
  that long ago with no byte of an answer since (the kernel's ``TCP_INFO``:
  the last data sent and received; libpq says a command is in progress) is
  ended with ``shutdown()`` on its socket. The blocked thread gets an
  ``OperationalError`` at once and the engine's usual paths take over:
  release the claim, close, reconnect with backoff. Nothing is added to a
  statement's path; the watchdog costs one ``getsockopt`` a connection a
  sample. It is what notices a peer whose kernel still acknowledges but that
  answers nothing: a hung pooler or proxy, a server stopped with SIGSTOP,
  and the test proxy's partitions (``loadtest/proxy.py``).

The watchdog covers the engine's own statements on the worker's threads
(claims, fences, step records, commits, lease renewals, the listener, which
pings every ``LISTEN_PING_SECONDS``). It leaves alone the statements of a
step's own function (``user_code()``, around each call of it), so a long
report query in a step is never ended by surprise; the kernel's layers still
apply to them. Linux only (``TCP_INFO``); elsewhere the worker logs once that
only the kernel's layers apply.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import struct
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from django.db import connections
from django.db.backends.signals import connection_created

from .conf import app_settings

logger = logging.getLogger(__name__)

# How often the listener, which only waits for notifications, sends a statement of its own
# (so a dead connection shows up as a statement without an answer).
LISTEN_PING_SECONDS = 5.0
KEEPALIVE_PROBES = 3

_TCP_INFO = getattr(socket, "TCP_INFO", None)
# struct tcp_info (linux/tcp.h): 8 one-byte fields, then 32-bit ones; tcpi_last_data_sent
# is the 10th of those, tcpi_last_data_recv the 12th (milliseconds ago).
_TCP_INFO_FORMAT = "8B12I"
_TCP_INFO_SIZE = struct.calcsize(_TCP_INFO_FORMAT)


def libpq_options() -> dict[str, int]:
    """The libpq connection parameters of the settings (those that are not None)."""
    options: dict[str, int] = {}
    if (connect := app_settings.CONNECT_TIMEOUT) is not None:
        options["connect_timeout"] = max(2, math.ceil(connect))  # libpq waits 2 s at least
    if (idle := app_settings.TCP_KEEPALIVE) is not None:
        options["keepalives"] = 1
        options["keepalives_idle"] = max(1, math.ceil(idle))
        options["keepalives_interval"] = keepalive_interval(idle)
        options["keepalives_count"] = KEEPALIVE_PROBES
    if (user_timeout := app_settings.TCP_USER_TIMEOUT) is not None:
        options["tcp_user_timeout"] = max(1, round(user_timeout * 1000))
    return options


def own_connection_params(alias: str) -> dict[str, Any]:
    """``psycopg.connect()``'s parameters for a connection the engine opens itself to
    ``alias`` (the listener's): Django's, with ``libpq_options()`` wherever the project's
    ``OPTIONS`` do not say otherwise, as the worker's own connections have them."""
    params = connections[alias].get_connection_params()
    for option in ("cursor_factory", "context", "server_side_binding"):
        params.pop(option, None)
    return {**libpq_options(), **params}


def keepalive_interval(idle: float) -> int:
    return max(1, round(idle / KEEPALIVE_PROBES))


def server_settings() -> dict[str, str]:
    """The same keepalives and user timeout for the server's side of a session."""
    values: dict[str, str] = {}
    if (idle := app_settings.TCP_KEEPALIVE) is not None:
        values["tcp_keepalives_idle"] = str(max(1, math.ceil(idle)))
        values["tcp_keepalives_interval"] = str(keepalive_interval(idle))
        values["tcp_keepalives_count"] = str(KEEPALIVE_PROBES)
    if (user_timeout := app_settings.TCP_USER_TIMEOUT) is not None:
        values["tcp_user_timeout"] = str(max(1, round(user_timeout * 1000)))
    return values


def unanswered_ms(fd: int) -> int | None:
    """How long ago the last data was sent on TCP socket ``fd`` if none came back since, else 0
    (for a connection that waits for an answer: see below).

    None when the kernel cannot tell (not Linux, not TCP: a Unix socket).
    """
    if _TCP_INFO is None:
        return None
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return None
            info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return None
    fields = struct.unpack_from(_TCP_INFO_FORMAT, info)
    last_sent, last_recv = fields[8 + 9], fields[8 + 11]
    # Equal: both in one tick of the kernel's clock (4 ms at HZ=250), a send right after an
    # answer arrived; the order is unknown. The callers ask only about connections that
    # wait for an answer, so "nothing since" is the reading that fits.
    return int(last_sent) if last_recv >= last_sent else 0


class _ThreadState:
    """A worker thread: its worker's ``Liveness``, and whether it runs a step's function."""

    __slots__ = ("__weakref__", "liveness", "user_code")

    def __init__(self, liveness: Liveness) -> None:
        self.liveness = liveness
        self.user_code = 0


class _Watched:
    __slots__ = ("ref", "state")

    def __init__(self, raw: Any, state: _ThreadState) -> None:
        self.ref = weakref.ref(raw)
        self.state = state


_local = threading.local()
_applied_lock = threading.Lock()
_applied: dict[str, tuple[int, dict[str, Any]]] = {}  # alias -> (workers, options we added)


class Liveness:
    """One worker's connection liveness: options at its start, the statement watchdog."""

    def __init__(self, using: str, worker_id: str) -> None:
        self.using = using
        self.worker_id = worker_id
        self.timeout: float | None = None
        # The server's side of each session; None: not known yet (pooler detection failed).
        self._server_side: dict[str, str] | None = {}
        self._pooled = True  # behind a pooler (or not known yet): no session settings
        self.ended = 0  # connections ended by the watchdog
        self._watched: list[_Watched] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._sampler: threading.Thread | None = None
        self._started = False

    @property
    def active(self) -> bool:
        return self._started

    def start(self) -> None:
        """At the worker's start, on PostgreSQL: the options, the session settings, the watchdog."""
        if connections[self.using].vendor != "postgresql":
            return  # MySQL and SQLite: see docs/operations.md
        from .pooler import behind_pooler

        self._started = True
        self._stopped.clear()
        _apply_options(self.using)
        try:
            self._pooled = behind_pooler(self.using)
            self._server_side = {} if self._pooled else server_settings()
        except Exception as exc:  # the database is down: find out on the next connection
            self._pooled, self._server_side = True, None
            logger.warning(
                "pooler detection failed at the start, tried again at the next connection "
                "worker=%s error=%s",
                self.worker_id,
                type(exc).__name__,
            )
        finally:
            if not connections[self.using].in_atomic_block:
                connections[self.using].close()  # the detection's; the next one is watched
        connection_created.connect(_on_connection_created, dispatch_uid=__name__)
        self.timeout = app_settings.STATEMENT_TIMEOUT
        if self.timeout is not None and _TCP_INFO is None:
            logger.warning(
                "statement watchdog unavailable on this platform (no TCP_INFO): a silent "
                "connection is noticed by TCP keepalives and tcp_user_timeout only worker=%s",
                self.worker_id,
            )
            self.timeout = None
        if self.timeout is not None:
            self._sampler = threading.Thread(
                target=self._sample_loop, name="openworkflow-watchdog", daemon=True
            )
            self._sampler.start()
        logger.debug(
            "connection liveness worker=%s options=%s server=%s statement_timeout=%s",
            self.worker_id,
            libpq_options(),
            self._server_side if self._server_side is not None else "not known yet",
            self.timeout,
        )

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._stopped.set()
        if self._sampler is not None:
            self._sampler.join(5)
            self._sampler = None
        _remove_options(self.using)
        with self._lock:
            self._watched.clear()

    # --- the worker's threads ------------------------------------------------------

    @contextlib.contextmanager
    def thread(self) -> Iterator[None]:
        """Around a worker thread's life: its connections to ``using`` are watched."""
        if not self._started:
            yield
            return
        previous = getattr(_local, "state", None)
        state = _local.state = _ThreadState(self)
        connection = connections[self.using]
        if connection.connection is not None:
            if connection.in_atomic_block:
                self.watch(connection.connection, prepare=True)
            else:
                connection.close()  # the next one gets the options
        try:
            yield
        finally:
            _local.state = previous
            with self._lock:
                self._watched = [w for w in self._watched if w.state is not state]

    @property
    def server_side(self) -> dict[str, str]:
        """The settings set on the server's side of each session ({} when not known yet)."""
        return self._server_side or {}

    def watch(self, raw: Any, *, prepare: bool = True) -> None:
        """Watch ``raw`` (a psycopg connection of this thread); set the server's side."""
        state = getattr(_local, "state", None)
        if state is None or state.liveness is not self:
            return
        if prepare and self._server_side is None:
            self._detect_pooler(raw)
        if prepare and not self._pooled:
            self._prepare(raw)
        if self.timeout is not None:
            with self._lock:
                self._watched.append(_Watched(raw, state))

    def _detect_pooler(self, raw: Any) -> None:
        """The pooler detection that failed at the start, on ``raw``; until one succeeds,
        no session setting (behind a pooler it would stay on a server connection)."""
        from .pooler import behind_pooler

        try:
            pooled = behind_pooler(self.using, raw)
            self._server_side = {} if pooled else server_settings()
            self._pooled = pooled
        except Exception as exc:
            logger.debug("pooler detection failed worker=%s detail=%s", self.worker_id, exc)

    def _prepare(self, raw: Any) -> None:
        values = dict(self.server_side)
        if self.timeout is not None and raw.info.server_version >= 140000:
            # A session whose statement the watchdog ended would otherwise go on waiting (for
            # a lock, say) and holding its locks until the wait ends: the server looks for
            # the closed client every so often and ends the session (PostgreSQL 14+).
            values["client_connection_check_interval"] = str(max(1000, round(self.timeout * 1000)))
        if not values:
            return
        names = list(values)
        sql = "SELECT " + ", ".join(["set_config(%s, %s, false)"] * len(names))
        params = [p for name in names for p in (name, values[name])]
        try:
            with raw.cursor() as cursor:
                cursor.execute(sql, params)
        except Exception as exc:  # an old server without tcp_user_timeout, say
            logger.warning(
                "server keepalive settings not applied worker=%s error=%s",
                self.worker_id,
                type(exc).__name__,
            )
            logger.debug("server keepalive settings worker=%s detail=%s", self.worker_id, exc)
            if not raw.closed and raw.info.transaction_status != 0:  # not IDLE
                raw.rollback()

    # --- the watchdog ----------------------------------------------------------------

    def _sample_loop(self) -> None:
        assert self.timeout is not None
        interval = max(0.05, min(1.0, self.timeout / 4))
        while not self._stopped.wait(interval):
            try:
                self.sample()
            except Exception:  # never die: a dead watchdog watches nothing
                logger.exception("statement watchdog failed worker=%s", self.worker_id)

    def sample(self) -> int:
        """Look at each watched connection once; end those past the timeout. How many."""
        from psycopg import pq

        if self.timeout is None:
            return 0
        limit_ms = self.timeout * 1000
        with self._lock:
            watched = list(self._watched)
        gone, ended = [], 0
        for entry in watched:
            raw = entry.ref()
            if raw is None or raw.closed:
                gone.append(entry)
                continue
            if entry.state.user_code:
                continue  # a step's own statements are the step's business
            pgconn = raw.pgconn
            if pgconn.transaction_status != pq.TransactionStatus.ACTIVE:
                continue
            try:
                fd = pgconn.socket
            except Exception:  # closed meanwhile
                continue
            silent = unanswered_ms(fd)
            if silent is None or silent < limit_ms or raw.closed:
                continue
            if self._end(fd, raw, silent):
                ended += 1
                gone.append(entry)
        if gone:
            with self._lock:
                self._watched = [w for w in self._watched if w not in gone]
        return ended

    def _end(self, fd: int, raw: Any, silent_ms: int) -> bool:
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                if raw.closed:  # the number may be another socket's by now
                    return False
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
        self.ended += 1
        logger.warning(
            "connection ended by the statement watchdog: no answer for %.1fs worker=%s "
            "thread=%s statement_timeout=%gs",
            silent_ms / 1000,
            self.worker_id,
            _thread_name(raw),
            self.timeout,
        )
        return True


def _thread_name(raw: Any) -> str:
    return getattr(raw, "_openworkflow_thread", "?")


def _on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    state = getattr(_local, "state", None)
    if state is None or connection.alias != state.liveness.using:
        return
    raw = connection.connection
    with contextlib.suppress(AttributeError, TypeError):
        raw._openworkflow_thread = threading.current_thread().name
    state.liveness.watch(raw)


def watch_here(raw: Any) -> None:
    """Watch a connection this worker thread opened itself (the listener's)."""
    state = getattr(_local, "state", None)
    if state is not None:
        with contextlib.suppress(AttributeError, TypeError):
            raw._openworkflow_thread = threading.current_thread().name
        state.liveness.watch(raw)


def enter_user_code() -> _ThreadState | None:
    """A step's function starts on this thread: the watchdog leaves its statements alone."""
    state: _ThreadState | None = getattr(_local, "state", None)
    if state is not None:
        state.user_code += 1
    return state


def leave_user_code(state: _ThreadState | None) -> None:
    if state is not None:
        state.user_code -= 1


def current() -> Liveness | None:
    """The ``Liveness`` watching this thread, if any (for ``step.parallel``'s threads)."""
    state = getattr(_local, "state", None)
    return None if state is None else state.liveness


def _apply_options(using: str) -> None:
    with _applied_lock:
        count, added = _applied.get(using, (0, {}))
        if count == 0:
            options = connections.settings[using].setdefault("OPTIONS", {})
            added = {k: v for k, v in libpq_options().items() if k not in options}
            options.update(added)
        _applied[using] = (count + 1, added)


def _remove_options(using: str) -> None:
    with _applied_lock:
        count, added = _applied.get(using, (0, {}))
        if count <= 1:
            _applied.pop(using, None)
            options = connections.settings[using].get("OPTIONS", {})
            for key, value in added.items():
                if options.get(key) == value:
                    del options[key]
        else:
            _applied[using] = (count - 1, added)
