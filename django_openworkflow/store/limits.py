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
from typing import Any, NamedTuple, Protocol

from django.db.models import Q
from django.utils import timezone

from ..pauses import pause_point
from ..queues import Queue, configured_queues

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
    open_queues: list[str] | None = None  # served without limits (None: all but ``limited``)

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
        return cls(Q(queue__in=open_names), limited, rate_limited, open_names)

    @property
    def open(self) -> bool:
        """Whether the claim reads any queue without limits."""
        return self.open_queues is None or bool(self.open_queues)


@dataclass
class SlotCounts:
    """What the limits count, read under the queues' locks."""

    in_progress: Counter[str] = field(default_factory=Counter)  # per queue
    per_key: dict[str, Counter[str]] = field(default_factory=dict)  # queue -> key -> runs
    recent: dict[str, tuple[int, datetime | None]] = field(default_factory=dict)  # starts, oldest


class LimitedQueries(Protocol):
    """What the claim with limits asks of a store (``OrmStore``; ``PostgresStore`` in SQL)."""

    def lock_due_queues(self, namespace: str, names: list[str], queues: list[str]) -> list[str]:
        """Lock, in name order, those of ``queues`` with a due run of ``names``; return them."""

    def count_slots(self, namespace: str, queues: list[Queue]) -> SlotCounts:
        """Runs in progress per queue (and per key, where keyed), and recent starts."""

    def due_page(self, page: Page) -> list[tuple[Candidate, str | None]]:
        """A page of the queue's due runs in claim order, locked (skipping locked ones)."""


@dataclass
class Page:
    """One read of a limited queue's due runs: what to leave out, where to go on."""

    namespace: str
    names: list[str]
    queue: str
    only_started: bool  # the queue is full: only runs that hold a slot
    full_keys: list[str]  # keys at their limit: their runs that never started are left out
    after: Candidate | None  # go on after this row (claim order)
    size: int


def lock_queues(
    store: LimitedQueries, namespace: str, names: list[str], queues: list[Queue]
) -> list[Queue]:
    """Lock those of the limited ``queues`` with a due run, in name order; return them.

    The claim calls it before it locks any run (see "Queue locks first" above).
    """
    locked = set(store.lock_due_queues(namespace, names, [q.name for q in queues]))
    for name in sorted(locked):
        pause_point("claim.queue-locked", namespace=namespace, queue=name)
    return [q for q in queues if q.name in locked]


def claim_limited(
    store: LimitedQueries, namespace: str, names: list[str], queues: list[Queue], limit: int
) -> tuple[list[Candidate], datetime | None]:
    """The due runs of the limited ``queues``, locked by ``lock_queues``, that their limits let
    start now (inside the claim's transaction), and when a full rate window lets the next one
    start."""
    if not queues:
        return [], None
    counts = store.count_slots(namespace, queues)
    for queue in queues:
        pause_point("claim.queue-counted", namespace=namespace, queue=queue.name)
    picked: list[Candidate] = []
    retry_at = None
    for queue in queues:
        picked += _take(store, namespace, names, queue, counts, limit)
        started, oldest = counts.recent.get(queue.name, (0, None))
        if queue.rate and started >= queue.rate[0]:
            # the window is full: the next start is when its oldest start leaves it
            oldest = oldest or timezone.now()  # a timer hint only
            at = oldest + timedelta(seconds=queue.rate[1])
            retry_at = at if retry_at is None else min(retry_at, at)
    return picked, retry_at


def _take(
    store: LimitedQueries,
    namespace: str,
    names: list[str],
    queue: Queue,
    counts: SlotCounts,
    limit: int,
) -> list[Candidate]:
    """Read ``queue``'s due runs a page at a time and take those its limits let start."""
    free: float = math.inf
    if queue.concurrency:
        free = queue.concurrency - counts.in_progress[queue.name]
    if queue.rate:
        started, _ = counts.recent.get(queue.name, (0, None))
        free = min(free, queue.rate[0] - started)
    per_key = counts.per_key.setdefault(queue.name, Counter())
    key_limit = queue.key_concurrency
    taken: list[Candidate] = []
    page = Page(namespace, names, queue.name, False, [], None, max(2 * limit, 20))
    while len(taken) < limit:
        page.only_started = free <= 0
        if key_limit and not page.only_started:
            page.full_keys = sorted(key for key, n in per_key.items() if n >= key_limit)
        rows = store.due_page(page)
        for candidate, key in rows:
            page.after = candidate
            if candidate.started_at is not None:
                taken.append(candidate)  # it holds its slot already
            elif free > 0 and not (key_limit and key is not None and per_key[key] >= key_limit):
                taken.append(candidate)
                free -= 1
                if key is not None:
                    per_key[key] += 1
            if len(taken) == limit:
                break
        if len(rows) < page.size:
            break
    # What this claim started counts at once (the merge may drop some: fewer, never more).
    counts.in_progress[queue.name] += sum(1 for c in taken if c.started_at is None)
    if queue.rate:
        started, oldest = counts.recent.get(queue.name, (0, None))
        counts.recent[queue.name] = (
            started + sum(1 for c in taken if c.started_at is None),
            oldest,
        )
    return taken


def after_in_claim_order(candidate: Candidate, due_at: Any) -> Q:
    """Rows after ``candidate`` in claim order (priority down, then due time, then id).

    ``due_at`` is the due time to compare with: the ORM store passes the one stored
    in ``candidate``'s row (a subquery; the row is locked by this claim), not the
    value read back: SQLite stores ``Now()`` with milliseconds and a datetime
    parameter with microseconds, so one instant written both ways is two unequal
    texts, and the runs due at the candidate's instant would be lost.
    """
    same_priority = Q(priority=candidate.priority)
    return (
        Q(priority__lt=candidate.priority)
        | (same_priority & Q(available_at__gt=due_at))
        | (same_priority & Q(available_at=due_at, pk__gt=candidate.pk))
    )
