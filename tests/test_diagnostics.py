"""The stuck-run detector (diagnostics.stuck_runs) and ``manage.py check_workflow_runs``.

Each stuck state is made with real rows: the engine runs the workflow as far
as it goes, then one UPDATE stands for the lost wake-up.
"""

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db.models.functions import Now
from django.test.utils import override_settings

from django_openworkflow import send_signal
from django_openworkflow.diagnostics import StuckRun, stuck_runs
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.testing import drain
from tests.conftest import claim_and_execute
from tests.testapp.models import SideEffect
from tests.testapp.workflows import changes_order, echo, parent, sleeper, three_steps, waiter

pytestmark = pytest.mark.django_db

WAKE_IT = (
    "make it due (set available_at to now) so a worker replays it, "
    "or cancel it (WorkflowRun.objects.cancel)"
)


def parked(workflow, input=None):
    """Start a run and execute it until it parks (or finishes)."""
    run = workflow.start(input)
    drain(time_travel=False)
    run.refresh_from_db()
    return run


def claimed(workflow, input=None):
    """Start a run and claim it without executing it: it is running under a lease."""
    run = workflow.start(input)
    [run] = WorkflowRun.objects.claim(
        worker_id="w1",
        workflow_names=[workflow.name],
        limit=1,
        lease_seconds=30,
        namespace="default",
    )
    return run


def shift(run, seconds):
    """Set the run's available_at ``seconds`` from now (negative: in the past)."""
    WorkflowRun.objects.filter(pk=run.pk).update(available_at=Now() + timedelta(seconds=seconds))


def finding(run, reason, message, action=WAKE_IT):
    return StuckRun(
        run_id=str(run.pk),
        workflow_name=run.workflow_name,
        namespace=run.namespace,
        reason=reason,
        message=message,
        action=action,
    )


def test_healthy_runs_are_not_reported():
    sleeping = parked(sleeper, {"sleep": "1h"})
    signal_wait = parked(waiter, {"signal": "go"})
    timed_wait = parked(waiter, {"signal": "later", "timeout": "1h"})
    with_child = parked(parent, {"child": "sleeper", "child_input": {"sleep": "1h"}})
    completed = parked(three_steps)
    woken = parked(waiter, {"signal": "now"})
    send_signal("now", 1)
    expired_now = claimed(echo, "x")
    shift(expired_now, -5)  # the next claim takes it over
    queued = three_steps.start()
    shift(queued, -3600)  # a backlog: any worker takes it
    WorkflowRun.objects.create(workflow_name="unknown", available_at=None, status="failed")

    assert [r.status for r in (sleeping, signal_wait, timed_wait, with_child)] == ["pending"] * 4
    assert completed.status == "completed"
    assert WorkflowRun.objects.get(pk=woken.pk).available_at is not None
    assert WorkflowRun.objects.filter(parent_step_attempt__isnull=False, status="pending").exists()
    assert stuck_runs() == []


def test_a_run_parked_without_a_wait_or_a_timer_is_reported():
    run = parked(sleeper, {"sleep": "1h"})
    WorkflowRun.objects.filter(pk=run.pk).update(available_at=None)
    # A wait with a timeout does not count: its run must sleep until the timeout.
    timed = parked(waiter, {"signal": "go", "timeout": "1h"})
    WorkflowRun.objects.filter(pk=timed.pk).update(available_at=None)

    message = (
        "pending with no available_at and no open wait for a child run or a signal without "
        "timeout: nothing will make it due"
    )
    assert stuck_runs() == [
        finding(run, "parked-without-wake", message),
        finding(timed, "parked-without-wake", message),
    ]


def test_a_wait_of_an_earlier_generation_does_not_keep_a_run_parked():
    run = parked(waiter, {"signal": "go"})
    WorkflowRun.objects.filter(pk=run.pk).update(resume_generation=1)

    assert [f.reason for f in stuck_runs()] == ["parked-without-wake"]


@pytest.mark.parametrize("child_end", ["completed", "failed", "canceled", "deleted"])
def test_a_parent_not_woken_by_its_finished_child_is_reported(child_end):
    run = parent.start({"child": "echo", "child_input": 1})
    claim_and_execute()  # the parent starts its child and parks; the child stays queued
    child = WorkflowRun.objects.get(parent_step_attempt__workflow_run=run)
    if child_end == "deleted":
        child.delete()  # this wakes the parent (a pre_delete receiver) ...
        WorkflowRun.objects.filter(pk=run.pk).update(available_at=None)  # ... undone here
        described = "was deleted"
    else:
        WorkflowRun.objects.filter(pk=child.pk).update(status=child_end)
        described = f"{child.pk} is {child_end}"

    assert stuck_runs() == [
        finding(
            run,
            "child-finished",
            f'step "echo" waits for a child run that has ended (child run {described}), '
            "but the run was not woken",
            "make it due (set available_at to now): its next pass reads the child's end",
        )
    ]


def test_a_parent_woken_by_its_child_is_not_reported():
    run = parent.start({"child": "echo", "child_input": 1})
    claim_and_execute()  # the parent: it starts its child and parks
    assert stuck_runs() == []
    claim_and_execute()  # the child: it completes and wakes the parent
    assert WorkflowRun.objects.get(pk=run.pk).available_at is not None
    assert stuck_runs() == []
    # A parent waiting with a timeout sleeps until then: late beyond the grace is stuck.
    WorkflowRun.objects.filter(pk=run.pk).update(available_at=Now() + timedelta(seconds=60))
    assert stuck_runs(grace=120) == []
    assert [f.reason for f in stuck_runs(grace=30)] == ["child-finished"]


@pytest.mark.parametrize("timeout", [None, "1h"])
def test_a_delivered_signal_that_did_not_wake_its_run_is_reported(timeout):
    run = parked(waiter, {"signal": "go", "timeout": timeout})
    StepAttempt.objects.filter(workflow_run=run, kind="signal_wait").update(
        status="completed", output={"data": 1}, finished_at=Now()
    )

    assert stuck_runs() == [
        finding(
            run,
            "signal-delivered",
            'signal "go" was delivered to step "go", but the run was not woken',
            "make it due (set available_at to now): its next pass reads the signal's data",
        )
    ]


def test_a_run_that_went_on_after_its_signal_is_not_reported():
    run = parked(waiter, {"signal": "go"})
    send_signal("go", 1)
    # Woken, then parked again for a workflow retry an hour later (its last step is the wait).
    WorkflowRun.objects.filter(pk=run.pk).update(available_at=Now() + timedelta(hours=1))

    assert stuck_runs() == []


def test_a_lease_expired_beyond_the_grace_is_reported():
    run = claimed(three_steps)
    shift(run, -31)
    run.refresh_from_db()

    assert stuck_runs(grace=40) == []
    assert stuck_runs() == [
        finding(
            run,
            "lease-expired",
            f"running, but the lease of worker w1 ended at {run.available_at.isoformat()} and "
            "no worker took the run over",
            "start a worker for its namespace (manage.py runworker --namespace default); "
            "it takes the run over",
        )
    ]


@pytest.mark.parametrize("status", ["pending", "running"])
def test_a_run_of_an_unknown_workflow_is_reported(status):
    run = WorkflowRun.objects.create(workflow_name="gone", status=status, worker_id="w1")
    shift(run, -60)
    run.refresh_from_db()

    assert stuck_runs() == [
        finding(
            run,
            "unknown-workflow",
            f'no worker knows workflow "gone": it is not registered (the run is {status} and '
            f"due since {run.available_at.isoformat()})",
            "deploy the code that defines the workflow (a workflows.py module, or runworker "
            "--workflows-module), or cancel the run",
        )
    ]


def test_a_running_step_of_a_finished_run_is_reported():
    run = parked(sleeper, {"sleep": "1h"})
    WorkflowRun.objects.filter(pk=run.pk).update(status="completed", available_at=None)
    run.refresh_from_db()

    assert stuck_runs() == [
        finding(
            run,
            "step-running-on-finished-run",
            'the run is completed but its step "nap" is still running: nothing will finish '
            "the step",
            "report it as a bug of django-openworkflow; the step is bookkeeping only (nothing "
            "executes it), so the run's result stands",
        )
    ]


def test_the_namespace_limits_the_search():
    run = parked(sleeper, {"sleep": "1h"})
    with override_settings(OPENWORKFLOW={"NAMESPACE": "other"}):
        other = parked(sleeper, {"sleep": "1h"})
    WorkflowRun.objects.update(available_at=None)

    assert [f.run_id for f in stuck_runs(namespace="other")] == [str(other.pk)]
    assert [f.run_id for f in stuck_runs(namespace="default")] == [str(run.pk)]
    assert len(stuck_runs()) == 2


# --- the command ------------------------------------------------------------------


def check(*args):
    out = StringIO()
    try:
        call_command("check_workflow_runs", *args, stdout=out)
    except SystemExit as exit:
        return exit.code, out.getvalue()
    return 0, out.getvalue()


def test_the_command_exits_0_when_nothing_is_stuck():
    parked(sleeper, {"sleep": "1h"})
    assert check() == (0, "no stuck runs\n")
    assert check("--json") == (0, "[]\n")


def test_the_command_lists_stuck_runs_and_exits_1():
    run = parked(sleeper, {"sleep": "1h"})
    WorkflowRun.objects.filter(pk=run.pk).update(available_at=None)

    assert check() == (
        1,
        f"run {run.pk} (sleeper, namespace default): parked-without-wake: pending with no "
        "available_at and no open wait for a child run or a signal without timeout: nothing "
        f"will make it due; to do: {WAKE_IT}\n1 stuck run\n",
    )
    code, out = check("--json")
    assert code == 1
    assert json.loads(out) == [
        {
            "run_id": str(run.pk),
            "workflow_name": "sleeper",
            "namespace": "default",
            "reason": "parked-without-wake",
            "message": "pending with no available_at and no open wait for a child run or a "
            "signal without timeout: nothing will make it due",
            "action": WAKE_IT,
        }
    ]
    assert check("--namespace", "other") == (0, "no stuck runs\n")


def test_the_command_passes_the_grace():
    run = claimed(three_steps)
    shift(run, -100)
    assert check("--grace", "200") == (0, "no stuck runs\n")
    assert check("--grace", "50")[0] == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [("-1", "must be zero or more seconds, not '-1'"), ("x", "must be a number of seconds")],
)
def test_the_command_refuses_a_bad_grace(value, message):
    with pytest.raises(CommandError, match=f"argument --grace: {message}"):
        call_command("check_workflow_runs", "--grace", value, stdout=StringIO())


# --- engine bugs the detector finds ------------------------------------------------


def test_a_wait_kept_open_on_a_run_failed_for_non_determinism_is_no_finding():
    run = changes_order.start()
    claim_and_execute()  # one pass: "a" ran; the run sleeps in "pause" (10 ms: drain() could
    # finish it in the same call on a slow database)
    SideEffect.objects.create(run_id=run.pk, step="flip")  # now it calls "b" first
    drain()
    run.refresh_from_db()
    assert run.error["type"] == "NonDeterministicWorkflow"

    assert stuck_runs() == []
