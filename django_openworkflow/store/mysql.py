"""``MysqlStore``: the ORM store with MySQL's and MariaDB's forms of two guarantees.

- **One run per idempotency key.** PostgreSQL serializes the starts of one key
  with a transaction-level advisory lock, SQLite with its database write lock.
  Here the key hashes to one of ``KEY_LOCK_SLOTS`` rows of ``WorkflowKeyLock``,
  locked by ``INSERT ... ON DUPLICATE KEY UPDATE``: an exclusive InnoDB row
  lock on the new or the existing row (for waiters too, so they never deadlock
  upgrading a shared lock), held until the outermost transaction commits or
  rolls back, as the advisory lock is. ``GET_LOCK`` would not do: it belongs
  to the session and outlives a rollback, for which Django has no hook.
  Two keys that share a slot wait for each other; that costs a wait, never a
  wrong answer.
- **The lock order.** MySQL and MariaDB lock rows as they read them, before
  ``ORDER BY`` sorts them (two lockers deadlocked): each row is locked by a
  statement of its own, in the lock order read first.
- **JSON depth.** MariaDB's JSON columns hold documents nested at most 31 deep
  (MySQL 8's: 100); deeper values are refused before they are written.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from django.db import DatabaseError

from ..managers import LOCK_ORDER
from .orm import OrmStore

KEY_LOCK_SLOTS = 65_536  # rows of WorkflowKeyLock that keys hash to
MYSQL_JSON_DEPTH = 30  # one level left for the engine's {"data": payload}
LOCK_WAIT_TIMEOUT = 1205  # ER_LOCK_WAIT_TIMEOUT
DEADLOCK = 1213  # ER_LOCK_DEADLOCK


class MysqlStore(OrmStore):
    vendor = "mysql"
    max_json_depth = MYSQL_JSON_DEPTH

    def lock_key(self, *parts: str) -> None:
        from ..models import WorkflowKeyLock

        text = "\x1f".join(("django_openworkflow", *parts))
        digest = hashlib.sha256(text.encode()).digest()
        table = self.connection.ops.quote_name(WorkflowKeyLock._meta.db_table)
        with self.connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} (slot) VALUES (%s) ON DUPLICATE KEY UPDATE slot = slot",
                [int.from_bytes(digest[:8], "big") % KEY_LOCK_SLOTS],
            )

    @contextmanager
    def time_limit(self, seconds: float | None) -> Iterator[None]:
        """MariaDB's ``max_statement_time`` (seconds), MySQL's ``max_execution_time``
        (milliseconds, SELECT only), set for the session and put back after the block;
        each limit is per query."""
        if seconds is None:
            yield
            return
        if self.connection.mysql_is_mariadb:
            variable, value = "max_statement_time", max(seconds, 0.000001)
        else:
            variable, value = "max_execution_time", max(1, round(seconds * 1000))
        with self.session_variable(variable, value):
            yield

    @contextmanager
    def limited_lock_waits(self, seconds: float) -> Iterator[None]:
        """``innodb_lock_wait_timeout``, whole seconds rounded up (MySQL: at least 1; MariaDB:
        0 waits not at all), set for the session and put back after the block."""
        wait = math.ceil(seconds)
        if not self.connection.mysql_is_mariadb:
            wait = max(1, wait)
        with self.session_variable("innodb_lock_wait_timeout", wait), self.atomic():
            yield

    def lock_wait_expired(self, exc: DatabaseError) -> bool:
        """Error 1205, "Lock wait timeout exceeded": ``innodb_lock_wait_timeout`` ran out."""
        return bool(exc.args) and exc.args[0] == LOCK_WAIT_TIMEOUT

    def deadlocked(self, exc: DatabaseError) -> bool:
        """Error 1213, "Deadlock found when trying to get lock"."""
        return bool(exc.args) and exc.args[0] == DEADLOCK

    @contextmanager
    def session_variable(self, variable: str, value: Any) -> Iterator[None]:
        """Set a session variable for the block; put it back after (or, if that fails,
        close the connection: never leave one with our value behind)."""
        connection = self.connection
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT @@SESSION.{variable}")
            (before,) = cursor.fetchone()
            cursor.execute(f"SET SESSION {variable} = %s", [value])
        try:
            yield
        finally:
            try:
                with connection.cursor() as cursor:
                    cursor.execute(f"SET SESSION {variable} = %s", [before])
            except DatabaseError:
                connection.close()

    def lock_runs(self, ids: Iterable[Any]) -> list[Any]:
        ordered = self.runs.filter(pk__in=ids).order_by(*LOCK_ORDER).values_list("pk", flat=True)
        one_row = self.runs.select_for_update().values_list("pk", flat=True)
        return [pk for pk in list(ordered) if list(one_row.filter(pk=pk))]
