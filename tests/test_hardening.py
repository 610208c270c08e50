"""Regression tests for the broken promises of issue 10, on SQLite and PostgreSQL."""

import datetime
from datetime import timedelta

import pytest
from django.utils import timezone

from django_openworkflow import send_signal
from django_openworkflow.engine import replay_positions
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.registry import get_workflow
from django_openworkflow.store import get_store
from django_openworkflow.testing import drain as drain_here
from tests.conftest import claim_and_execute, drain
from tests.testapp.models import Ledger, SideEffect

pytestmark = pytest.mark.django_db(transaction=True)


def finished(name, input=None):
    run = get_workflow(name).start(input)
    drain()
    run.refresh_from_db()
    return run


def history(run):
    return [
        (a.step_name, a.status, a.resume_generation)
        for a in StepAttempt.objects.filter(workflow_run=run).order_by("id")
    ]


def executions(run, step):
    return SideEffect.objects.filter(run_id=run.pk, step=step).count()


# 1. A committed step.atomic never runs again -------------------------------------


def test_an_on_commit_hook_that_raises_after_the_commit_does_not_fail_the_step(caplog):
    run = finished("atomic-hook-raises")
    assert (run.status, run.output) == ("completed", "charged and mailed")
    assert Ledger.objects.filter(run_id=run.pk).count() == 1
    assert executions(run, "charge") == 1
    assert history(run) == [("charge", "completed", 0), ("after", "completed", 0)]
    [record] = [r for r in caplog.records if "step committed, then raised" in r.getMessage()]
    assert record.getMessage() == (
        "step committed, then raised (an on_commit hook or the commit's reply failed; the step "
        f"is not repeated) run={run.pk} workflow=atomic-hook-raises step=charge "
        "error=MailServerDown"
    )


def test_a_commit_that_fails_is_a_failure_of_the_step_and_is_retried():
    run = finished("atomic-commit-fails", {"break": True})
    assert (run.status, run.output) == ("completed", 1)
    assert Ledger.objects.filter(run_id=run.pk).count() == 1  # the first commit wrote nothing
    attempts = list(StepAttempt.objects.filter(workflow_run=run).order_by("id"))
    assert [(a.status, a.error and a.error["type"]) for a in attempts] == [
        ("failed", "IntegrityError"),
        ("completed", None),
    ]


# 2. A BaseException from a step is a failure of that step --------------------------


def test_a_cancelled_error_from_asyncio_run_in_a_step_fails_the_step_under_its_policy():
    run = finished("cancelled-step")
    assert run.status == "failed"
    assert run.error["type"] == "StepFailed"
    assert run.error["message"] == 'step "cancelled" failed after 2 attempts: CancelledError: '
    assert executions(run, "cancelled") == 2
    assert history(run) == [("cancelled", "failed", 0), ("cancelled", "failed", 0)]


# 3. Error text PostgreSQL refuses is stored escaped, and nothing loops ---------------


def test_an_error_message_with_nul_and_a_lone_surrogate_is_stored_escaped():
    run = finished("bad-error-text", {"kind": "nul"})
    assert run.status == "failed"
    assert executions(run, "fail") == 2  # the retry policy, not an endless release loop
    assert executions(run, "first") == 1  # its deferred result was stored with the first failure
    first, *fails = StepAttempt.objects.filter(workflow_run=run).order_by("id")
    assert (first.step_name, first.status, first.output) == ("first", "completed", "kept")
    assert [a.status for a in fails] == ["failed", "failed"]
    assert fails[0].error["message"] == "bad byte \\x00 and a lone \\ud800 surrogate"
    assert "\\x00" in fails[0].error["traceback"]
    assert run.error["message"] == (
        'step "fail" failed after 2 attempts: ValueError: '
        "bad byte \\x00 and a lone \\ud800 surrogate"
    )


def test_an_exception_whose_str_raises_still_follows_the_retry_policy():
    run = finished("bad-error-text", {"kind": "unprintable"})
    assert run.status == "failed"
    assert executions(run, "fail") == 2
    assert not StepAttempt.objects.filter(workflow_run=run, status="running").exists()
    failures = StepAttempt.objects.filter(workflow_run=run, step_name="fail")
    assert [a.error["message"] for a in failures] == [
        "<str() of the Unprintable failed: RuntimeError>"
    ] * 2


# 8. parallel: a refused result does not hide a sibling's real error --------------------


def test_a_refused_parallel_result_stores_the_siblings_own_error_too():
    run = finished("parallel-refused")
    assert run.status == "failed"
    assert run.error["type"] == "TypeError"
    errors = {
        a.step_name: (a.status, a.error["type"], a.error["message"])
        for a in StepAttempt.objects.filter(workflow_run=run)
    }
    assert errors["broken"] == ("failed", "KeyError", '"the sibling\'s own error"')
    assert errors["refused"][:2] == ("failed", "TypeError")
    WorkflowRun.objects.resume(run)
    drain()
    broken = StepAttempt.objects.filter(workflow_run=run, step_name="broken").order_by("id")
    assert [a.error["type"] for a in broken] == ["KeyError", "KeyError"]  # never WorkerLost


# 5. Resuming a run that compensated ------------------------------------------------


def test_a_run_that_compensated_resumes_on_its_new_path():
    run = finished("compensates")
    assert (run.status, run.error["type"]) == ("failed", "StepFailed")
    SideEffect.objects.create(run_id=run.pk, step="card-fixed")
    WorkflowRun.objects.resume(run)
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", "charged"), run.error
    assert history(run) == [
        ("reserve", "completed", 0),
        ("charge", "failed", 0),
        ("release-stock", "completed", 0),
        ("charge", "completed", 1),
        ("ship", "completed", 1),
    ]
    assert [executions(run, s) for s in ("reserve", "charge", "ship")] == [1, 2, 1]


def test_a_resumed_run_still_may_not_reorder_the_steps_it_is_served():
    run = finished("changes-order")
    assert run.status == "completed"
    StepAttempt.objects.filter(workflow_run=run, step_name="b").update(
        status="failed", error={"type": "ValueError", "message": "made to fail"}
    )
    WorkflowRun.objects.filter(pk=run.pk).update(status="failed")
    SideEffect.objects.create(run_id=run.pk, step="flip")  # now "b" is called first
    WorkflowRun.objects.resume(run)
    drain()
    run.refresh_from_db()
    assert (run.status, run.error["type"]) == ("failed", "NonDeterministicWorkflow")


def test_replay_positions_bind_each_generation_up_to_its_first_unfinished_step():
    def attempt(gen, position, name, status):
        return StepAttempt(resume_generation=gen, position=position, step_name=name, status=status)

    attempts = [
        attempt(0, 0, "reserve", "completed"),
        attempt(0, 1, "charge", "failed"),
        attempt(0, 2, "release-stock", "completed"),  # after the failure: not binding
        attempt(1, 1, "charge", "completed"),
        attempt(1, 2, "ship", "failed"),
    ]
    assert replay_positions(attempts, 2) == {0: "reserve", 1: "charge"}
    assert replay_positions(attempts, 1) == {0: "reserve", 1: "charge", 2: "ship"}
    retried = [attempt(0, 0, "a", "failed"), attempt(0, 0, "a", "completed")]
    assert replay_positions([*retried, attempt(0, 1, "b", "completed")], 1) == {0: "a", 1: "b"}


# 9. A resumed parent waits for its still-running child -------------------------------


def test_a_parent_resumed_after_its_deadline_waits_for_the_same_child():
    run = get_workflow("parent").start(
        {"child": "waiter", "child_input": {"signal": "go-9"}},
        deadline_at=timezone.now() + timedelta(hours=1),
    )
    claim_and_execute()  # the parent starts its child and parks
    claim_and_execute()  # the child runs "before" and waits for its signal
    [wait] = StepAttempt.objects.filter(workflow_run=run, kind="workflow")
    child = wait.child_workflow_run
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=timezone.now() - timedelta(1))
    assert get_store().fail_overdue("default") == 1
    run.refresh_from_db()
    wait.refresh_from_db()
    assert (run.status, run.error["type"]) == ("failed", "DeadlineExceeded")
    assert wait.status == "running"  # the wait is kept, not failed with the deadline

    WorkflowRun.objects.resume(run, deadline_at=timezone.now() + timedelta(hours=1))
    wait.refresh_from_db()
    assert wait.resume_generation == 1  # it goes on in the new generation
    drain_here()  # the parent replays and parks on the same child
    assert send_signal("go-9", {"ok": True}) == [str(child.pk)]
    drain_here()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"child": {"data": {"ok": True}}})
    assert list(WorkflowRun.objects.filter(parent_step_attempt__workflow_run=run)) == [child]
    wait.refresh_from_db()
    child.refresh_from_db()
    assert (wait.status, child.parent_step_attempt_id) == ("completed", wait.pk)


def test_a_wait_of_a_superseded_generation_takes_no_signal():
    run = get_workflow("waiter").start({"signal": "gen-signal"})
    claim_and_execute()
    WorkflowRun.objects.filter(pk=run.pk).update(resume_generation=1)  # a later generation
    assert send_signal("gen-signal", 1) == []
    [wait] = StepAttempt.objects.filter(workflow_run=run, kind="signal_wait")
    assert (wait.status, wait.resume_generation) == ("running", 0)


# Bad input to the manager transitions --------------------------------------------


@pytest.mark.parametrize("deadline_at", ["2030-01-01T00:00:00Z", datetime.datetime(2030, 1, 1)])
def test_resume_refuses_a_deadline_that_is_not_an_aware_datetime(deadline_at):
    run = finished("fails-at-once")
    with pytest.raises(ValueError) as refused:
        WorkflowRun.objects.resume(run, deadline_at=deadline_at)
    assert str(refused.value) == (
        f"deadline_at must be an aware datetime (timezone.now() + ...), not {deadline_at!r}"
    )
    run.refresh_from_db()
    assert (run.status, run.resume_generation, run.events.count()) == ("failed", 0, 0)


@pytest.mark.parametrize("transition", ["resume", "cancel"])
@pytest.mark.parametrize("bad_id", ["not-a-uuid", 12, None, "\x00"])
def test_an_id_that_is_not_a_uuid_names_no_run(transition, bad_id):
    with pytest.raises(WorkflowRun.DoesNotExist) as missing:
        getattr(WorkflowRun.objects, transition)(bad_id)
    assert str(missing.value) == f"no workflow run has the id {bad_id!r}"


@pytest.mark.row_locks
def test_a_step_atomic_whose_connection_dies_after_the_commit_is_not_repeated(caplog):
    run = finished("atomic-reply-lost")
    assert (run.status, run.output) == ("completed", "written")
    # found committed on a new connection, in the same pass (no release and replay)
    assert (
        f"the step is not repeated) run={run.pk} workflow=atomic-reply-lost step=write "
        "error=OperationalError"
    ) in caplog.text
    assert "releasing the run" not in caplog.text
    assert Ledger.objects.filter(run_id=run.pk).count() == 1
    assert history(run) == [("write", "completed", 0)]
