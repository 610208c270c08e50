import uuid
from datetime import timedelta

import pytest
from django.db import transaction
from django.db.transaction import TransactionManagementError
from django.utils import timezone

from django_openworkflow import InvalidTransition, WorkflowCanceled, WorkflowError, WorkflowFailed
from django_openworkflow.exceptions import Refusal
from django_openworkflow.models import StepAttempt, WorkflowRun
from tests.conftest import claim_and_execute
from tests.testapp.workflows import echo

pytestmark = pytest.mark.django_db(transaction=True)


def test_result_returns_the_output_of_a_completed_run():
    run = echo.start({"n": 1})
    claim_and_execute()
    assert run.result(timeout=1) == {"n": 1}
    assert run.status == WorkflowRun.Status.COMPLETED


def test_result_raises_workflow_failed_with_the_error():
    run = WorkflowRun.objects.create(
        workflow_name="echo", status="failed", error={"type": "ValueError", "message": "bad"}
    )
    with pytest.raises(WorkflowFailed) as info:
        run.result(timeout=1)
    assert isinstance(info.value, WorkflowError)
    assert str(info.value) == f"run {run.pk} failed: ValueError: bad"
    assert info.value.error == {"type": "ValueError", "message": "bad"}


def test_result_raises_workflow_canceled():
    run = echo.start({"n": 1})
    WorkflowRun.objects.cancel(run)
    with pytest.raises(WorkflowCanceled) as info:
        run.result(timeout=1)
    assert str(info.value) == f"run {run.pk} was canceled"


def test_result_inside_the_transaction_that_started_the_run_says_so_at_once():
    with transaction.atomic():
        run = echo.start({"n": 1})
        copy = WorkflowRun.objects.get(pk=run.pk)  # fetched again: the same run
        for waiting in (run, copy):
            with pytest.raises(TransactionManagementError) as info:
                waiting.result(timeout=1)
            assert str(info.value) == (
                f"run {run.pk} is not committed yet: result() is waiting inside the transaction "
                "that started it, where no worker can see the run. Call result() after the "
                "atomic() block, or in transaction.on_commit()."
            )
    # committed: an ordinary wait
    with pytest.raises(TimeoutError) as timeout:
        run.result(timeout=0.05)
    assert str(timeout.value) == f"run {run.pk} did not finish within 0.05 s (it is pending)"


def test_a_wait_inside_a_transaction_that_times_out_names_the_transaction():
    run = echo.start({"n": 1})
    with transaction.atomic(), pytest.raises(TimeoutError) as info:
        run.result(timeout=0.05)
    assert str(info.value) == (
        f"run {run.pk} did not finish within 0.05 s (it is pending); result() was called "
        "inside transaction.atomic(): a run started in this transaction is seen by workers "
        "only after it commits"
    )


def test_result_times_out_on_an_unfinished_run():
    run = echo.start({"n": 1})
    with pytest.raises(TimeoutError) as info:
        run.result(timeout=0.1)
    assert str(info.value) == f"run {run.pk} did not finish within 0.1 s (it is pending)"


def test_str_and_absolute_url():
    run = WorkflowRun.objects.create(id=uuid.UUID(int=1), workflow_name="echo")
    assert str(run) == "echo 00000000-0000-0000-0000-000000000001 (pending)"
    assert run.get_absolute_url() == "/workflows/00000000-0000-0000-0000-000000000001/"
    attempt = StepAttempt.objects.create(workflow_run=run, step_name="charge")
    assert str(attempt) == "charge (running)"


def test_database_refuses_an_unknown_status():
    from django.db import IntegrityError

    with pytest.raises(IntegrityError):
        WorkflowRun.objects.create(workflow_name="echo", status="sleeping")


# --- can_resume / can_cancel: one rule for the managers, the querysets and the pages ---

DEADLINES = {
    "no deadline": None,
    "deadline ahead": timedelta(hours=1),
    "deadline passed": -timedelta(minutes=5),
}


@pytest.mark.parametrize("deadline", DEADLINES, ids=list(DEADLINES))
@pytest.mark.parametrize("status", WorkflowRun.Status.values)
def test_can_resume_and_can_cancel_agree_with_the_querysets_and_the_managers(status, deadline):
    delta = DEADLINES[deadline]
    run = WorkflowRun.objects.create(
        workflow_name="echo",
        status=status,
        deadline_at=None if delta is None else timezone.now() + delta,
    )
    resumable = WorkflowRun.objects.resumable().filter(pk=run.pk).exists()
    active = WorkflowRun.objects.active().filter(pk=run.pk).exists()
    expected_refusal = (
        Refusal.STATUS
        if status != "failed"
        else Refusal.DEADLINE
        if deadline == "deadline passed"
        else None
    )

    assert run.resume_refusal() is expected_refusal
    assert run.can_resume() is (expected_refusal is None) is resumable
    assert run.can_cancel() is (status in ("pending", "running")) is active
    assert run.cancel_refusal() is (None if active else Refusal.STATUS)

    # The managers decide by the same methods: they refuse exactly these, with that reason.
    for transition, allowed, refusal in [
        (WorkflowRun.objects.resume, run.can_resume(), run.resume_refusal()),
        (WorkflowRun.objects.cancel, run.can_cancel(), run.cancel_refusal()),
    ]:
        with transaction.atomic():
            try:
                transition(run.pk)
            except InvalidTransition as exc:
                assert (allowed, exc.reason, exc.status, exc.run_id) == (
                    False,
                    refusal,
                    status,
                    run.pk,
                )
            else:
                assert allowed
            transaction.set_rollback(True)  # the next transition sees the run unchanged


def test_a_new_deadline_is_judged_by_the_same_method():
    run = WorkflowRun.objects.create(
        workflow_name="echo", status="failed", deadline_at=timezone.now() - timedelta(minutes=5)
    )
    earlier = timezone.now() - timedelta(seconds=1)
    later = timezone.now() + timedelta(hours=1)

    assert run.resume_refusal(deadline_at=earlier) is Refusal.NEW_DEADLINE
    assert run.resume_refusal(deadline_at=later) is None
    with pytest.raises(InvalidTransition) as info:
        WorkflowRun.objects.resume(run, deadline_at=earlier)
    assert (info.value.reason, str(info.value.reason)) == (Refusal.NEW_DEADLINE, "new-deadline")
    assert WorkflowRun.objects.resume(run, deadline_at=later).status == "pending"
