"""``OrmStore``: the store written with Django's ORM, for any supported database.

Correct wherever ``select_for_update(skip_locked=True)`` exists (PostgreSQL,
MariaDB, MySQL, Oracle) and on SQLite, whose IMMEDIATE transactions take the
database's write lock when they begin. The contract is in ``base.py``.
"""

from __future__ import annotations

import json
import logging
import operator
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import reduce
from sqlite3 import SQLITE_BUSY
from typing import Any

from django.db import DatabaseError, models
from django.db.models import Count, F, Min, Q, Subquery
from django.db.models.functions import Coalesce

from .. import instruments
from ..clock import Now
from ..errors import DEADLINE_ERROR, DEADLINE_EXCEEDED
from ..managers import ACTIVE, LOCK_ORDER, not_past_deadline, now_plus
from ..models import QueueStart, StepAttempt, WorkflowRun
from ..pauses import pause_point
from ..queues import Queue, configured_queues, frees_a_place
from ..signals import run_failed, run_started, send_after_commit
from .base import Claim, Claims, Deferred, Store
from .limits import (
    CANDIDATE_FIELDS,
    CLAIM_ORDER,
    Candidate,
    ClaimPlan,
    Page,
    SlotCounts,
    after_in_claim_order,
    claim_limited,
    lock_queues,
)

logger = logging.getLogger(__name__)

RUNNING = WorkflowRun.Status.RUNNING


class OrmQueries(Store):
    """The querysets the ORM store's writes are made of."""

    @property
    def runs(self) -> Any:
        return WorkflowRun.objects.db_manager(self.using)

    @property
    def attempts(self) -> Any:
        return StepAttempt.objects.db_manager(self.using)

    @property
    def queue_starts(self) -> Any:
        return QueueStart.objects.db_manager(self.using)

    def claimed(self, claim: Claim) -> Any:
        return self.runs.filter(pk=claim.run_id, claim_token=claim.token, status=RUNNING)

    def skip_locked(self, queryset: Any) -> Any:
        """Lock the rows of ``queryset`` skipping those locked (where row locks exist)."""
        if self.connection.features.has_select_for_update_skip_locked:
            return queryset.select_for_update(skip_locked=True)
        return queryset  # SQLite: the IMMEDIATE transaction holds the whole database

    def lock_runs(self, ids: Iterable[Any]) -> list[Any]:
        """Lock these runs' rows in the lock order (oldest first); return their ids."""
        ordered = self.runs.filter(pk__in=ids).order_by(*LOCK_ORDER).values_list("pk", flat=True)
        return list(ordered.select_for_update())

    def store_deferred(self, deferred: Deferred | None) -> None:
        if deferred is not None:
            attempt_id, text, finished_at = deferred
            self.attempts.filter(pk=attempt_id, status="running").update(
                status="completed", output=json.loads(text), finished_at=finished_at
            )


class OrmWakeUps(OrmQueries):
    """Writes that wake runs up or end them from outside a claim."""

    def renew_leases(self, tokens: Sequence[uuid.UUID], lease_seconds: float) -> int:
        if not tokens:
            return 0
        with self.atomic():
            owned = self.runs.filter(claim_token__in=list(tokens), status=RUNNING)
            ids = list(self.skip_locked(owned).values_list("pk", flat=True))
            if not ids:
                return 0
            return self.runs.filter(pk__in=ids).update(  # type: ignore[no-any-return]
                available_at=now_plus(lease_seconds)
            )

    def fail_overdue(self, namespace: str) -> int:
        overdue = self.runs.in_namespace(namespace).overdue()
        candidates = list(overdue.values_list("pk", flat=True))
        if not candidates:
            return 0
        with self.atomic():
            self.runs.lock_parents(candidates)
            ids = list(
                self.skip_locked(overdue.filter(pk__in=candidates)).values_list("pk", flat=True)
            )
            if not ids:
                return 0
            running = self.attempts.filter(
                workflow_run_id__in=ids, status="running", kind=StepAttempt.Kind.RUN
            )
            steps: dict[Any, list[str]] = {}
            for run_id, step in running.values_list("workflow_run_id", "step_name"):
                steps.setdefault(run_id, []).append(step)
            running.update(status="failed", error=DEADLINE_ERROR, finished_at=Now())
            failed: int = (
                self.runs.filter(pk__in=ids)
                .overdue()
                .update(
                    status=WorkflowRun.Status.FAILED,
                    error=DEADLINE_ERROR,
                    worker_id=None,
                    claim_token=None,
                    available_at=None,
                    finished_at=Now(),
                    updated_at=Now(),
                )
            )
            ended = list(self.runs.filter(pk__in=ids))
            if self.wake_parents(ids) or any(frees_a_place(run) for run in ended):
                self.notify(namespace)
            for run in ended:
                send_after_commit(run_failed, run, using=self.using)
        names = []
        for run in ended:
            if run.status == WorkflowRun.Status.FAILED and run.error == DEADLINE_ERROR:
                names.append(run.workflow_name)
                logger.info(
                    "run failed run=%s workflow=%s%s error=%s reason=deadline",
                    run.pk,
                    run.workflow_name,
                    f" step={','.join(steps[run.pk])}" if run.pk in steps else "",
                    DEADLINE_EXCEEDED,
                )
        instruments.runs_ended(WorkflowRun.Status.FAILED.value, names)  # no pass reports them
        return failed

    def wake_parents(self, child_ids: Iterable[Any]) -> int:
        waits = self.attempts.filter(
            workflow_run_id=models.OuterRef("pk"),
            resume_generation=models.OuterRef("resume_generation"),
            child_workflow_run_id__in=list(child_ids),
            status=StepAttempt.Status.RUNNING,
        )
        pending = self.runs.filter(status=WorkflowRun.Status.PENDING)
        return pending.filter(models.Exists(waits)).update(  # type: ignore[no-any-return]
            available_at=Now(), updated_at=Now()
        )

    def deliver_signal(
        self, namespace: str, signal: str, data: Any, *, sender: Any = None
    ) -> list[uuid.UUID]:
        waiting = self.attempts.filter(
            kind=StepAttempt.Kind.SIGNAL_WAIT,
            status=StepAttempt.Status.RUNNING,
            signal=signal,
            resume_generation=F("workflow_run__resume_generation"),
            workflow_run__namespace=namespace,
            workflow_run__status__in=ACTIVE,
        )
        run_ids = set(waiting.values_list("workflow_run_id", flat=True))
        locked = self.runs.lock(run_ids if sender is None else run_ids | {sender})
        if not run_ids:
            return []
        targets = list(
            waiting.filter(workflow_run_id__in=locked).values_list("pk", "workflow_run_id")
        )
        if not targets:
            return []
        pause_point("signal.locked", signal=signal, run_ids=locked)
        self.attempts.filter(pk__in=[pk for pk, _ in targets]).update(
            status=StepAttempt.Status.COMPLETED, output={"data": data}, finished_at=Now()
        )
        woken = sorted({run_id for _, run_id in targets})
        self.runs.filter(pk__in=woken, status=WorkflowRun.Status.PENDING).update(
            available_at=Now(), updated_at=Now()
        )
        self.notify(namespace)
        return woken

    def next_due_at(self, namespace: str, workflow_names: Iterable[str]) -> datetime | None:
        names = list(workflow_names)
        if not names:
            return None
        active = self.runs.in_namespace(namespace).active().filter(workflow_name__in=names)
        return active.aggregate(at=models.Min("available_at"))["at"]  # type: ignore[no-any-return]


class OrmStore(OrmWakeUps):
    """The store on any database Django supports (the contract is in ``base.py``)."""

    vendor = "orm"

    def insert_run(self, **fields: Any) -> WorkflowRun:
        if fields.get("available_at") is None:
            fields.pop("available_at", None)  # the column's default: the database clock
        run = self.runs.create(**fields)
        self.notify(run.namespace)
        return run  # type: ignore[no-any-return]

    def lock_key(self, *parts: str) -> None:
        """SQLite: the IMMEDIATE transaction already holds the database's write lock."""

    @contextmanager
    def time_limit(self, seconds: float | None) -> Iterator[None]:
        """SQLite: a progress handler interrupts the block's queries once ``seconds`` have
        passed, all of them together ("interrupted"); the wait for the database's lock is
        bounded by the connection's ``timeout`` instead. Other databases: no limit."""
        connection = self.connection
        connection.ensure_connection()
        raw = connection.connection
        if seconds is None or not hasattr(raw, "set_progress_handler"):
            yield
            return
        deadline = time.monotonic() + seconds
        raw.set_progress_handler(lambda: time.monotonic() >= deadline, 1000)
        try:
            yield
        finally:
            if connection.connection is raw:
                raw.set_progress_handler(None, 0)

    @contextmanager
    def limited_lock_waits(self, seconds: float) -> Iterator[None]:
        """SQLite: the connection's busy timeout, how long the transaction's ``BEGIN
        IMMEDIATE`` waits for the database's write lock (any other transaction holds it), is
        ``seconds`` for the block, then what it was. Other databases: no limit."""
        connection = self.connection
        if connection.vendor != "sqlite":
            with self.atomic():
                yield
            return
        connection.ensure_connection()
        raw = connection.connection
        (before,) = raw.execute("PRAGMA busy_timeout").fetchone()
        raw.execute(f"PRAGMA busy_timeout = {max(0, round(seconds * 1000))}")
        try:
            with self.atomic():
                yield
        finally:
            if connection.connection is raw:  # (the same connection, not a new one)
                raw.execute(f"PRAGMA busy_timeout = {int(before)}")

    def lock_wait_expired(self, exc: DatabaseError) -> bool:
        """SQLite: "database is locked" (``SQLITE_BUSY``): the write lock was not granted."""
        code = getattr(exc.__cause__, "sqlite_errorcode", None)
        if code is not None:
            return bool(code & 0xFF == SQLITE_BUSY)
        return self.connection.vendor == "sqlite" and str(exc) == "database is locked"

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
        names = list(workflow_names)
        claims = Claims()
        if limit < 1 or not names:
            return claims
        plan = ClaimPlan.serving(queues)
        with self.atomic():
            locked = lock_queues(self, namespace, names, plan.limited) if plan.limited else []
            picked = self.open_candidates(namespace, names, plan, limit) if plan.open else []
            if plan.limited:
                limited, claims.retry_at = claim_limited(self, namespace, names, locked, limit)
                # the best of every queue, in claim order
                picked = sorted([*picked, *limited], key=lambda c: c.order)[:limit]
            if picked:
                claims += self.take(picked, worker_id, lease_seconds)
                self.record_starts(namespace, claims, plan.rate_limited)
                self.announce(claims)
                pause_point("claim.before-commit", run_ids=[claim.run_id for claim in claims])
        return claims

    # --- the claim's parts (PostgresStore has them in SQL) ------------------------

    def due_runs(self, namespace: str, names: list[str]) -> Any:
        return self.runs.in_namespace(namespace).due().filter(workflow_name__in=names)

    def open_candidates(
        self, namespace: str, names: list[str], plan: ClaimPlan, limit: int
    ) -> list[Candidate]:
        """Due runs of the queues without limits, in claim order, locked (skipping locked ones)."""
        due = self.due_runs(namespace, names)
        if plan.open_filter is not None:
            due = due.filter(plan.open_filter)
        rows = self.skip_locked(due.order_by(*CLAIM_ORDER)).values_list(*CANDIDATE_FIELDS)
        return [Candidate(*row) for row in rows[:limit]]

    def lock_due_queues(self, namespace: str, names: list[str], queues: list[str]) -> list[str]:
        due = self.due_runs(namespace, names)
        locked = []
        for queue in sorted(queues):  # a queue with nothing due takes no lock
            if due.filter(queue=queue).exists():
                self.lock_key("queue", namespace, queue)
                locked.append(queue)
        return locked

    def count_slots(self, namespace: str, queues: list[Queue]) -> SlotCounts:
        counts = SlotCounts()
        in_progress = self.runs.filter(
            namespace=namespace, status__in=ACTIVE, started_at__isnull=False
        )
        limited = [q.name for q in queues if q.concurrency]
        if limited:
            per_queue = in_progress.filter(queue__in=limited).values_list("queue")
            counts.in_progress.update(dict(per_queue.annotate(n=Count("pk")).order_by()))
        keyed = [q.name for q in queues if q.key_concurrency]
        if keyed:
            per_key = (
                in_progress.filter(queue__in=keyed)
                .exclude(concurrency_key=None)
                .values_list("queue", "concurrency_key")
                .annotate(n=Count("pk"))
                .order_by()
            )
            for queue, key, n in per_key:
                counts.per_key.setdefault(queue, Counter())[key] = n
        # every rate-limited queue's starts in its own window, in one query
        windows = [
            Q(queue=queue.name, started_at__gt=now_plus(-queue.rate[1]))
            for queue in queues
            if queue.rate
        ]
        if windows:
            recent = (
                self.queue_starts.filter(reduce(operator.or_, windows), namespace=namespace)
                .values_list("queue")
                .annotate(n=Count("pk"), oldest=Min("started_at"))
                .order_by()
            )
            for queue_name, n, oldest in recent:
                counts.recent[queue_name] = (n, oldest)
        return counts

    def due_page(self, page: Page) -> list[tuple[Candidate, str | None]]:
        due = self.due_runs(page.namespace, page.names).filter(queue=page.queue)
        if page.only_started:
            due = due.filter(started_at__isnull=False)
        elif page.full_keys:
            due = due.exclude(started_at=None, concurrency_key__in=page.full_keys)
        if page.after is not None:
            stored = self.runs.filter(pk=page.after.pk).values("available_at")[:1]
            due = due.filter(after_in_claim_order(page.after, Subquery(stored)))
        rows = self.skip_locked(due.order_by(*CLAIM_ORDER)).values_list(
            *CANDIDATE_FIELDS, "concurrency_key"
        )
        return [(Candidate(*values), key) for *values, key in rows[: page.size]]

    def take(self, picked: list[Candidate], worker_id: str, lease_seconds: float) -> list[Claim]:
        """Mark the picked runs (locked, still due) running under a new claim token."""
        token = uuid.uuid4()
        # Compare-and-set: only rows still due are taken.
        self.runs.filter(pk__in=[c.pk for c in picked]).due().update(
            status=RUNNING,
            worker_id=worker_id,
            claim_token=token,
            available_at=now_plus(lease_seconds),
            started_at=Coalesce("started_at", Now()),
            updated_at=Now(),
        )
        first = {c.pk for c in picked if c.started_at is None}
        claimed = self.runs.filter(claim_token=token).annotate(db_now=Now())
        return [Claim(run, token, run.db_now, run.pk in first, lease_seconds) for run in claimed]

    def record_starts(self, namespace: str, claims: list[Claim], rate_limited: set[str]) -> None:
        """Count the first executions of rate-limited queues (``QueueStart``, per window)."""
        starts = [
            QueueStart(namespace=namespace, queue=c.run.queue, run_id=c.run_id, started_at=c.db_now)
            for c in claims
            if c.first_start and c.run.queue in rate_limited
        ]
        if starts:
            self.queue_starts.bulk_create(starts)
            for queue in {start.queue for start in starts}:
                window = configured_queues()[queue].rate[1]  # type: ignore[index]
                self.queue_starts.filter(
                    namespace=namespace, queue=queue, started_at__lte=now_plus(-window)
                ).delete()

    def announce(self, claims: list[Claim]) -> None:
        """Send ``run_started`` (after the commit) for the runs started for the first time."""
        for claim in claims:
            if claim.first_start:
                send_after_commit(run_started, claim.run, using=self.using)

    def fence(self, claim: Claim, *, renew: bool = False, deferred: Deferred | None = None) -> bool:
        changes: dict[str, Any] = {"updated_at": Now()}
        if renew:
            changes["available_at"] = now_plus(claim.lease_seconds)
        if not self.claimed(claim).filter(not_past_deadline()).update(**changes):
            return False
        self.store_deferred(deferred)
        return True

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
        with self.atomic():
            # The fence is an UPDATE here anyway: it renews the lease too, so a run that
            # makes progress keeps it while heartbeats fail (SQLite: "database is locked").
            if not self.fence(claim, renew=True, deferred=deferred):
                return None
            attempt = self.insert_attempt(
                claim,
                step_name=name,
                kind=StepAttempt.Kind.RUN,
                resume_generation=generation,
                position=position,
                started_at=started_at,
                atomic=atomic,
            )
        return attempt.pk  # type: ignore[no-any-return]

    def insert_attempt(self, claim: Claim, **fields: Any) -> Any:
        return self.attempts.create(
            workflow_run_id=claim.run_id, worker_id=claim.run.worker_id, **fields
        )

    def complete_step(self, claim: Claim, attempt_id: int, output: Any) -> bool:
        if not self.fence(claim, renew=True):
            return False
        self.attempts.filter(pk=attempt_id).update(
            status="completed", output=output, finished_at=Now()
        )
        return True

    def complete_wait(self, attempt_id: int, output: Any) -> None:
        self.attempts.filter(pk=attempt_id, status="running").update(
            status="completed", output=output, finished_at=Now()
        )

    def fail_steps(self, failures: Iterable[tuple[int, dict[str, Any]]]) -> None:
        for attempt_id, error in failures:
            self.attempts.filter(pk=attempt_id, status="running").update(
                status="failed", error=error, finished_at=Now()
            )

    def park(
        self,
        claim: Claim,
        available_at: datetime | None,
        *,
        attempts: int | None = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        changes: dict[str, Any] = {
            "status": WorkflowRun.Status.PENDING,
            "worker_id": None,
            "claim_token": None,
            "available_at": available_at,
            "updated_at": Now(),
        }
        if attempts is not None:
            changes["attempts"] = attempts
            changes["error"] = error
        return bool(self.claimed(claim).filter(not_past_deadline()).update(**changes))

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
        changes: dict[str, Any] = {
            "status": status,
            "output": output,
            "error": error,
            "worker_id": None,
            "claim_token": None,
            "available_at": None,
            "finished_at": Now(),
            "updated_at": Now(),
        }
        if attempts is not None:
            changes["attempts"] = attempts
        claimed = self.claimed(claim)
        if status == WorkflowRun.Status.COMPLETED:  # unfinished at the deadline means failed
            claimed = claimed.filter(not_past_deadline())
        child = claim.run.parent_step_attempt_id is not None
        with self.atomic():
            if child:
                self.runs.lock_parents([claim.run_id])  # the lock order: parent, then child
                pause_point("finish.parent-locked", run_id=claim.run_id)
            if not claimed.update(**changes):
                return False
            self.store_deferred(deferred)
            if child:
                self.wake_parents([claim.run_id])
                self.notify("")
            elif frees_a_place(claim.run):
                self.notify(claim.run.namespace)
            pause_point("finish.before-commit", run_id=claim.run_id, status=status)
        return True

    def fail_at_deadline(
        self,
        claim: Claim,
        generation: int,
        error: dict[str, Any],
        deferred: Deferred | None = None,
    ) -> bool:
        with self.atomic():
            if not self.finish(claim, WorkflowRun.Status.FAILED, error=error, deferred=deferred):
                return False
            self.attempts.filter(
                workflow_run_id=claim.run_id,
                resume_generation=generation,
                status=StepAttempt.Status.RUNNING,
                kind=StepAttempt.Kind.RUN,
            ).update(status="failed", error=error, finished_at=Now())
        return True

    def store_late_result(self, run_id: Any, generation: int, deferred: Deferred) -> None:
        attempt_id, text, finished_at = deferred
        with self.atomic():
            still_failed = self.runs.select_for_update().filter(
                pk=run_id, status=WorkflowRun.Status.FAILED, resume_generation=generation
            )
            if still_failed.exists():
                self.attempts.filter(
                    pk=attempt_id, status=StepAttempt.Status.FAILED, error=DEADLINE_ERROR
                ).update(
                    status=StepAttempt.Status.COMPLETED,
                    output=json.loads(text),
                    error=None,
                    finished_at=finished_at,
                )

    def release(self, claim: Claim, *, delay: float = 0.0) -> bool:
        # No claim token: every later write of this claim (a step start, a heartbeat) is
        # fenced out, and the run, still running, is due once its lease ended ``delay`` on.
        ended = self.claimed(claim).update(claim_token=None, available_at=now_plus(delay))
        return bool(ended)
