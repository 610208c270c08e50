"""``PostgresStore``: the hot statements in one round trip and one commit each.

The ORM store's transactions take several statements; on PostgreSQL these
do the same work in one, with data-modifying CTEs, prepared once per
connection. The SQL of each method stands beside it. Everything not
overridden here is the ORM store's.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from django.db import DatabaseError, transaction

from ..ids import uuid7
from ..liveness import LISTEN_PING_SECONDS, own_connection_params, watch_here
from ..logfields import failure, failure_text
from ..models import QueueStart, StepAttempt, WorkflowRun
from ..pauses import has_hooks, pause_point
from ..pooler import behind_pooler, prepared_statements, sql_prepare
from ..queues import Queue, frees_a_place
from .base import Claim, Claims, Deferred
from .limits import Candidate, ClaimPlan, Page, SlotCounts, lock_queues
from .orm import OrmStore

if TYPE_CHECKING:
    import threading

logger = logging.getLogger(__name__)

RUN = WorkflowRun._meta.db_table
STEP = StepAttempt._meta.db_table
QUEUE_START = QueueStart._meta.db_table
NOTIFY_CHANNEL = "django_openworkflow"
# Where a test may stop a claim with limits: the claim then runs its statements one by one.
CLAIM_PAUSES = ("claim.queue-locked", "claim.queue-counted", "claim.before-commit")

# Locks the run row (no new row version: steps do not rewrite the run) while
# checking that the claim still holds; the heartbeat renews the lease. "IS TRUE": a
# plain "status = 'running'" implies the predicates of the partial indexes of active
# runs, and the generic plan of the prepared statement, planned when statistics saw no
# run active, scanned one of those (every active run) instead of the primary key.
FENCE = f"""
    SELECT id, worker_id FROM {RUN}
    WHERE id = %s AND claim_token = %s AND (status = 'running') IS TRUE
      AND (deadline_at IS NULL OR deadline_at > statement_timestamp())
    FOR NO KEY UPDATE
"""

STORE_DEFERRED = f"""
    UPDATE {STEP} SET status = 'completed', output = %s::jsonb, finished_at = %s
    WHERE id = %s AND status = 'running' AND EXISTS (SELECT 1 FROM fence)
"""

# What a claim sets on the runs it takes (worker id, claim token, lease seconds).
MARK_RUNNING = """
        status = 'running', worker_id = %s, claim_token = %s,
        available_at = statement_timestamp() + make_interval(secs => %s),
        started_at = COALESCE(run.started_at, statement_timestamp()),
        updated_at = statement_timestamp()"""

_JSON_COLUMNS = {"input", "output", "error", "trace_context"}
_RUN_FIELDS = WorkflowRun._meta.concrete_fields
_RUN_COLUMNS = [str(field.column) for field in _RUN_FIELDS]
_RUN_ATTNAMES = [field.attname for field in _RUN_FIELDS]


class PostgresStore(OrmStore):
    vendor = "postgresql"
    notifies = True

    @contextlib.contextmanager
    def time_limit(self, seconds: float | None) -> Iterator[None]:
        """``statement_timeout`` for the block's transaction (its own, or a savepoint of
        the caller's, which keeps it until its end); per query."""
        if seconds is None:
            yield
            return
        with transaction.atomic(using=self.using):
            with self.connection.cursor() as cursor:
                cursor.execute(
                    "SELECT set_config('statement_timeout', %s, true)",
                    [f"{max(1, round(seconds * 1000))}ms"],  # 0 would mean no limit
                )
            yield

    @contextlib.contextmanager
    def limited_lock_waits(self, seconds: float) -> Iterator[None]:
        """``lock_timeout`` for the block's transaction; in a savepoint of the caller's
        transaction, put back as it was when the block ends (a rollback undoes it anyway).
        Never set for the session: behind a pooler it would stay on a server connection."""
        nested = self.connection.in_atomic_block
        with transaction.atomic(using=self.using):
            with self.connection.cursor() as cursor:
                cursor.execute("SELECT current_setting('lock_timeout')")
                (before,) = cursor.fetchone()
                cursor.execute(
                    "SELECT set_config('lock_timeout', %s, true)",
                    [f"{max(1, round(seconds * 1000))}ms"],  # 0 would mean no limit
                )
            yield
            if nested:
                with self.connection.cursor() as cursor:
                    cursor.execute("SELECT set_config('lock_timeout', %s, true)", [before])

    def lock_wait_expired(self, exc: DatabaseError) -> bool:
        """``lock_not_available`` (55P03): ``lock_timeout`` ran out."""
        return getattr(exc.__cause__, "sqlstate", None) == "55P03"

    def deadlocked(self, exc: DatabaseError) -> bool:
        """``deadlock_detected`` (40P01)."""
        return getattr(exc.__cause__, "sqlstate", None) == "40P01"

    START_RUN = f"""
    WITH run AS (
        INSERT INTO {RUN} (id, namespace, workflow_name, version, status, input, attempts,
                           available_at, deadline_at, idempotency_key, resume_generation,
                           queue, priority, concurrency_key, trace_context,
                           subject_type_id, subject_id)
        VALUES (%s, %s, %s, %s, 'pending', %s::jsonb, 0,
                COALESCE(%s, statement_timestamp()), %s, %s, 0, %s, %s, %s, %s::jsonb,
                %s, %s)
        RETURNING *
    )
    SELECT run.*, pg_notify(%s, run.namespace) AS notified FROM run
    """
    FAST_START_FIELDS = frozenset(
        {
            "namespace",
            "workflow_name",
            "version",
            "input",
            "available_at",
            "deadline_at",
            "idempotency_key",
            "queue",
            "priority",
            "concurrency_key",
            "trace_context",
            "subject_type_id",
            "subject_id",
        }
    )

    def insert_run(self, **fields: Any) -> WorkflowRun:
        if not fields.keys() <= self.FAST_START_FIELDS:
            return super().insert_run(**fields)  # a child run: the ORM
        params = [
            uuid7(),
            fields["namespace"],
            fields["workflow_name"],
            fields.get("version"),
            _json(fields.get("input")),
            fields.get("available_at"),
            fields.get("deadline_at"),
            fields.get("idempotency_key"),
            fields.get("queue", "default"),
            fields.get("priority", 0),
            fields.get("concurrency_key"),
            _json(fields.get("trace_context")),
            fields.get("subject_type_id"),
            fields.get("subject_id"),
            NOTIFY_CHANNEL,
        ]
        [(run, _)] = self._runs(self.START_RUN, params)
        return run

    def lock_key(self, *parts: str) -> None:
        """A transaction-level advisory lock on a hash of the parts."""
        with self.connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [lock_text(*parts)]
            )

    DUE = """namespace = %s AND status IN ('pending', 'running')
          AND available_at <= statement_timestamp() AND workflow_name = ANY(%s)
          AND (deadline_at IS NULL OR deadline_at > statement_timestamp())"""

    # DUE, for a run read by its primary key: "IS TRUE" keeps the planner of a generic
    # plan from the partial indexes (whose predicate it no longer sees implied), which it
    # would otherwise scan for the one id.
    DUE_BY_ID = DUE.replace(
        "status IN ('pending', 'running')", "(status IN ('pending', 'running')) IS TRUE"
    )

    CLAIM = f"""
    WITH due AS (
        SELECT id, started_at AS previous_started_at
        FROM {RUN}
        WHERE {DUE}
          {{queues}}
        ORDER BY priority DESC, available_at
        LIMIT %s
        FOR UPDATE SKIP LOCKED
    )
    UPDATE {RUN} AS run SET {MARK_RUNNING}
    FROM due WHERE run.id = due.id
    RETURNING run.*, due.previous_started_at IS NULL AS first_start,
              statement_timestamp() AS db_now
    """
    CLAIM_ANY_QUEUE = CLAIM.format(queues="")
    CLAIM_QUEUES = CLAIM.format(queues="AND queue = ANY(%s)")
    CLAIM_EXCLUDING = CLAIM.format(queues="AND queue <> ALL(%s)")
    LIMITED_DUE = f"""
    SELECT name FROM unnest(%s::text[]) AS name
    WHERE EXISTS (SELECT 1 FROM {RUN} WHERE queue = name AND {DUE})
    """

    def claim(
        self,
        *,
        namespace: str,
        workflow_names: Sequence[str],
        limit: int,
        worker_id: str,
        lease_seconds: float,
        queues: Sequence[str] | None = None,
    ) -> Claims:
        """One statement without limited queues. With them: when every limited queue
        served limits only ``concurrency``, ``claim_concurrency`` (one query of two
        statements); otherwise one ``EXISTS`` for due runs in the limited queues, then
        the same one statement when none has one, ``claim_concurrency`` when those that
        have one limit only ``concurrency``, or else the ORM store's claim (its parts in
        SQL below)."""
        names = list(workflow_names)
        if limit < 1 or not names:
            return Claims()
        plan = ClaimPlan.serving(queues)
        if plan.limited and all(_only_concurrency(q) for q in plan.limited):
            return self.claim_concurrency(
                namespace, names, plan, plan.limited, limit, worker_id, lease_seconds
            )
        limited = [q.name for q in plan.limited]
        due = set()
        if limited:
            rows, _ = self._fetch(self.LIMITED_DUE, [limited, namespace, names])
            due = {row[0] for row in rows}
        if due:
            due_limited = [q for q in plan.limited if q.name in due]
            if all(_only_concurrency(q) for q in due_limited):
                return self.claim_concurrency(
                    namespace, names, plan, due_limited, limit, worker_id, lease_seconds
                )
            return super().claim(
                namespace=namespace,
                workflow_names=names,
                limit=limit,
                worker_id=worker_id,
                lease_seconds=lease_seconds,
                queues=queues,
            )
        # No limited queue has a due run: the others in one statement (a limited queue's run
        # that becomes due meanwhile waits for the next claim).
        if not plan.open:
            return Claims()
        token = uuid.uuid4()
        params: list[Any]
        if plan.open_queues is not None:
            sql, params = self.CLAIM_QUEUES, [namespace, names, plan.open_queues]
        elif limited:
            sql, params = self.CLAIM_EXCLUDING, [namespace, names, limited]
        else:
            sql, params = self.CLAIM_ANY_QUEUE, [namespace, names]
        params += [limit, worker_id, token, lease_seconds]
        claims = self._claims(*self._fetch(sql, params), token, lease_seconds)
        self.announce(claims)
        return claims

    # --- the claim with limits: OrmStore.claim's parts, each one prepared statement ----

    # The queues a claim with limits reads without them: those it serves (listed), or every
    # queue with a pending or running run but the limited ones. These are found by a loose
    # index scan of owf_run_queue_claim_idx, one index descent per queue name; a filter
    # ``queue <> ALL(limited)`` would instead read every due run of the limited queues,
    # their backlog, at every claim.
    OPEN_QUEUES_LISTED = "open_queues(name) AS (SELECT unnest(%s::text[]))"
    OPEN_QUEUES_EXCEPT = f"""queue_names(name) AS (
        (SELECT queue FROM {RUN} WHERE namespace = %s AND status IN ('pending', 'running')
         ORDER BY queue LIMIT 1)
        UNION ALL
        SELECT (SELECT queue FROM {RUN}
                WHERE namespace = %s AND status IN ('pending', 'running') AND queue > q.name
                ORDER BY queue LIMIT 1)
        FROM queue_names AS q WHERE q.name IS NOT NULL
    ), open_queues(name) AS (
        SELECT name FROM queue_names WHERE name IS NOT NULL AND name <> ALL(%s)
    )"""
    # The best due runs of those queues: from each, the first ``pool`` (read, not locked:
    # locking them all would hold runs this claim does not take from other workers' claims);
    # of those, the first ``limit`` in claim order that no other claim holds, each locked
    # through its primary key (a nested loop keeps the pool's order, so LIMIT stops there).
    OPEN = f"""open_pool AS (
        SELECT c.* FROM open_queues, LATERAL (
            SELECT id, priority, available_at FROM {RUN}
            WHERE queue = open_queues.name AND {DUE}
            ORDER BY priority DESC, available_at  -- the index's order (LATERALS below too)
            LIMIT {{pool}}
        ) AS c
    ), open AS (
        SELECT c.* FROM (
            SELECT id FROM open_pool ORDER BY priority DESC, available_at, id
        ) AS p, LATERAL (
            SELECT id, started_at, priority, available_at, queue FROM {RUN}
            WHERE id = p.id AND {DUE_BY_ID}
            FOR UPDATE SKIP LOCKED
        ) AS c
        LIMIT {{limit}}
    )"""

    @classmethod
    def with_open_queues(
        cls, template: str, namespace: str, plan: ClaimPlan, limit: int
    ) -> tuple[str, list[Any]]:
        """``template`` (OPEN_PAGE, CLAIM_CONCURRENCY) with ``plan``'s ``open_queues`` CTE
        and ``limit``, and the CTE's parameters.

        The limit is in the text, rounded up to a power of two (the statement then
        takes the exact limit as a parameter at the end): these statements are prepared,
        and a generic plan that does not know its limits reads whole tables. So a
        connection prepares one statement per power of two up to its concurrency.
        """
        if plan.open_queues is None:
            limited = [q.name for q in plan.limited]
            cte, params = cls.OPEN_QUEUES_EXCEPT, [namespace, namespace, limited]
        else:
            cte, params = cls.OPEN_QUEUES_LISTED, [plan.open_queues]
        return _statement(template, cte, 1 << max(0, limit - 1).bit_length()), params

    OPEN_PAGE = f"""
    WITH RECURSIVE {{open_queues}}, {OPEN}
    SELECT id, started_at, priority, available_at, queue FROM open
    ORDER BY priority DESC, available_at, id
    LIMIT %s
    """

    def open_candidates(
        self, namespace: str, names: list[str], plan: ClaimPlan, limit: int
    ) -> list[Candidate]:
        sql, params = self.with_open_queues(self.OPEN_PAGE, namespace, plan, limit)
        rows, _ = self._fetch(sql, [*params, *(namespace, names) * 2, limit])
        return [Candidate(*row) for row in rows]

    # The advisory locks are taken one row at a time, in name order (the subquery's). The
    # statement returns, and notes for the rest of the transaction (``LOCKED``, a
    # transaction-local setting that CLAIM_CONCURRENCY reads), the names it locked.
    LOCKED = "django_openworkflow.locked_queues"
    LOCK_DUE_QUEUES = f"""
    WITH locked AS (
        SELECT q.name, pg_advisory_xact_lock(hashtextextended(q.lock_key, 0)) FROM (
            SELECT name, lock_key FROM unnest(%s::text[], %s::text[]) AS q(name, lock_key)
            WHERE EXISTS (SELECT 1 FROM {RUN} WHERE queue = q.name AND {DUE})
            ORDER BY name OFFSET 0
        ) AS q
    )
    SELECT set_config('{LOCKED}', COALESCE((SELECT json_agg(name)::text FROM locked), '[]'), true)
    """

    def lock_due_queues(self, namespace: str, names: list[str], queues: list[str]) -> list[str]:
        [(locked,)], _ = self._fetch(*self.lock_due_queues_statement(namespace, names, queues))
        return json.loads(locked)

    def lock_due_queues_statement(
        self, namespace: str, names: list[str], queues: list[str]
    ) -> tuple[str, list[Any]]:
        queues = sorted(queues)
        keys = [lock_text("queue", namespace, queue) for queue in queues]
        return self.LOCK_DUE_QUEUES, [queues, keys, namespace, names]

    COUNT_SLOTS = f"""
    SELECT 'queue', queue, NULL, count(*), NULL::timestamptz FROM {RUN}
    WHERE namespace = %s AND queue = ANY(%s) AND status IN ('pending', 'running')
      AND started_at IS NOT NULL
    GROUP BY queue
    UNION ALL
    SELECT 'key', queue, concurrency_key, count(*), NULL FROM {RUN}
    WHERE namespace = %s AND queue = ANY(%s) AND status IN ('pending', 'running')
      AND started_at IS NOT NULL AND concurrency_key IS NOT NULL
    GROUP BY queue, concurrency_key
    UNION ALL
    SELECT 'rate', w.name, NULL, count(s.id), min(s.started_at)
    FROM unnest(%s::text[], %s::float8[]) AS w(name, secs)
    LEFT JOIN {QUEUE_START} AS s ON s.namespace = %s AND s.queue = w.name
        AND s.started_at > statement_timestamp() - make_interval(secs => w.secs)
    GROUP BY w.name
    """

    def count_slots(self, namespace: str, queues: list[Queue]) -> SlotCounts:
        rated = [q for q in queues if q.rate]
        params = [
            namespace,
            [q.name for q in queues if q.concurrency],
            namespace,
            [q.name for q in queues if q.key_concurrency],
            [q.name for q in rated],
            [q.rate[1] for q in rated if q.rate],
            namespace,
        ]
        counts = SlotCounts()
        rows, _ = self._fetch(self.COUNT_SLOTS, params)
        for kind, queue, key, n, oldest in rows:
            if kind == "queue":
                counts.in_progress[queue] = n
            elif kind == "key":
                counts.per_key.setdefault(queue, Counter())[key] = n
            else:
                counts.recent[queue] = (n, oldest)
        return counts

    DUE_PAGE = f"""
    SELECT id, started_at, priority, available_at, queue, concurrency_key FROM {RUN}
    WHERE queue = %s AND {DUE}
      AND (started_at IS NOT NULL OR NOT %s)
      AND (started_at IS NOT NULL OR concurrency_key IS NULL OR concurrency_key <> ALL(%s))
      AND (%s OR (-priority, available_at, id) > (%s::integer, %s::timestamptz, %s::uuid))
    ORDER BY priority DESC, available_at, id
    LIMIT %s
    FOR UPDATE SKIP LOCKED
    """

    def due_page(self, page: Page) -> list[tuple[Candidate, str | None]]:
        after = page.after
        params = [
            page.queue,
            page.namespace,
            page.names,
            page.only_started,
            page.full_keys,
            after is None,
            None if after is None else -after.priority,
            None if after is None else after.available_at,
            None if after is None else after.pk,
            page.size,
        ]
        rows, _ = self._fetch(self.DUE_PAGE, params)
        return [(Candidate(*row[:5]), row[5]) for row in rows]

    TAKE = f"""
    UPDATE {RUN} AS run SET {MARK_RUNNING}
    WHERE id = ANY(%s) AND status IN ('pending', 'running')
      AND available_at <= statement_timestamp()
      AND (deadline_at IS NULL OR deadline_at > statement_timestamp())
    RETURNING run.*, statement_timestamp() AS db_now
    """

    def take(self, picked: list[Candidate], worker_id: str, lease_seconds: float) -> list[Claim]:
        token = uuid.uuid4()
        first = {c.pk for c in picked if c.started_at is None}
        params = [worker_id, token, lease_seconds, [c.pk for c in picked]]
        return [
            Claim(run, token, extra["db_now"], run.pk in first, lease_seconds)
            for run, extra in self._runs(self.TAKE, params)
        ]

    # A worker whose limited queues limit only ``concurrency`` (the commonest limit): after the
    # queue locks, one statement counts the places, reads and locks the candidates and
    # takes the best of them, as OrmStore.claim's parts do in five.
    CLAIM_CONCURRENCY = f"""
    WITH RECURSIVE {{open_queues}}, places AS (
        SELECT q.name, q.cap - count(r.id) AS free
        FROM unnest(%s::text[], %s::integer[]) AS q(name, cap)
        LEFT JOIN {RUN} AS r ON r.queue = q.name AND r.namespace = %s
            AND r.queue = ANY(%s::text[])  -- for the index, which the join alone misses
            AND r.status IN ('pending', 'running') AND r.started_at IS NOT NULL
        WHERE q.name IN (  -- the queues this transaction locked (LOCK_DUE_QUEUES)
            SELECT json_array_elements_text(
                COALESCE(NULLIF(current_setting('{LOCKED}', true), ''), '[]')::json))
        GROUP BY q.name, q.cap
    ), held AS (
        -- the due runs that hold a place already, taken whatever the count: read through
        -- owf_run_slot_idx (the runs in progress of these queues, at most the limit plus
        -- those of dead workers), not by reading the queue's backlog of due runs
        SELECT id, started_at, priority, available_at FROM {RUN}
        WHERE queue = ANY(%s::text[]) AND queue IN (SELECT name FROM places)
          AND started_at IS NOT NULL AND {DUE}
        FOR UPDATE SKIP LOCKED
    ), limited AS (
        SELECT id, started_at, priority, available_at FROM held
        UNION ALL
        -- the first of the others, as many as there are free places
        SELECT id, started_at, priority, available_at FROM (
            SELECT c.*, places.free,
                   row_number() OVER (PARTITION BY places.name
                                      ORDER BY c.priority DESC, c.available_at, c.id) AS n
            FROM places, LATERAL (
                SELECT id, started_at, priority, available_at FROM {RUN}
                WHERE places.free > 0 AND queue = places.name AND started_at IS NULL AND {DUE}
                ORDER BY priority DESC, available_at
                LIMIT {{limit}}
                FOR UPDATE SKIP LOCKED
            ) AS c
        ) AS ranked
        WHERE n <= free
    ), {OPEN}, picked AS (
        SELECT id, started_at, priority, available_at FROM (
            SELECT id, started_at, priority, available_at FROM limited
            UNION ALL
            SELECT id, started_at, priority, available_at FROM open
        ) AS candidates
        ORDER BY priority DESC, available_at, id
        LIMIT %s
    )
    UPDATE {RUN} AS run SET {MARK_RUNNING}
    FROM picked WHERE run.id = picked.id
    RETURNING run.*, picked.started_at IS NULL AS first_start,
              statement_timestamp() AS db_now
    """

    def claim_concurrency(
        self,
        namespace: str,
        names: list[str],
        plan: ClaimPlan,
        limited: list[Queue],
        limit: int,
        worker_id: str,
        lease_seconds: float,
    ) -> Claims:
        """The claim when the limited queues it may take runs of (``limited``) limit only
        ``concurrency``, in one transaction of two statements: LOCK_DUE_QUEUES locks those of
        ``limited`` with a due run, CLAIM_CONCURRENCY counts their places and claims. A queue
        of ``limited`` that had no due run at the lock waits for the next claim.

        The two go in one round trip (``_in_one_transaction``) unless a test waits at one of
        the claim's pause points, the caller has a transaction open, or
        SQL ``PREPARE`` is not to be used (``pooler.sql_prepare``: ``PREPARED_STATEMENTS``
        off, or behind a pooler): then one at a time.
        """
        token = uuid.uuid4()
        sql, open_params = self.with_open_queues(self.CLAIM_CONCURRENCY, namespace, plan, limit)
        queue_names = [q.name for q in limited]
        params = [
            *open_params,
            queue_names,
            [q.concurrency for q in limited],
            namespace,
            queue_names,
            queue_names,  # the runs holding places
            *(namespace, names) * 4,  # ... and the others, the open queues' pool, their runs
            limit,
            worker_id,
            token,
            lease_seconds,
        ]
        one_round_trip = (
            sql_prepare(self.using) and _ONE_ROUND_TRIP["usable"] and not has_hooks(*CLAIM_PAUSES)
        )
        if one_round_trip and not self.connection.in_atomic_block:
            lock = self.lock_due_queues_statement(namespace, names, queue_names)
            claims = self._claims(
                *self._in_one_transaction([lock, (sql, params)]), token, lease_seconds
            )
            self.announce(claims)
            return claims
        with self.atomic():
            for queue in lock_queues(self, namespace, names, limited):
                # the statement below counts under these locks
                pause_point("claim.queue-counted", namespace=namespace, queue=queue.name)
            claims = self._claims(*self._fetch(sql, params), token, lease_seconds)
            self.announce(claims)
            pause_point("claim.before-commit", run_ids=[claim.run_id for claim in claims])
        return claims

    def _claims(
        self,
        rows: list[tuple[Any, ...]],
        columns: list[str],
        token: uuid.UUID,
        lease_seconds: float,
    ) -> Claims:
        """The claims of a claim's ``RETURNING run.*, first_start, db_now`` rows."""
        return Claims(
            Claim(run, token, extra["db_now"], extra["first_start"], lease_seconds)
            for run, extra in self._to_runs(rows, columns)
        )

    FENCE_AND_STORE = f"""
    WITH fence AS ({FENCE}), deferred AS ({STORE_DEFERRED})
    SELECT id FROM fence
    """

    def fence(self, claim: Claim, *, renew: bool = False, deferred: Deferred | None = None) -> bool:
        if renew:  # an UPDATE, for the new lease
            return super().fence(claim, renew=renew, deferred=deferred)
        params = [claim.run_id, claim.token, *_deferred_params(deferred)]
        return self._one(self.FENCE_AND_STORE, params) is not None

    START_STEP = f"""
    WITH fence AS ({FENCE}), deferred AS ({STORE_DEFERRED})
    INSERT INTO {STEP} (workflow_run_id, step_name, kind, status, resume_generation, started_at,
                        position, atomic, worker_id)
    SELECT id, %s, 'run', 'running', %s, %s, %s, %s, worker_id FROM fence
    RETURNING id
    """

    def start_step(
        self,
        claim: Claim,
        *,
        name: str,
        generation: int,
        position: int | None,
        started_at: datetime,
        atomic: bool,
        deferred: Deferred | None,
    ) -> int | None:
        params = [
            claim.run_id,
            claim.token,
            *_deferred_params(deferred),
            name,
            generation,
            started_at,
            position,
            atomic,
        ]
        row = self._one(self.START_STEP, params)
        return None if row is None else int(row[0])

    FINISH = f"""
    WITH fence AS (
        UPDATE {RUN} SET status = %s, output = %s::jsonb, error = %s::jsonb,
                         attempts = COALESCE(%s, attempts),
                         worker_id = NULL, claim_token = NULL, available_at = NULL,
                         finished_at = statement_timestamp(), updated_at = statement_timestamp()
        WHERE id = %s AND claim_token = %s AND (status = 'running') IS TRUE
          AND (%s OR deadline_at IS NULL OR deadline_at > statement_timestamp())
        RETURNING id, namespace
    ), deferred AS ({STORE_DEFERRED})
    SELECT id, CASE WHEN %s THEN pg_notify('{NOTIFY_CHANNEL}', namespace) END FROM fence
    """

    def finish(
        self,
        claim: Claim,
        status: str,
        *,
        output: Any = None,
        error: dict[str, Any] | None = None,
        attempts: int | None = None,
        deferred: Deferred | None = None,
    ) -> bool:
        if claim.run.parent_step_attempt_id is not None:  # the parent is locked first
            return super().finish(
                claim, status, output=output, error=error, attempts=attempts, deferred=deferred
            )
        params = [
            status,
            _json(output),
            _json(error),
            attempts,
            claim.run_id,
            claim.token,
            status != WorkflowRun.Status.COMPLETED,
            *_deferred_params(deferred),
            frees_a_place(claim.run),
        ]
        return self._one(self.FINISH, params) is not None

    def notify(self, namespace: str) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [NOTIFY_CHANNEL, namespace])

    def listen(
        self,
        namespace: str,
        wakeup: threading.Event,
        stopping: threading.Event,
        worker_id: str,
    ) -> bool:
        """LISTEN on a connection of its own, to ``listen_alias()``'s database; reconnect
        with backoff (polling covers gaps). False at once when there is nowhere to LISTEN
        (behind a pooler without ``LISTEN_DATABASE``): the worker polls."""
        from django.db import connections

        alias: str | None = ""  # not known yet
        delay = 0.5
        while not stopping.is_set():
            try:
                alias = alias or self.listen_alias(worker_id)
                if alias is None:
                    return False
                with psycopg.connect(**own_connection_params(alias), autocommit=True) as conn:
                    if alias != self.using and not self.same_database(conn, alias, worker_id):
                        return False
                    watch_here(conn)  # the statement watchdog's (liveness.py)
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    delay = 0.5
                    logger.debug("listening channel=%s database=%s", NOTIFY_CHANNEL, alias)
                    pinged = time.monotonic()
                    while not stopping.is_set():
                        for notice in conn.notifies(timeout=1.0):
                            if notice.payload in ("", namespace):
                                wakeup.set()
                        if time.monotonic() - pinged >= LISTEN_PING_SECONDS:
                            conn.execute("SELECT 1")  # a dead connection never answers
                            pinged = time.monotonic()
            except Exception as exc:
                logger.warning("listen failed worker=%s error=%s", worker_id, failure(exc))
                logger.debug("listen failed worker=%s detail=%s", worker_id, failure_text(exc))
                stopping.wait(delay)
                delay = min(delay * 2, 30.0)
            finally:
                connections.close_all()
        return True

    def listen_alias(self, worker_id: str) -> str | None:
        """The alias whose database the worker LISTENs on: ``OPENWORKFLOW["LISTEN_DATABASE"]``
        when set, else the engine's own unless it is behind a pooler in transaction mode (a
        LISTEN there holds for one transaction's server session only). None then, said once
        per process in a warning: the worker polls."""
        from django.db import connections

        from ..conf import app_settings

        alias = app_settings.LISTEN_DATABASE
        if alias is not None:
            return alias
        try:
            if not behind_pooler(self.using):
                return self.using
        finally:
            connections.close_all()  # this thread's, opened to find out
        if not _POLLING_SAID["said"]:
            _POLLING_SAID["said"] = True
            logger.warning(
                "no LISTEN behind a pooler in transaction mode, the worker polls every"
                ' POLL_INTERVAL: set OPENWORKFLOW["LISTEN_DATABASE"] to an alias that'
                " reaches the same database directly worker=%s database=%s",
                worker_id,
                self.using,
            )
        return None

    def same_database(self, conn: psycopg.Connection[Any], alias: str, worker_id: str) -> bool:
        """Whether ``conn`` (to ``LISTEN_DATABASE``) reaches the engine's database: the same
        name, on a server started at the same moment. When not, said once: the worker polls."""
        where = "SELECT current_database(), pg_postmaster_start_time()"
        there = conn.execute(where).fetchone()
        with self.connection.cursor() as cursor:
            cursor.execute(where)
            here = cursor.fetchone()
        if here == there:
            return True
        if not _POLLING_SAID["said"]:
            _POLLING_SAID["said"] = True
            logger.error(
                "LISTEN_DATABASE reaches another database than DATABASE, the worker polls"
                " every POLL_INTERVAL worker=%s database=%s listen_database=%s reaches=%s"
                " expected=%s",
                worker_id,
                self.using,
                alias,
                there[0] if there else None,
                here[0] if here else None,
            )
        return False

    # --- running the statements ---------------------------------------------------

    def _fetch(self, sql: str, params: list[Any]) -> tuple[list[tuple[Any, ...]], list[str]]:
        """Run one statement, prepared, with server-side parameter binding.

        Django's own cursors bind parameters on the client and never prepare;
        the worker runs these few statements thousands of times, so PostgreSQL
        parses and plans each once per connection instead; not behind a pooler
        in transaction mode, unless ``OPENWORKFLOW["PREPARED_STATEMENTS"]`` says
        so (``pooler.prepared_statements``): there the statement goes unnamed,
        parsed and run in one message. Errors still arrive as ``django.db``
        exceptions.
        """
        connection = self.connection
        connection.ensure_connection()
        raw = connection.connection
        prepare = prepared_statements(self.using)
        if prepare and raw.prepare_threshold is None:
            # Django turns preparing off with None; a threshold never reached keeps
            # every other query unprepared while these are prepared on request.
            raw.prepare_threshold = 2**31 - 1
        with connection.wrap_database_errors, psycopg.Cursor(raw) as cursor:
            cursor.execute(sql, params, prepare=prepare)
            columns = [column.name for column in cursor.description or ()]
            return cursor.fetchall(), columns

    def _in_one_transaction(
        self, statements: list[tuple[str, list[Any]]]
    ) -> tuple[list[tuple[Any, ...]], list[str]]:
        """Run ``statements`` as one transaction, in one round trip; return the last one's
        rows and columns.

        They go as one query of the simple protocol, ``EXECUTE`` after ``EXECUTE`` of
        statements prepared on the server (SQL ``PREPARE``, once per connection). The
        statements of one such query are one transaction, committed after the last (rolled
        back whole on an error), so a transaction-level advisory lock taken by one holds
        over the next; each statement takes its own snapshot (READ COMMITTED) when it
        begins, so a statement after a lock sees what was committed before the lock was
        granted. (psycopg's pipeline mode would do the same in as many round trips, at
        about twice the client's CPU per claim.) A connection that lost its prepared
        statements (a ``DISCARD ALL``) prepares them again, once.
        """
        connection = self.connection
        connection.ensure_connection()
        raw = connection.connection
        with connection.wrap_database_errors:
            for retry in (True, False):
                prepared = _SERVER_PREPARED.setdefault(raw, set())
                calls = []
                for sql, params in statements:
                    name, text, count = _server_statement(sql)
                    if name not in prepared:
                        self._prepare(raw, name, text)
                        prepared.add(name)
                    calls.append((f"EXECUTE {name}({', '.join(['%s'] * count)})", params))
                query = "; ".join(call for call, _ in calls)
                try:
                    with psycopg.ClientCursor(raw) as cursor:
                        cursor.execute(query, [p for _, params in calls for p in params])
                        while cursor.nextset():
                            pass
                        columns = [column.name for column in cursor.description or ()]
                        return cursor.fetchall(), columns
                except psycopg.errors.InvalidSqlStatementName:
                    prepared.clear()
                    if not retry:
                        _ONE_ROUND_TRIP["usable"] = False
                        logger.warning(
                            "statements prepared with SQL PREPARE were gone at the next query"
                            " twice (a pooler in transaction mode?): claims of limited queues"
                            " go statement by statement from now on; behind such a pooler set"
                            ' OPENWORKFLOW["POOLER"] = True'
                        )
                        raise
        raise AssertionError("unreachable")

    @staticmethod
    def _prepare(raw: psycopg.Connection[Any], name: str, text: str) -> None:
        # (a duplicate: this session prepared it, but the count was lost)
        with contextlib.suppress(psycopg.errors.DuplicatePreparedStatement):
            raw.execute(f"PREPARE {name} AS {text}")

    def _one(self, sql: str, params: list[Any]) -> tuple[Any, ...] | None:
        rows, _ = self._fetch(sql, params)
        return rows[0] if rows else None

    def _runs(self, sql: str, params: list[Any]) -> list[tuple[WorkflowRun, dict[str, Any]]]:
        """Model instances from ``RETURNING run.*, extra...`` rows, with the extras."""
        return self._to_runs(*self._fetch(sql, params))

    def _to_runs(
        self, rows: list[tuple[Any, ...]], columns: list[str]
    ) -> list[tuple[WorkflowRun, dict[str, Any]]]:
        runs = []
        for row in rows:
            values = dict(zip(columns, row, strict=True))
            for column in _JSON_COLUMNS:
                if isinstance(values.get(column), str):  # Django loads jsonb as text
                    values[column] = json.loads(values[column])
            # in the model's field order, whatever the table's column order
            run = WorkflowRun.from_db(
                self.using, _RUN_ATTNAMES, [values[column] for column in _RUN_COLUMNS]
            )
            extra = {column: values[column] for column in columns if column not in _RUN_COLUMNS}
            runs.append((run, extra))
        return runs


@functools.lru_cache(maxsize=256)
def _statement(template: str, open_queues: str, limit: int) -> str:
    return template.format(open_queues=open_queues, limit=int(limit), pool=2 * int(limit))


# True once the worker said that it polls, behind a pooler without LISTEN_DATABASE.
_POLLING_SAID = {"said": False}

# False once SQL PREPARE's statements were found gone twice in a row (a pooler).
_ONE_ROUND_TRIP = {"usable": True}

# The statements each connection has prepared with SQL PREPARE (``_in_one_transaction``).
_SERVER_PREPARED: weakref.WeakKeyDictionary[psycopg.Connection[Any], set[str]] = (
    weakref.WeakKeyDictionary()
)


@functools.cache
def _server_statement(sql: str) -> tuple[str, str, int]:
    """``sql`` for SQL PREPARE: its name (from its text), its text with $1, $2, ..., and
    how many parameters it takes."""
    parts = sql.split("%s")
    text = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], 1))
    name = "owf_" + hashlib.sha1(sql.encode()).hexdigest()[:16]
    return name, text, len(parts) - 1


def _only_concurrency(queue: Queue) -> bool:
    return bool(queue.concurrency) and not (queue.key_concurrency or queue.rate)


def lock_text(*parts: str) -> str:
    """The text an advisory lock's key is the hash of."""
    return "\x1f".join(("django_openworkflow", *parts))


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _deferred_params(deferred: Deferred | None) -> list[Any]:
    if deferred is None:
        return [None, None, None]
    attempt_id, text, finished_at = deferred
    return [text, finished_at, attempt_id]
