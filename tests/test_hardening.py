"""Regression tests for the broken promises of issue 10, on SQLite and PostgreSQL."""

import pytest

from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.registry import get_workflow
from tests.conftest import drain
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
        f"step committed, then raised run={run.pk} step=charge error=MailServerDown "
        "(an on_commit hook or the commit's reply failed; the step is not repeated)"
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
    from django_openworkflow.engine import replay_positions

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
