"""ctx.step.run_workflow: child runs linked to the parent's step, parked parents, cascades."""

import pytest
from django.utils import timezone

from django_openworkflow import InvalidTransition
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.store import get_store
from django_openworkflow.testing import drain
from tests.conftest import claim_and_execute
from tests.testapp.models import SideEffect
from tests.testapp.workflows import bad_child_name, parent

pytestmark = pytest.mark.django_db(transaction=True)


def child_of(run):
    return WorkflowRun.objects.get(parent_step_attempt__workflow_run=run)


def test_a_child_run_is_started_and_its_output_returned():
    run = parent.start({"child": "echo", "child_input": {"n": 5}})
    run = claim_and_execute()
    # the parent parked without a worker slot, waiting for no time in particular
    assert (run.status, run.worker_id, run.available_at) == ("pending", None, None)
    step = StepAttempt.objects.get(workflow_run=run, step_name="echo")
    assert (step.kind, step.status) == ("workflow", "running")
    child = child_of(run)
    assert step.child_workflow_run_id == child.pk
    assert (child.workflow_name, child.input, child.status) == ("echo", {"n": 5}, "pending")

    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED
    assert run.output == {"child": {"n": 5}}
    step.refresh_from_db()
    assert (step.status, step.output) == ("completed", {"n": 5})


def test_a_child_that_completes_wakes_its_parent_at_once():
    run = parent.start({"child": "echo", "child_input": 1})
    claim_and_execute()  # parent parks
    child = claim_and_execute()  # child completes
    assert child.status == "completed"
    run.refresh_from_db()
    assert run.available_at is not None
    assert run.available_at <= timezone.now()
    assert WorkflowRun.objects.due().filter(pk=run.pk).exists()


def test_a_failed_child_fails_the_step_at_once():
    run = parent.start({"child": "fails-at-once"})
    drain()
    run.refresh_from_db()
    child = child_of(run)
    assert child.status == "failed"
    assert run.status == WorkflowRun.Status.FAILED
    assert run.error["type"] == "StepFailed"
    assert run.error["message"] == (
        f'step "fails-at-once" failed after 1 attempt: ChildWorkflowFailed: child run '
        f"{child.pk} (fails-at-once) failed: LookupError: no such order"
    )
    assert StepAttempt.objects.filter(workflow_run=run, step_name="fails-at-once").count() == 1


def test_a_failed_child_step_can_be_caught_by_the_parent():
    run = parent.start({"child": "fails-at-once", "catch": True})
    drain()
    run.refresh_from_db()
    assert run.status == "completed"
    assert run.output["failed"]["type"] == "ChildWorkflowFailed"


def test_a_canceled_child_fails_the_step():
    run = parent.start({"child": "waiter", "child_input": {"signal": "never"}, "catch": True})
    drain()
    child = child_of(run)
    assert child.status == "pending"  # waiting for its signal
    WorkflowRun.objects.cancel(child)
    drain()
    run.refresh_from_db()
    assert run.status == "completed"
    assert run.output["failed"]["message"] == f"child run {child.pk} (waiter) was canceled"


def test_a_child_timeout_fails_the_step_and_the_child_keeps_running():
    run = parent.start(
        {"child": "waiter", "child_input": {"signal": "never"}, "timeout": "1h", "catch": True}
    )
    drain(time_travel=False)
    run.refresh_from_db()
    child = child_of(run)
    assert run.status == "pending"
    assert run.available_at is not None  # parked until the timeout
    drain()  # time travel: the hour passes
    run.refresh_from_db()
    assert run.status == "completed"
    assert run.output["failed"]["type"] == "ChildWorkflowTimeout"
    assert run.output["failed"]["message"] == (
        f'step "waiter" timed out waiting for child run {child.pk}; the child keeps running'
    )
    child.refresh_from_db()
    assert child.status == "pending"


def test_cancelling_a_parent_cancels_its_unfinished_children():
    run = parent.start({"child": "waiter", "child_input": {"signal": "never"}})
    drain()
    child = child_of(run)
    WorkflowRun.objects.cancel(run)
    child.refresh_from_db()
    assert child.status == WorkflowRun.Status.CANCELED
    assert child.events.get().action == "cancel"


@pytest.mark.parametrize(
    "delete",
    [lambda child: child.delete(), lambda child: WorkflowRun.objects.filter(pk=child.pk).delete()],
    ids=["instance", "queryset"],
)
def test_deleting_a_waiting_child_fails_its_parents_step_instead_of_leaving_it_waiting(delete):
    run = parent.start({"child": "waiter", "child_input": {"signal": "never"}})
    drain()
    child = child_of(run)
    child_id = child.pk
    delete(child)
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.error["message"] == (
        'step "waiter" failed after 1 attempt: ChildWorkflowMissing: the child run of step '
        '"waiter" no longer exists'
    )
    assert not WorkflowRun.objects.filter(pk=child_id).exists()


def test_a_parent_that_fails_leaves_its_children_running():
    run = parent.start({"child": "waiter", "child_input": {"signal": "never"}, "timeout": "10ms"})
    drain()
    run.refresh_from_db()
    assert run.status == "failed"
    assert child_of(run).status == "pending"


def test_resuming_a_parent_whose_child_failed_starts_a_new_child():
    run = parent.start({"child": "fails-at-once"})
    drain()
    first_child = child_of(run)
    WorkflowRun.objects.resume(run)
    drain()
    children = WorkflowRun.objects.filter(parent_step_attempt__workflow_run=run)
    assert children.count() == 2
    assert first_child.pk in {c.pk for c in children}
    attempts = list(
        StepAttempt.objects.filter(workflow_run=run).values_list("resume_generation", "status")
    )
    assert attempts == [(0, "failed"), (1, "failed")]


def test_completed_child_steps_are_not_started_again_on_replay():
    run = parent.start({"child": "echo", "child_input": 3})
    drain()
    run.refresh_from_db()
    assert run.status == "completed"
    assert WorkflowRun.objects.filter(parent_step_attempt__workflow_run=run).count() == 1
    assert SideEffect.objects.filter(run_id=run.pk, step="after").count() == 1


def test_a_child_past_its_deadline_wakes_its_parent():
    run = parent.start({"child": "waiter", "child_input": {"signal": "never"}, "catch": True})
    drain()
    child = child_of(run)
    WorkflowRun.objects.filter(pk=child.pk).update(deadline_at=timezone.now())
    assert get_store().fail_overdue("default") == 1
    run.refresh_from_db()
    assert WorkflowRun.objects.due().filter(pk=run.pk).exists()
    drain()
    run.refresh_from_db()
    assert run.output["failed"]["message"].endswith(
        "failed: DeadlineExceeded: "
        + ("deadline passed: the run did not finish before its deadline_at")
    )


@pytest.mark.parametrize(
    ("child", "message"),
    [
        (42, "run_workflow() needs a workflow or its name, not 42"),
        ("", "run_workflow() needs a workflow or its name, not ''"),
    ],
)
def test_bad_child_arguments_are_refused(child, message):
    run = parent.start({"child": child})
    run = claim_and_execute()
    assert run.status == "failed"
    assert run.error == {**run.error, "type": "TypeError", "message": message}


def test_a_non_json_child_input_is_a_type_error_naming_the_step():
    run = parent.start({"child": "echo", "child_input": [1, 2], "as_tuple": True})
    run = claim_and_execute()
    assert run.status == "failed"
    assert run.error["type"] == "TypeError"
    assert run.error["message"] == (
        'input of child workflow step "echo" is not a JSON value: $ is a builtins.tuple ((1, 2))'
    )
    assert not StepAttempt.objects.filter(workflow_run=run).exists()


def test_cancel_of_a_finished_child_is_still_refused():
    run = parent.start({"child": "echo", "child_input": 1})
    drain()
    with pytest.raises(InvalidTransition):
        WorkflowRun.objects.cancel(child_of(run))


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            {"length": 299, "nul": True},
            "child workflow name 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'… is 300 characters; "
            "at most 255",
        ),
        (
            {"length": 3, "nul": True, "step": "start-child"},
            "child workflow name of step \"start-child\" 'xxx\\x00' contains the character "
            "U+0000 (NUL), which PostgreSQL cannot store",
        ),
    ],
    ids=["too-long", "nul"],
)
def test_a_child_workflow_name_no_column_can_hold_fails_the_run_before_anything_is_stored(
    given, message
):
    run = bad_child_name.start(given)
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.FAILED
    assert (run.error["type"], run.error["message"]) == ("ValueError", message)
    assert list(WorkflowRun.objects.values_list("pk", flat=True)) == [run.pk]  # no child
    assert not StepAttempt.objects.filter(workflow_run=run).exists()


def test_deleting_a_completed_child_before_its_parent_read_it_keeps_its_output():
    run = parent.start({"child": "echo", "child_input": {"n": 3}})
    claim_and_execute()  # the parent starts its child and parks
    claim_and_execute()  # the child completes and wakes its parent, which has not read it yet
    child_of(run).delete()
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"child": {"n": 3}})


def test_cancel_reaches_active_runs_below_a_child_that_already_failed():
    run = parent.start(
        {"child": "parent", "child_input": {"child": "waiter", "child_input": {"signal": "no"}}}
    )
    for _ in range(3):
        claim_and_execute()  # the parent, its child (a parent too), the grandchild waits
    child = child_of(run)
    grandchild = child_of(child)
    WorkflowRun.objects.filter(pk=child.pk).update(deadline_at=timezone.now())
    assert get_store().fail_overdue("default") == 1  # the grandchild keeps running
    WorkflowRun.objects.cancel(run)
    statuses = [WorkflowRun.objects.get(pk=r.pk).status for r in (run, child, grandchild)]
    assert statuses == ["canceled", "failed", "canceled"]
