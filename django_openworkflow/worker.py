"""The worker loop: claim due runs, execute them on threads, renew leases, stop cleanly.

One ``Worker`` runs in one process. Its main thread claims due runs (as many
as it has free slots) and hands each to a thread of its pool; each thread
has its own database connection. A heartbeat thread renews the leases of the
runs in flight. On PostgreSQL a listener thread waits on ``LISTEN`` so new,
resumed and woken runs are picked up at once; polling is only the fallback.
"""

from __future__ import annotations

import heapq
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError, connections
from django.db.models import Count
from django.utils import timezone

from . import instruments
from .checks import SQLITE_LOCKED_HINT
from .conf import app_settings
from .engine import Execution
from .engine.loops import close_thread_loop
from .liveness import Liveness
from .logfields import failure, failure_text
from .models import WorkflowRun, WorkflowSchedule
from .names import check_name
from .pauses import pause_point
from .queues import served_queues, setting_problems
from .registry import get_workflow, registered_workflows, workflow_names
from .retention import purge_thread
from .store import Claim, Store, get_store
from .workers import Presence

logger = logging.getLogger(__name__)


class Worker:
    """Executes due workflow runs until stopped (or, with ``burst``, until none is due)."""

    def __init__(
        self,
        *,
        concurrency: int | None = None,
        lease_seconds: float | None = None,
        poll_interval: float | None = None,
        burst: bool = False,
        namespace: str | None = None,
        worker_id: str | None = None,
        queues: list[str] | None = None,
    ) -> None:
        self.concurrency = concurrency or app_settings.CONCURRENCY
        self.lease_seconds = lease_seconds or app_settings.LEASE_SECONDS
        self.heartbeat_seconds = min(app_settings.HEARTBEAT_SECONDS, self.lease_seconds / 3)
        self.poll_interval = (
            poll_interval if poll_interval is not None else app_settings.POLL_INTERVAL
        )
        self.burst = burst
        self.namespace = namespace or app_settings.NAMESPACE
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        check_name(self.worker_id, "worker id")  # it fits WorkflowRun.worker_id
        self.queues = served_queues(queues)  # None: every queue
        self.store = get_store()
        self.using = self.store.using
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._finished = threading.Event()
        self._lock = threading.Lock()
        # One entry per run claimed and not yet done, keyed by (claim token, run): one
        # claim's runs share its token, and a run parked and claimed again while its last
        # slot is still finishing is two entries, each dropped by its own slot.
        self._in_flight: dict[tuple[uuid.UUID, Any], Claim] = {}
        # Run id -> its passes in a row that ended in a database error (db_error_delay).
        self._db_errors: dict[Any, int] = {}
        self._unknown_names: set[str] = set()  # names of due runs already reported
        self._schedules_declared = False  # tried again at each sweep until it succeeds
        self._queue: queue.SimpleQueue[Claim | None] = queue.SimpleQueue()
        # Wake-ups: of runs parked by this worker, of the next due run, of a rate limit.
        # Each moment once: the sweep and every held-back claim report theirs again.
        self._timers: list[datetime] = []
        self._timer_set: set[datetime] = set()
        self.claim_batch = max(1, self.concurrency // 5)
        self._signals = 0
        self.runs_executed = 0
        # Its WorkflowWorker row: registered at the start, seen at every heartbeat.
        self.presence = Presence(
            self.worker_id,
            namespace=self.namespace,
            concurrency=self.concurrency,
            queues=self.queues,
            using=self.using,
        )
        # PostgreSQL: how its connections notice a dead peer (liveness.py).
        self.liveness = Liveness(self.using, self.worker_id)

    @property
    def busy_slots(self) -> int:
        """Slots executing a run now (``openworkflow_worker_slots_busy``)."""
        return len(self._in_flight)

    # --- control ----------------------------------------------------------------

    def stop(self) -> None:
        """Stop taking new runs; the in-flight ones finish, then ``run()`` returns."""
        self._stopping.set()
        self._wakeup.set()

    def release_in_flight(self) -> int:
        """End the leases of the runs in flight now, so another worker replays them at once.

        For a process about to exit without waiting for them (``runworker --reload``).
        A release ends the claim (the run loses its claim token): the slots' later
        writes are refused by the claim fence and the heartbeat's renewals match
        nothing. The slots stay counted busy until their threads let go of the runs,
        so the worker claims no run it has no free slot for. Returns how many.
        """
        with self._lock:
            claims = list(self._in_flight.values())
        for claim in claims:
            release(self.store, claim)
        return len(claims)

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the worker; a signal the parent chose to ignore stays ignored.

        (A shell starts background jobs with SIGINT ignored, so ``make demo``'s
        Ctrl-C reaches the worker only as the single SIGTERM its trap sends.)
        """
        for sig in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            logger.warning(
                "stopping, send the signal again to exit now worker=%s signal=%s in_flight=%d",
                self.worker_id,
                name,
                len(self._in_flight),
            )
            self.stop()
        else:
            logger.warning("exiting now worker=%s signal=%s", self.worker_id, name)
            os._exit(1)

    # --- the loop -----------------------------------------------------------------

    def run(self) -> None:
        names = workflow_names()
        logger.info(
            "worker started worker=%s namespace=%s queues=%s concurrency=%d lease=%ss workflows=%d",
            self.worker_id,
            self.namespace,
            ",".join(self.queues) if self.queues else "*",
            self.concurrency,
            self.lease_seconds,
            len(names),
        )
        try:
            self.liveness.start()
            with self.liveness.thread():
                self._run(names)
        finally:
            self.liveness.stop()

    def _run(self, names: list[str]) -> None:
        self.presence.register(names)
        instruments.prepare()  # their imports now, not in the first passes
        self._declare_schedules()
        if problems := setting_problems():
            logger.error(
                "OPENWORKFLOW['QUEUES'] is invalid (check E010): every queue is served without "
                "limits worker=%s problems=%s",
                self.worker_id,
                "; ".join(problems),
            )
        slots = [
            threading.Thread(target=self._slot_loop, name=f"openworkflow-run-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        for thread in slots:
            thread.start()
        helpers = [threading.Thread(target=self._heartbeat_loop, name="openworkflow-heartbeat")]
        # A burst worker exits when idle: nothing to wait for.
        if app_settings.NOTIFY and not self.burst and self.store.notifies:
            helpers.append(threading.Thread(target=self._listen, name="openworkflow-listen"))
        purger = purge_thread(
            self.worker_id, self._stopping, using=self.using, namespace=self.namespace
        )
        if purger is not None and not self.burst:  # OPENWORKFLOW["RETENTION"]
            helpers.append(purger)
        for thread in helpers:
            thread.daemon = True
            thread.start()
        try:
            self._loop(names)
        finally:
            for _ in slots:
                self._queue.put(None)
            for thread in slots:
                thread.join()
            self._stopping.set()
            self._finished.set()
            for thread in helpers:
                thread.join(timeout=5)
            self.presence.stop()
            connections.close_all()
            logger.info("worker stopped worker=%s runs=%d", self.worker_id, self.runs_executed)

    def _loop(self, names: list[str]) -> None:
        last_sweep = float("-inf")
        failures = 0
        busy = False  # the last claim filled every free slot: more runs are probably due
        idle = False
        while not self._stopping.is_set():
            pause_point("worker.before-poll", worker_id=self.worker_id)
            self._wakeup.clear()
            was_idle, idle = idle, False
            try:
                check_connection(self.using)
                if time.monotonic() - last_sweep >= self.poll_interval:
                    last_sweep = time.monotonic()
                    self._sweep(names, busy)
                free = self.concurrency - len(self._in_flight)
                # While the queue is busy, claim in batches rather than one run per freed slot.
                if (
                    free > 0
                    and (not busy or free >= self.claim_batch)
                    and not self._stopping.is_set()
                ):
                    claimed = self.store.claim(
                        worker_id=self.worker_id,
                        workflow_names=names,
                        limit=free,
                        lease_seconds=self.lease_seconds,
                        namespace=self.namespace,
                        queues=self.queues,
                    )
                    self._add_timer(claimed.retry_at)  # a rate limit's next free start
                    busy = len(claimed) == free
                    for claim in claimed:
                        pause_point(
                            "claim.after-commit", run_id=claim.run_id, worker_id=self.worker_id
                        )
                        self._submit(claim)
                    idle = not claimed and not self._in_flight
                    if self.burst and idle:
                        logger.info("no runs due, burst worker exits worker=%s", self.worker_id)
                        return
                timeout = self._timer_timeout()
                failures = 0
            except DatabaseError as exc:
                failures += 1
                timeout = min(self.poll_interval * 2**failures, 30.0)
                logger.warning(
                    "database error worker=%s retry_in=%.1fs error=%s",
                    self.worker_id,
                    timeout,
                    failure(exc),
                )
                logger.debug(
                    "database error worker=%s detail=%s", self.worker_id, failure_text(exc)
                )
                connections[self.using].close()
            if idle and not was_idle:  # only a wake-up (NOTIFY, a timer, the poll) ends this wait
                logger.debug("worker idle worker=%s next_poll_in=%.1fs", self.worker_id, timeout)
            if not self._stopping.is_set():  # stop() may have set the wake-up cleared above
                self._wakeup.wait(timeout)

    def _sweep(self, names: list[str], busy: bool) -> None:
        """Once a poll interval: fail overdue runs, learn when parked runs are due.

        And report due runs of unknown workflows, unless every slot is busy:
        that query reads every due run, so not while there is a backlog.
        """
        if not busy:
            report_unknown_names(self.store, self.namespace, names, self._unknown_names)
        self.presence.purge()  # the rows of long-gone workers, once an hour
        self.store.fail_overdue(self.namespace)  # logs each run it fails
        if not self._schedules_declared:
            self._declare_schedules()
        schedules = WorkflowSchedule.objects.db_manager(self.using)
        for run in schedules.fire_due(self.namespace, names):
            logger.info(
                "schedule fired schedule=%s tick=%s run=%s worker=%s",
                run.schedule_name,
                run.scheduled_at.isoformat(),
                run.pk,
                self.worker_id,
            )
        self._add_timer(self.store.next_due_at(self.namespace, names))

    def _declare_schedules(self) -> None:
        """Create or update the schedules this worker's workflows declare in code.

        At the start; if the database was away then, at each sweep until it works.
        """
        try:
            WorkflowSchedule.objects.db_manager(self.using).declare(
                registered_workflows(), namespace=self.namespace
            )
            self._schedules_declared = True
        except DatabaseError as exc:  # the next sweep tries again
            logger.error("schedules not declared worker=%s error=%s", self.worker_id, failure(exc))
            logger.debug(
                "schedules not declared worker=%s detail=%s", self.worker_id, failure_text(exc)
            )
            connections[self.using].close()

    def _add_timer(self, when: datetime | None) -> None:
        if when is not None:
            with self._lock:
                if when not in self._timer_set:
                    self._timer_set.add(when)
                    heapq.heappush(self._timers, when)

    def _timer_timeout(self) -> float:
        """Wait until the earliest known wake-up, but no longer than the poll interval."""
        now = timezone.now()
        with self._lock:
            while self._timers and self._timers[0] <= now:
                self._timer_set.discard(heapq.heappop(self._timers))
            if not self._timers:
                return self.poll_interval
            seconds = (self._timers[0] - now).total_seconds()
        return max(0.0, min(self.poll_interval, seconds + 0.001))

    def _submit(self, claim: Claim) -> None:
        with self._lock:
            self._in_flight[claim.token, claim.run_id] = claim
        logger.info(
            "run claimed run=%s workflow=%s worker=%s",
            claim.run_id,
            claim.run.workflow_name,
            self.worker_id,
        )
        self._queue.put(claim)

    def _slot_loop(self) -> None:
        """One execution slot: a thread with its own database connection (and, once it
        runs an async step, its own event loop: ``engine/loops.py``).

        It survives anything a run raises (an engine bug, a ``KeyboardInterrupt``
        from a step): the run's claim is released so it is replayed after
        ``CRASH_RELEASE_DELAY``, and the slot takes the next run.
        """
        try:
            with self.liveness.thread():
                self._slots()
        finally:
            close_thread_loop()  # the event loop of its async steps, if one ran
            connections.close_all()

    def _slots(self) -> None:
        while True:
            claim = self._queue.get()
            if claim is None:
                return
            try:
                self._execute(claim)
            except BaseException as exc:
                # With the traceback: this is a bug (of the engine, or a
                # KeyboardInterrupt from a step), and no stored error records it.
                logger.exception(
                    "run crashed the engine, releasing it run=%s workflow=%s error=%s",
                    claim.run_id,
                    claim.run.workflow_name,
                    type(exc).__name__,
                )
                release(self.store, claim, delay=CRASH_RELEASE_DELAY)
            finally:
                self._done(claim)

    def _execute(self, claim: Claim) -> None:
        run = claim.run
        try:
            workflow = get_workflow(run.workflow_name)
            if workflow is None:  # claims only ask for known names; registry changed?
                logger.error("unknown workflow run=%s workflow=%s", run.pk, run.workflow_name)
                self.store.park(claim, timezone.now() + timedelta(seconds=5))
                return
            execution = Execution(claim, workflow, store=self.store)
            execution.execute()
            self._add_timer(execution.parked_until)
        except DatabaseError as exc:
            with self._lock:
                if len(self._db_errors) >= MAX_DB_ERROR_RUNS:  # runs others took over
                    self._db_errors.clear()
                times = self._db_errors[run.pk] = self._db_errors.get(run.pk, 0) + 1
            delay = db_error_delay(times)
            # The type only: a database's message may quote the values written (PostgreSQL's
            # CONTEXT of a JSON error, say). The message is for DEBUG.
            logger.warning(
                "database error, releasing the run run=%s workflow=%s error=%s%s%s",
                run.pk,
                run.workflow_name,
                type(exc).__name__,
                _hint(exc),
                f" times={times} delay={delay:g}s" if delay else "",
            )
            logger.debug("database error run=%s detail=%s", run.pk, exc)
            release(self.store, claim, delay=delay)
        else:
            if self._db_errors:
                with self._lock:
                    self._db_errors.pop(run.pk, None)

    def _done(self, claim: Claim) -> None:
        """The slot is free again: drop this claim (only this one) from flight."""
        pause_point("worker.after-execute", run_id=claim.run_id, token=claim.token)
        with self._lock:
            self._in_flight.pop((claim.token, claim.run_id), None)
            self.runs_executed += 1
        self._wakeup.set()
        try:
            check_connection(self.using)
        except DatabaseError:
            connections[self.using].close()

    # --- helpers threads ----------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        """Renew the leases, refresh the worker's row; survive any error until the end.

        (Not only a ``DatabaseError``: Django's ``InterfaceError`` is none, and a
        driver may raise something else on a dead connection. A heartbeat that
        died would let every lease run out while the worker goes on claiming.)
        """
        try:
            with self.liveness.thread():
                while not self._finished.wait(self.heartbeat_seconds):
                    with self._lock:
                        tokens = list({token for token, _ in self._in_flight})
                        busy = len(self._in_flight)
                    if tokens:
                        self._renew_leases(tokens)
                    self.presence.beat(busy)  # idle or not; logs its own failures
        finally:
            connections[self.using].close()

    def _listen(self) -> None:
        with self.liveness.thread():
            self.store.listen(self.namespace, self._wakeup, self._stopping, self.worker_id)

    def _renew_leases(self, tokens: list[uuid.UUID]) -> None:
        try:
            pause_point("heartbeat.before-renew", tokens=tokens)
            renewed = self.store.renew_leases(tokens, self.lease_seconds)
            logger.debug("leases renewed worker=%s runs=%d", self.worker_id, renewed)
        except Exception as exc:
            logger.warning("heartbeat failed worker=%s error=%s", self.worker_id, failure(exc))
            logger.debug(
                "heartbeat failed worker=%s detail=%s",
                self.worker_id,
                failure_text(exc),
                exc_info=not isinstance(exc, DatabaseError),
            )
            connections[self.using].close()


def _hint(exc: DatabaseError) -> str:
    """What to change when SQLite says "database is locked" (appended to the log line)."""
    return f" hint={SQLITE_LOCKED_HINT}" if "database is locked" in str(exc) else ""


def report_unknown_names(
    store: Store, namespace: str, names: list[str], reported: set[str]
) -> None:
    """Warn once per name about due runs of workflows this worker does not know.

    (A typo in ``run_workflow("send-reciept")``, or a worker started without
    the module that defines the workflow.) ``reported`` holds the names
    already reported; they are left out of the query.
    """
    unknown = (
        WorkflowRun.objects.using(store.using)
        .in_namespace(namespace)
        .due()
        .exclude(workflow_name__in=[*names, *reported])
        .values_list("workflow_name")
        .annotate(runs=Count("pk"))
        .order_by("workflow_name")
    )
    for name, runs in unknown:
        reported.add(name)
        logger.warning(
            "unknown workflow, no @workflow with this name is registered in this worker "
            "name=%s runs=%d",
            name,
            runs,
        )


# A run that crashed the engine (not a database error) is replayed after this many
# seconds, so one that crashes before any step is recorded cannot spin a worker.
CRASH_RELEASE_DELAY = 1.0
# A run whose passes end in a database error again and again (a statement of the engine's
# that fails the same way at every replay: a value the database refuses, a trigger) must
# not spin a slot: released at once the first time (a lost connection, say), then later
# and later, up to a minute.
MAX_DB_ERROR_DELAY = 60.0
MAX_DB_ERROR_RUNS = 10_000  # runs remembered (db_error_delay); beyond, forgotten at once


def db_error_delay(times: int) -> float:
    """Seconds before a run released after its ``times``-th database error in a row is due:
    0, then CRASH_RELEASE_DELAY doubling up to ``MAX_DB_ERROR_DELAY``."""
    if times <= 1:
        return 0.0
    return min(MAX_DB_ERROR_DELAY, CRASH_RELEASE_DELAY * 2 ** min(times - 2, 16))


def release(store: Store, claim: Claim, *, delay: float = 0.0) -> None:
    """After a database error or a crash: end our lease now, so the run is replayed soon.

    Best effort on a fresh connection; if the database is still away, the
    lease simply runs out.
    """
    store.connection.close()
    try:
        store.release(claim, delay=delay)
    except DatabaseError:
        store.connection.close()


def check_connection(using: str) -> None:
    """Keep this thread's connection open between runs unless it is broken.

    (Django's request-oriented ``close_old_connections()`` would reconnect
    for every run with the default ``CONN_MAX_AGE = 0``.)
    """
    connection = connections[using]
    if connection.connection is None:
        return
    if connection.in_atomic_block or not connection.get_autocommit():
        connection.close()  # never leak a transaction into the next run
    elif connection.errors_occurred:
        if connection.is_usable():
            connection.errors_occurred = False
        else:
            connection.close()
