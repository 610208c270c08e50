"""The adversarial review of issue 12 (queues and limits, SPEC section 9).

Each test is one interleaving or fault of the limited claim (``store/limits.py``)
or of a path that frees a place, forced with pause points and threads that
have connections of their own, never with sleeps.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import uuid
from datetime import timedelta

import pytest
from django.db import DatabaseError, connection, transaction
from django.db.models.functions import Now as DjangoNow
from django.utils import timezone

from django_openworkflow import workflow
from django_openworkflow.engine import Execution
from django_openworkflow.models import QueueStart, WorkflowRun
from django_openworkflow.pauses import add_hook, remove_hook
from django_openworkflow.registry import get_workflow
from django_openworkflow.store import Claims, get_store
from django_openworkflow.testing import drain, pause_at
from django_openworkflow.worker import Worker
from tests.conftest import Backend, blocked_on_a_lock, wait_until_blocked

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def queues(settings):
    """Set ``OPENWORKFLOW["QUEUES"]`` ("default" without limits, plus these)."""

    def configure(**limits: dict) -> None:
        settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "QUEUES": {"default": {}, **limits}}

    return configure


def claim(limit: int = 10, *, worker: str = "w1", queues: list[str] | None = None) -> Claims:
    return get_store().claim(
        namespace="default",
        workflow_names=["echo"],
        limit=limit,
        worker_id=worker,
        lease_seconds=30,
        queues=queues,
    )


def in_progress(queue: str) -> int:
    return WorkflowRun.objects.active().filter(queue=queue, started_at__isnull=False).count()


# --- keyset pagination: runs due at one instant ----------------------------------------------


def test_runs_due_at_the_same_instant_as_a_page_end_are_found_on_the_next_page(queues):
    # One statement writes every run's available_at with the database clock (as start_many
    # does, or start() calls within one millisecond). SQLite keeps Now() with milliseconds
    # and a datetime parameter with microseconds: the same instant, unequal as text, so the
    # next page's "after this row" condition lost the rows due at the page end's instant.
    queues(billing={"key_concurrency": 1})
    WorkflowRun.objects.bulk_create(
        WorkflowRun(namespace="default", workflow_name="echo", queue="billing", concurrency_key="a")
        for _ in range(41)
    )
    # (SQLite splits that insert in batches by the number of columns; one UPDATE is one
    # statement, with Django's own Now().)
    WorkflowRun.objects.update(available_at=DjangoNow())
    assert WorkflowRun.objects.values("available_at").distinct().count() == 1
    last = WorkflowRun.objects.order_by("pk").last()  # last in claim order
    WorkflowRun.objects.filter(pk=last.pk).update(concurrency_key="b")

    claims = claim(2)  # a page of 20 runs of key "a" held back after the first
    assert {c.run.concurrency_key for c in claims} == {"a", "b"}


# --- the queue's lock against the other locks ----------------------------------------------


def shared_slot_key(workflow: str, queue: str) -> str:
    """An idempotency key of ``workflow`` whose MariaDB/MySQL lock row is ``queue``'s."""
    from django_openworkflow.store.mysql import KEY_LOCK_SLOTS

    def slot(*parts: str) -> int:
        text = "\x1f".join(("django_openworkflow", *parts))
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % KEY_LOCK_SLOTS

    target = slot("queue", "default", queue)
    return next(
        key
        for key in (f"key-{i}" for i in range(10**7))
        if slot("start", "default", workflow, key) == target
    )


@pytest.mark.skipif(connection.vendor != "mysql", reason="the key-slot rows of MariaDB/MySQL")
def test_a_claim_waiting_for_a_queue_lock_holds_no_row_another_waiter_needs(queues):
    # The queue's lock row is also an idempotency key's. A transaction holds it (a start()
    # with that key) and then cancels a run; the claim locked that run (a due run of an
    # unlimited queue) before it came to wait for the queue's lock: each waited for the
    # other, and InnoDB killed one of them with a deadlock error.
    queues(limited={"concurrency": 5})
    echo = get_workflow("echo")
    key = shared_slot_key("echo", "limited")
    open_run = echo.start(1)
    limited_run = echo.start(2, queue="limited")
    started, go = threading.Event(), threading.Event()
    keyed = []

    def start_then_cancel():
        with transaction.atomic():
            keyed.append(echo.start(3, idempotency_key=key))  # the slot row, until the commit
            started.set()
            assert go.wait(10)
            WorkflowRun.objects.cancel(open_run)

    claimed = []
    user = Backend(start_then_cancel)
    worker = Backend(lambda: claimed.extend(c.run_id for c in claim()))
    user.start()
    assert started.wait(10)
    worker.start()
    assert worker.connected.wait(10)
    wait_until_blocked(worker.pid, by=user.pid)  # on the slot row
    go.set()
    user.finish()
    worker.finish()
    # the claim went on once the transaction committed: the canceled run was no longer due
    assert sorted(claimed) == sorted([limited_run.pk, keyed[0].pk])
    assert WorkflowRun.objects.get(pk=open_run.pk).status == "canceled"


@pytest.mark.row_locks
def test_two_claims_of_a_limited_queue_take_turns_and_unlimited_claims_never_wait(queues):
    queues(limited={"concurrency": 2})
    echo = get_workflow("echo")
    limited = [echo.start(i, queue="limited") for i in range(4)]
    plain = echo.start(9)
    first, second, unlimited = [], [], []
    with pause_at("claim.queue-locked", when=lambda c: c["queue"] == "limited") as pause:
        holder = Backend(lambda: first.extend(claim(1, worker="w1")))
        holder.start()
        pause.wait()  # w1 holds the queue's lock, has counted nothing yet
        # A claim of the unlimited queue alone takes no queue lock: it does not wait.
        free = Backend(lambda: unlimited.extend(claim(5, worker="w3", queues=["default"])))
        free.start()
        free.finish()
        waiter = Backend(lambda: second.extend(claim(5, worker="w2")))
        waiter.start()
        assert blocked_on_a_lock(waiter)  # on the queue's lock, held by w1
        wait_until_blocked(waiter.pid, by=holder.pid)
    holder.finish()
    waiter.finish()
    assert [c.run_id for c in unlimited] == [plain.pk]
    assert [c.run_id for c in first] == [limited[0].pk]
    # w2 counted after w1 committed: one place left, not two
    assert [c.run_id for c in second] == [limited[1].pk]
    assert in_progress("limited") == 2


# --- faults inside the claim's transaction --------------------------------------------------


def test_a_claim_interrupted_before_its_commit_leaves_no_trace(queues):
    # KeyboardInterrupt (a BaseException) inside the transaction: the runs, their started_at
    # and their QueueStart rows are written together or not at all.
    queues(paced={"rate_limit": "2/h", "concurrency": 2, "key_concurrency": 1})
    runs = [get_workflow("echo").start(i, queue="paced", concurrency_key=str(i)) for i in range(3)]

    def interrupt(context):
        raise KeyboardInterrupt

    add_hook("claim.before-commit", interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            claim()
    finally:
        remove_hook("claim.before-commit", interrupt)
    assert QueueStart.objects.count() == 0
    assert set(WorkflowRun.objects.values_list("status", "started_at", "worker_id")) == {
        ("pending", None, None)
    }
    claims = claim(worker="w2")  # nothing was counted: the full rate and both places
    assert {c.run_id for c in claims} == {runs[0].pk, runs[1].pk}
    assert all(c.first_start for c in claims)
    assert sorted(QueueStart.objects.values_list("run_id", flat=True)) == sorted(
        [runs[0].pk, runs[1].pk]
    )


def kill_connection(pid: int) -> None:
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        else:
            cursor.execute(f"KILL {int(pid)}")


@pytest.mark.row_locks
def test_a_claim_that_loses_its_connection_holding_the_queue_lock_leaves_no_trace(queues):
    queues(paced={"rate_limit": "1/h", "concurrency": 1})
    run = get_workflow("echo").start(1, queue="paced")
    with pause_at("claim.queue-locked") as pause:
        lost = Backend(claim)
        lost.start()
        pause.wait()
        kill_connection(lost.pid)
    lost.join(15)
    assert isinstance(lost.error, DatabaseError)
    assert QueueStart.objects.count() == 0
    run.refresh_from_db()
    assert (run.status, run.started_at) == ("pending", None)
    # the queue's lock went with the connection: the next claim takes the run
    assert [c.run_id for c in claim(worker="w2")] == [run.pk]
    assert QueueStart.objects.get().run_id == run.pk


# --- the worker's timer for a rate limit ------------------------------------------------------


def test_a_worker_held_back_by_a_rate_limit_keeps_one_timer_for_it(queues):
    # Every claim that the full window holds back says when it frees (Claims.retry_at), the
    # same moment until a start leaves the window. The worker pushed each onto its heap of
    # timers: a busy worker (a claim per finished run) grew it by thousands an hour.
    queues(paced={"rate_limit": "1/h"})
    QueueStart.objects.create(
        namespace="default", queue="paced", run_id=uuid.uuid4(), started_at=timezone.now()
    )
    get_workflow("echo").start(1, queue="paced")
    worker = Worker(concurrency=1, poll_interval=0)  # claims on every turn of its loop
    turns = []

    def count(context):
        turns.append(len(worker._timers))
        if len(turns) == 30:
            worker.stop()

    add_hook("worker.before-poll", count)
    try:
        worker.run()
    finally:
        remove_hook("worker.before-poll", count)
    assert len(turns) == 30
    assert max(turns) <= 1


# --- a place freed outside the worker wakes the workers ---------------------------------------


@contextlib.contextmanager
def listening():
    """A LISTEN connection of its own; ``heard()`` returns the NOTIFY payloads sent since."""
    import psycopg

    from django_openworkflow.store.postgres import NOTIFY_CHANNEL

    params = connection.get_connection_params()
    for option in ("cursor_factory", "context", "server_side_binding"):
        params.pop(option, None)
    with psycopg.connect(**params, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")

        def heard() -> list[str]:
            # a NOTIFY of the listener's own after the others: what came before it was sent
            listener.execute("SELECT pg_notify(%s, 'sentinel')", [NOTIFY_CHANNEL])
            payloads = []
            for notice in listener.notifies(timeout=10):
                if notice.payload == "sentinel":
                    return payloads
                payloads.append(notice.payload)
            raise AssertionError("the sentinel never came")

        yield heard


def parked_in_progress(queue: str) -> WorkflowRun:
    """A run of ``queue`` claimed once and parked without a timer: it holds a place."""
    run = get_workflow("echo").start(1, queue=queue)
    [taken] = claim(1)
    assert get_store().park(taken, None)
    run.refresh_from_db()
    assert (run.status, run.started_at is not None) == ("pending", True)
    return run


@pytest.mark.postgres
@pytest.mark.parametrize("end", ["cancel", "deadline"])
def test_a_place_freed_by_a_cancel_or_a_deadline_wakes_the_workers(queues, end):
    # A finished run of a limited queue notifies (store.finish), so a held-back run starts
    # at once rather than at the next poll. A cancel or the deadline sweep frees a place
    # just the same.
    queues(narrow={"concurrency": 1})
    run = parked_in_progress("narrow")
    with listening() as heard:
        assert heard() == []
        if end == "cancel":
            WorkflowRun.objects.cancel(run)
        else:
            WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=timezone.now())
            assert get_store().fail_overdue("default") == 1
        assert heard() == ["default"]


# --- keys and queue names compare exactly --------------------------------------------------------

ODD_KEYS = ["a", "A", "a ", "ä", "\N{GRINNING FACE}", "\N{SMILING FACE WITH OPEN MOUTH}"]
ODD_KEYS += ["x" * 254 + "a", "x" * 254 + "b"]  # 255 characters, the column's length


def test_concurrency_keys_differing_in_case_accents_spaces_or_emoji_are_distinct(queues):
    # MariaDB's usual collations hold "a", "A", "a " and "ä" equal, and all emoji: the
    # columns are binary (ExactCharField), and so is the count of a key's runs in progress.
    queues(billing={"key_concurrency": 1})
    echo = get_workflow("echo")
    first = [echo.start(i, queue="billing", concurrency_key=key) for i, key in enumerate(ODD_KEYS)]
    second = [echo.start(i, queue="billing", concurrency_key=key) for i, key in enumerate(ODD_KEYS)]
    assert {c.run_id for c in claim(20)} == {run.pk for run in first}
    assert claim(20) == []  # every key is full, each with its own run
    WorkflowRun.objects.cancel(first[1])  # "A" frees its place: "A"'s second run, only
    assert [c.run_id for c in claim(20)] == [second[1].pk]


def test_queue_names_differing_in_case_or_spaces_have_their_own_limits(queues):
    queues(**{name: {"concurrency": 1, "rate_limit": "1/h"} for name in ("mail", "Mail", "mail ")})
    echo = get_workflow("echo")
    runs = {
        name: [echo.start(i, queue=name) for i in range(2)] for name in ("mail", "Mail", "mail ")
    }
    assert {c.run_id for c in claim(20)} == {queue_runs[0].pk for queue_runs in runs.values()}
    assert claim(20) == []
    assert sorted(QueueStart.objects.values_list("queue", flat=True)) == ["Mail", "mail", "mail "]


# --- a bad QUEUES setting where the checks did not run -----------------------------------------

BAD_QUEUES = {"emails": {"concurrency": 0}}  # check E010
E010_PROBLEM = "queue 'emails': concurrency must be a whole number of at least 1, or None, not 0"


def test_a_worker_with_a_bad_queues_setting_says_it_serves_without_limits(settings, caplog):
    # runworker runs the checks (E010 stops it); a worker started without them (the
    # Worker class, --skip-checks) serves every queue without limits: loudly, not silently.
    settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "QUEUES": BAD_QUEUES}
    caplog.set_level("ERROR", logger="django_openworkflow.worker")
    Worker(burst=True, worker_id="w-bad").run()
    assert [record.getMessage() for record in caplog.records] == [
        "OPENWORKFLOW['QUEUES'] is invalid (check E010): every queue is served without limits "
        f"worker=w-bad problems={E010_PROBLEM}"
    ]


def test_a_start_refused_by_a_bad_queues_setting_says_why(settings):
    # The queue is in the setting: "not in QUEUES" alone would send the reader looking there.
    settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "QUEUES": BAD_QUEUES}
    with pytest.raises(ValueError) as info:
        get_workflow("echo").start(1, queue="emails")
    assert str(info.value) == (
        "queue 'emails' of workflow \"echo\" is not in OPENWORKFLOW['QUEUES']; known queues: "
        f"default (OPENWORKFLOW['QUEUES'] is invalid and counts as only 'default', check E010: "
        f"{E010_PROBLEM})"
    )
    assert not WorkflowRun.objects.exists()


# --- every way a run ends gives its place up once -----------------------------------------------


@pytest.mark.parametrize("end", ["deadline", "delete"])
def test_a_parked_run_ended_by_its_deadline_or_deleted_gives_its_place_up_once(queues, end):
    # (Completing, failing and canceling are tested in tests/test_queues.py.)
    queues(narrow={"concurrency": 1, "rate_limit": "5/h"})
    parked = parked_in_progress("narrow")
    waiting = get_workflow("echo").start(2, queue="narrow")
    assert claim() == []  # the parked run holds the only place
    if end == "deadline":
        WorkflowRun.objects.filter(pk=parked.pk).update(deadline_at=timezone.now())
        assert get_store().fail_overdue("default") == 1
    else:
        WorkflowRun.objects.filter(pk=parked.pk).delete()
    [taken] = claim()
    assert (taken.run_id, taken.first_start) == (waiting.pk, True)
    assert in_progress("narrow") == 1
    if end == "deadline":  # resumed, it waits for a place like a new run, and counts again
        WorkflowRun.objects.resume(parked, deadline_at=timezone.now() + timedelta(hours=1))
        assert claim() == []
        assert get_store().finish(taken, "completed")
        [again] = claim()
        assert (again.run_id, again.first_start) == (parked.pk, True)
    assert QueueStart.objects.count() == (3 if end == "deadline" else 2)


# --- a queue removed from QUEUES while runs are in it ---------------------------------------------


@workflow(name="review12-payments-child", queue="payments")
def payments_child(ctx):
    return ctx.step.run("charge", lambda: 42)


def test_a_parent_replaying_after_its_childs_queue_was_removed_gets_the_childs_result(queues):
    # "Removing a queue from QUEUES: runs already in it stay in it" (docs/queues.md). The
    # parent's replay checked its child's queue against the setting again, before it looked
    # for the child it had started: the ValueError failed the parent, the child's result lost.
    queues(payments={"concurrency": 2})
    parent = get_workflow("parent").start({"child": "review12-payments-child"})
    [taken] = get_store().claim(
        namespace="default", workflow_names=["parent"], limit=1, worker_id="w1", lease_seconds=30
    )
    Execution(taken, get_workflow("parent")).execute()  # started its child, waits for it
    child = WorkflowRun.objects.get(workflow_name="review12-payments-child")
    assert child.queue == "payments"
    queues()  # the deploy that removes the queue
    drain(time_travel=False)  # the child runs (without limits), the parent replays
    parent.refresh_from_db()
    assert (parent.status, parent.output) == ("completed", {"child": 42})
