"""WorkflowRun.objects.resume(): the rules of SPEC section 4, on SQLite and PostgreSQL."""

import threading
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.utils import timezone

from django_openworkflow import InvalidTransition, WorkflowError
from django_openworkflow.engine import MAX_STEP_ATTEMPTS
from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowRunEvent
from django_openworkflow.registry import get_workflow
from tests.conftest import backend_pid, drain, wait_until_blocked
from tests.testapp.models import SideEffect

pytestmark = pytest.mark.django_db(transaction=True)


def failed_run(name, input=None, **kwargs):
    run = get_workflow(name).start(input, **kwargs)
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.FAILED, run.error
    return run


def effects(run, step):
    return SideEffect.objects.filter(run_id=run.pk, step=step).count()


def test_resume_sends_a_failed_run_back_to_the_queue_and_records_it():
    run = failed_run("reserve-then-charge", {"failures": 1})
    cleared = run.error
    user = get_user_model().objects.create_user("ops")
    resumed = WorkflowRun.objects.resume(run.pk, by=user)
    assert resumed.pk == run.pk
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.PENDING
    assert (run.error, run.worker_id, run.started_at, run.finished_at) == (None, None, None, None)
    assert run.attempts == 0
    assert run.resume_generation == 1
    assert run.available_at <= timezone.now()
    assert WorkflowRun.objects.due().filter(pk=run.pk).exists()
    [event] = run.events.all()
    assert (event.action, event.by, event.cleared_error) == ("resume", user, cleared)
    assert event.at is not None


def test_resume_keeps_history_and_does_not_repeat_completed_steps():
    run = failed_run("reserve-then-charge", {"failures": 1})
    WorkflowRun.objects.resume(run)
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED
    assert run.output == "charged"
    assert effects(run, "reserve") == 1
    assert effects(run, "charge") == 2
    history = [
        (a.step_name, a.status, a.resume_generation)
        for a in StepAttempt.objects.filter(workflow_run=run).order_by("id")
    ]
    assert history == [
        ("reserve", "completed", 0),
        ("charge", "failed", 0),
        ("charge", "completed", 1),
    ]


def test_the_failed_step_gets_its_whole_retry_budget_again():
    run = failed_run("flaky", {"failures": 3, "attempts": 2})
    assert effects(run, "flaky") == 2
    WorkflowRun.objects.resume(run)
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED  # attempts 3 (fails) and 4 (succeeds)
    assert run.output == 4
    generations = list(
        StepAttempt.objects.filter(workflow_run=run)
        .order_by("id")
        .values_list("resume_generation", "status")
    )
    assert generations == [(0, "failed"), (0, "failed"), (1, "failed"), (1, "completed")]


def test_a_resumed_run_that_fails_again_can_be_resumed_again():
    run = failed_run("flaky", {"failures": 10, "attempts": 2})
    WorkflowRun.objects.resume(run)
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.error["message"] == 'step "flaky" failed after 2 attempts: ValueError: boom 4'
    WorkflowRun.objects.resume(run)
    run.refresh_from_db()
    assert run.resume_generation == 2
    assert run.events.filter(action="resume").count() == 2


def test_the_workflow_attempt_counter_starts_again():
    run = failed_run("workflow-retries")
    assert run.attempts == 3
    WorkflowRun.objects.resume(run)
    run.refresh_from_db()
    assert run.attempts == 0
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.attempts == 3
    assert effects(run, "first") == 1


def test_the_attempt_cap_counts_only_the_current_generation():
    run = failed_run("many-steps", {"n": MAX_STEP_ATTEMPTS + 3})
    assert run.error["type"] == "AttemptCapExceeded"
    WorkflowRun.objects.resume(run)
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED
    assert StepAttempt.objects.filter(workflow_run=run, resume_generation=1).count() == 3


def test_a_step_refused_for_a_non_json_result_is_called_again_after_resume():
    run = failed_run("bad-result")
    WorkflowRun.objects.resume(run)
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.FAILED  # the code still returns a set
    assert effects(run, "bad") == 2


@pytest.mark.parametrize("status", ["pending", "running", "completed", "canceled"])
def test_only_failed_runs_can_be_resumed(status):
    run = WorkflowRun.objects.create(workflow_name="echo", status=status, worker_id="w")
    with pytest.raises(InvalidTransition) as info:
        WorkflowRun.objects.resume(run)
    assert isinstance(info.value, WorkflowError)
    assert str(info.value) == (
        f"cannot resume run {run.pk}: it is {status}; only failed runs can be resumed"
    )
    assert (info.value.run_id, info.value.status) == (run.pk, status)
    after = WorkflowRun.objects.get(pk=run.pk)
    assert (after.status, after.worker_id, after.resume_generation) == (status, "w", 0)
    assert not WorkflowRunEvent.objects.exists()


def test_resume_of_an_unknown_run_raises_does_not_exist():
    with pytest.raises(WorkflowRun.DoesNotExist):
        WorkflowRun.objects.resume(uuid.uuid4())


def test_a_run_past_its_deadline_needs_a_new_future_deadline():
    past = timezone.now() - timedelta(minutes=1)
    run = WorkflowRun.objects.create(workflow_name="echo", status="failed", deadline_at=past)
    with pytest.raises(InvalidTransition) as info:
        WorkflowRun.objects.resume(run)
    assert str(info.value) == (
        f"cannot resume run {run.pk}: its deadline_at {past.isoformat()} has passed; "
        "pass a future deadline_at= to resume it"
    )
    earlier = timezone.now() - timedelta(seconds=5)
    with pytest.raises(InvalidTransition) as info:
        WorkflowRun.objects.resume(run, deadline_at=earlier)
    assert str(info.value) == (
        f"cannot resume run {run.pk}: the new deadline_at {earlier.isoformat()} "
        "is not in the future"
    )
    assert WorkflowRun.objects.get(pk=run.pk).status == "failed"

    later = timezone.now() + timedelta(hours=1)
    WorkflowRun.objects.resume(run, deadline_at=later)
    run.refresh_from_db()
    assert (run.status, run.deadline_at) == ("pending", later)


def test_a_future_deadline_may_be_given_to_any_resume():
    run = failed_run("reserve-then-charge", {"failures": 1})
    later = timezone.now() + timedelta(hours=2)
    WorkflowRun.objects.resume(run, deadline_at=later)
    run.refresh_from_db()
    assert run.deadline_at == later


def test_bulk_resume_returns_the_resumed_runs_and_skips_the_rest():
    failed = [WorkflowRun.objects.create(workflow_name="echo", status="failed") for _ in range(2)]
    others = [
        WorkflowRun.objects.create(workflow_name="echo", status=status)
        for status in ("completed", "pending", "canceled")
    ]
    resumed = WorkflowRun.objects.all().resume()
    assert sorted(r.pk for r in resumed) == sorted(r.pk for r in failed)
    assert all(r.status == "pending" for r in resumed)
    assert [WorkflowRun.objects.get(pk=r.pk).status for r in others] == [
        "completed",
        "pending",
        "canceled",
    ]
    assert WorkflowRunEvent.objects.count() == 2


def test_bulk_cancel_returns_the_canceled_runs_and_skips_the_rest():
    active = [
        WorkflowRun.objects.create(workflow_name="echo", status=status)
        for status in ("pending", "running")
    ]
    WorkflowRun.objects.create(workflow_name="echo", status="completed")
    canceled = WorkflowRun.objects.all().cancel()
    assert sorted(r.pk for r in canceled) == sorted(r.pk for r in active)
    assert WorkflowRun.objects.filter(status="canceled").count() == 2


# --- PostgreSQL: row locks -------------------------------------------------------------


@pytest.mark.row_locks
def test_four_concurrent_resumes_resume_exactly_once():
    run = WorkflowRun.objects.create(workflow_name="echo", status="failed")
    barrier = threading.Barrier(4)
    outcomes = []

    def resume():
        try:
            barrier.wait()
            WorkflowRun.objects.resume(run.pk)
            outcomes.append("resumed")
        except InvalidTransition as exc:
            outcomes.append(str(exc))
        finally:
            connection.close()

    threads = [threading.Thread(target=resume) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    refused = f"cannot resume run {run.pk}: it is pending; only failed runs can be resumed"
    assert sorted(outcomes) == sorted(["resumed", refused, refused, refused])
    run.refresh_from_db()
    assert run.resume_generation == 1
    assert run.events.count() == 1


@pytest.mark.row_locks
@pytest.mark.parametrize("committed_status", ["failed", "completed"])
def test_resume_waits_for_a_row_lock_and_decides_on_the_committed_status(committed_status):
    run = WorkflowRun.objects.create(workflow_name="echo", status="failed")
    locked, release, connected = threading.Event(), threading.Event(), threading.Event()
    pids: dict[str, int] = {}
    outcome = []

    def hold_lock():
        try:
            pids["holder"] = backend_pid()
            with transaction.atomic():
                WorkflowRun.objects.select_for_update().get(pk=run.pk)
                locked.set()
                release.wait(10)
                WorkflowRun.objects.filter(pk=run.pk).update(status=committed_status)
        finally:
            connection.close()

    def resume():
        try:
            pids["resumer"] = backend_pid()
            connected.set()
            WorkflowRun.objects.resume(run.pk)
            outcome.append("resumed")
        except InvalidTransition as exc:
            outcome.append(str(exc))
        finally:
            connection.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    assert locked.wait(10)
    resumer = threading.Thread(target=resume)
    resumer.start()
    assert connected.wait(10)
    # waiting on the holder's row lock, not deciding on a stale read
    wait_until_blocked(pids["resumer"], by=pids["holder"])
    assert outcome == []
    release.set()
    holder.join(10)
    assert not holder.is_alive()
    resumer.join(10)
    assert not resumer.is_alive()
    run.refresh_from_db()
    if committed_status == "failed":
        assert outcome == ["resumed"]
        assert (run.status, run.resume_generation) == ("pending", 1)
    else:
        assert outcome == [
            f"cannot resume run {run.pk}: it is completed; only failed runs can be resumed"
        ]
        assert (run.status, run.resume_generation) == ("completed", 0)
        assert not run.events.exists()


@pytest.mark.postgres
def test_a_resumed_run_is_picked_up_at_once_by_a_waiting_worker(worker_process):
    run = failed_run("reserve-then-charge", {"failures": 1})
    proc = worker_process("--poll-interval", "600")
    proc.wait_until_idle()
    WorkflowRun.objects.resume(run)
    assert run.result(timeout=10) == "charged"
