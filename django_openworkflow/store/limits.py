"""The queues' limits, applied inside the claim transaction (``OrmStore.claim``).

How a claim keeps ``concurrency``, ``key_concurrency`` and ``rate_limit``
(``queues.py``) across any number of workers:

- **One claimer per limited queue at a time.** Before it counts, a claim
  takes the queue's lock (``store.lock_key("queue", namespace, name)``: a
  transaction-level advisory lock on PostgreSQL, a key-slot row on MySQL,
  the database's write lock on SQLite), so two workers never both see the
  last free slot. A queue with no due run is not locked at all; unlimited
  queues never are.
- **Queue locks first.** A claim takes its queue locks, in name order,
  before it locks any run row, so while it waits for one it holds nothing
  but queue locks that come earlier in that order. (On MySQL a queue's lock
  row may be an idempotency key's too: a ``start()`` holding it may go on to
  lock runs, a cancel say, and must not find one locked by the claim that
  waits for it.)
- **Counting.** In progress: runs of the queue with ``started_at`` that have
  not finished (parked ones included); ``started_at`` is set at the first
  claim and cleared by a resume. Rate: ``QueueStart`` rows in the window.
- **No head-of-line blocking.** Candidates are read in claim order (priority,
  then due time) a page at a time, with keys already full left out by the
  query itself, so a full key costs no reads and the due runs behind it are
  found.
- **Slots are kept.** A run that already has ``started_at`` (a parked run
  that woke, a run whose worker died) is taken whatever the counts say.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db.models import Count, Min, Q, Subquery
from django.utils import timezone

from ..managers import ACTIVE, now_plus
from ..pauses import pause_point
from ..queues import Queue, configured_queues

if TYPE_CHECKING:
    from .orm import OrmQueries

CLAIM_ORDER = ("-priority", "available_at", "pk")
CANDIDATE_FIELDS = ("pk", "started_at", "priority", "available_at", "queue")


class Candidate(NamedTuple):
    pk: Any
    started_at: datetime | None
    priority: int
    available_at: datetime
    queue: str

    @property
    def order(self) -> tuple[int, datetime, str]:
        return (-self.priority, self.available_at, str(self.pk))


@dataclass
class ClaimPlan:
    """Which queues a claim reads without limits, and which limited queues it serves."""

    open_filter: Q | None  # None: every queue is open to the claim
    limited: list[Queue] = field(default_factory=list)
    rate_limited: set[str] = field(default_factory=set)

    @classmethod
    def serving(cls, queues: Sequence[str] | None) -> ClaimPlan:
        configured = configured_queues()
        limited = sorted((q for q in configured.values() if q.limited), key=lambda q: q.name)
        rate_limited = {q.name for q in limited if q.rate_limit}
        if queues is None:  # every queue, the limited ones with their limits
            open_filter = ~Q(queue__in=[q.name for q in limited]) if limited else None
            return cls(open_filter, limited, rate_limited)
        served = set(queues)
        limited = [q for q in limited if q.name in served]
        open_names = sorted(served - {q.name for q in limited})
        return cls(Q(queue__in=open_names) if open_names else Q(pk__in=[]), limited, rate_limited)

    @property
    def open(self) -> bool:
        """Whether the claim reads any queue without limits."""
        return self.open_filter is None or self.open_filter.children != [("pk__in", [])]


def open_candidates(store: OrmQueries, due: Any, plan: ClaimPlan, limit: int) -> list[Candidate]:
    """Due runs of the queues without limits, in claim order, locked (skipping locked ones)."""
    if not plan.open:
        return []
    if plan.open_filter is not None:
        due = due.filter(plan.open_filter)
    rows = store.skip_locked(due.order_by(*CLAIM_ORDER)).values_list(*CANDIDATE_FIELDS)
    return [Candidate(*row) for row in rows[:limit]]


def lock_queues(store: OrmQueries, due: Any, namespace: str, plan: ClaimPlan) -> list[Queue]:
    """Lock the limited queues of ``plan`` that have a due run, in name order; return them.

    The claim calls it before it locks any run (see "Queue locks first" above).
    """
    locked = []
    for queue in plan.limited:  # sorted by name
        if due.filter(queue=queue.name).exists():
            store.lock_key("queue", namespace, queue.name)
            pause_point("claim.queue-locked", namespace=namespace, queue=queue.name)
            locked.append(queue)
    return locked


def limited_candidates(
    store: OrmQueries, due: Any, namespace: str, queue: Queue, limit: int
) -> tuple[list[Candidate], datetime | None]:
    """Due runs of one limited queue, locked by ``lock_queues``, that its limits let start
    now: locked, in claim order.

    Also when the rate limit lets the next run start, if it held one back.
    """
    due = due.filter(queue=queue.name)
    in_progress = store.runs.filter(
        namespace=namespace, queue=queue.name, status__in=ACTIVE, started_at__isnull=False
    )
    free = math.inf
    if queue.concurrency:
        free = queue.concurrency - in_progress.count()
    retry_at = None
    if queue.rate:
        runs, window = queue.rate
        recent = store.queue_starts.filter(
            namespace=namespace, queue=queue.name, started_at__gt=now_plus(-window)
        ).aggregate(count=Count("pk"), oldest=Min("started_at"))
        free = min(free, runs - recent["count"])
    per_key: Counter[str] = Counter()
    if queue.key_concurrency:
        keyed = in_progress.exclude(concurrency_key=None).values_list("concurrency_key")
        per_key.update(dict(keyed.annotate(n=Count("pk")).order_by()))
    taken: list[Candidate] = []
    after: Candidate | None = None
    page_size = max(2 * limit, 20)
    while len(taken) < limit:
        page_query = due
        if free <= 0:  # only runs that already hold a slot
            page_query = page_query.filter(started_at__isnull=False)
        elif queue.key_concurrency:
            full = [key for key, n in per_key.items() if n >= queue.key_concurrency]
            if full:
                page_query = page_query.exclude(started_at=None, concurrency_key__in=full)
        if after is not None:
            page_query = page_query.filter(_after(store, after))
        rows = store.skip_locked(page_query.order_by(*CLAIM_ORDER)).values_list(
            *CANDIDATE_FIELDS, "concurrency_key"
        )
        page = list(rows[:page_size])
        for *values, key in page:
            candidate = after = Candidate(*values)
            if candidate.started_at is not None:
                taken.append(candidate)  # it holds its slot already
            elif free > 0 and not (
                queue.key_concurrency and key is not None and per_key[key] >= queue.key_concurrency
            ):
                taken.append(candidate)
                free -= 1
                if key is not None:
                    per_key[key] += 1
            if len(taken) == limit:
                break
        if len(page) < page_size:
            break
    if queue.rate and free <= 0:  # the window is full: when its oldest start leaves it
        oldest = recent["oldest"] or timezone.now()  # a timer hint; the claim decides
        retry_at = oldest + timedelta(seconds=queue.rate[1])
    return taken, retry_at


def _after(store: OrmQueries, candidate: Candidate) -> Q:
    """Rows after ``candidate`` in claim order (priority down, then due time, then id).

    The due time compared is the one stored in ``candidate``'s row (locked by this
    claim), not the value read back: SQLite stores ``Now()`` with milliseconds and a
    datetime parameter with microseconds, so one instant written both ways is two
    unequal texts, and the runs due at the candidate's instant would be lost.
    """
    due_at = Subquery(store.runs.filter(pk=candidate.pk).values("available_at")[:1])
    same_priority = Q(priority=candidate.priority)
    return (
        Q(priority__lt=candidate.priority)
        | (same_priority & Q(available_at__gt=due_at))
        | (same_priority & Q(available_at=due_at, pk__gt=candidate.pk))
    )
