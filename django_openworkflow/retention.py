"""Retention: delete finished runs, family by family, once they are old enough.

The rules (docs/retention.md states them for users):

- **Families go whole.** A family is a root run (no ``parent_step_attempt``)
  and every run below it through child steps. It is deleted only when every
  member is finished, has a status the limits name, and finished longer ago
  than its status's limit (by the database clock). A finished child of an
  active parent, or an old parent with a young child, stays.
- **A run goes with its records**: its step attempts, its
  ``WorkflowRunEvent`` rows, and the ``WorkflowSignal`` rows it received (see
  ``purge_signals``).
- **Batches.** Up to ``batch_size`` families a batch, each batch its own short
  transaction: lock the members in the lock order of ``managers.py`` (oldest
  first), read the families again under the locks and keep only those that
  are unchanged and still old enough, then delete them with a few set-based
  statements. An exception or a kill rolls back the batch in progress; the
  batches before it are whole families, committed.
- **No signals, no cascade collector.** Nothing fires ``pre_delete``
  (``wake_parent_of_deleted_child`` would wake parents that are deleted too).
  Runs and attempts link both ways through ``SET_NULL`` keys, and MySQL and
  MariaDB check keys at each statement, so the links inside a batch are
  cleared first, then events, attempts and runs are deleted in that order.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError, connections, models, transaction
from django.db.models import Q

from . import leases
from .durations import parse_duration
from .managers import now_plus
from .pauses import pause_point

if TYPE_CHECKING:
    from .managers import WorkflowRunQuerySet

logger = logging.getLogger(__name__)

FINISHED = ("completed", "failed", "canceled")
# A signal row is what makes a repeated send_signal() with its idempotency key deliver
# nothing (registry.IDEMPOTENCY_WINDOW): it is kept at least this long.
SIGNAL_WINDOW = timedelta(hours=24)

# The background purge: the lease's name, how long a holder may go without renewing it
# (it renews before each batch), how often a worker looks whether a purge is due, and
# how long after a purge the next one is due, across the cluster.
LEASE_NAME = "purge"
LEASE_SECONDS = 300.0
LOOK_EVERY = 60.0
PURGE_INTERVAL = timedelta(minutes=10)
BATCH_SIZE = 1000


# --- the setting -------------------------------------------------------------------------


def retention_problems(value: object) -> list[str]:
    """What is wrong with an ``OPENWORKFLOW["RETENTION"]`` value (none for a good one)."""
    if value is None:
        return []
    if not isinstance(value, Mapping):
        return [f"must be a dict of status -> duration, or None, not {value!r}"]
    problems = []
    for status, duration in value.items():
        if status not in FINISHED:
            problems.append(f"{status!r} is not a finished status (completed, failed, canceled)")
            continue
        try:
            parse_duration(duration, what=f"the retention of {status} runs")
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def parse_retention(value: object) -> dict[str, timedelta] | None:
    """``OPENWORKFLOW["RETENTION"]`` as status -> timedelta; ``ValueError`` if invalid."""
    problems = retention_problems(value)
    if problems:
        raise ValueError(f"OPENWORKFLOW['RETENTION']: {problems[0]}")
    if value is None:
        return None
    assert isinstance(value, Mapping)
    return {str(status): parse_duration(duration) for status, duration in value.items()}


# --- the purge ---------------------------------------------------------------------------


@dataclass
class Purged:
    """What a purge deleted (or, dry, would delete)."""

    runs: int = 0
    attempts: int = 0
    events: int = 0
    signals: int = 0

    def __iadd__(self, other: Purged) -> Purged:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def __str__(self) -> str:
        return (
            f"{_count(self.runs, 'run')}, {_count(self.attempts, 'step attempt')}, "
            f"{_count(self.events, 'event')}, {_count(self.signals, 'signal')}"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


class Purge:
    """One pass over a namespace's runs: every family old enough goes, batch by batch.

    ``namespace`` defaults to ``OPENWORKFLOW["NAMESPACE"]`` (a project sharing
    the database under another namespace keeps its own runs). ``limits`` maps
    each finished status that may go to how long after ``finished_at`` its
    runs are kept; a family with a member of another status stays.
    ``keep_going`` is asked before each batch (the background purge renews
    its lease there and stops when the worker stops).
    """

    def __init__(
        self,
        limits: Mapping[str, timedelta],
        *,
        using: str | None = None,
        namespace: str | None = None,
        batch_size: int = BATCH_SIZE,
        dry_run: bool = False,
        keep_going: Callable[[], bool] = lambda: True,
    ) -> None:
        from .conf import app_settings

        unknown = sorted(set(limits) - set(FINISHED))
        if unknown:
            raise ValueError(f"not a finished status: {', '.join(unknown)}")
        self.limits = dict(limits)
        self.using = using or app_settings.DATABASE
        self.namespace = namespace or app_settings.NAMESPACE
        self.batch_size = batch_size
        self.dry_run = dry_run
        self.keep_going = keep_going
        self.stopped = False
        self._gone: set[str] = set()  # dry run: the runs it would have deleted

    @property
    def runs(self) -> WorkflowRunQuerySet:
        from .models import WorkflowRun

        return WorkflowRun.objects.using(self.using)  # type: ignore[no-any-return]

    def old_enough(self) -> Q:
        """The runs that may go, as far as their own row tells: finished long enough ago."""
        rule = Q(pk__in=[])  # no limits: nothing may go
        for status, limit in sorted(self.limits.items()):
            old = Q(status=status, finished_at__lt=now_plus(-limit.total_seconds()))
            rule = old if rule == Q(pk__in=[]) else rule | old
        return rule

    def run(self) -> Purged:
        """Purge every family old enough, then the signals nobody needs any more."""
        purged = Purged()
        for status in sorted(self.limits):
            for roots in self._root_batches(status):
                if not self._go_on():
                    return purged
                purged += self._batch(roots)
        purged += self.purge_signals()
        return purged

    def _go_on(self) -> bool:
        if not self.stopped and not self.keep_going():
            self.stopped = True
        return not self.stopped

    def _root_batches(self, status: str) -> Iterable[list[uuid.UUID]]:
        """Roots of ``status`` old enough, oldest first, ``batch_size`` at a time.

        ``finished_at >= created_at``, so the roots are searched by
        ``created_at`` in the index of runs by status (``owf_run_status_idx``):
        no index of its own that every insert would pay for. A root that stays
        (its family has a young member) is passed once per pass.
        """
        cutoff = now_plus(-self.limits[status].total_seconds())
        roots = self.runs.filter(
            namespace=self.namespace,
            status=status,
            parent_step_attempt__isnull=True,
            created_at__lt=cutoff,
            finished_at__lt=cutoff,
        ).order_by("created_at", "pk")
        after = Q()
        while True:
            rows = list(roots.filter(after).values_list("created_at", "pk")[: self.batch_size])
            if not rows:
                return
            yield [pk for _, pk in rows]
            created_at, pk = rows[-1]
            after = Q(created_at__gt=created_at) | Q(created_at=created_at, pk__gt=pk)

    def families(self, roots: Iterable[Any]) -> dict[Any, dict[Any, bool]]:
        """The families of these roots: root -> {member id: old enough}, one query a level."""
        ok = models.Case(
            models.When(self.old_enough(), then=models.Value(True)),
            default=models.Value(False),
            output_field=models.BooleanField(),
        )
        found: dict[Any, dict[Any, bool]] = {}
        root_of: dict[Any, Any] = {}
        for pk, old in self.runs.filter(pk__in=list(roots)).annotate(ok=ok).values_list("pk", "ok"):
            found[pk] = {pk: old}
            root_of[pk] = pk
        frontier = list(found)
        while frontier:
            children = self.runs.filter(parent_step_attempt__workflow_run_id__in=frontier)
            rows = children.annotate(ok=ok).values_list(
                "pk", "parent_step_attempt__workflow_run_id", "ok"
            )
            frontier = []
            for pk, parent, old in rows:
                root_of[pk] = root_of[parent]
                found[root_of[pk]][pk] = old
                frontier.append(pk)
        return found

    def _batch(self, roots: list[Any]) -> Purged:
        """Delete the families of ``roots`` that may go, in one transaction."""
        from .models import WorkflowRun

        going = {
            root: set(members)
            for root, members in self.families(roots).items()
            if all(members.values())
        }
        if not going:
            return Purged()
        ids = [pk for members in going.values() for pk in members]
        if self.dry_run:
            self._gone.update(str(pk) for pk in ids)
            return self._counted(ids)
        pause_point("purge.before-lock", runs=ids)
        with transaction.atomic(using=self.using):
            WorkflowRun.objects.db_manager(self.using).lock(ids)
            # Under the locks: only families unchanged (nobody resumed a member, started
            # or deleted a child meanwhile) and still old enough.
            ids = [
                pk
                for root, members in self.families(going).items()
                if all(members.values()) and set(members) == going[root]
                for pk in members
            ]
            purged = self._delete(ids)
        logger.debug("purge batch runs=%d attempts=%d", purged.runs, purged.attempts)
        return purged

    def _counted(self, ids: list[Any]) -> Purged:
        from .models import StepAttempt, WorkflowRunEvent

        return Purged(
            runs=len(ids),
            attempts=StepAttempt.objects.using(self.using).filter(workflow_run_id__in=ids).count(),
            events=WorkflowRunEvent.objects.using(self.using).filter(run_id__in=ids).count(),
        )

    def _delete(self, ids: list[Any]) -> Purged:
        """Inside the batch's transaction, the runs locked: delete them and their records."""
        from .models import StepAttempt, WorkflowRunEvent

        if not ids:
            return Purged()
        using = self.using
        attempts = StepAttempt.objects.using(using)
        # The links inside the families first, so no statement below leaves a key pointing
        # at a deleted row (MySQL and MariaDB check each statement, not the commit).
        self.runs.filter(pk__in=ids, parent_step_attempt__isnull=False).update(
            parent_step_attempt=None
        )
        # A step outside the families that names one of their runs as its child: none, as
        # the families follow these links; cleared rather than failing every pass.
        attempts.filter(child_workflow_run_id__in=ids).exclude(workflow_run_id__in=ids).update(
            child_workflow_run=None
        )
        purged = Purged()
        purged.events = (
            WorkflowRunEvent.objects.using(using).filter(run_id__in=ids)._raw_delete(using)
        )
        purged.attempts = attempts.filter(workflow_run_id__in=ids)._raw_delete(using)
        pause_point("purge.before-runs", runs=ids)
        purged.runs = self.runs.filter(pk__in=ids)._raw_delete(using)
        return purged

    def purge_signals(self) -> Purged:
        """Delete the signal rows whose every receiver is gone, once past their window.

        A ``WorkflowSignal`` row records a send with an idempotency key and the
        runs it was ``delivered_to`` (their ids). It goes when it is older than
        ``SIGNAL_WINDOW`` (else a repeat of the send would deliver again) and it
        was delivered to at least one run and none of them exists any more. A
        signal delivered to runs of several families goes with the last of them;
        one delivered to nobody is not a purge's business and stays. Signals
        whose runs went while they were inside their window go at a later pass.
        """
        from .models import WorkflowRun, WorkflowSignal

        signals = WorkflowSignal.objects.using(self.using)
        old = signals.filter(
            namespace=self.namespace, sent_at__lt=now_plus(-SIGNAL_WINDOW.total_seconds())
        ).order_by("pk")
        purged = Purged()
        after = 0
        while self._go_on():
            rows = list(
                old.filter(pk__gt=after).values_list("pk", "delivered_to")[: self.batch_size]
            )
            if not rows:
                break
            after = rows[-1][0]
            receivers = {run_id: _uuid(run_id) for _, to in rows for run_id in _ids(to)}
            alive = {
                str(pk)
                for pk in WorkflowRun.objects.using(self.using)
                .filter(pk__in=[u for u in receivers.values() if u is not None])
                .values_list("pk", flat=True)
            } - self._gone
            going = [
                pk
                for pk, to in rows
                if _ids(to) and not any(str(receivers[run_id]) in alive for run_id in _ids(to))
            ]
            if not going:
                continue
            if self.dry_run:
                purged.signals += len(going)
            else:
                purged.signals += signals.filter(pk__in=going)._raw_delete(self.using)
        return purged


def _ids(delivered_to: object) -> list[str]:
    return [str(x) for x in delivered_to] if isinstance(delivered_to, list) else []


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def purge(
    limits: Mapping[str, timedelta] | None = None,
    *,
    using: str | None = None,
    namespace: str | None = None,
    batch_size: int = BATCH_SIZE,
    dry_run: bool = False,
) -> Purged:
    """Purge a namespace once with ``limits`` (default: ``OPENWORKFLOW["RETENTION"]``).

    Returns the counts. ``namespace`` defaults to ``OPENWORKFLOW["NAMESPACE"]``.
    """
    from .conf import app_settings

    limits = app_settings.RETENTION if limits is None else limits
    if not limits:
        return Purged()
    pass_ = Purge(limits, using=using, namespace=namespace, batch_size=batch_size, dry_run=dry_run)
    purged = pass_.run()
    logger.info(
        "runs purged namespace=%s runs=%d attempts=%d events=%d signals=%d dry_run=%s",
        pass_.namespace,
        purged.runs,
        purged.attempts,
        purged.events,
        purged.signals,
        dry_run,
    )
    return purged


# --- in the background -------------------------------------------------------------------


class BackgroundPurge:
    """A worker's purge thread: at most one purge of a namespace at a time in the cluster.

    Every ``LOOK_EVERY`` seconds it tries to take the namespace's lease
    (``"purge:<namespace>"``); the
    lease is free only when no worker purges and the last purge finished
    ``PURGE_INTERVAL`` ago. Its holder purges in batches on this thread's own
    connection (the claim loop never waits for it), renews the lease before
    each batch, stops between two batches when the worker stops, and then
    keeps the lease until the next purge is due.
    """

    def __init__(
        self, holder: str, stopping: threading.Event, *, using: str, namespace: str
    ) -> None:
        self.holder = holder
        self.stopping = stopping
        self.using = using
        self.namespace = namespace
        self.lease = f"{LEASE_NAME}:{namespace}"

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    self.tick()
                except DatabaseError as exc:
                    logger.warning("purge failed worker=%s error=%s", self.holder, exc)
                    connections[self.using].close()
                except Exception:  # never let the thread die: the next look tries again
                    logger.exception("purge crashed worker=%s", self.holder)
                    connections[self.using].close()
                self.stopping.wait(LOOK_EVERY)
        finally:
            connections[self.using].close()

    def tick(self) -> Purged | None:
        """Purge if this worker takes the lease; None when another holds it or none is due."""
        from .conf import app_settings

        limits = app_settings.RETENTION
        if not limits or not leases.take(self.lease, self.holder, LEASE_SECONDS, using=self.using):
            return None
        pause_point("purge.leased", holder=self.holder)
        pass_ = Purge(
            limits, using=self.using, namespace=self.namespace, keep_going=self._keep_going
        )
        purged = pass_.run()
        if not pass_.stopped:  # done: the lease says when the next purge is due
            leases.renew(self.lease, self.holder, PURGE_INTERVAL.total_seconds(), using=self.using)
        elif self.stopping.is_set():  # let another worker go on at once
            leases.renew(self.lease, self.holder, 0, using=self.using)
        logger.info(
            "runs purged namespace=%s runs=%d attempts=%d events=%d signals=%d worker=%s",
            self.namespace,
            purged.runs,
            purged.attempts,
            purged.events,
            purged.signals,
            self.holder,
        )
        return purged

    def _keep_going(self) -> bool:
        if self.stopping.is_set():
            return False
        return leases.renew(self.lease, self.holder, LEASE_SECONDS, using=self.using)


def purge_thread(
    holder: str, stopping: threading.Event, *, using: str, namespace: str
) -> threading.Thread | None:
    """The worker's background purge thread, or None when ``RETENTION`` is not set."""
    from .conf import app_settings

    try:
        if not app_settings.RETENTION:
            return None
    except ValueError as exc:
        logger.error("no background purge (check E014) worker=%s problem=%s", holder, exc)
        return None
    purger = BackgroundPurge(holder, stopping, using=using, namespace=namespace)
    return threading.Thread(target=purger.run, name="openworkflow-purge", daemon=True)
