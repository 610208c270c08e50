"""The store: every write the engine, the worker and the managers make to runs.

``Store`` states the contract; ``OrmStore`` (``orm.py``) implements it with
Django's ORM on any database that has row locks with ``SKIP LOCKED`` or,
like SQLite in IMMEDIATE mode, takes the write lock when a transaction
begins; ``PostgresStore`` (``postgres.py``) overrides the hot statements
with one SQL statement each. ``get_store()`` picks one; nothing else looks
at the database vendor.

The rules every implementation keeps:

- **Fencing.** A claim is a token, new for every claim. A write made on
  behalf of a worker (fence, start step, complete step, park, finish,
  release) matches the run's ``claim_token`` and ``status = 'running'``; a
  worker whose claim was taken over, canceled, finished or released writes
  nothing and is told so (``False`` or ``None``). A release ends the claim:
  the run keeps its status and loses its token.
- **The deadline.** A run whose ``deadline_at`` has passed on the database
  clock is never claimed, fenced, parked or completed: it can only fail
  (``fail_overdue``, or ``finish`` with a status other than completed).
- **A ``step.run`` result rides on the next write.** The engine hands the
  result of a finished ``step.run`` to the run's next write as a
  ``Deferred``; ``fence``, ``start_step`` and ``finish`` store it in the same
  transaction, and only when the fence holds.
- **Time is the database's.** Leases, wake-ups and deadlines are compared
  with the database clock (``Now()``/``statement_timestamp()``), never with
  a worker's.
- **The lock order** (``managers.py``): runs are locked oldest first; a
  parent before its children. Locks taken with ``SKIP LOCKED`` never wait.

Methods that say "inside a transaction" must be called in
``transaction.atomic(using=store.using)`` (``store.atomic()``); the others
make their own transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError, OperationalError, connections, transaction
from django.utils import timezone

if TYPE_CHECKING:
    import threading

    from ..models import WorkflowRun

# A finished ``step.run``'s result on its way to the next write:
# (attempt id, the result's JSON text, when the step finished).
Deferred = tuple[int, str, datetime]


class LockWaitExpired(OperationalError):
    """A wait for a lock in ``Store.atomic_with_lock_timeout()`` ran out (the database's
    own error is the ``__cause__``); the block's transaction was rolled back."""


@dataclass
class Claim:
    """A run a worker has claimed: what the claim hands to the engine.

    ``token`` fences every write made for this claim; ``db_now`` is the
    database clock at the claim; ``first_start`` is true when the run had not
    been started before in its generation (nothing to replay unless it was
    resumed); ``lease_seconds`` is the lease that renewals extend it by.
    ``clock_offset`` is the database clock minus this process's, taken when
    the claim is made (the store makes it right after its statement), not
    when a slot gets to the run.
    """

    run: WorkflowRun
    token: uuid.UUID
    db_now: datetime
    first_start: bool
    lease_seconds: float
    clock_offset: timedelta = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.clock_offset = self.db_now - timezone.now()

    @property
    def run_id(self) -> uuid.UUID:
        return self.run.pk  # type: ignore[no-any-return]


class Claims(list[Claim]):
    """What ``claim()`` took; ``retry_at`` is when a rate limit that held runs back
    lets the next one start (the worker sets a timer for it)."""

    retry_at: datetime | None = None


class Store:
    """The contract; see the module docstring for the rules."""

    vendor = ""
    notifies = False  # whether ``listen`` can wake workers (else they poll)
    max_json_depth: int | None = None  # how deep the JSON columns nest, where limited

    def __init__(self, using: str) -> None:
        self.using = using

    def __repr__(self) -> str:
        return f"<{type(self).__name__} using={self.using!r}>"

    @property
    def connection(self) -> Any:
        return connections[self.using]

    def atomic(self) -> transaction.Atomic:
        return transaction.atomic(using=self.using)

    @contextmanager
    def time_limit(self, seconds: float | None) -> Iterator[None]:
        """Have the database stop this block's queries after ``seconds`` (None: no limit).

        A stopped query raises a ``DatabaseError``; the connection is left as it
        was found (no limit of ours stays on it). For reads that must not hang
        (the metrics' queue gauges); a database with no way to do it sets none.
        """
        yield

    @contextmanager
    def atomic_with_lock_timeout(self, seconds: float) -> Iterator[None]:
        """A transaction (``atomic()``) whose waits for a lock last at most ``seconds``
        each (0: none), for what a person waits on (a page, an admin action).

        A wait that runs out raises ``LockWaitExpired``, after the block's
        transaction (or savepoint) rolled back. The limit is the block's only:
        the connection is left as it was found. Each database's way:
        ``lock_wait_expired()`` recognises its error.
        """
        try:
            with self.limited_lock_waits(seconds):
                yield
        except DatabaseError as exc:
            if self.lock_wait_expired(exc):
                raise LockWaitExpired(str(exc)) from exc
            raise

    def limited_lock_waits(self, seconds: float) -> AbstractContextManager[Any]:
        """``atomic_with_lock_timeout()``'s transaction, with the database's limit on lock
        waits set for it and taken off after it. Here: no limit."""
        return self.atomic()

    def lock_wait_expired(self, exc: DatabaseError) -> bool:
        """Whether ``exc`` says that a wait for a lock ran out (nothing else failed)."""
        return False

    def deadlocked(self, exc: DatabaseError) -> bool:
        """Whether ``exc`` says that the database ended the transaction to break a deadlock
        (it rolled back, and the same work may simply be tried again). Here: never."""
        return False

    # --- runs ------------------------------------------------------------------

    def insert_run(self, **fields: Any) -> WorkflowRun:
        """Insert a pending run (due at once unless ``available_at``) and ``notify``.

        Inside the caller's transaction if there is one: the run exists, and
        the workers hear of it, only when that transaction commits.
        """
        raise NotImplementedError

    def lock_key(self, *parts: str) -> None:
        """Inside a transaction: serialize the transactions using this key until they end.

        Held until the outermost transaction commits or rolls back, so two
        ``start()`` calls with one idempotency key never both insert.
        """
        raise NotImplementedError

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
        """Take up to ``limit`` due runs of these workflows in ``queues`` (None: every queue),
        highest priority first, then oldest due first.

        Due: pending or running (an expired lease), ``available_at`` reached,
        deadline not passed. One short transaction marks them running with a
        new token, the worker's id and a lease of ``lease_seconds``, and sets
        ``started_at`` on a first start.

        The queues' limits (``queues.py``) hold in the same transaction: a run
        that would start beyond one stays pending, and the runs behind it are
        still found. A run in progress (it has ``started_at``) already has its
        slot and is never held back.
        """
        raise NotImplementedError

    def fence(self, claim: Claim, *, renew: bool = False, deferred: Deferred | None = None) -> bool:
        """Inside a transaction: lock the claimed run; False if the claim no longer holds.

        With ``renew`` the lease is extended; a ``deferred`` result is stored
        when the fence holds.
        """
        raise NotImplementedError

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
        """Fence, store ``deferred``, insert a running ``run`` attempt; its id, or None.

        The ORM stores renew the lease with it (their fence is an UPDATE anyway);
        PostgreSQL's one-statement start leaves that to the heartbeat.
        """
        raise NotImplementedError

    def insert_attempt(self, claim: Claim, **fields: Any) -> Any:
        """Inside a fenced transaction: insert a step attempt of this run; return it."""
        raise NotImplementedError

    def complete_step(self, claim: Claim, attempt_id: int, output: Any) -> bool:
        """Inside a transaction: fence (renewing the lease) and complete the attempt.

        ``step.atomic`` calls it inside the transaction of the step's own writes.
        """
        raise NotImplementedError

    def complete_wait(self, attempt_id: int, output: Any) -> None:
        """Inside a fenced transaction: complete a waiting attempt still running."""
        raise NotImplementedError

    def fail_steps(self, failures: Iterable[tuple[int, dict[str, Any]]]) -> None:
        """Inside a fenced transaction: fail these attempts, those still running only."""
        raise NotImplementedError

    def park(
        self,
        claim: Claim,
        available_at: datetime | None,
        *,
        attempts: int | None = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """Release the claimed run until ``available_at`` (None: until woken).

        A sleep, a wait or a retry; ``attempts``/``error`` record a workflow retry.
        """
        raise NotImplementedError

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
        """Complete or fail the claimed run, storing ``deferred``; wake a waiting parent.

        A completion also checks the deadline. A child run locks its parent
        first (the lock order) and makes it due in the same transaction.
        """
        raise NotImplementedError

    def fail_at_deadline(
        self,
        claim: Claim,
        generation: int,
        error: dict[str, Any],
        deferred: Deferred | None = None,
    ) -> bool:
        """Fail a claimed run past its deadline (storing ``deferred``), and its executing
        ``run`` attempts."""
        raise NotImplementedError

    def store_late_result(self, run_id: Any, generation: int, deferred: Deferred) -> None:
        """A result that lost the race with the deadline sweep: keep it for a resume.

        Under the run's lock, only while the run is still failed in ``generation``,
        and only over an attempt the sweep failed with the deadline.
        """
        raise NotImplementedError

    def release(self, claim: Claim, *, delay: float = 0.0) -> bool:
        """End the claim now and its lease ``delay`` seconds from now, so the run is replayed soon.

        The run keeps its status (running) and loses its claim token: every later
        write of this claim (a step start, a lease renewal, a second release) is
        fenced out, while the worker that released it may still be executing it.
        """
        raise NotImplementedError

    def lock_runs(self, ids: Iterable[Any]) -> list[Any]:
        """Inside a transaction: lock these runs' rows in the lock order; return their ids."""
        raise NotImplementedError

    # --- wake-ups -----------------------------------------------------------------

    def renew_leases(self, tokens: Sequence[uuid.UUID], lease_seconds: float) -> int:
        """Extend the leases of the runs claimed with ``tokens``.

        Never waits for a row lock: a run whose row its own ``step.atomic``
        holds renews its lease when that step commits.
        """
        raise NotImplementedError

    def fail_overdue(self, namespace: str) -> int:
        """Fail the active runs past their deadline and wake their parents.

        Their executing ``run`` attempts fail too; waits stay open, so a
        resumed run waits for the same child or signal.
        """
        raise NotImplementedError

    def wake_parents(self, child_ids: Iterable[Any]) -> int:
        """Inside a transaction that locked the parents: make parents waiting on these
        (finished) children due now. Only waits of a parent's current generation count.
        """
        raise NotImplementedError

    def deliver_signal(
        self, namespace: str, signal: str, data: Any, *, sender: Any = None
    ) -> list[uuid.UUID]:
        """Inside a transaction: complete the current waits for ``signal`` with ``data``.

        Locks the waiting runs and the ``sender`` (a run sending as a step)
        in the lock order, and makes the woken runs due at once.
        """
        raise NotImplementedError

    def next_due_at(self, namespace: str, workflow_names: Iterable[str]) -> datetime | None:
        """When the earliest active run of these workflows becomes due."""
        raise NotImplementedError

    def notify(self, namespace: str) -> None:
        """Wake the workers of ``namespace`` when the current transaction commits."""

    def listen(
        self,
        namespace: str,
        wakeup: threading.Event,
        stopping: threading.Event,
        worker_id: str,
    ) -> bool:
        """Set ``wakeup`` on each ``notify`` until ``stopping``; False when the
        database has no notifications (the worker polls)."""
        return False
