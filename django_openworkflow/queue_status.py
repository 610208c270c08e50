"""What the queues are doing, for the Queues page and the run page (read-only).

The claim keeps the limits (``store/limits.py``); this module counts with
the same words, on the database clock:

- **pending**: runs with status ``pending`` (parked ones included);
- **waiting to start** (``due``): due runs (``WorkflowRun.objects.due()``)
  that never started (``started_at`` is NULL), the runs a limit can hold
  back; a run that already started keeps its slot and is never held;
- **in progress**: pending or running with ``started_at`` set, what
  ``concurrency`` and ``key_concurrency`` count; **running now**: status
  ``running``;
- **recent starts**: ``QueueStart`` rows in the rate window.

A limit *holds back* the runs waiting to start while it is full: all of the
queue's for ``concurrency`` and ``rate_limit``, those of one key for
``key_concurrency``. A run may be held by more than one limit at once.

``queue_load()`` is the cheap reading for metrics (``metrics.py``): per queue
the runs in progress, the **due** runs (every run a worker may take now:
``.due()``, new, woken, retrying or with an expired lease, not only those
waiting to start) and how long the oldest has been due; two aggregate
queries over the partial indexes of active runs, each stopped by the
database after ``timeout`` seconds (``time_limit()``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from django.db.models import (
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    Max,
    Min,
    OuterRef,
    Q,
    Subquery,
)
from django.utils import timezone
from django.utils.translation import gettext as _

from .clock import Now
from .conf import app_settings
from .managers import ACTIVE, now_plus
from .models import QueueStart, WorkflowRun
from .queues import Queue, configured_queues

if TYPE_CHECKING:
    from .managers import WorkflowRunQuerySet

TOP_KEYS = 5  # full keys listed one by one per queue; the others are summed up

LimitKind = Literal["concurrency", "key", "rate"]


@dataclass(frozen=True)
class HeldBack:
    """Runs waiting to start that one full limit holds back, and why."""

    limit: LimitKind
    count: int
    reason: str  # "concurrency 5 of 5 in progress"
    key: str | None = None  # the full key (``limit == "key"``)
    next_start_at: datetime | None = None  # when the rate limit lets a run start


@dataclass(frozen=True)
class QueueState:
    """One queue of a namespace: its limits and its runs (see the module docstring)."""

    queue: Queue
    configured: bool
    pending: int = 0
    due: int = 0  # waiting to start
    in_progress: int = 0
    running: int = 0
    oldest_due_age: timedelta | None = None  # of the runs waiting to start
    recent_starts: int | None = None  # in the rate window; None without a rate limit
    held: tuple[HeldBack, ...] = ()
    other_full_keys: int = 0  # full keys holding runs, beyond those in ``held``
    held_by_other_keys: int = 0  # the runs they hold

    @property
    def name(self) -> str:
        return self.queue.name

    @property
    def limits(self) -> str:
        """The limits in words; a queue that only runs name is "not configured, no limits"."""
        if not self.configured:
            return _("not configured, no limits")
        return self.queue.describe()

    @property
    def active(self) -> bool:
        return bool(self.pending or self.in_progress or self.running)


# --- the reasons, one wording for the Queues page and the run page ------------------


def concurrency_reason(in_progress: int, limit: int) -> str:
    return _("concurrency %(n)d of %(limit)d in progress") % {"n": in_progress, "limit": limit}


def key_reason(key: str, in_progress: int, limit: int) -> str:
    return _("key '%(key)s' has %(n)d of %(limit)d in progress") % {
        "key": key,
        "n": in_progress,
        "limit": limit,
    }


def rate_reason(rate_limit: str, next_start_at: datetime | None) -> str:
    rate = rate_limit.replace(" ", "")
    if next_start_at is None:
        return _("rate limit %(rate)s reached") % {"rate": rate}
    return _("rate limit %(rate)s reached; next start at %(at)s") % {
        "rate": rate,
        "at": f"{timezone.localtime(next_start_at):%Y-%m-%d %H:%M:%S %Z}",
    }


# --- the overview ------------------------------------------------------------------


def queue_overview(namespace: str, using: str | None = None) -> list[QueueState]:
    """Every configured queue, and every other queue with active runs, by name.

    A few aggregate queries whatever the number of runs: the active runs per
    queue, the runs waiting to start per queue, the recent starts of the
    rate-limited queues, and per queue with ``key_concurrency`` the full keys
    that hold runs back.
    """
    db = using or app_settings.DATABASE
    runs = WorkflowRun.objects.using(db).in_namespace(namespace)
    waiting = runs.due().filter(started_at=None)
    in_progress = runs.filter(status__in=ACTIVE, started_at__isnull=False)

    active = {row["queue"]: row for row in _active_counts(runs)}
    due = {row["queue"]: row for row in _waiting_counts(waiting)}
    configured = configured_queues()
    queues = dict(configured)
    queues.update({name: Queue(name) for name in active.keys() - configured.keys()})
    starts = _recent_starts(db, namespace, [q for q in queues.values() if q.rate_limit])

    states = []
    for name in sorted(queues):
        queue = queues[name]
        counts = active.get(name, {})
        due_row = due.get(name, {})
        state = QueueState(
            queue=queue,
            configured=name in configured,
            pending=counts.get("pending", 0),
            due=due_row.get("n", 0),
            in_progress=counts.get("in_progress", 0),
            running=counts.get("running", 0),
            oldest_due_age=due_row.get("age"),
            recent_starts=starts[name][0] if name in starts else None,
        )
        states.append(_with_held(state, waiting, in_progress, starts.get(name)))
    return states


def _active_counts(runs: WorkflowRunQuerySet) -> Any:
    return (
        runs.filter(status__in=ACTIVE)
        .values("queue")
        .annotate(
            pending=Count("pk", filter=Q(status=WorkflowRun.Status.PENDING)),
            running=Count("pk", filter=Q(status=WorkflowRun.Status.RUNNING)),
            in_progress=Count("pk", filter=Q(started_at__isnull=False)),
        )
        .order_by()
    )


def _waiting_counts(waiting: WorkflowRunQuerySet) -> Any:
    """Runs waiting to start per queue, and how long the oldest has been due."""
    return waiting.values("queue").annotate(n=Count("pk"), age=Max(_due_for())).order_by()


def _due_for() -> ExpressionWrapper:
    """How long a due run has been due, on the database clock."""
    return ExpressionWrapper(Now() - F("available_at"), output_field=DurationField())


def _recent_starts(
    db: str, namespace: str, queues: list[Queue]
) -> dict[str, tuple[int, datetime | None]]:
    """Per rate-limited queue: the starts in its window and the oldest of them (one query)."""
    if not queues:
        return {}
    aggregates: dict[str, Any] = {}
    for i, queue in enumerate(queues):
        assert queue.rate is not None
        in_window = Q(queue=queue.name, started_at__gt=now_plus(-queue.rate[1]))
        aggregates[f"n{i}"] = Count("pk", filter=in_window)
        aggregates[f"oldest{i}"] = Min("started_at", filter=in_window)
    found = (
        QueueStart.objects.using(db)
        .filter(namespace=namespace, queue__in=[q.name for q in queues])
        .aggregate(**aggregates)
    )
    return {q.name: (found[f"n{i}"], found[f"oldest{i}"]) for i, q in enumerate(queues)}


def _rate_full(
    queue: Queue, starts: tuple[int, datetime | None] | None
) -> tuple[str, datetime | None] | None:
    """The rate limit's reason and next start time while it is reached, else None."""
    if queue.rate_limit is None or queue.rate is None or starts is None:
        return None
    runs, window = queue.rate
    count, oldest = starts
    if count < runs:
        return None
    next_start_at = None if oldest is None else oldest + timedelta(seconds=window)
    return rate_reason(queue.rate_limit, next_start_at), next_start_at


def _with_held(
    state: QueueState,
    waiting: WorkflowRunQuerySet,
    in_progress: WorkflowRunQuerySet,
    starts: tuple[int, datetime | None] | None,
) -> QueueState:
    queue = state.queue
    if not state.due or not queue.limited:
        return state
    held: list[HeldBack] = []
    if queue.concurrency and state.in_progress >= queue.concurrency:
        reason = concurrency_reason(state.in_progress, queue.concurrency)
        held.append(HeldBack("concurrency", state.due, reason))
    rate = _rate_full(queue, starts)
    if rate is not None:
        held.append(HeldBack("rate", state.due, rate[0], next_start_at=rate[1]))
    other_keys = other_runs = 0
    if queue.key_concurrency:
        by_key, other_keys, other_runs = _held_by_keys(
            waiting.filter(queue=queue.name), in_progress.filter(queue=queue.name), queue
        )
        held += by_key
    return replace(
        state, held=tuple(held), other_full_keys=other_keys, held_by_other_keys=other_runs
    )


def _held_by_keys(
    waiting: WorkflowRunQuerySet, in_progress: WorkflowRunQuerySet, queue: Queue
) -> tuple[list[HeldBack], int, int]:
    """The keys that are full and hold runs back, most runs first (the top few), and
    how many other full keys hold how many runs."""
    assert queue.key_concurrency is not None
    of_key = (
        in_progress.filter(concurrency_key=OuterRef("concurrency_key"))
        .order_by()
        .values("concurrency_key")
        .annotate(n=Count("pk"))
        .values("n")
    )
    held = (
        waiting.exclude(concurrency_key=None)
        .annotate(key_in_progress=Subquery(of_key))
        .filter(key_in_progress__gte=queue.key_concurrency)
    )
    groups = list(
        held.values_list("concurrency_key")
        .annotate(n=Count("pk"), in_progress=Max("key_in_progress"))
        .order_by("-n", "concurrency_key")[:TOP_KEYS]
    )
    top = [
        HeldBack("key", n, key_reason(key, count, queue.key_concurrency), key=key)
        for key, n, count in groups
    ]
    if len(groups) < TOP_KEYS:
        return top, 0, 0
    totals = held.aggregate(keys=Count("concurrency_key", distinct=True), runs=Count("pk"))
    return top, totals["keys"] - len(top), totals["runs"] - sum(h.count for h in top)


# --- the load, for metrics -----------------------------------------------------------


@dataclass(frozen=True)
class QueueLoad:
    """One queue's runs in progress and due now (see the module docstring)."""

    queue: str
    in_progress: int = 0
    due: int = 0
    oldest_due_age: timedelta | None = None  # None: no run is due


def queue_load(
    namespace: str, using: str | None = None, *, timeout: float | None = None
) -> list[QueueLoad]:
    """Every configured queue and every queue with active runs, by name.

    Two aggregate queries: the runs in progress per queue (the partial index
    ``owf_run_slot_idx``) and the due runs per queue with the oldest's age on
    the database clock (the claim's partial index ``owf_run_queue_claim_idx`` on
    PostgreSQL: the entries of the active runs, the rows of the due ones). With ``timeout``, each is
    stopped after that many seconds (``time_limit()``): a ``DatabaseError``.
    """
    db = using or app_settings.DATABASE
    runs = WorkflowRun.objects.using(db).in_namespace(namespace)
    in_progress = (
        runs.filter(status__in=ACTIVE, started_at__isnull=False)
        .values("queue")
        .annotate(n=Count("pk"))
        .order_by()
    )
    due = runs.due().values("queue").annotate(n=Count("pk"), age=Max(_due_for())).order_by()
    with time_limit(db, timeout):
        started = {row["queue"]: row["n"] for row in in_progress}
        due_rows = {row["queue"]: row for row in due}
    names = configured_queues().keys() | started.keys() | due_rows.keys()
    return [
        QueueLoad(
            queue=name,
            in_progress=started.get(name, 0),
            due=due_rows.get(name, {}).get("n", 0),
            oldest_due_age=due_rows.get(name, {}).get("age"),
        )
        for name in sorted(names)
    ]


def time_limit(using: str, seconds: float | None) -> AbstractContextManager[None]:
    """Have the database stop the queries of this block after ``seconds`` (None: no limit);
    a stopped query raises a ``DatabaseError``. How each database does it: ``Store.time_limit``.
    """
    from .store import get_store

    return get_store(using).time_limit(seconds)


# --- one run -----------------------------------------------------------------------


def slot_wait(run: WorkflowRun) -> str | None:
    """Why a run waiting to start is not started: its queue's full limits, or None.

    Only for a pending run that never started and is due, in a configured
    queue with limits, while one of the limits that apply to it is full.
    """
    if run.status != WorkflowRun.Status.PENDING or run.started_at is not None:
        return None
    queue = configured_queues().get(run.queue)
    if queue is None or not queue.limited:
        return None
    db = run._state.db or app_settings.DATABASE
    runs = WorkflowRun.objects.using(db)
    if not runs.due().filter(pk=run.pk).exists():
        return None
    reasons = _full_limits(run, queue, db)
    if not reasons:
        return None
    return _("Waiting for a slot in queue '%(queue)s': %(reasons)s.") % {
        "queue": queue.name,
        "reasons": "; ".join(reasons),
    }


def _full_limits(run: WorkflowRun, queue: Queue, db: str) -> list[str]:
    """The reasons of the limits that hold ``run`` back now (one query, two with a rate)."""
    in_progress = WorkflowRun.objects.using(db).filter(
        namespace=run.namespace, queue=queue.name, status__in=ACTIVE, started_at__isnull=False
    )
    key = run.concurrency_key
    counts = in_progress.aggregate(
        total=Count("pk"), of_key=Count("pk", filter=Q(concurrency_key=key))
    )
    reasons = []
    if queue.concurrency and counts["total"] >= queue.concurrency:
        reasons.append(concurrency_reason(counts["total"], queue.concurrency))
    if queue.key_concurrency and key is not None and counts["of_key"] >= queue.key_concurrency:
        reasons.append(key_reason(key, counts["of_key"], queue.key_concurrency))
    if queue.rate_limit:
        starts = _recent_starts(db, run.namespace, [queue])[queue.name]
        rate = _rate_full(queue, starts)
        if rate is not None:
            reasons.append(rate[0])
    return reasons
