"""Races forced at the engine's pause points, on PostgreSQL (row locks), never with sleeps.

Each test holds one thread at a named pause point (``testing.pause_at``),
lets another transaction run into it, and checks the outcome the lock order
promises. Every thread uses its own database connection.
"""

import logging
from datetime import timedelta

import pytest
from django.db import OperationalError, connection, transaction
from django.utils import timezone

from django_openworkflow import send_signal
from django_openworkflow.engine import Execution
from django_openworkflow.models import WorkflowRun, WorkflowRunEvent
from django_openworkflow.registry import get_workflow
from django_openworkflow.store import get_store
from django_openworkflow.testing import drain, pause_at
from tests.conftest import Backend, blocked_on_a_lock, make_due
from tests.testapp.models import Ledger
from tests.testapp.workflows import parent

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.row_locks]


def claim(name, worker_id="race-worker"):
    [run] = get_store().claim(
        worker_id=worker_id, workflow_names=[name], limit=1, lease_seconds=30, namespace="default"
    )
    return run


def execute(run):
    return lambda: Execution(run, get_workflow(run.run.workflow_name)).execute()


def parked_parent(child="echo", child_input=7):
    run = parent.start({"child": child, "child_input": child_input})
    execute(claim("parent"))()  # the parent starts its child and parks
    run.refresh_from_db()
    assert (run.status, run.available_at) == ("pending", None)
    return run, WorkflowRun.objects.get(parent_step_attempt__workflow_run=run)


def test_a_child_finishing_while_its_parent_replays_still_wakes_the_parent():
    run, child = parked_parent()
    make_due(run)  # woken early: the parent replays while the child is unfinished
    replay = Backend(execute(claim("parent")))
    with pause_at("wait.before-park", when=lambda c: c["run_id"] == run.pk) as pause:
        replay.start()
        pause.wait()  # the parent read its child as unfinished and holds its row lock
        finishing = Backend(execute(claim("echo")))
        finishing.start()
        blocked_on_a_lock(finishing)  # the child locks its parent before changing its row
    replay.finish()
    finishing.finish()
    child.refresh_from_db()
    run.refresh_from_db()
    assert child.status == "completed"
    assert run.status == "pending"
    assert run.available_at is not None and run.available_at <= timezone.now()  # woken
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"child": 7})


def test_cancelling_a_parent_while_its_child_finishes_does_not_deadlock():
    run, child = parked_parent()
    child_claim = claim("echo")
    cancel = Backend(lambda: WorkflowRun.objects.cancel(run))
    with pause_at("cancel.before-children", when=lambda c: c["run_id"] == run.pk) as pause:
        cancel.start()
        pause.wait()  # the cancel holds the parent's row, not yet the child's
        finishing = Backend(execute(child_claim))
        finishing.start()
        assert blocked_on_a_lock(finishing)  # waits for the parent, holding nothing
    cancel.finish()  # no deadlock: the cancel took the child's row
    finishing.finish()
    run.refresh_from_db()
    child.refresh_from_db()
    assert (run.status, child.status) == ("canceled", "canceled")
    assert child.output is None  # the fenced-out child stored nothing as success


def deadlock_a_cancel(run, child, cancel_it) -> Backend:
    """Run ``cancel_it`` (a cancel of ``run``) into a deadlock, and return its finished
    thread. The other transaction locks the child, then the parent: against the lock order
    (no engine path does), so that the deadlock is certain. It also writes more rows (InnoDB
    rolls back the one that wrote fewer) and checks for deadlocks later (PostgreSQL: the
    first to check is rolled back), so that the cancel is the one ended; it commits."""

    def against_the_lock_order():
        with transaction.atomic():
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute("SET LOCAL deadlock_timeout = '30s'")
            Ledger.objects.bulk_create(Ledger(run_id=run.pk, note=f"weight {i}") for i in range(20))
            list(WorkflowRun.objects.select_for_update().filter(pk=child.pk))
            list(WorkflowRun.objects.select_for_update().filter(pk=run.pk))

    cancel = Backend(cancel_it)
    with pause_at("cancel.before-children", when=lambda c: c["run_id"] == run.pk) as pause:
        cancel.start()
        pause.wait()  # the cancel holds the parent's row, not yet the child's
        other = Backend(against_the_lock_order)
        other.start()
        assert blocked_on_a_lock(other)  # it holds the child's row, waits for the parent's
    # The cancel asks for the child's row now: a deadlock, which ends the cancel's first try.
    other.finish()
    cancel.join(15)
    assert not cancel.is_alive()
    assert Ledger.objects.filter(run_id=run.pk).count() == 20  # the other one committed
    return cancel


def test_a_cancel_the_database_ends_to_break_a_deadlock_runs_again(caplog):
    caplog.set_level(logging.INFO, logger="django_openworkflow")
    run, child = parked_parent()
    cancel = deadlock_a_cancel(run, child, lambda: WorkflowRun.objects.cancel(run))
    assert cancel.error is None, repr(cancel.error)
    run.refresh_from_db()
    child.refresh_from_db()
    assert (run.status, child.status) == ("canceled", "canceled")
    assert WorkflowRunEvent.objects.filter(run=run, action="cancel").count() == 1
    tried = [r.getMessage() for r in caplog.records if r.name == "django_openworkflow.managers"]
    assert tried == [f"deadlock victim, cancel tried again run={run.pk} attempt=2"]


def test_a_cancel_in_the_callers_transaction_leaves_the_deadlock_to_the_caller():
    """The database rolled the caller's whole transaction back: running the cancel again
    alone would commit it without the caller's other writes. The error is the caller's."""
    run, child = parked_parent()

    def in_a_transaction():
        with transaction.atomic():
            WorkflowRun.objects.cancel(run)

    cancel = deadlock_a_cancel(run, child, in_a_transaction)
    assert isinstance(cancel.error, OperationalError)
    assert get_store().deadlocked(cancel.error)
    run.refresh_from_db()
    assert run.status == "pending"
    assert not WorkflowRunEvent.objects.filter(run=run, action="cancel").exists()


def test_the_deadline_sweep_and_a_cancel_of_the_parent_do_not_deadlock():
    run, child = parked_parent(child="waiter", child_input={"signal": "never"})
    execute(claim("waiter"))()  # the child waits for its signal
    WorkflowRun.objects.filter(pk=child.pk).update(deadline_at=timezone.now() - timedelta(1))
    cancel = Backend(lambda: WorkflowRun.objects.cancel(run))
    with pause_at("cancel.before-children", when=lambda c: c["run_id"] == run.pk) as pause:
        cancel.start()
        pause.wait()
        sweep = Backend(lambda: get_store().fail_overdue("default"))
        sweep.start()
        assert blocked_on_a_lock(sweep)  # it locks the parent before the overdue child
    cancel.finish()
    sweep.finish()
    child.refresh_from_db()
    assert child.status == "canceled"  # the cancel came first; the sweep found nothing due


def test_a_resumed_child_finishing_during_its_parents_replay_wakes_the_parent():
    run, child = parked_parent(child="fails-at-once", child_input=None)
    execute(claim("fails-at-once"))()  # the child fails and wakes its parent
    replay = Backend(execute(claim("parent")))
    WorkflowRun.objects.resume(child)  # meanwhile a person resumes the failed child
    with pause_at("wait.before-park", when=lambda c: c["run_id"] == run.pk) as pause:
        replay.start()
        pause.wait()  # the replay read the resumed child as pending
        finishing = Backend(execute(claim("fails-at-once")))
        finishing.start()
        assert blocked_on_a_lock(finishing)
    replay.finish()
    finishing.finish()
    run.refresh_from_db()
    assert run.status == "pending"
    assert run.available_at is not None and run.available_at <= timezone.now()  # woken again


def test_deleting_a_failed_parent_while_its_child_finishes_does_not_deadlock():
    run, child = parked_parent(child="waiter", child_input={"signal": "never"})
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=timezone.now() - timedelta(1))
    assert get_store().fail_overdue("default") == 1  # the child keeps running
    execute(claim("waiter"))()  # the child waits for its signal
    send_signal("never", 1)
    finishing_claim = claim("waiter")
    finishing = Backend(execute(finishing_claim))
    with pause_at("finish.parent-locked", when=lambda c: c["run_id"] == child.pk) as pause:
        finishing.start()
        pause.wait()  # the finishing child holds its parent's row, not yet its own
        deleting = Backend(lambda: WorkflowRun.objects.filter(pk=run.pk).delete())
        deleting.start()
        assert blocked_on_a_lock(deleting)  # it locks the parent before the child's row
    finishing.finish()
    deleting.finish()
    assert not WorkflowRun.objects.filter(pk=run.pk).exists()
    child.refresh_from_db()
    assert (child.status, child.parent_step_attempt_id) == ("completed", None)
