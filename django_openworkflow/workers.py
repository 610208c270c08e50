"""The registry of workers: which ``runworker`` processes run, where, what, and since when.

Each worker keeps one ``WorkflowWorker`` row (``Presence`` below): it
registers when it starts (a worker restarted with the same ``--worker-id``
replaces its row; the old process, still finishing its runs, then leaves the
new one's row alone: it tells its own by its ``started_at``), refreshes
``last_seen_at`` and ``busy_slots`` at every heartbeat, whether runs are in
flight or not, and sets ``stopped_at`` when it stops cleanly. Every time is the database's clock.

A worker is

- **live**: not stopped, and seen within ``live_window()``;
- **stopped**: it stopped cleanly (``stopped_at`` is set);
- **dead**: not stopped and not seen within ``live_window()`` (killed, its
  host gone, or cut off from the database).

``live_window()`` is ``max(LEASE_SECONDS, 3 * HEARTBEAT_SECONDS)`` of the
settings of the process that looks. A worker's heartbeat is
``min(HEARTBEAT_SECONDS, its lease / 3)``, never longer than
``HEARTBEAT_SECONDS`` whatever its ``--lease``, so a live worker misses at
least two refreshes before it counts as dead; with the defaults a worker is
dead after 30 seconds unseen, when the leases of its runs (30 seconds) have
run out too.

Rows of workers stopped or dead for more than ``KEEP_GONE`` (a day) are
deleted by any worker's sweep, at most once every ``PURGE_EVERY`` seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError, connections, models, transaction
from django.db.models import Case, F, Q, Value, When

from .clock import Now
from .conf import app_settings
from .logfields import failure, failure_text
from .managers import not_past_deadline, now_plus

logger = logging.getLogger(__name__)

KEEP_GONE = timedelta(days=1)  # rows of stopped and dead workers are kept this long
PURGE_EVERY = 3600.0  # seconds between two purges by one worker


def live_window() -> float:
    """Seconds a worker may go unseen and still be live (see the module docstring)."""
    return max(app_settings.LEASE_SECONDS, 3 * app_settings.HEARTBEAT_SECONDS)


class WorkflowWorkerQuerySet(models.QuerySet):  # type: ignore[type-arg]
    def in_namespace(self, namespace: str) -> WorkflowWorkerQuerySet:
        return self.filter(namespace=namespace)

    def live(self) -> WorkflowWorkerQuerySet:
        """Workers not stopped and seen within ``live_window()`` (by the database clock)."""
        return self.filter(live_q())

    def recently_dead(self) -> WorkflowWorkerQuerySet:
        """Workers stopped or dead, last seen within ``KEEP_GONE`` (the Workers page's past)."""
        return self.exclude(live_q()).filter(last_seen_at__gte=_since(KEEP_GONE))

    def recent(self) -> WorkflowWorkerQuerySet:
        """The live workers and the recently dead ones."""
        return self.filter(last_seen_at__gte=_since(KEEP_GONE))

    def expired(self) -> WorkflowWorkerQuerySet:
        """Workers stopped or dead, not seen for more than ``KEEP_GONE``: rows to delete."""
        return self.filter(last_seen_at__lt=_since(KEEP_GONE))

    def with_state(self) -> WorkflowWorkerQuerySet:
        """Annotate ``state`` ("live", "stopped" or "dead") and ``seen_ago`` (a timedelta)."""
        return self.annotate(
            state=Case(
                When(stopped_at__isnull=False, then=Value(STOPPED)),
                When(live_q(), then=Value(LIVE)),
                default=Value(DEAD),
                output_field=models.CharField(),
            ),
            seen_ago=models.ExpressionWrapper(
                Now() - models.F("last_seen_at"), output_field=models.DurationField()
            ),
        )


LIVE, STOPPED, DEAD = "live", "stopped", "dead"


def live_q() -> Q:
    """``live()`` as a ``Q``, to combine with other conditions."""
    return Q(stopped_at__isnull=True, last_seen_at__gte=_since(timedelta(seconds=live_window())))


def _since(ago: timedelta) -> models.Expression:
    return now_plus(-ago.total_seconds())


class WorkflowWorkerManager(models.Manager.from_queryset(WorkflowWorkerQuerySet)):  # type: ignore[misc]
    def register(
        self,
        worker_id: str,
        *,
        namespace: str,
        concurrency: int,
        workflows: list[str],
        queues: list[str] | None = None,
        host: str | None = None,
        pid: int | None = None,
    ) -> datetime:
        """Create or replace the worker's row: started and seen now, not stopped, no slot busy.

        Returns its ``started_at``, which tells this registration's row from a later one
        under the same id (``seen()``, ``stopped()``): a replaced row starts at least a
        millisecond after the row it replaces (SQLite's clock has milliseconds).
        """
        fields: dict[str, Any] = {
            "namespace": namespace,
            "host": host if host is not None else socket.gethostname(),
            "pid": pid if pid is not None else os.getpid(),
            "queues": list(queues) if queues is not None else None,
            "workflows": sorted(workflows),
            "concurrency": concurrency,
            "busy_slots": 0,
            "last_seen_at": Now(),
            "stopped_at": None,
        }
        later = Case(
            When(
                started_at__gte=Now(),
                then=models.ExpressionWrapper(
                    F("started_at") + Value(timedelta(milliseconds=1)),
                    output_field=models.DateTimeField(),
                ),
            ),
            default=Now(),
            output_field=models.DateTimeField(),
        )
        with transaction.atomic(using=self.db):
            if not self.filter(pk=worker_id).update(started_at=later, **fields):
                self.create(worker_id=worker_id, started_at=Now(), **fields)
            return self.filter(pk=worker_id).values_list("started_at", flat=True).get()  # type: ignore[no-any-return]

    def seen(self, worker_id: str, *, busy_slots: int, started_at: datetime | None = None) -> bool:
        """The worker is alive now with ``busy_slots`` runs in flight; False: it has no row
        (of the registration that returned ``started_at``, when given)."""
        return bool(
            self._of(worker_id, started_at)
            .filter(stopped_at__isnull=True)
            .update(last_seen_at=Now(), busy_slots=busy_slots)
        )

    def stopped(self, worker_id: str, *, started_at: datetime | None = None) -> bool:
        """The worker stopped cleanly, now; False: it has no row (of the registration that
        returned ``started_at``, when given)."""
        return bool(
            self._of(worker_id, started_at).update(
                stopped_at=Now(), last_seen_at=Now(), busy_slots=0
            )
        )

    def _of(self, worker_id: str, started_at: datetime | None) -> WorkflowWorkerQuerySet:
        """The worker's row; with ``started_at``, only the row of that registration.

        (Not a later one: a restart under the same id replaced it.) A range rather than
        an equality: SQLite keeps datetimes as text, and Django writes a datetime without
        a fraction of a second as ``'12:00:05'`` where the row holds ``'12:00:05.000000'``.
        """
        rows = self.filter(pk=worker_id)
        if started_at is not None:
            rows = rows.filter(started_at__lt=started_at + timedelta(microseconds=1))
        return rows  # type: ignore[no-any-return]

    def purge_dead(self) -> int:
        """Delete the rows of workers stopped or dead for more than ``KEEP_GONE``; how many."""
        deleted, _ = self.expired().delete()
        return deleted


# --- who runs a workflow -------------------------------------------------------


@dataclass(frozen=True)
class LiveWorker:
    """What the pages and ``workflow_status`` need of a live worker to judge who runs what."""

    worker_id: str
    queues: list[str] | None  # None: every queue
    workflows: frozenset[str]

    @classmethod
    def of(cls, worker: Any) -> LiveWorker:
        """Of a ``WorkflowWorker`` row."""
        return cls(worker.pk, worker.queues, frozenset(worker.workflows or ()))

    def runs(self, workflow_name: str, queue: str) -> bool:
        return workflow_name in self.workflows and (self.queues is None or queue in self.queues)


NO_WORKER, NOT_REGISTERED, QUEUE_NOT_SERVED = "no_live_worker", "not_registered", "queue_not_served"


def live_workers(namespace: str, using: str | None = None) -> list[LiveWorker]:
    """The live workers of ``namespace`` (one query)."""
    from .models import WorkflowWorker

    rows = (
        WorkflowWorker.objects.using(using or app_settings.DATABASE)
        .in_namespace(namespace)
        .live()
        .values_list("worker_id", "queues", "workflows")
    )
    return [LiveWorker(pk, queues, frozenset(workflows or ())) for pk, queues, workflows in rows]


def unserved_reason(workflow_name: str, queue: str, workers: list[LiveWorker]) -> str | None:
    """Why no live worker would take a run of ``workflow_name`` in ``queue``; None if one would.

    ``NO_WORKER``: no worker of the namespace is live; ``NOT_REGISTERED``: none
    of the live ones has registered the workflow; ``QUEUE_NOT_SERVED``: those
    that have serve other queues.
    """
    if not workers:
        return NO_WORKER
    registered = [w for w in workers if workflow_name in w.workflows]
    if not registered:
        return NOT_REGISTERED
    if not any(w.runs(workflow_name, queue) for w in registered):
        return QUEUE_NOT_SERVED
    return None


@dataclass(frozen=True)
class Unserved:
    """Active runs of one workflow in one queue that no live worker would take, and why."""

    workflow: str
    queue: str
    active: int
    due: int  # of them, due now
    reason: str  # NO_WORKER, NOT_REGISTERED or QUEUE_NOT_SERVED


def unserved_runs(
    namespace: str, workers: list[LiveWorker], using: str | None = None
) -> list[Unserved]:
    """The active runs of ``namespace`` no live worker would take, by workflow and queue.

    One aggregate query over the active runs (``workflow_status``).
    """
    from .models import WorkflowRun

    due = Q(available_at__lte=Now()) & not_past_deadline()
    groups = (
        WorkflowRun.objects.using(using or app_settings.DATABASE)
        .in_namespace(namespace)
        .active()
        .values_list("workflow_name", "queue")
        .annotate(active=models.Count("pk"), due=models.Count("pk", filter=due))
        .order_by("workflow_name", "queue")
    )
    found = []
    for workflow, queue, active, due_now in groups:
        reason = unserved_reason(workflow, queue, workers)
        if reason is not None:
            found.append(Unserved(workflow, queue, active, due_now, reason))
    return found


# --- the worker's own row --------------------------------------------------------


class Presence:
    """A worker's row in the registry, kept by the worker itself.

    Never raises (an ``Exception``): a failure is logged and the next
    heartbeat tries again (registering anew if the row is missing).
    """

    def __init__(
        self,
        worker_id: str,
        *,
        namespace: str,
        concurrency: int,
        queues: list[str] | None,
        using: str,
    ) -> None:
        self.worker_id = worker_id
        self.namespace = namespace
        self.concurrency = concurrency
        self.queues = queues
        self.using = using
        self.workflows: list[str] = []
        self._registered = False
        self._started_at: datetime | None = None  # of this process's row (register())
        self._stopped = False
        self._lock = threading.Lock()  # the main thread and the heartbeat thread write
        self._last_purge = float("-inf")

    @property
    def _workers(self) -> WorkflowWorkerManager:
        from .models import WorkflowWorker

        return WorkflowWorker.objects.db_manager(self.using)  # type: ignore[return-value]

    def register(self, workflows: list[str]) -> None:
        """At the start: create or replace the row (the heartbeat retries after a failure)."""
        self.workflows = workflows
        with self._lock:
            self._write("register", self._register)

    def beat(self, busy_slots: int) -> None:
        """At every heartbeat: seen now; registered again if the row is missing.

        Not when a newer process registered under the same id meanwhile (a restart
        while this one still finishes its runs): its row is left alone.
        """
        busy = min(busy_slots, self.concurrency)
        with self._lock:
            if self._stopped:
                return
            if not self._registered:
                self._write("register", self._register)
                return
            seen = self._write(
                "seen",
                self._workers.seen,
                self.worker_id,
                busy_slots=busy,
                started_at=self._started_at,
            )
            if seen is False and self._write("replaced", self._replaced) is False:
                self._write("register", self._register)  # its row was deleted meanwhile

    def stop(self) -> None:
        """When the worker stops cleanly (after its last heartbeat): its own row only."""
        with self._lock:
            self._stopped = True
            if self._registered:
                self._write(
                    "stop", self._workers.stopped, self.worker_id, started_at=self._started_at
                )

    def purge(self) -> None:
        """At a sweep, at most once every ``PURGE_EVERY`` seconds: delete long-gone workers."""
        if time.monotonic() - self._last_purge < PURGE_EVERY:
            return
        self._last_purge = time.monotonic()
        deleted = self._write("purge", self._workers.purge_dead)
        if deleted:
            logger.info("gone workers deleted worker=%s count=%d", self.worker_id, deleted)

    def _register(self) -> bool:
        self._started_at = self._workers.register(
            self.worker_id,
            namespace=self.namespace,
            concurrency=self.concurrency,
            workflows=self.workflows,
            queues=self.queues,
        )
        self._registered = True
        return True

    def _replaced(self) -> bool:
        """A newer process registered under this id: its row, not ours, is there."""
        return bool(self._workers.filter(pk=self.worker_id).exists())

    def _write(self, action: str, write: Any, *args: Any, **kwargs: Any) -> Any:
        """``write(*args, **kwargs)``; None after a database error (logged)."""
        try:
            return write(*args, **kwargs)
        except Exception as exc:  # not only a DatabaseError: the heartbeat's thread goes on
            logger.warning(
                "worker registry write failed action=%s worker=%s error=%s",
                action,
                self.worker_id,
                failure(exc),
            )
            logger.debug(
                "worker registry write failed action=%s worker=%s detail=%s",
                action,
                self.worker_id,
                failure_text(exc),
                exc_info=not isinstance(exc, DatabaseError),
            )
            connections[self.using].close()
            return None
