"""Settings: one dict, ``OPENWORKFLOW = {...}``, read lazily.

Every key has a documented default (see docs/settings.md). Values
are read on each access, so ``override_settings(OPENWORKFLOW=...)`` works in
tests; bad values are reported by the system checks in ``checks.py``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings as django_settings

DEFAULTS: dict[str, Any] = {
    # Runs are partitioned by namespace: a worker only claims its own.
    "NAMESPACE": "default",
    # How long a claim lasts without a heartbeat before another worker may take the run.
    "LEASE_SECONDS": 30.0,
    # Heartbeat period; None means a third of the lease.
    "HEARTBEAT_SECONDS": None,
    # Longest pause between two looks at the queue when nothing wakes the worker.
    "POLL_INTERVAL": 1.0,
    # Runs executed at once by one runworker process (threads).
    "CONCURRENCY": 10,
    # PostgreSQL: wake workers with LISTEN/NOTIFY instead of waiting for the poll.
    "NOTIFY": True,
    # Largest input, step result, output or signal data, as bytes of JSON (0: no limit).
    "MAX_PAYLOAD_BYTES": 1_048_576,
    # PostgreSQL: prepare the worker's step statements. None: yes, unless behind a pooler
    # (POOLER); True: also behind one (PgBouncer 1.21+ with max_prepared_statements).
    "PREPARED_STATEMENTS": None,
    # The database alias where the engine's tables live (route the app there too).
    "DATABASE": "default",
    # Queues and their limits (concurrency, key_concurrency, rate_limit); see docs/queues.md.
    "QUEUES": {"default": {}},
    # How long finished runs are kept after finished_at, per status ("30d"); None: forever.
    "RETENTION": None,
    # OpenTelemetry spans and trace context, when opentelemetry-api is installed (tracing.py).
    "TRACING": True,
    # PostgreSQL: is DATABASE reached through a pooler in transaction mode (PgBouncer)?
    # None: the worker finds out (pooler.py); True or False: as you say.
    "POOLER": None,
    # How long the run pages and the admin wait for a run's row lock (a step holding it)
    # before they answer "busy in a step" (seconds).
    "PAGE_LOCK_TIMEOUT": 2.0,
    # PostgreSQL: a DATABASES alias reaching DATABASE's database directly (not through a
    # pooler), where the worker LISTENs. None: DATABASE itself, unless behind a pooler.
    "LISTEN_DATABASE": None,
    # PostgreSQL: how the worker notices a dead connection (liveness.py; docs/operations.md).
    # Seconds; None leaves each to libpq, the kernel and the server.
    # libpq's connect_timeout of the worker's connections (whole seconds, at least 2).
    "CONNECT_TIMEOUT": 10,
    # TCP keepalives: first probe after this idle time, 3 probes a third of it apart.
    "TCP_KEEPALIVE": 10,
    # tcp_user_timeout: how long sent data may stay unacknowledged before the kernel gives up.
    "TCP_USER_TIMEOUT": 30,
    # The worker's own statements: one without an answer this long ends its connection.
    "STATEMENT_TIMEOUT": 30,
}


class Settings:
    """Typed, lazy view of ``settings.OPENWORKFLOW``."""

    def _get(self, key: str) -> Any:
        user = getattr(django_settings, "OPENWORKFLOW", None) or {}
        return user.get(key, DEFAULTS[key])

    @property
    def NAMESPACE(self) -> str:
        return str(self._get("NAMESPACE"))

    @property
    def LEASE_SECONDS(self) -> float:
        return float(self._get("LEASE_SECONDS"))

    @property
    def HEARTBEAT_SECONDS(self) -> float:
        value = self._get("HEARTBEAT_SECONDS")
        return float(value) if value is not None else self.LEASE_SECONDS / 3

    @property
    def POLL_INTERVAL(self) -> float:
        return float(self._get("POLL_INTERVAL"))

    @property
    def CONCURRENCY(self) -> int:
        return int(self._get("CONCURRENCY"))

    @property
    def MAX_PAYLOAD_BYTES(self) -> int:
        return int(self._get("MAX_PAYLOAD_BYTES"))

    @property
    def NOTIFY(self) -> bool:
        return bool(self._get("NOTIFY"))

    @property
    def PREPARED_STATEMENTS(self) -> bool | None:
        """None: decided by ``pooler.prepared_statements()``."""
        value = self._get("PREPARED_STATEMENTS")
        return None if value is None else bool(value)

    @property
    def DATABASE(self) -> str:
        return str(self._get("DATABASE"))

    @property
    def QUEUES(self) -> Any:
        return self._get("QUEUES")

    @property
    def TRACING(self) -> bool:
        return self._get("TRACING") is True

    @property
    def POOLER(self) -> bool | None:
        value = self._get("POOLER")
        return None if value is None else bool(value)

    @property
    def PAGE_LOCK_TIMEOUT(self) -> float:
        return float(self._get("PAGE_LOCK_TIMEOUT"))

    @property
    def LISTEN_DATABASE(self) -> str | None:
        value = self._get("LISTEN_DATABASE")
        return None if value is None else str(value)

    @property
    def CONNECT_TIMEOUT(self) -> float | None:
        return _seconds(self._get("CONNECT_TIMEOUT"))

    @property
    def TCP_KEEPALIVE(self) -> float | None:
        return _seconds(self._get("TCP_KEEPALIVE"))

    @property
    def TCP_USER_TIMEOUT(self) -> float | None:
        return _seconds(self._get("TCP_USER_TIMEOUT"))

    @property
    def STATEMENT_TIMEOUT(self) -> float | None:
        return _seconds(self._get("STATEMENT_TIMEOUT"))

    @property
    def RETENTION(self) -> dict[str, timedelta] | None:
        """Status -> how long runs of that status are kept; None (or empty): keep them all.

        Raises ``ValueError`` for an invalid value (check E014 reports it first).
        """
        return _retention(self._get("RETENTION")) or None


app_settings = Settings()


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)


def _retention(value: Any) -> dict[str, timedelta] | None:
    from .retention import parse_retention

    return parse_retention(value)
