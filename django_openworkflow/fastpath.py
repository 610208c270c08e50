"""The worker's hot path on PostgreSQL: one statement per step, per claim, per finish.

The generic code in ``managers.py`` and ``engine.py`` (ORM, one transaction
of several statements) is what SQLite and other databases use; on
PostgreSQL these statements do the same work in one round trip and one
commit each, with data-modifying CTEs:

- ``claim``: lock due rows with ``FOR UPDATE SKIP LOCKED`` and mark them
  running, returning each row with its previous ``started_at`` and status.
- ``start_step``: fence the claim (lock the run row), store the previous
  step's deferred result, insert the new ``running`` attempt.
- ``finish``: fence, store the last step's deferred result, complete or fail
  the run.

Every statement is fenced by the claim token exactly as the ORM versions are.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import psycopg
from django.db import connections

from .models import StepAttempt, WorkflowRun

RUN = WorkflowRun._meta.db_table
STEP = StepAttempt._meta.db_table

# Locks the run row (no new row version: steps do not rewrite the run) while
# checking that the claim still holds; the heartbeat renews the lease.
FENCE = f"""
    SELECT id FROM {RUN}
    WHERE id = %s AND claim_token = %s AND status = 'running'
      AND (deadline_at IS NULL OR deadline_at > statement_timestamp())
    FOR NO KEY UPDATE
"""

STORE_DEFERRED = f"""
    UPDATE {STEP} SET status = 'completed', output = %s::jsonb, finished_at = %s
    WHERE id = %s AND status = 'running' AND EXISTS (SELECT 1 FROM fence)
"""

CLAIM = f"""
WITH due AS (
    SELECT id, started_at AS previous_started_at, status AS previous_status
    FROM {RUN}
    WHERE namespace = %s AND status IN ('pending', 'running')
      AND available_at <= statement_timestamp() AND workflow_name = ANY(%s)
      AND (deadline_at IS NULL OR deadline_at > statement_timestamp())
    ORDER BY available_at
    LIMIT %s
    FOR UPDATE SKIP LOCKED
)
UPDATE {RUN} AS run SET
    status = 'running', worker_id = %s, claim_token = %s,
    available_at = statement_timestamp() + make_interval(secs => %s),
    started_at = COALESCE(run.started_at, statement_timestamp()),
    updated_at = statement_timestamp()
FROM due WHERE run.id = due.id
RETURNING run.*, due.previous_started_at, due.previous_status, statement_timestamp() AS db_now
"""

START_STEP = f"""
WITH fence AS ({FENCE}), deferred AS ({STORE_DEFERRED})
INSERT INTO {STEP} (workflow_run_id, step_name, kind, status, resume_generation, started_at,
                    position, atomic)
SELECT id, %s, 'run', 'running', %s, %s, %s, %s FROM fence
RETURNING id
"""

FINISH = f"""
WITH fence AS (
    UPDATE {RUN} SET status = %s, output = %s::jsonb, error = %s::jsonb,
                     attempts = COALESCE(%s, attempts),
                     worker_id = NULL, claim_token = NULL, available_at = NULL,
                     finished_at = statement_timestamp(), updated_at = statement_timestamp()
    WHERE id = %s AND claim_token = %s AND status = 'running'
      AND (%s OR deadline_at IS NULL OR deadline_at > statement_timestamp())
    RETURNING id
), deferred AS ({STORE_DEFERRED})
SELECT id FROM fence
"""


def _execute(using: str, sql: str, params: list[Any]) -> tuple[Any, ...] | None:
    rows, _ = _fetch(using, sql, params)
    return rows[0] if rows else None


def _fetch(using: str, sql: str, params: list[Any]) -> tuple[list[tuple[Any, ...]], list[str]]:
    """Run one of the statements above, prepared, with server-side parameter binding.

    Django's own cursors bind parameters on the client and never prepare; the
    worker runs these few statements thousands of times, so PostgreSQL parses
    and plans each once per connection instead (``OPENWORKFLOW["PREPARED_STATEMENTS"]``
    turns that off, e.g. behind a PgBouncer older than 1.21 in transaction
    mode). Errors still arrive as ``django.db`` exceptions.
    """
    from .conf import app_settings

    connection = connections[using]
    connection.ensure_connection()
    raw = connection.connection
    prepare = app_settings.PREPARED_STATEMENTS
    if prepare and raw.prepare_threshold is None:
        # Django turns preparing off with None; a threshold never reached keeps
        # every other query unprepared while these are prepared on request.
        raw.prepare_threshold = 2**31 - 1
    with connection.wrap_database_errors, psycopg.Cursor(raw) as cursor:
        cursor.execute(sql, params, prepare=prepare)
        columns = [column.name for column in cursor.description or ()]
        return cursor.fetchall(), columns


_JSON_COLUMNS = {"input", "output", "error"}
_RUN_FIELDS = WorkflowRun._meta.concrete_fields
_RUN_COLUMNS = [str(field.column) for field in _RUN_FIELDS]


def _runs(using: str, sql: str, params: list[Any]) -> list[WorkflowRun]:
    """Model instances from ``RETURNING run.*, extra...`` rows; extras become attributes."""
    rows, columns = _fetch(using, sql, params)
    attnames = [field.attname for field in _RUN_FIELDS]
    runs = []
    for row in rows:
        values = dict(zip(columns, row, strict=True))
        for column in _JSON_COLUMNS:
            if isinstance(values.get(column), str):  # Django loads jsonb as text
                values[column] = json.loads(values[column])
        # in the model's field order, whatever the table's column order
        run = WorkflowRun.from_db(using, attnames, [values[column] for column in _RUN_COLUMNS])
        for column in columns:
            if column not in _RUN_COLUMNS:
                setattr(run, column, values[column])
        runs.append(run)
    return runs


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


Deferred = tuple[int, str, datetime]  # (attempt id, the result's JSON text, finished_at)


def _deferred_params(deferred: Deferred | None) -> list[Any]:
    if deferred is None:
        return [None, None, None]
    attempt_id, text, finished_at = deferred
    return [text, finished_at, attempt_id]


def claim(
    using: str,
    *,
    namespace: str,
    names: list[str],
    limit: int,
    worker_id: str,
    token: uuid.UUID,
    lease_seconds: float,
) -> list[WorkflowRun]:
    params = [namespace, names, limit, worker_id, token, lease_seconds]
    return _runs(using, CLAIM, params)


def start_step(
    using: str,
    *,
    run_id: Any,
    token: uuid.UUID,
    name: str,
    generation: int,
    started_at: datetime,
    position: int | None,
    deferred: Deferred | None,
    atomic: bool = False,
) -> int | None:
    """Insert a running ``run`` attempt; None when the claim no longer holds."""
    params = [
        run_id,
        token,
        *_deferred_params(deferred),
        name,
        generation,
        started_at,
        position,
        atomic,
    ]
    row = _execute(using, START_STEP, params)
    return None if row is None else int(row[0])


def finish(
    using: str,
    *,
    run_id: Any,
    token: uuid.UUID,
    status: str,
    output: Any = None,
    error: Any = None,
    attempts: int | None = None,
    deferred: Deferred | None,
) -> bool:
    """Complete or fail the run (a completion also checks the deadline)."""
    params = [
        status,
        _json(output),
        _json(error),
        attempts,
        run_id,
        token,
        status != WorkflowRun.Status.COMPLETED,
        *_deferred_params(deferred),
    ]
    return _execute(using, FINISH, params) is not None


START_RUN = f"""
WITH run AS (
    INSERT INTO {RUN} (id, namespace, workflow_name, version, status, input, attempts,
                       available_at, deadline_at, resume_generation)
    VALUES (%s, %s, %s, %s, 'pending', %s::jsonb, 0,
            COALESCE(%s, statement_timestamp()), %s, 0)
    RETURNING *
)
SELECT run.*, pg_notify(%s, run.namespace) AS notified FROM run
"""


def start_run(
    using: str,
    *,
    namespace: str,
    workflow_name: str,
    version: str | None,
    input: Any,
    available_at: datetime | None,
    deadline_at: datetime | None,
) -> WorkflowRun:
    """Insert a pending run and wake the workers at commit: one statement."""
    from .managers import NOTIFY_CHANNEL

    params = [
        uuid.uuid4(),
        namespace,
        workflow_name,
        version,
        _json(input),
        available_at,
        deadline_at,
        NOTIFY_CHANNEL,
    ]
    [run] = _runs(using, START_RUN, params)
    return run
