"""Is the engine's database reached through a pooler in transaction mode (PgBouncer)?

Behind such a pooler, one client connection is served by a different server
session from one transaction to the next. What a session keeps between
transactions is then not ours to keep: statements prepared by name, ``SET``
without ``LOCAL``, ``LISTEN``.

``OPENWORKFLOW["POOLER"]`` says so (``True`` or ``False``); ``None`` (the
default) lets the worker find out. Callers ask ``behind_pooler(using)``.

How it finds out (PostgreSQL only; other databases are never behind one).
When a client connects, the server sends it a key for cancelling its
queries: the server process's id and a secret. PgBouncer cannot hand out the
key of one server process, since the client may be served by any of them: it
makes up a key of its own, whose "process id" is random (checked with
PgBouncer 1.18 in transaction mode; poolers built the same way must do the
same). So a connection whose key's process id (``info.backend_pid``, read
without a query) differs from ``pg_backend_pid()`` (one query) goes through
such a pooler. A TCP proxy, a port forward or a Kubernetes service pass the
key on: they are not taken for a pooler, and need not be, since each client
keeps one server session. The limits:

- a PgBouncer in *session* mode is taken for one in transaction mode (it
  makes up keys too, and a client cannot see the mode): set ``POOLER`` to
  ``False`` there, or the worker gives up prepared statements and ``LISTEN``
  for nothing;
- a pooler that passes the server's key on while switching sessions between
  transactions would not be seen: set ``POOLER`` to ``True``.

It is asked once per process and alias, on the calling thread's connection to
that alias, and remembered (``forget()`` clears the memory, for tests).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from .conf import app_settings

logger = logging.getLogger(__name__)

_detected: dict[tuple[int, str], bool] = {}
_lock = threading.Lock()


def behind_pooler(using: str, raw: Any = None) -> bool:
    """Whether the database ``using`` is reached through a pooler in transaction mode.

    Found out on ``raw`` (a psycopg connection to ``using``) when given, else on the
    calling thread's connection. A detection that fails (the database is down) raises
    and remembers nothing: the next call asks again.
    """
    setting = app_settings.POOLER
    if setting is not None:
        return setting
    key = (os.getpid(), using)  # a forked child asks again: its connections are new
    found = _detected.get(key)
    if found is None:
        found = _detect(using) if raw is None else _detect_on(raw)
        with _lock:
            if key not in _detected:
                _detected[key] = found
                logger.info("pooler detected database=%s behind_pooler=%s", using, found)
    return found


def prepared_statements(using: str) -> bool:
    """Whether the worker may prepare its statements with the protocol's named statements.

    ``OPENWORKFLOW["PREPARED_STATEMENTS"]``: ``True`` or ``False`` as said; ``None``
    (the default) means yes unless the database is behind a pooler (PgBouncer carries
    them only from 1.21 on, with ``max_prepared_statements`` set: say ``True`` then).
    """
    setting = app_settings.PREPARED_STATEMENTS
    if setting is not None:
        return setting
    return not behind_pooler(using)


def sql_prepare(using: str) -> bool:
    """Whether the worker may use SQL ``PREPARE`` (a session's statements, which no
    pooler in transaction mode carries, whatever its version)."""
    return prepared_statements(using) and not behind_pooler(using)


def forget() -> None:
    """Detect again at the next ``behind_pooler()``."""
    with _lock:
        _detected.clear()


def _detect(using: str) -> bool:
    from django.db import connections

    connection = connections[using]
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:  # opens the connection if need be
        cursor.execute("SELECT pg_backend_pid()")
        (server_pid,) = cursor.fetchone()
    return int(connection.connection.info.backend_pid) != int(server_pid)


def _detect_on(raw: Any) -> bool:
    with raw.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (server_pid,) = cursor.fetchone()
    return int(raw.info.backend_pid) != int(server_pid)
