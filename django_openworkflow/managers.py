"""QuerySets (read vocabulary) and Manager transitions.

Every change of a run's status goes through a method here; views, admin
actions, the worker and the engine call them and never assign ``status``
themselves. Transitions made on behalf of a worker are *fenced*: they match
the run's ``claim_token`` (new for every claim), so a worker that lost its
claim writes nothing.

The lock order. A transaction that locks several runs' rows and waits for
them locks them oldest first (``created_at``, then ``id``: ``LOCK_ORDER``).
A parent is always older than its children, so parents are locked before
children: a child that finishes, is canceled or passes its deadline locks
its parent (``lock_parents``) *before* it changes its own row. A cancel
locks the run's parent, the run, then its active descendants; a rerun locks
the run, then the active runs below the steps it runs again (children and
their descendants, oldest first); a resume locks its run only. Locks taken
with ``SKIP LOCKED`` never wait and need no order.

Three layers: ``RunLocks`` (the lock order), ``RunWrites`` (what the
transitions check and write under the locks they hold) and
``WorkflowRunManager`` (the transitions: ``resume``, ``rerun``, ``cancel``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from asgiref.sync import sync_to_async
from django.db import DatabaseError, models, transaction
from django.db.models import Q
from django.utils import timezone

from . import errors
from .audit import log_run_change
from .clock import Now
from .corrections import (
    NOT_GIVEN,
    Correction,
    RerunPlan,
    require_correct_permission,
    stale_message,
)
from .corrections import expected_generation as expected_generation_of
from .exceptions import InvalidTransition, Refusal, RunBusy
from .names import check_name
from .pauses import pause_point
from .queues import frees_a_place
from .signals import run_canceled, run_rerun, run_resumed, send_after_commit
from .store.base import LockWaitExpired
from .subjects import content_type_of, subject_key
from .tracing import resumed

if TYPE_CHECKING:
    from .models import StepAttempt, WorkflowRun, WorkflowRunEvent
    from .store import Store

logger = logging.getLogger(__name__)
R = TypeVar("R")

ACTIVE = ("pending", "running")
# A transition the database chose as a deadlock's victim runs again, this many times in all.
DEADLOCK_ATTEMPTS = 3
UUID_GROUPS = ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32))  # 8-4-4-4-12 hex digits


def now_plus(seconds: float) -> models.Expression:
    """The database clock plus ``seconds``, as an expression."""
    return models.ExpressionWrapper(
        Now() + models.Value(timedelta(seconds=seconds)),
        output_field=models.DateTimeField(),
    )


def not_past_deadline() -> Q:
    return Q(deadline_at__isnull=True) | Q(deadline_at__gt=Now())


LOCK_ORDER = ("created_at", "pk")
NEWEST_FIRST = ("-created_at", "-pk")  # (ids are time-ordered: the tie-break of one instant)
WAIT_KINDS = ("sleep", "workflow", "signal_wait")  # attempts that wait rather than execute


def _pk(run_or_id: Any) -> uuid.UUID:
    """The run id of a run or an id; an id that is no UUID names no run (``DoesNotExist``)."""
    from .models import WorkflowRun

    value = getattr(run_or_id, "pk", run_or_id)
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except (TypeError, ValueError, AttributeError):
        raise WorkflowRun.DoesNotExist(f"no workflow run has the id {value!r}") from None


def _lock_timeout(value: Any) -> float | None:
    """``lock_timeout=``: None, or seconds (a number ≥ 0); anything else is a ``ValueError``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"lock_timeout must be None or a number of seconds >= 0, not {value!r}")
    return float(value)


def _aware_deadline(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or timezone.is_naive(value):
        raise ValueError(
            f"deadline_at must be an aware datetime (timezone.now() + ...), not {value!r}"
        )
    return value


ALLOWED = {  # what each verb's Refusal.STATUS message says may be done so
    "resume": "only failed runs can be resumed",
    "rerun": "only completed, failed or canceled runs can be rerun",
}


def _refused(verb: str, run: WorkflowRun, refusal: Refusal, deadline_at: datetime | None) -> str:
    """The message of the ``InvalidTransition`` that ``resume()``/``rerun()`` raise."""
    if refusal is Refusal.STATUS:
        return f"cannot {verb} run {run.pk}: it is {run.status}; {ALLOWED[verb]}"
    if refusal is Refusal.NEW_DEADLINE:
        assert deadline_at is not None
        return (
            f"cannot {verb} run {run.pk}: the new deadline_at "
            f"{deadline_at.isoformat()} is not in the future"
        )
    assert run.deadline_at is not None
    return (
        f"cannot {verb} run {run.pk}: its deadline_at {run.deadline_at.isoformat()} "
        f"has passed; pass a future deadline_at= to {verb} it"
    )


class WorkflowRunQuerySet(models.QuerySet["WorkflowRun"]):
    def active(self) -> WorkflowRunQuerySet:
        """Runs that have not finished: pending (queued or parked) or running.

        The runs ``cancel()`` would cancel: ``WorkflowRun.can_cancel()`` in SQL.
        """
        return self.filter(status__in=ACTIVE)

    def finished(self) -> WorkflowRunQuerySet:
        return self.exclude(status__in=ACTIVE)

    def failed(self) -> WorkflowRunQuerySet:
        return self.filter(status="failed")

    def resumable(self) -> WorkflowRunQuerySet:
        """Runs ``resume()`` would resume: ``WorkflowRun.can_resume()`` in SQL.

        Failed, with no deadline or one still ahead (by the database clock).
        """
        return self.failed().filter(not_past_deadline())

    def rerunnable(self) -> WorkflowRunQuerySet:
        """Runs ``rerun()`` would rerun: ``WorkflowRun.can_rerun()`` in SQL.

        Finished (completed, failed or canceled), with no deadline or one still ahead.
        """
        return self.finished().filter(not_past_deadline())

    def names_to_offer(
        self, field: str, known: Iterable[str], chosen: str | None = None
    ) -> list[str]:
        """The choices of a filter by ``field`` (the run list's, the admin's): the ``known``
        names, those of active runs, and the ``chosen`` one.

        Not the column's DISTINCT values: a read of every run ever stored.
        """
        active = self.active().order_by().exclude(**{field: None}).values_list(field, flat=True)
        return sorted({*known, *active.distinct(), *([chosen] if chosen else [])})

    def in_namespace(self, namespace: str) -> WorkflowRunQuerySet:
        return self.filter(namespace=namespace)

    def for_subject(self, obj: models.Model) -> WorkflowRunQuerySet:
        """The runs started with ``subject=obj``, newest first (index ``owf_run_subject_idx``).

        ``obj`` is a saved model instance (``TypeError`` / ``ValueError``
        otherwise); its runs are found by its content type and primary key,
        wherever the object lives.
        """
        subject_type_id, subject_id = subject_key(obj, " of for_subject()")
        return self.filter(subject_type_id=subject_type_id, subject_id=subject_id).order_by(
            *NEWEST_FIRST
        )

    def for_subjects(self, objects: Iterable[models.Model]) -> WorkflowRunQuerySet:
        """The runs of any of ``objects`` (instances, of any models, or a QuerySet), newest first.

        A QuerySet is read for its primary keys (one query, on its own
        database); the runs are then found by content type and key.
        """
        keys: dict[int, set[str]] = {}
        if isinstance(objects, models.QuerySet):
            subject_type_id = content_type_of(objects.model).pk
            keys[subject_type_id] = {str(pk) for pk in objects.values_list("pk", flat=True)}
        else:
            for obj in objects:
                subject_type_id, subject_id = subject_key(obj, " of for_subjects()")
                keys.setdefault(subject_type_id, set()).add(subject_id)
        found = Q()
        for subject_type_id, subject_ids in keys.items():
            found |= Q(subject_type_id=subject_type_id, subject_id__in=sorted(subject_ids))
        runs = self.filter(found) if keys else self.none()
        return runs.order_by(*NEWEST_FIRST)

    def with_current_step(self) -> WorkflowRunQuerySet:
        """Annotate ``current_step``: the latest attempt's step (the one running or that failed)."""
        from .models import StepAttempt

        latest = (
            StepAttempt.objects.filter(workflow_run=models.OuterRef("pk"))
            .order_by("-id")
            .values("step_name")[:1]
        )
        return self.annotate(current_step=models.Subquery(latest))

    def delete(self) -> tuple[int, dict[str, int]]:
        """Delete the runs, first locking every run the delete touches in the lock order.

        Their parents (woken, see ``models.wake_parent_of_deleted_child``), the
        runs, and their children (whose link to the deleted step is cleared).
        """
        with transaction.atomic(using=self.db):
            ids = list(self.values_list("pk", flat=True))
            self.model.objects.db_manager(self.db).lock_for_delete(ids)
            return super().delete()

    def matching(self, text: str) -> WorkflowRunQuerySet:
        """Runs that a search for ``text`` finds (the run list's and the admin's search).

        A run id or its first characters (at least 4 hex digits, dashes optional),
        or part of the idempotency key or of the workflow name (any case).
        """
        text = text.strip()
        if not text:
            return self
        found = Q(idempotency_key__icontains=text) | Q(workflow_name__icontains=text)
        digits = text.replace("-", "").lower()
        if 4 <= len(digits) <= 32 and all(c in "0123456789abcdef" for c in digits):
            # the canonical text form's dashes, so it matches native uuid columns too
            dashed = "-".join(digits[a:b] for a, b in UUID_GROUPS if digits[a:b])
            found |= Q(id__startswith=dashed)
        return self.filter(found)

    def due(self) -> WorkflowRunQuerySet:
        """Active runs a worker may take now: queued, woken, or with an expired lease."""
        return self.active().filter(available_at__lte=Now()).filter(not_past_deadline())

    def overdue(self) -> WorkflowRunQuerySet:
        """Active runs whose deadline has passed."""
        return self.active().filter(deadline_at__lte=Now())

    def asleep_beyond(self, seconds: float) -> WorkflowRunQuerySet:
        """Pending runs not due within ``seconds``: parked without a timer, or due later."""
        later = Q(available_at__isnull=True) | Q(available_at__gt=now_plus(seconds))
        return self.filter(status=self.model.Status.PENDING).filter(later)

    def lease_expired_for(self, seconds: float) -> WorkflowRunQuerySet:
        """Running runs whose lease ended more than ``seconds`` ago."""
        return self.filter(status=self.model.Status.RUNNING, available_at__lt=now_plus(-seconds))

    def resume(self, *, by: Any = None) -> list[WorkflowRun]:
        """Resume every resumable run in the queryset; skip the others. Returns the resumed."""
        return self._each(self.model.objects.resume, by)

    def cancel(self, *, by: Any = None) -> list[WorkflowRun]:
        """Cancel every active run in the queryset; skip the others. Returns the canceled."""
        return self._each(self.model.objects.cancel, by)

    def rerun(self, *, by: Any = None) -> list[WorkflowRun]:
        """Rerun every finished run in the queryset from the start; skip the others (active,
        or past their deadline). Returns the rerun."""
        return self._each(self.model.objects.rerun, by)

    def _each(self, transition: Any, by: Any) -> list[WorkflowRun]:
        changed = []
        for pk in self.values_list("pk", flat=True):
            try:
                changed.append(transition(pk, by=by))
            except (InvalidTransition, self.model.DoesNotExist):
                continue
        return changed


class RunLocks(models.Manager.from_queryset(WorkflowRunQuerySet)):  # type: ignore[misc]
    """The lock order (see the module's docstring): which rows a transition locks, and how."""

    def lock(self, ids: Iterable[Any]) -> list[Any]:
        """Lock these runs' rows in the lock order (oldest first); return their ids."""
        return self.store.lock_runs(ids)

    def lock_for_delete(self, ids: Iterable[Any]) -> None:
        """Before deleting runs: lock their parents, them and their children, oldest first."""
        from .models import StepAttempt

        ids = list(ids)
        # Three reads through their indexes, then one lock by primary key. (One statement
        # of "id IN ids OR id IN (parents) OR id IN (children)" read the whole table on
        # PostgreSQL: a quarter of a second per delete with a million runs stored.)
        parents = StepAttempt.objects.using(self.db).filter(child_workflow_run_id__in=ids)
        children = self.filter(parent_step_attempt__workflow_run_id__in=ids)
        self.lock(
            {
                *ids,
                *parents.values_list("workflow_run_id", flat=True),
                *children.values_list("pk", flat=True),
            }
        )

    def lock_parents(self, child_ids: Iterable[Any]) -> list[Any]:
        """Lock the runs whose steps started these child runs: before the children change."""
        from .models import StepAttempt

        parents = StepAttempt.objects.using(self.db).filter(
            child_workflow_run_id__in=list(child_ids)
        )
        return self.lock(parents.values("workflow_run_id"))

    @property
    def store(self) -> Store:
        """The store of this manager's database (``OPENWORKFLOW["DATABASE"]`` by default)."""
        from .store import get_store

        return get_store(self.db)

    def _lock_one(self, pk: Any) -> WorkflowRun:
        """Lock the run's row; the run carries ``db_now``, the database clock under the lock."""
        return self.select_for_update().annotate(db_now=Now()).get(pk=pk)  # type: ignore[no-any-return]

    def _lock_active_descendants(self, root: Any) -> set[Any]:
        """Lock the active runs below ``root`` (children, grandchildren, ...) in the lock order."""
        return self._lock_active_family(Q(parent_step_attempt__workflow_run_id=root))

    def _lock_active_family(self, first: Q) -> set[Any]:
        """Lock the active runs that ``first`` selects and their active descendants, in the
        lock order; return their ids.

        The whole family is read first and locked at once; a child started
        meanwhile (its parent was not locked yet) is found by the next round.
        """
        locked: set[Any] = set()
        while True:
            family: set[Any] = set()
            rows = list(self.filter(first).values_list("pk", "status"))
            while rows:  # through finished runs too: a child that failed may have
                family.update(pk for pk, status in rows if status in ACTIVE)  # active children
                frontier = [pk for pk, _ in rows]
                rows = list(
                    self.filter(parent_step_attempt__workflow_run_id__in=frontier).values_list(
                        "pk", "status"
                    )
                )
            new = family - locked
            if not new:
                return locked
            locked.update(self.lock(new))

    @property
    def _attempts(self) -> Any:
        from .models import StepAttempt

        return StepAttempt.objects.using(self.db)

    def _transition(
        self, action: str, pk: Any, lock_timeout: float | None, body: Callable[[], R]
    ) -> R:
        """``body()`` in ``_locking()``'s transaction. When the database ends that
        transaction to break a deadlock with another one (a worker's, say), the whole
        transition runs again, up to ``DEADLOCK_ATTEMPTS`` times in all: its reads and
        refusals are made afresh under the new locks. Not inside a caller's transaction,
        which the database rolled back: the error goes to the caller."""
        attempt = 1
        while True:
            try:
                with self._locking(action, pk, lock_timeout):
                    return body()
            except DatabaseError as exc:
                in_callers = transaction.get_connection(self.db).in_atomic_block
                if attempt == DEADLOCK_ATTEMPTS or in_callers or not self.store.deadlocked(exc):
                    raise
                attempt += 1
                logger.info(
                    "deadlock victim, %s tried again run=%s attempt=%s", action, pk, attempt
                )

    @contextmanager
    def _locking(self, action: str, pk: Any, lock_timeout: float | None) -> Iterator[None]:
        """A transition's transaction. With ``lock_timeout`` (seconds, for a person waiting:
        the pages, the admin), each of its waits for a row lock lasts at most that long; one
        that runs out rolls it back and raises ``RunBusy`` naming the run. None: wait as
        long as the database does."""
        if lock_timeout is None:
            with transaction.atomic(using=self.db):
                yield
            return
        try:
            with self.store.atomic_with_lock_timeout(lock_timeout):
                yield
        except LockWaitExpired as exc:
            raise RunBusy(pk, action=action, lock_timeout=lock_timeout) from exc


class RunWrites(RunLocks):
    """What the transitions check and write, each under the row locks its transition holds."""

    def _refuse(
        self,
        verb: str,
        run: WorkflowRun,
        expected: int | None,
        deadline_at: datetime | None,
        rule: Any,
    ) -> None:
        """Under the lock: raise ``InvalidTransition`` if ``verb`` may not go on."""
        if expected is not None and run.resume_generation != expected:
            raise InvalidTransition(
                stale_message(run.pk, run.resume_generation, expected),
                run_id=run.pk,
                status=run.status,
                reason=Refusal.STALE,
            )
        refusal = rule(run.db_now, deadline_at=deadline_at)  # type: ignore[attr-defined]
        if refusal is not None:
            raise InvalidTransition(
                _refused(verb, run, refusal, deadline_at),
                run_id=run.pk,
                status=run.status,
                reason=refusal,
            )

    def _attempts_of(self, run: WorkflowRun, *columns: str) -> list[Any]:
        """Under the lock: the run's attempts, oldest first, without their outputs (nor
        ``columns``)."""
        attempts = self._attempts.filter(workflow_run=run).order_by("id")
        return list(attempts.defer("output", *columns))

    def _restart(self, run: WorkflowRun, deadline_at: datetime | None, also: list[str]) -> None:
        """Under the lock: make the run pending in a new generation, due now; save it.

        ``also``: fields the caller changed too. Waits in flight (its deadline
        passed while a child ran, say) go on in the new generation: the same
        child, the same signal; a rerun then closes those of steps it runs again.
        """
        from .models import StepAttempt

        db_now = run.db_now  # type: ignore[attr-defined]
        if deadline_at is not None:
            run.deadline_at = deadline_at
        run.status = self.model.Status.PENDING
        run.error = None
        run.worker_id = None
        run.claim_token = None
        run.started_at = None
        run.finished_at = None
        run.attempts = 0
        run.resume_generation += 1
        run.available_at = db_now
        run.updated_at = db_now
        traced = resumed(run.trace_context, run.resume_generation)
        if traced is not None:  # resumed inside a span: the next passes link to it
            run.trace_context = traced
        run.save(
            update_fields=[
                *(["trace_context"] if traced is not None else []),
                *also,
                "status",
                "error",
                "worker_id",
                "claim_token",
                "started_at",
                "finished_at",
                "attempts",
                "resume_generation",
                "available_at",
                "updated_at",
                "deadline_at",
            ]
        )
        self._attempts.filter(
            workflow_run=run, status=StepAttempt.Status.RUNNING, kind__in=WAIT_KINDS
        ).update(resume_generation=run.resume_generation)

    def _record(
        self, run: WorkflowRun, action: str, by: Any, cleared: Any, details: Any
    ) -> WorkflowRunEvent:
        """Under the lock: the run's event of a resume or rerun."""
        from .models import WorkflowRunEvent

        return WorkflowRunEvent.objects.using(self.db).create(  # type: ignore[no-any-return]
            run=run, action=action, by=by, cleared_error=cleared, details=details
        )

    def _give_outputs(
        self,
        run: WorkflowRun,
        event: WorkflowRunEvent,
        failed: dict[str, StepAttempt],
        outputs: dict[str, Any],
    ) -> None:
        """Under the lock, after the restart: complete the failed steps with the given
        outputs, as attempts of the new generation (the kind and place of their failure)."""
        from .models import StepAttempt

        db_now = run.db_now  # type: ignore[attr-defined]
        self._attempts.bulk_create(
            StepAttempt(
                workflow_run=run,
                step_name=name,
                kind=last.kind,
                atomic=last.atomic,
                position=last.position,
                signal=last.signal,
                status=StepAttempt.Status.COMPLETED,
                output=outputs[name],
                resume_generation=run.resume_generation,
                started_at=db_now,
                finished_at=db_now,
                given_in=event,
            )
            for name, last in failed.items()
        )

    def _close_waits(self, run: WorkflowRun, plan: RerunPlan) -> None:
        """Under the lock, before the restart: fail the open waits of the steps a rerun runs
        again, in their own generation, so they never take a signal or a wake-up again."""
        from .models import StepAttempt

        if plan.close_waits:
            error = errors.rerun_closed(run.pk, run.resume_generation + 1, plan.from_step)
            self._attempts.filter(
                pk__in=plan.close_waits, status=StepAttempt.Status.RUNNING
            ).update(status=StepAttempt.Status.FAILED, error=error, finished_at=Now())

    def _supersede(self, run: WorkflowRun, event: WorkflowRunEvent, plan: RerunPlan) -> None:
        """Under the lock: the completed attempts that replay would serve, but for the steps
        a rerun serves (``plan.supersede``), are superseded by its event (one UPDATE)."""
        if plan.supersede:
            served = self._attempts.filter(
                workflow_run=run, status="completed", superseded_by__isnull=True
            )
            served.exclude(step_name__in=plan.served_steps).update(superseded_by=event)

    def _mark_canceled(self, run: WorkflowRun, by: Any) -> None:
        """Inside ``cancel``'s transaction, with the row locked: cancel one run."""
        from .models import StepAttempt, WorkflowRunEvent

        run.status = self.model.Status.CANCELED
        run.worker_id = None
        run.claim_token = None
        run.available_at = None
        run.finished_at = run.updated_at = run.db_now  # type: ignore[attr-defined]
        run.save(
            update_fields=[
                "status",
                "worker_id",
                "claim_token",
                "available_at",
                "finished_at",
                "updated_at",
            ]
        )
        StepAttempt.objects.using(self.db).filter(workflow_run=run, status="running").update(
            status="failed", error=errors.CANCELED_ERROR, finished_at=Now()
        )
        WorkflowRunEvent.objects.using(self.db).create(
            run=run, action=WorkflowRunEvent.Action.CANCEL, by=by
        )
        send_after_commit(run_canceled, run, using=self.db, by=by)


class WorkflowRunManager(RunWrites):
    """``WorkflowRun.objects``: the transitions asked for by people (views, admin, shell)."""

    def resume(
        self,
        run_or_id: Any,
        *,
        deadline_at: Any = None,
        by: Any = None,
        input: Any = NOT_GIVEN,
        step_outputs: dict[str, Any] | None = None,
        expected_generation: int | None = None,
        lock_timeout: float | None = None,
    ) -> WorkflowRun:
        """Send a failed run back to the queue; completed steps keep their results.

        Locks the run row and decides from the status read under that lock.
        Raises ``InvalidTransition`` for a run that is not ``failed`` (or whose
        deadline has passed and no future ``deadline_at`` is given, or whose
        ``resume_generation`` is not ``expected_generation``),
        ``WorkflowRun.DoesNotExist`` for an unknown id (or one that is not a
        UUID) and ``ValueError`` for a ``deadline_at`` that is not an aware
        datetime. Waits in flight when the run failed are kept.

        With changes (``corrections.py``): ``input`` replaces the run's input;
        ``step_outputs`` (``{"step": output}``) completes each named step that
        failed in the current generation with that output, as a new attempt
        of the new generation marked ``given_in`` the resume's event, which
        replay serves instead of running the step. The values are checked
        before the lock (``TypeError``/``ValueError``); a step that did not
        fail is a ``ValueError``; a user ``by`` needs the permission
        ``correct_workflowrun`` (``PermissionDenied``). The event's
        ``details`` hold the old and new values, and a user's change is
        written to the admin's history too. Any refusal changes nothing.

        ``lock_timeout`` (seconds; the pages and the admin pass
        ``OPENWORKFLOW["PAGE_LOCK_TIMEOUT"]``): wait at most that long for the
        run's row lock, then raise ``RunBusy`` (an ``InvalidTransition``). None,
        the default: wait until the row is free.
        """
        pk = _pk(run_or_id)
        deadline_at = _aware_deadline(deadline_at)
        expected = expected_generation_of(expected_generation)
        timeout = _lock_timeout(lock_timeout)
        correction = Correction.checked(pk, input, step_outputs)
        if correction.given:
            require_correct_permission(by, pk)

        def locked() -> WorkflowRun:
            run = self._lock_one(pk)
            pause_point("resume.locked", run_id=run.pk)
            self._refuse("resume", run, expected, deadline_at, run.resume_refusal)
            failed = {}
            if correction.step_outputs:
                failed = correction.failed_attempts(run.resume_generation, self._attempts_of(run))
            details = correction.details(run.input, failed)
            cleared = run.error
            changed = []
            if correction.input is not NOT_GIVEN:
                run.input = correction.input
                changed.append("input")
            self._restart(run, deadline_at, changed)
            event = self._record(run, "resume", by, cleared, details)
            if failed:
                self._give_outputs(run, event, failed, correction.step_outputs)
            self.store.notify(run.namespace)
            send_after_commit(run_resumed, run, using=self.db, by=by)
            if correction.given:
                log_run_change(run, by, correction.log_message(), using=self.db)
            return run

        return self._transition("resume", pk, timeout, locked)

    def rerun(
        self,
        run_or_id: Any,
        *,
        from_step: str | None = None,
        by: Any = None,
        deadline_at: Any = None,
        expected_generation: int | None = None,
        lock_timeout: float | None = None,
    ) -> WorkflowRun:
        """Take a finished run back to ``pending`` in place: same id, a new generation.

        The steps on the stored path (``WorkflowRun.stored_path()``) before
        ``from_step`` are served from their stored results; ``from_step``
        and everything after it run again (``None``: every step). Nothing is
        deleted: the completed attempts of the steps that run again are
        marked ``superseded_by`` the rerun's event, their open waits are
        closed (failed, ``Rerun``) and the active child runs their attempts
        started are canceled, with their descendants (the rerun starts new
        ones). Raises ``InvalidTransition`` for an active run, a passed
        deadline without a future ``deadline_at`` or a stale
        ``expected_generation`` (as ``resume()``), ``ValueError`` for a
        ``from_step`` not on the path and ``WorkflowRun.DoesNotExist`` for an
        unknown id; any refusal changes nothing. A rerun of a child run does
        not touch its parent.

        The lock order: the run, then the child runs to cancel and their
        descendants, oldest first. ``lock_timeout``: as ``resume()``'s, for
        each of these locks.
        """
        pk = _pk(run_or_id)
        deadline_at = _aware_deadline(deadline_at)
        expected = expected_generation_of(expected_generation)
        timeout = _lock_timeout(lock_timeout)
        if from_step is not None:
            check_name(from_step, "from_step", of=f" of the rerun of run {pk}")

        def locked() -> WorkflowRun:
            run = self._lock_one(pk)
            pause_point("rerun.locked", run_id=run.pk)
            self._refuse("rerun", run, expected, deadline_at, run.rerun_refusal)
            plan = RerunPlan.of(run, self._attempts_of(run, "error"), from_step)
            # The child runs of the steps that run again (any of their attempts), with
            # their descendants: no one waits for them any more.
            started = Q(parent_step_attempt__workflow_run=run) & ~Q(
                parent_step_attempt__step_name__in=plan.kept_steps
            )
            family = self._lock_active_family(started)
            ended = list(self.filter(pk__in=family).active().annotate(db_now=Now()))
            ended.sort(key=lambda r: (r.created_at, str(r.pk)))
            cleared = run.error if run.status == self.model.Status.FAILED else None
            self._close_waits(run, plan)  # before the restart moves the open waits on
            run.output = None
            self._restart(run, deadline_at, ["output"])
            canceled = [r.pk for r in ended]
            event = self._record(
                run, "rerun", by, cleared, plan.details(run.resume_generation, canceled)
            )
            self._supersede(run, event, plan)
            for child in ended:
                self._mark_canceled(child, by)
            self.store.notify(run.namespace)
            send_after_commit(run_rerun, run, using=self.db, by=by, from_step=from_step)
            log_run_change(run, by, plan.log_message(), using=self.db)
            return run

        return self._transition("rerun", pk, timeout, locked)

    def cancel(
        self, run_or_id: Any, *, by: Any = None, lock_timeout: float | None = None
    ) -> WorkflowRun:
        """Cancel a pending or running run and its unfinished descendant runs.

        A worker executing one stops at its next step boundary and stores
        nothing further as success. Raises ``InvalidTransition`` for a
        finished run and ``WorkflowRun.DoesNotExist`` for an unknown id.
        One transaction, locking in the lock order: the run's parent, the
        run, then its descendants. ``lock_timeout``: as ``resume()``'s, for
        each of these locks.
        """
        pk = _pk(run_or_id)
        timeout = _lock_timeout(lock_timeout)

        def locked() -> WorkflowRun:
            self.lock_parents([pk])
            run = self.select_for_update().annotate(db_now=Now()).get(pk=pk)
            refusal = run.cancel_refusal()
            if refusal is not None:
                raise InvalidTransition(
                    f"cannot cancel run {run.pk}: it is {run.status}; "
                    "only pending or running runs can be canceled",
                    run_id=run.pk,
                    status=run.status,
                    reason=refusal,
                )
            self._mark_canceled(run, by)
            pause_point("cancel.before-children", run_id=run.pk)
            descendants = self._lock_active_descendants(run.pk)
            ended = [run, *self.filter(pk__in=descendants).active().annotate(db_now=Now())]
            for child in ended[1:]:
                self._mark_canceled(child, by)
            woken = run.parent_step_attempt_id is not None and self.store.wake_parents([run.pk])
            if woken or any(frees_a_place(r) for r in ended):
                self.store.notify(run.namespace)
            return run

        return self._transition("cancel", pk, timeout, locked)

    # --- for async code (Django's "a" prefix): the same arguments, awaited ---------------

    async def aresume(self, *args: Any, **kwargs: Any) -> WorkflowRun:
        """``resume()`` for async code."""
        return await sync_to_async(self.resume)(*args, **kwargs)

    async def arerun(self, *args: Any, **kwargs: Any) -> WorkflowRun:
        """``rerun()`` for async code."""
        return await sync_to_async(self.rerun)(*args, **kwargs)

    async def acancel(self, *args: Any, **kwargs: Any) -> WorkflowRun:
        """``cancel()`` for async code."""
        return await sync_to_async(self.cancel)(*args, **kwargs)


class StepAttemptQuerySet(models.QuerySet[Any]):
    def running(self) -> StepAttemptQuerySet:
        return self.filter(status="running")

    def completed(self) -> StepAttemptQuerySet:
        return self.filter(status="completed")

    def failed(self) -> StepAttemptQuerySet:
        return self.filter(status="failed")

    def open_waits(self) -> StepAttemptQuerySet:
        """Running waits for a child run or a signal (what a run parked without a timer awaits)."""
        return self.running().filter(kind__in=["workflow", "signal_wait"])
