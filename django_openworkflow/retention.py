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

import functools
import logging
import operator
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError, connections, models, transaction
from django.db.models import Q

from . import leases
from .durations import parse_duration
from .logfields import failure, failure_text
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
# While runs execute, a purge rests after each batch this many times as long as the batch
# took: it is busy at most a quarter of the time, and leaves the rest to the work.
REST_RATIO = 3.0
SPANS_A_QUERY = 200
# Longer than this is "for ever" to no database (PostgreSQL's timestamps end at 4713 BC,
# Python's datetime at year 1): leave the status out of RETENTION to keep its runs.
LONGEST = timedelta(days=100 * 366)


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
            parsed = parse_duration(duration, what=f"the retention of {status} runs")
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if parsed > LONGEST:
            problems.append(
                f"the retention of {status} runs {duration!r} is longer than 100 years; "
                f"leave {status!r} out to keep those runs for ever"
            )
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
    its lease there and stops when the worker stops). ``progress`` is told
    after each batch has committed: how many roots the pass has looked at
    and what it deleted so far (``manage.py purge_workflow_runs`` shows it).
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
        rest: Callable[[float], object] | None = None,
        progress: Callable[[int, Purged], object] | None = None,
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
        # How to rest (time.sleep; the background purge's ends when the worker stops).
        self.rest = rest or time.sleep
        self.progress = progress
        self._signals_counted: set[int] = set()  # dry run: counted by a batch already
        self.stopped = False
        self._gone: set[str] = set()  # dry run: the runs it would have deleted

    @property
    def runs(self) -> WorkflowRunQuerySet:
        from .models import WorkflowRun

        return WorkflowRun.objects.using(self.using)  # type: ignore[no-any-return]

    def old_enough(self) -> Q:
        """The runs that may go, as far as their own row tells: finished long enough ago."""
        rules = [
            Q(status=status, finished_at__lt=now_plus(-limit.total_seconds()))
            for status, limit in sorted(self.limits.items())
        ]
        return functools.reduce(operator.or_, rules, Q(pk__in=[]))  # no limits: none may go

    def run(self) -> Purged:
        """Purge every family old enough, then the signals nobody needs any more."""
        purged = Purged()
        looked_at = 0
        for status in sorted(self.limits):
            for roots in self._root_batches(status):
                if not self._go_on():
                    return purged
                began = time.monotonic()
                purged += self._batch(roots)
                looked_at += len(roots)
                if self.progress is not None:
                    self.progress(looked_at, purged)
                self._rest(time.monotonic() - began)
        purged += self.purge_signals()
        return purged

    def candidates(self) -> int:
        """How many roots the pass will look at, about (runs finish meanwhile): one count
        a status, on the index the batches read."""
        return sum(self._roots(status).count() for status in self.limits)

    def _rest(self, busy: float) -> None:
        """Yield to the work: while runs execute, rest ``REST_RATIO`` times as long as the
        batch took.

        Runs of any namespace: they share the database. A purge runs at full
        speed on an idle system and at a quarter of it beside busy workers.
        """
        if not self.dry_run and self.runs.filter(status="running").exists():
            self.rest(busy * REST_RATIO)

    def _go_on(self) -> bool:
        if not self.stopped and not self.keep_going():
            self.stopped = True
        return not self.stopped

    def _root_batches(self, status: str) -> Iterable[list[uuid.UUID]]:
        """Roots of ``status`` old enough, oldest first, ``batch_size`` at a time.

        ``finished_at >= created_at``, so the roots are searched by
        ``created_at`` in the index of runs by status (``owf_run_status_idx``):
        no index of its own that every insert would pay for. The order is the
        index's alone (no sort of every old run); runs that share a
        ``created_at`` (``start_many``) are read as one group, in
        ``batch_size`` chunks. A root that stays (its family has a young
        member) is passed once per pass.
        """
        roots = self._roots(status).order_by("created_at")
        after: Q = Q()
        while True:
            rows = list(roots.filter(after).values_list("created_at", "pk")[: self.batch_size])
            if not rows:
                return
            last = rows[-1][0]
            if len(rows) == self.batch_size:  # the rest of the last instant's group
                rows = [row for row in rows if row[0] != last]
                rows += roots.filter(created_at=last).values_list("created_at", "pk")
            ids = [pk for _, pk in rows]
            for i in range(0, len(ids), self.batch_size):
                yield ids[i : i + self.batch_size]
            after = Q(created_at__gt=last)

    def _roots(self, status: str) -> WorkflowRunQuerySet:
        cutoff = now_plus(-self.limits[status].total_seconds())
        return self.runs.filter(
            namespace=self.namespace,
            status=status,
            parent_step_attempt__isnull=True,
            created_at__lt=cutoff,
            finished_at__lt=cutoff,
        )

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
            counted = self._counted(ids)
            signals = set(self._signals_going(ids))
            self._signals_counted |= signals
            counted.signals = len(signals)
            return counted
        pause_point("purge.before-lock", runs=ids)
        with transaction.atomic(using=self.using):
            manager = WorkflowRun.objects.db_manager(self.using)
            manager.lock(ids)
            self._lock_keys(ids)
            # Under the locks: only families unchanged (nobody resumed a member, started
            # or deleted a child meanwhile) and still old enough, and none that a model of
            # the project protects (on_delete=PROTECT, RESTRICT or DO_NOTHING).
            protected = protected_runs(self.using, ids)
            ids = [
                pk
                for root, members in self.families(going).items()
                if all(members.values())
                and set(members) == going[root]
                and not protected & set(members)
                for pk in members
            ]
            purged = self._delete(ids, self._signals_going(ids))
        logger.debug("purge batch runs=%d attempts=%d", purged.runs, purged.attempts)
        return purged

    def _lock_keys(self, ids: list[Any]) -> None:
        """Take ``start()``'s lock of each idempotency key of these runs still in its window.

        ``start()`` with such a key then waits for this batch and finds no run: it
        never returns a run the batch deletes (SPEC 11). Keys in name order; ``start()``
        takes no run lock, so this cannot deadlock with it.
        """
        from .registry import IDEMPOTENCY_WINDOW

        keyed = self.runs.filter(
            pk__in=ids,
            idempotency_key__isnull=False,
            created_at__gte=now_plus(-IDEMPOTENCY_WINDOW.total_seconds()),
        ).values_list("workflow_name", "idempotency_key")
        from .store import get_store

        store = get_store(self.using)
        for name, key in sorted(set(keyed)):
            store.lock_key("start", self.namespace, name, str(key))

    def _counted(self, ids: list[Any]) -> Purged:
        from .models import StepAttempt, WorkflowRunEvent

        return Purged(
            runs=len(ids),
            attempts=StepAttempt.objects.using(self.using).filter(workflow_run_id__in=ids).count(),
            events=WorkflowRunEvent.objects.using(self.using).filter(run_id__in=ids).count(),
        )

    def _delete(self, ids: list[Any], signals: list[int]) -> Purged:
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
        _forget_links_of_other_apps(using, ids)
        purged = Purged(signals=self._delete_signals(signals))
        purged.events = (
            WorkflowRunEvent.objects.using(using).filter(run_id__in=ids)._raw_delete(using)
        )
        purged.attempts = attempts.filter(workflow_run_id__in=ids)._raw_delete(using)
        pause_point("purge.before-runs", runs=ids)
        purged.runs = self.runs.filter(pk__in=ids)._raw_delete(using)
        return purged

    # --- signals ---------------------------------------------------------------------

    def _signals_going(self, ids: list[Any]) -> list[int]:
        """The signal rows delivered to these runs that go with them.

        A ``WorkflowSignal`` row records a send with an idempotency key and
        the ids of the runs it was ``delivered_to``. It goes once it is past
        ``SIGNAL_WINDOW`` (within it, a repeat of the send must still deliver
        nothing) and none of its runs is left but these: the others are gone
        already (or, dry run, went in an earlier batch). A signal reaches a run
        while it waits, so it was sent between the run's ``created_at`` and its
        ``finished_at``: only those instants are read (``owf_signal_sent_idx``).
        """
        from .models import WorkflowSignal

        instants = sorted(self.runs.filter(pk__in=ids).values_list("created_at", "finished_at"))
        spans: list[list[Any]] = []
        for start, end in instants:  # merged into disjoint ranges
            if spans and start <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        if not spans:
            return []
        rows: list[tuple[int, Any]] = []
        for i in range(0, len(spans), SPANS_A_QUERY):  # SQLite: an expression 1000 deep at most
            sent = Q(pk__in=[])
            for start, end in spans[i : i + SPANS_A_QUERY]:
                sent |= Q(sent_at__gte=start, sent_at__lte=end)
            rows += (
                WorkflowSignal.objects.using(self.using)
                .filter(namespace=self.namespace, sent_at__lt=self._window_end())
                .filter(sent)
                .values_list("pk", "delivered_to")
            )
        these = {str(pk) for pk in ids}
        theirs = [(pk, to) for pk, to in rows if these & set(_ids(to))]
        return self._without_receivers(theirs, going=these)

    def _window_end(self) -> Any:
        return now_plus(-SIGNAL_WINDOW.total_seconds())

    def _without_receivers(
        self, rows: list[tuple[int, Any]], going: set[str] | frozenset[str] = frozenset()
    ) -> list[int]:
        """The signals of ``rows`` (id, delivered_to) none of whose runs stays.

        Runs that stay: those that exist, but for ``going`` and (dry run) the
        runs of earlier batches.
        """
        from .models import WorkflowRun

        receivers = {run_id: _uuid(run_id) for _, to in rows for run_id in _ids(to)}
        alive = (
            {
                str(pk)
                for pk in WorkflowRun.objects.using(self.using)
                .filter(pk__in=[u for u in receivers.values() if u is not None])
                .values_list("pk", flat=True)
            }
            - self._gone
            - going
        )
        return [
            pk
            for pk, to in rows
            if _ids(to) and not any(str(receivers[run_id]) in alive for run_id in _ids(to))
        ]

    def _delete_signals(self, ids: list[int]) -> int:
        from .models import WorkflowSignal

        if not ids:
            return 0
        return WorkflowSignal.objects.using(self.using).filter(pk__in=ids)._raw_delete(self.using)

    def purge_signals(self) -> Purged:
        """Delete the signals whose runs went while they were inside their window.

        A batch deletes the signals of its runs that are past their window
        (``_signals_going``); one that was not is left without runs and goes
        here, once past its window: the signals of the day after their window
        (``SIGNAL_WINDOW``) are read, so any pass within that day finds it.
        """
        from .models import WorkflowSignal

        day_after = WorkflowSignal.objects.using(self.using).filter(
            namespace=self.namespace,
            sent_at__lt=self._window_end(),
            sent_at__gte=now_plus(-2 * SIGNAL_WINDOW.total_seconds()),
        )
        purged = Purged()
        after = 0
        while self._go_on():
            batch = day_after.filter(pk__gt=after).order_by("pk").values_list("pk", "delivered_to")
            rows = list(batch[: self.batch_size])
            if not rows:
                break
            after = rows[-1][0]
            going = [pk for pk in self._without_receivers(rows) if pk not in self._signals_counted]
            purged.signals += len(going) if self.dry_run else self._delete_signals(going)
        return purged


def _links_of_other_apps() -> list[tuple[Any, str]]:
    """The relations of the project's models to runs and step attempts, each with the
    lookup from the run ids to the rows they point at."""
    from .models import StepAttempt, WorkflowRun

    links = []
    for model, to_ids in ((WorkflowRun, "pk__in"), (StepAttempt, "workflow_run_id__in")):
        for rel in model._meta.related_objects:
            if rel.related_model._meta.app_label != model._meta.app_label and rel.field.concrete:
                links.append((rel, to_ids))
    return links


def _linked(rel: Any, to_ids: str, using: str, ids: list[Any]) -> models.QuerySet[Any]:
    targets = rel.model._base_manager.using(using).filter(**{to_ids: ids})
    return rel.related_model._base_manager.using(using).filter(  # type: ignore[no-any-return]
        **{f"{rel.field.name}__in": targets}
    )


# What a delete does to a row that points at it, the purge does too; these stop a delete.
KEEPING = (models.PROTECT, models.RESTRICT, models.DO_NOTHING)


def protected_runs(using: str, ids: list[Any]) -> set[Any]:
    """The runs among ``ids`` that a model of the project keeps from being deleted.

    (``on_delete=PROTECT`` or ``RESTRICT``, or ``DO_NOTHING`` with a database
    constraint, on a key to the run or to one of its step attempts.) Their
    families stay, as a delete in the admin would refuse them.
    """
    kept: set[Any] = set()
    for rel, to_ids in _links_of_other_apps():
        if rel.on_delete not in KEEPING or not rel.field.db_constraint:
            continue
        pointed = _linked(rel, to_ids, using, ids).values_list(rel.field.attname, flat=True)
        if rel.model._meta.model_name == "workflowrun":
            kept.update(pointed)
        else:
            kept.update(
                rel.model._base_manager.using(using)
                .filter(pk__in=pointed)
                .values_list("workflow_run_id", flat=True)
            )
    return kept


def _forget_links_of_other_apps(using: str, ids: list[Any]) -> None:
    """Do to the project's rows that point at these runs (or their attempts) what a
    delete would: ``SET_NULL``, ``SET_DEFAULT``, ``SET(...)``, ``CASCADE`` (with the
    project's signals for those rows).

    The purge deletes its own rows without Django's collector, so a model such as
    ``Order.run = ForeignKey(WorkflowRun, on_delete=SET_NULL)`` would otherwise
    make every batch fail on its key.
    """
    from django.db.models.deletion import Collector

    collector = Collector(using=using)
    for rel, to_ids in _links_of_other_apps():
        if rel.on_delete in KEEPING:
            continue  # protected_runs() left those families out, or no constraint
        linked = _linked(rel, to_ids, using, ids)
        if linked.exists():
            rel.on_delete(collector, rel.field, linked, using)
    collector.delete()


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
    (``"purge:<namespace>"``), free only when no worker purges and the last
    purge finished ``PURGE_INTERVAL`` ago. Its holder purges in batches on
    this thread's own connection (the claim loop never waits for it), renews
    the lease before each batch, stops between two batches when the worker
    stops (and hands the lease back), and otherwise keeps the lease until the
    next purge is due.
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
                    logger.warning("purge failed worker=%s error=%s", self.holder, failure(exc))
                    logger.debug("purge failed worker=%s detail=%s", self.holder, failure_text(exc))
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
            limits,
            using=self.using,
            namespace=self.namespace,
            keep_going=self._keep_going,
            rest=self.stopping.wait,
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
