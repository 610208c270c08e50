"""The adversarial review of the engine's write paths (issue 10, "go beyond the list").

Each test is one interleaving or fault tried against one write path. Tests of
holes still open are marked ``xfail(strict=True)`` with the hole as reason;
the others pass: a hole fixed here, or an interleaving that held.
"""

import logging
import threading
from contextlib import contextmanager
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from django_openworkflow import send_signal, workflow
from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowSignal
from django_openworkflow.pauses import add_hook, remove_hook
from django_openworkflow.registry import get_workflow
from django_openworkflow.store import get_store
from django_openworkflow.testing import pause_at
from tests.conftest import Backend, blocked_on_a_lock, claim_and_execute, drain, make_due
from tests.test_races import claim, execute, parked_parent
from tests.testapp.models import Ledger, SideEffect
from tests.testapp.review import GATES, UNDECODABLE

pytestmark = pytest.mark.django_db(transaction=True)


def history(run):
    return [
        (a.step_name, a.status, a.error and a.error["type"])
        for a in StepAttempt.objects.filter(workflow_run=run).order_by("id")
    ]


def one_pass(name, input=None):
    """Start a run and execute one pass of it, as a worker would."""
    run = get_workflow(name).start(input)
    claim_and_execute()
    run.refresh_from_db()
    return run


@contextmanager
def on_point(name, action, **match):
    """Run ``action`` once on the engine's own thread when it reaches pause point ``name``."""
    done = []

    def hook(context):
        if not done and all(context.get(key) == value for key, value in match.items()):
            done.append(True)
            action()

    add_hook(name, hook)
    try:
        yield done
    finally:
        remove_hook(name, hook)


def executions(run, step):
    return SideEffect.objects.filter(run_id=run.pk, step=step).count()


# --- workflow code outside steps --------------------------------------------------


@pytest.mark.parametrize(("input", "kind"), [(None, "SystemExit"), ("cancelled", "CancelledError")])
def test_a_base_exception_from_workflow_code_fails_the_run_instead_of_escaping(input, kind):
    # Before: it escaped Execution.execute(); the run stayed "running" under a claim
    # nobody executed, was claimed again when the lease ran out, and crashed again, forever.
    run = one_pass("review-base-exception", input)
    assert (run.status, run.error["type"], run.worker_id) == ("failed", kind, None)
    assert history(run) == [("before", "completed", None)]  # the deferred result was stored


def test_a_workflow_retry_delay_past_the_year_9999_fails_the_run_with_its_error():
    # Before: OverflowError escaped execute(); the run stayed "running", forever.
    run = one_pass("review-far-workflow-retry")
    assert (run.status, run.error["type"], run.error["message"]) == (
        "failed",
        "ValueError",
        "broken input",
    )
    assert run.attempts == 1


def test_a_step_retry_delay_past_the_year_9999_fails_the_step(caplog):
    # Before: the run failed with "OverflowError: date value out of range" and the
    # step's attempt was never marked failed (it stayed "running").
    caplog.set_level(logging.INFO, logger="django_openworkflow")
    run = one_pass("review-far-step-retry")
    assert (
        f"step failed run={run.pk} workflow=review-far-step-retry step=broken error=ValueError "
        "attempts=1" in caplog.text
    )
    assert (run.status, run.error["type"], run.error["step"]) == ("failed", "StepFailed", "broken")
    assert run.error["message"] == 'step "broken" failed after 1 attempt: ValueError: broken step'
    assert history(run) == [("broken", "failed", "ValueError")]


# --- bad text from users: names and keys -------------------------------------------


def test_a_step_name_that_is_not_unicode_text_is_refused_naming_it():
    # Before: "UnicodeEncodeError: 'utf-8' codec can't encode character '\udcff' in
    # position 16", naming neither the step nor the value.
    run = one_pass("review-bad-step-name")
    assert (run.status, run.error["type"]) == ("failed", "ValueError")
    assert run.error["message"] == (
        f"step name {'process ' + UNDECODABLE!r} contains '\\udcff', "
        "which is not valid Unicode text"
    )


def test_a_signal_name_that_is_not_unicode_text_is_refused_naming_it():
    run = one_pass("review-bad-signal-name")
    assert (run.status, run.error["type"]) == ("failed", "ValueError")
    assert run.error["message"] == (
        f"signal {'uploaded ' + UNDECODABLE!r} contains '\\udcff', which is not valid Unicode text"
    )
    with pytest.raises(ValueError) as refused:
        send_signal("uploaded", idempotency_key=UNDECODABLE)
    assert str(refused.value) == (
        f"idempotency_key of signal \"uploaded\" {UNDECODABLE!r} contains '\\udcff', "
        "which is not valid Unicode text"
    )


def test_an_idempotency_key_that_is_not_unicode_text_is_refused_naming_it():
    with pytest.raises(ValueError) as refused:
        get_workflow("review-two-steps").start(idempotency_key=UNDECODABLE)
    assert str(refused.value) == (
        f'idempotency_key {UNDECODABLE!r} of workflow "review-two-steps" contains '
        "'\\udcff', which is not valid Unicode text"
    )
    assert not WorkflowRun.objects.exists()


def test_a_step_result_of_a_dict_subclass_is_refused_not_converted():
    # Before: the Counter was stored as a plain dict; the first pass read counts["c"]
    # as 0, the replay after the sleep raised KeyError and failed the run.
    run = get_workflow("review-counter").start()
    drain()
    run.refresh_from_db()
    assert (run.status, run.error["type"]) == ("failed", "TypeError")
    assert run.error["message"] == (
        f'step "count" of run {run.pk} returned a value that is not JSON: '
        "$ is a collections.Counter (Counter({'a': 2, 'b': 1}))"
    )
    assert history(run) == [("count", "failed", "TypeError")]


@pytest.mark.parametrize(
    ("version", "error", "message"),
    [
        ("v" * 101, ValueError, "version of workflow 'review-v' is 101 characters; at most 100"),
        (
            "a\x00b",
            ValueError,
            "version 'a\\x00b' of workflow 'review-v' contains the character U+0000 (NUL), "
            "which PostgreSQL cannot store",
        ),
        (7, TypeError, "version of workflow 'review-v' must be a string, not 7"),
    ],
)
def test_a_workflow_version_no_column_can_hold_is_refused_where_it_is_declared(
    version, error, message
):
    # Before: SQLite stored it (an int came back as ctx.version "7"); PostgreSQL raised
    # a bare DataError from every start() of the workflow and every child step starting it.
    with pytest.raises(error) as refused:
        workflow(name="review-v", version=version)(lambda ctx: None)
    assert str(refused.value) == message
    assert get_workflow("review-v") is None


# --- steps called inside steps -------------------------------------------------------


@pytest.mark.parametrize("outer", ["atomic", "run"])
@pytest.mark.parametrize("inner", ["sleep", "run"])
def test_a_step_called_inside_a_step_function_fails_the_run_at_once(outer, inner):
    # Before: a sleep inside step.atomic parked the run inside the step's transaction,
    # which rolled back: the run stayed "running" under a dead claim, and every lease
    # later was replayed, its step failed as "WorkerLost", ten times. Inside step.run
    # the same lost one retry per pass; a nested step.run was left "running" forever
    # on a completed run (its deferred result was overwritten by the outer step's).
    run = one_pass("review-nested-steps", {"outer": outer, "inner": inner})
    inner_name = "nap" if inner == "sleep" else "inner"
    assert (run.status, run.error["type"], run.error["message"]) == (
        "failed",
        "TypeError",
        f'step "{inner_name}" was called inside the function of step "outer" of run {run.pk}: '
        "steps cannot be nested; call them from the workflow function",
    )
    assert history(run) == [("outer", "failed", "TypeError")]


def test_a_step_called_inside_a_transaction_of_the_workflow_code_fails_the_run_at_once():
    # Before: the sleep parked the run inside the workflow code's transaction, which
    # rolled back as the Suspend unwound it: the run stayed "running" with no attempt
    # stored, and every lease later ran "charge" again, with no budget ever used up.
    run = one_pass("review-steps-in-user-transaction")
    assert (run.status, run.error["type"], run.error["message"]) == (
        "failed",
        "TypeError",
        f'step "charge" of run {run.pk} was called inside a transaction.atomic() block of '
        "the workflow function: steps commit on their own (use ctx.step.atomic for database "
        "writes that must commit with a step)",
    )
    assert history(run) == []
    assert not Ledger.objects.exists()


# --- step.atomic ------------------------------------------------------------------------


def test_held_a_step_atomic_that_marks_its_transaction_for_rollback_is_a_failed_step():
    # transaction.set_rollback(True) in fn: the step's completion cannot be written
    # in that transaction, so the step fails; nothing of it is committed.
    run = one_pass("review-atomic-rollback")
    assert (run.status, run.error["type"]) == ("failed", "StepFailed")
    assert history(run) == [("write", "failed", "TransactionManagementError")]
    assert not Ledger.objects.exists()


def test_a_step_atomic_that_cancels_its_own_run_fails_it_clearly_instead_of_looping():
    # Before: the cancel rolled back with the step (the step's own fence saw the run
    # canceled and unwound), and the run was left running under a claim nobody
    # executed; when the lease ended it was replayed and did it again, forever.
    run = one_pass("review-atomic-cancels-itself")
    assert (run.status, run.error["type"], run.error["message"]) == (
        "failed",
        "TypeError",
        f'step "cancel" of run {run.pk} changed its own run (canceled it?) inside its '
        "transaction, which the step's completion then refused; do that in ctx.step.run, "
        "which commits at once",
    )
    assert history(run) == [("cancel", "failed", "TypeError")]
    assert not Ledger.objects.exists()


# --- the deferred step.run result ("rides on the next write") -------------------------------


def test_a_step_result_changed_in_place_by_the_workflow_is_stored_as_the_step_returned_it():
    # Before: the deferred result was the very object handed to the workflow; the
    # workflow's append was stored with it, and the replay appended again (output 5).
    run = get_workflow("review-mutates-result").start()
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", 4)
    load = StepAttempt.objects.get(workflow_run=run, step_name="load")
    assert load.output == {"items": [3, 1, 2]}


def test_a_deeply_nested_step_result_is_stored_as_returned():
    run = get_workflow("review-deep-result").start()
    drain()
    run.refresh_from_db()
    if connection.vendor == "mysql":  # JSON nests at most 30 deep there: refused at once
        assert (run.status, run.error["type"]) == ("failed", "TypeError")
        assert run.error["message"] == (
            f'step "deep" of run {run.pk} returned a value that is not JSON: $ is nested 600 '
            "deep; MySQL and MariaDB store JSON nested at most 30 deep"
        )
        return
    assert (run.status, run.output) == ("completed", 600)


def test_a_step_result_changed_in_place_into_no_json_value_does_not_crash_the_pass():
    # Before: the next write failed to serialize the date ("Object of type date is not
    # JSON serializable"), the TypeError escaped the pass and left the run running under
    # a dead claim; each lease later the step failed as WorkerLost, ten times.
    run = get_workflow("review-mutates-result").start("date")
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", 4)
    assert history(run) == [
        ("load", "completed", None),
        ("pause", "completed", None),
        ("total", "completed", None),
    ]


def test_a_last_step_that_returned_as_the_deadline_passed_is_not_run_again_after_resume():
    # Before: the completion was refused (deadline), the deferred result was dropped
    # with it, and the deadline failure that followed stored the run failed with the
    # step still "running": after the resume the finished step ran again.
    run = get_workflow("review-deadline-in-last-step").start()
    claim_and_execute()
    run.refresh_from_db()
    assert (run.status, run.error["type"]) == ("failed", "DeadlineExceeded")
    assert history(run) == [("last", "completed", None)]
    WorkflowRun.objects.resume(run, deadline_at=timezone.now() + timedelta(hours=1))
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", 1)
    assert executions(run, "last") == 1


def test_a_finished_step_whose_result_waits_for_the_next_write_is_not_run_again_after_resume():
    # The deadline sweep fails the run between "a" returning and its result's write: the
    # worker's next fence fails, and it stores the result the sweep had marked failed.
    run = get_workflow("review-two-steps").start()

    def deadline_passes():  # between "a" returning and "b" starting: the sweep runs
        WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=timezone.now())
        assert get_store().fail_overdue("default") == 1

    with on_point("step.before-fence", deadline_passes, step="b") as done:
        claim_and_execute()
    assert done
    run.refresh_from_db()
    assert (run.status, run.error["type"]) == ("failed", "DeadlineExceeded")
    assert history(run) == [("a", "completed", None)]  # a's fn returned 1: stored
    WorkflowRun.objects.resume(run, deadline_at=timezone.now() + timedelta(hours=1))
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", 3)
    assert executions(run, "a") == 1


# --- races on PostgreSQL: a thread held at a point, another transaction into it -------------


def gated(run):
    """Hold ``run``'s next step function until the returned ``release`` is set."""
    entered, release = threading.Event(), threading.Event()
    GATES[run.pk] = (entered, release)
    return entered, release


@pytest.mark.row_locks
def test_held_a_cancel_while_a_step_atomic_runs_rolls_its_writes_back():
    run = get_workflow("review-atomic-gated").start()
    entered, release = gated(run)
    worker = Backend(execute(claim("review-atomic-gated")))
    worker.start()
    assert entered.wait(10)  # fn wrote its Ledger row, uncommitted
    WorkflowRun.objects.cancel(run)  # the step holds no lock on its run: not blocked
    release.set()
    worker.finish()
    run.refresh_from_db()
    assert (run.status, run.output) == ("canceled", None)
    assert not Ledger.objects.exists()  # the fence failed inside the step: all rolled back
    assert history(run) == [("write", "failed", "WorkflowCanceled")]


@pytest.mark.row_locks
def test_held_a_step_atomic_whose_lease_expired_is_fenced_out_and_the_new_owner_commits_once():
    run = get_workflow("review-atomic-gated").start()
    entered, release = gated(run)
    first = Backend(execute(claim("review-atomic-gated", worker_id="first")))
    first.start()
    assert entered.wait(10)
    make_due(run)  # the first worker's lease ran out (it stalled)
    second = Backend(execute(claim("review-atomic-gated", worker_id="second")))
    second.start()
    second.finish()  # replays: the first attempt is lost, its own commits
    release.set()
    first.finish()  # its fence fails: its Ledger row rolls back
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", "written")
    assert Ledger.objects.count() == 1
    assert history(run) == [("write", "failed", "WorkerLost"), ("write", "completed", None)]


@pytest.mark.row_locks
def test_a_step_atomic_outlived_by_its_deadline_is_failed_like_the_sweep_fails_it():
    # Before: the worker found the deadline passed at the step's completion and failed
    # the run, but left the step's attempt "running" on the failed run (the deadline
    # sweep marks it failed with the deadline).
    run = get_workflow("review-atomic-gated").start()
    entered, release = gated(run)
    worker = Backend(execute(claim("review-atomic-gated")))
    worker.start()
    assert entered.wait(10)
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=timezone.now())
    release.set()
    worker.finish()
    run.refresh_from_db()
    assert (run.status, run.error["type"]) == ("failed", "DeadlineExceeded")
    assert history(run) == [("write", "failed", "DeadlineExceeded")]
    assert not Ledger.objects.exists()


@pytest.mark.row_locks
def test_held_a_run_failed_at_its_deadline_and_resumed_during_a_step_atomic_commits_it_once():
    run = get_workflow("review-atomic-gated").start()
    entered, release = gated(run)
    old = Backend(execute(claim("review-atomic-gated", worker_id="old")))
    old.start()
    assert entered.wait(10)  # the old worker's fn wrote its Ledger row, uncommitted
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=timezone.now())
    assert get_store().fail_overdue("default") == 1
    WorkflowRun.objects.resume(run, deadline_at=timezone.now() + timedelta(hours=1))
    new = Backend(execute(claim("review-atomic-gated", worker_id="new")))
    new.start()
    new.finish()  # the new generation runs the step and completes the run
    release.set()
    old.finish()  # the old claim is fenced out: its Ledger row rolls back
    run.refresh_from_db()
    assert (run.status, run.output, run.resume_generation) == ("completed", "written", 1)
    assert Ledger.objects.count() == 1
    assert history(run) == [("write", "failed", "DeadlineExceeded"), ("write", "completed", None)]


@pytest.mark.row_locks
def test_held_a_signal_sent_while_its_waiter_replays_is_delivered_and_wakes_it():
    run = get_workflow("waiter").start({"signal": "review-go"})
    execute(claim("waiter"))()  # "before", then the wait parks the run
    make_due(run)  # woken early: it replays while nothing was sent
    replay = Backend(execute(claim("waiter")))
    woken = []
    sender = Backend(lambda: woken.extend(send_signal("review-go", 5)))
    with pause_at("wait.before-park", when=lambda c: c["run_id"] == run.pk) as pause:
        replay.start()
        pause.wait()  # the replay found no signal and holds its row lock
        sender.start()
        assert blocked_on_a_lock(sender)
    replay.finish()
    sender.finish()
    assert woken == [str(run.pk)]
    run.refresh_from_db()
    assert run.status == "pending" and run.available_at <= timezone.now()  # woken
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"data": 5})


@pytest.mark.row_locks
def test_held_a_child_canceled_while_its_parent_replays_wakes_the_parent():
    run, child = parked_parent(child="waiter", child_input={"signal": "never"})
    make_due(run)
    replay = Backend(execute(claim("parent")))
    cancel = Backend(lambda: WorkflowRun.objects.cancel(child))
    with pause_at("wait.before-park", when=lambda c: c["run_id"] == run.pk) as pause:
        replay.start()
        pause.wait()
        cancel.start()
        assert blocked_on_a_lock(cancel)  # it locks the parent before the child
    replay.finish()
    cancel.finish()
    run.refresh_from_db()
    assert run.status == "pending" and run.available_at <= timezone.now()  # woken


@pytest.mark.row_locks
def test_held_a_child_past_its_deadline_while_its_parent_replays_wakes_the_parent():
    run, child = parked_parent(child="waiter", child_input={"signal": "never"})
    WorkflowRun.objects.filter(pk=child.pk).update(deadline_at=timezone.now())
    make_due(run)
    replay = Backend(execute(claim("parent")))
    sweep = Backend(lambda: get_store().fail_overdue("default"))
    with pause_at("wait.before-park", when=lambda c: c["run_id"] == run.pk) as pause:
        replay.start()
        pause.wait()
        sweep.start()
        assert blocked_on_a_lock(sweep)
    replay.finish()
    sweep.finish()
    child.refresh_from_db()
    run.refresh_from_db()
    assert child.status == "failed"
    assert run.status == "pending" and run.available_at <= timezone.now()  # woken


def hold_transaction(action, started, release):
    """A thread's body: do ``action`` in a transaction and keep it open until ``release``."""

    def body():
        with transaction.atomic():
            action()
            started.set()
            assert release.wait(10)

    return body


@pytest.mark.row_locks
def test_held_two_starts_with_one_idempotency_key_at_once_make_one_run():
    wf = get_workflow("review-two-steps")
    started, release, runs = threading.Event(), threading.Event(), []
    first = Backend(
        hold_transaction(lambda: runs.append(wf.start(idempotency_key="k")), started, release)
    )
    second = Backend(lambda: runs.append(wf.start(idempotency_key="k")))
    first.start()
    assert started.wait(10)  # the first start is in, its transaction open
    second.start()
    assert blocked_on_a_lock(second)  # the key's advisory lock
    release.set()
    first.finish()
    second.finish()
    assert [r.pk for r in runs] == [runs[0].pk, runs[0].pk]
    assert WorkflowRun.objects.count() == 1


@pytest.mark.postgres
@pytest.mark.xfail(
    strict=True,
    reason="the idempotency key's advisory lock orders two start()s, but a caller whose "
    "database runs REPEATABLE READ (OPTIONS isolation_level) reads with the snapshot taken "
    "before it waited for the lock: it does not see the first run and inserts a second; "
    "check E011 refuses such a database (test_checks.py), this shows why",
)
def test_two_starts_with_one_idempotency_key_make_one_run_under_repeatable_read():
    import psycopg

    wf = get_workflow("review-two-steps")
    started, release, runs = threading.Event(), threading.Event(), []

    def repeatable_read_start():
        connection.ensure_connection()
        connection.connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        runs.append(wf.start(idempotency_key="k"))

    first = Backend(
        hold_transaction(lambda: runs.append(wf.start(idempotency_key="k")), started, release)
    )
    second = Backend(repeatable_read_start)
    first.start()
    assert started.wait(10)
    second.start()
    assert blocked_on_a_lock(second)
    release.set()
    first.finish()
    second.finish()
    assert WorkflowRun.objects.count() == 1


@pytest.mark.row_locks
def test_held_two_signals_with_one_idempotency_key_at_once_deliver_once():
    run = get_workflow("waiter").start({"signal": "review-go"})
    execute(claim("waiter"))()
    started, release, woken = threading.Event(), threading.Event(), []
    first = Backend(
        hold_transaction(
            lambda: woken.append(send_signal("review-go", 1, idempotency_key="k")), started, release
        )
    )
    second = Backend(lambda: woken.append(send_signal("review-go", 2, idempotency_key="k")))
    first.start()
    assert started.wait(10)
    second.start()
    assert blocked_on_a_lock(second)
    release.set()
    first.finish()
    second.finish()
    assert woken == [[str(run.pk)], []]
    assert WorkflowSignal.objects.count() == 1


@pytest.mark.row_locks
def test_held_two_senders_racing_for_one_waiter_deliver_it_once():
    run = get_workflow("waiter").start({"signal": "review-go"})
    execute(claim("waiter"))()
    started, release, woken = threading.Event(), threading.Event(), []
    first = Backend(
        hold_transaction(lambda: woken.append(send_signal("review-go", 1)), started, release)
    )
    second = Backend(lambda: woken.append(send_signal("review-go", 2)))
    first.start()
    assert started.wait(10)  # delivered, not committed: it holds the waiter's row
    second.start()
    assert blocked_on_a_lock(second)  # it saw the waiter waiting, and waits for its row
    release.set()
    first.finish()
    second.finish()  # re-read under the lock: no longer waiting
    assert woken == [[str(run.pk)], []]
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"data": 1})
