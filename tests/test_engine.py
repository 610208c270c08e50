"""The engine: replay, steps, retries, deadlines, fencing, cancel (in-process, real database)."""

import threading
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models.functions import Now
from django.utils import timezone

from django_openworkflow import InvalidTransition
from django_openworkflow.engine import MAX_STEP_ATTEMPTS, Execution
from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowRunEvent
from django_openworkflow.registry import Workflow, get_workflow
from django_openworkflow.store import get_store
from django_openworkflow.worker import Worker
from tests.conftest import claim, claim_and_execute, drain, expire_lease, make_due
from tests.testapp.models import Ledger, SideEffect

pytestmark = pytest.mark.django_db(transaction=True)


def start(name, input=None, **kwargs):
    return get_workflow(name).start(input, **kwargs)


def effects(run, step=None):
    qs = SideEffect.objects.filter(run_id=run.pk)
    return qs.filter(step=step).count() if step else qs.count()


def attempts(run):
    return list(StepAttempt.objects.filter(workflow_run=run).order_by("id"))


# --- replay -------------------------------------------------------------------


def test_a_run_executes_its_steps_and_stores_each_result():
    run = start("three-steps", {"i": 4})
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.COMPLETED
    assert run.output == {"total": 3}
    assert run.worker_id is None
    assert run.claim_token is None
    assert run.finished_at is not None
    assert [(a.step_name, a.status, a.output) for a in attempts(run)] == [
        ("s0", "completed", {"i": 4, "step": 0}),
        ("s1", "completed", {"i": 4, "step": 1}),
        ("s2", "completed", {"i": 4, "step": 2}),
    ]


def test_sleep_parks_the_run_and_replay_does_not_repeat_finished_steps():
    run = start("sleeper", {"sleep": "1h"})
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.PENDING
    assert run.worker_id is None
    assert run.claim_token is None
    nap = StepAttempt.objects.get(workflow_run=run, step_name="nap")
    assert nap.kind == "sleep"
    assert nap.status == "running"
    assert run.available_at == nap.wake_at
    assert timedelta(minutes=59) < nap.wake_at - timezone.now() <= timedelta(hours=1)
    assert claim_and_execute() is None  # not due yet

    make_due(run)
    StepAttempt.objects.filter(pk=nap.pk).update(wake_at=Now())  # time travel: the hour passed
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.COMPLETED
    assert run.output == 2
    assert effects(run, "before") == 1
    assert effects(run, "after") == 1
    assert StepAttempt.objects.get(pk=nap.pk).status == "completed"


def test_a_run_woken_before_its_sleep_ends_parks_again():
    run = start("sleeper", {"sleep": "1h"})
    claim_and_execute()
    make_due(run)
    run = claim_and_execute()
    nap = StepAttempt.objects.get(workflow_run=run, step_name="nap")
    assert run.status == WorkflowRun.Status.PENDING
    assert run.available_at == nap.wake_at
    assert effects(run, "before") == 1
    assert StepAttempt.objects.filter(workflow_run=run).count() == 2


def test_zero_sleep_completes_at_once():
    run = start("sleeper", {"sleep": 0})
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.COMPLETED
    assert StepAttempt.objects.get(workflow_run=run, step_name="nap").status == "completed"


def test_repeated_step_names_are_numbered_and_explicit_names_are_kept():
    run = start("repeated-names")
    run = claim_and_execute()
    assert run.output == ["a", "b", "c", "d", "e"]
    assert [a.step_name for a in attempts(run)] == ["x:1", "x", "x:2", "x:3", "x:2:1"]


# --- step retries ----------------------------------------------------------------


def test_step_retry_delays_follow_the_formula():
    run = start("flaky", {"failures": 3, "initial": "1s"})
    expected = [1, 2, 4]  # initial * 2 ** (k - 1)
    for k, seconds in enumerate(expected, start=1):
        run = claim_and_execute()
        failed = attempts(run)[-1]
        assert failed.status == "failed"
        assert failed.error["message"] == f"boom {k}"
        assert run.status == WorkflowRun.Status.PENDING
        assert run.attempts == 0  # step retries do not use the workflow budget
        assert run.worker_id is None
        delay = (run.available_at - failed.finished_at).total_seconds()
        assert delay == pytest.approx(seconds, abs=0.15)
        make_due(run)
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.COMPLETED
    assert run.output == 4
    assert effects(run, "flaky") == 4


def test_an_exhausted_step_fails_the_run_with_the_step_error():
    run = start("flaky", {"failures": 5, "attempts": 2})
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.error["type"] == "StepFailed"
    assert run.error["step"] == "flaky"
    assert run.error["message"] == 'step "flaky" failed after 2 attempts: ValueError: boom 2'
    assert "boom 2" in run.error["traceback"]
    assert run.attempts == 0  # StepFailed is not retried by the workflow policy
    assert effects(run, "flaky") == 2


def test_step_failed_can_be_caught_and_is_raised_again_on_replay_without_running():
    run = start("catches-step-failure")
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED
    assert run.output == {"compensated": 'step "bad" failed after 2 attempts: RuntimeError: always'}
    assert effects(run, "bad") == 2


def test_default_step_policy_allows_ten_attempts():
    run = start("flaky", {"failures": 100, "initial": 0})
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.FAILED
    assert effects(run, "flaky") == 10


# --- workflow retries -------------------------------------------------------------


def test_default_workflow_policy_fails_the_run_at_the_first_error():
    run = start("fails-at-once")
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.attempts == 1
    assert run.error["type"] == "LookupError"
    assert run.error["message"] == "no such order"


def test_workflow_retry_policy_counts_escaped_exceptions():
    run = start("workflow-retries")
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.PENDING
    assert run.attempts == 1
    assert run.error["type"] == "KeyError"  # shown while the run waits for its retry
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.attempts == 3
    assert run.error["message"] == "'workflow code failed'"
    assert effects(run, "first") == 1


def test_workflow_retry_that_succeeds_clears_the_error():
    run = start("fails-once")
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED
    assert run.error is None
    assert run.attempts == 1
    assert effects(run, "step") == 1


# --- JSON values -----------------------------------------------------------------


def test_a_non_json_step_result_fails_at_once_without_retries():
    run = start("bad-result")
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.error["type"] == "TypeError"
    assert run.error["message"] == (
        f'step "bad" of run {run.pk} returned a value that is not JSON: '
        "$ is a builtins.set ({1, 2})"
    )
    assert effects(run, "bad") == 1
    [attempt] = attempts(run)
    assert attempt.status == "failed"
    assert attempt.error["retryable"] is False


def test_a_non_json_step_result_raises_the_same_type_error_on_replay_without_calling_fn():
    run = start("json-then-sleep")
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED
    assert run.output == (
        f'step "bad" of run {run.pk} returned a value that is not JSON: '
        "$ is a datetime.date (datetime.date(2026, 1, 1))"
    )
    assert effects(run, "bad") == 1


# --- step.atomic ------------------------------------------------------------------


def test_atomic_step_that_raises_leaves_no_row():
    run = start("atomic-writer", {"fail": True})
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.FAILED
    assert Ledger.objects.count() == 0


def test_atomic_step_commits_its_row_with_the_completed_attempt():
    run = start("atomic-writer", {"fail": False})
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.COMPLETED
    assert run.output == 1
    assert Ledger.objects.filter(run_id=run.pk).count() == 1
    [attempt] = attempts(run)
    assert (attempt.status, attempt.output) == ("completed", 1)


def _execute_in_thread(claimed):
    def target():
        try:
            Execution(claimed, get_workflow(claimed.run.workflow_name)).execute()
        finally:
            connection.close()

    thread = threading.Thread(target=target)
    thread.start()
    return thread


def _wait_for_attempt(run, step, status="running", timeout=10.0):
    import time

    end = time.monotonic() + timeout
    while not StepAttempt.objects.filter(workflow_run=run, step_name=step, status=status).exists():
        assert time.monotonic() < end, f"no {status} attempt of {step}"
        time.sleep(0.02)


def _take_over(claimed, worker_id="worker-b"):
    """Another worker claims the run after its lease expired."""
    expire_lease(claimed.run)
    again = claim(claimed.run.workflow_name, worker_id=worker_id)
    assert [c.run_id for c in again] == [claimed.run_id]
    return again[0]


@pytest.mark.parametrize(
    "atomic",
    [
        False,
        # On SQLite a step.atomic holds the database write lock, so nobody can take over.
        pytest.param(True, marks=pytest.mark.row_locks),
    ],
    ids=["run", "atomic"],
)
def test_a_worker_whose_lease_was_taken_over_cannot_complete_its_step(tmp_path, atomic):
    flag = tmp_path / "go"
    start("waits-for-file", {"path": str(flag), "atomic": atomic})
    [claim_a] = claim("waits-for-file", worker_id="worker-a")
    run_a = claim_a.run
    thread = _execute_in_thread(claim_a)
    _wait_for_attempt(run_a, "block")
    run_b = _take_over(claim_a)
    flag.touch()
    thread.join(10)
    assert not thread.is_alive()
    block = StepAttempt.objects.get(workflow_run=run_a, step_name="block")
    assert block.status == "running"  # A's completion was refused
    assert Ledger.objects.count() == 0  # and its atomic writes rolled back
    assert not StepAttempt.objects.filter(step_name="last").exists()
    current = WorkflowRun.objects.get(pk=run_a.pk)
    assert (current.status, current.worker_id, current.claim_token) == (
        "running",
        "worker-b",
        run_b.token,
    )

    # B replays: A's attempt is lost, the step runs again, finished steps do not.
    Execution(run_b, get_workflow("waits-for-file")).execute()
    current.refresh_from_db()
    assert current.status == WorkflowRun.Status.COMPLETED
    block.refresh_from_db()
    assert (block.status, block.error["type"]) == ("failed", "WorkerLost")
    assert effects(current, "first") == 1
    # A step.atomic's own writes (the side effect too) rolled back with A's refused completion.
    assert effects(current, "block") == (1 if atomic else 2)
    assert Ledger.objects.count() == (1 if atomic else 0)


def test_the_same_worker_claiming_again_fences_out_its_older_claim():
    run = start("echo", {"x": 1})
    [old] = claim("echo", worker_id="worker-a")
    new = _take_over(old, worker_id="worker-a")
    assert new.token != old.token
    Execution(old, get_workflow("echo")).execute()
    assert StepAttempt.objects.filter(workflow_run=run).count() == 0
    run.refresh_from_db()
    assert (run.status, run.claim_token) == ("running", new.token)


def test_fenced_transitions_refuse_a_stale_token():
    run = start("echo", {"x": 1})
    [old] = claim("echo", worker_id="worker-a")
    new = _take_over(old)
    store = get_store()
    assert not store.finish(old, "completed", output=1)
    assert not store.finish(old, "failed", error={"type": "X"})
    assert not store.park(old, timezone.now())
    with store.atomic():
        assert not store.fence(old)
    assert not store.release(old)
    run.refresh_from_db()
    assert (run.status, run.output, run.error, run.claim_token) == (
        "running",
        None,
        None,
        new.token,
    )


def test_a_step_left_running_by_a_dead_worker_counts_against_its_budget():
    run = start("flaky", {"failures": 0, "attempts": 1})
    # what a worker that died mid-step leaves behind: a started run, a running attempt
    WorkflowRun.objects.filter(pk=run.pk).update(started_at=Now())
    StepAttempt.objects.create(workflow_run=run, step_name="flaky", kind="run")
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.error["message"].startswith('step "flaky" failed after 1 attempt: WorkerLost: ')
    assert effects(run, "flaky") == 0


# --- the attempt cap ----------------------------------------------------------------


def test_a_run_fails_after_1000_step_attempts():
    run = start("many-steps", {"n": MAX_STEP_ATTEMPTS + 5})
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.error == {
        "type": "AttemptCapExceeded",
        "message": f"run {run.pk} reached the cap of 1000 step attempts",
    }
    assert StepAttempt.objects.filter(workflow_run=run).count() == MAX_STEP_ATTEMPTS


# --- deadlines ------------------------------------------------------------------------


def test_a_run_past_its_deadline_is_not_claimed_and_fails():
    run = start("echo", {"x": 1}, deadline_at=timezone.now() - timedelta(seconds=1))
    assert claim_and_execute() is None
    assert get_store().fail_overdue("default") == 1
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.error["type"] == "DeadlineExceeded"
    assert "deadline" in run.error["message"]


def test_a_running_run_past_its_deadline_fails_at_the_next_step():
    run = start("three-steps", {"i": 1}, deadline_at=timezone.now() + timedelta(hours=1))
    [claimed] = claim("three-steps", worker_id="w")
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=Now() - timedelta(seconds=1))
    Execution(claimed, get_workflow("three-steps")).execute()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.error["type"] == "DeadlineExceeded"
    assert effects(run) == 0


def test_a_running_run_past_its_deadline_is_failed_by_the_sweep_and_its_worker_fenced(tmp_path):
    flag = tmp_path / "go"
    run = start(
        "waits-for-file", {"path": str(flag)}, deadline_at=timezone.now() + timedelta(hours=1)
    )
    [claimed] = claim("waits-for-file", worker_id="w")
    thread = _execute_in_thread(claimed)
    _wait_for_attempt(run, "block")
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=Now() - timedelta(seconds=1))
    assert get_store().fail_overdue("default") == 1
    flag.touch()
    thread.join(10)
    assert not thread.is_alive()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.error["type"] == "DeadlineExceeded"
    block = StepAttempt.objects.get(workflow_run=run, step_name="block")
    # the sweep failed "block" with the deadline; its function then returned, and the
    # fenced-out worker stored that result (a resume does not run it again)
    assert (block.status, block.error) == ("completed", None)
    assert not StepAttempt.objects.filter(workflow_run=run, step_name="last").exists()


def test_a_retry_that_would_start_after_the_deadline_is_not_made():
    run = start(
        "flaky",
        {"failures": 5, "initial": "10s"},
        deadline_at=timezone.now() + timedelta(seconds=5),
    )
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.error["type"] == "DeadlineExceeded"
    assert run.error["message"] == (
        "deadline passed: the next retry would start after the run's deadline_at; "
        "last error: ValueError: boom 1"
    )
    assert effects(run, "flaky") == 1


# --- cancel ----------------------------------------------------------------------------


def test_cancel_a_pending_run():
    run = start("echo", {"x": 1})
    canceled = WorkflowRun.objects.cancel(run.pk)
    assert canceled.status == WorkflowRun.Status.CANCELED
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.CANCELED
    assert run.finished_at is not None
    [event] = run.events.all()
    assert (event.action, event.by) == (WorkflowRunEvent.Action.CANCEL, None)
    assert claim_and_execute() is None


def test_cancel_a_running_run_stops_it_at_the_next_step(tmp_path):
    flag = tmp_path / "go"
    run = start("waits-for-file", {"path": str(flag)})
    [claimed] = claim("waits-for-file", worker_id="w")
    thread = _execute_in_thread(claimed)
    _wait_for_attempt(run, "block")
    WorkflowRun.objects.cancel(run)
    flag.touch()
    thread.join(10)
    assert not thread.is_alive()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.CANCELED
    assert run.output is None
    block = StepAttempt.objects.get(workflow_run=run, step_name="block")
    assert (block.status, block.error["type"]) == ("failed", "WorkflowCanceled")
    assert not StepAttempt.objects.filter(workflow_run=run, step_name="last").exists()


@pytest.mark.parametrize("status", ["completed", "failed", "canceled"])
def test_cancel_a_finished_run_is_an_invalid_transition(status):
    run = WorkflowRun.objects.create(workflow_name="echo", status=status)
    with pytest.raises(InvalidTransition) as info:
        WorkflowRun.objects.cancel(run)
    assert str(info.value) == (
        f"cannot cancel run {run.pk}: it is {status}; only pending or running runs can be canceled"
    )
    run.refresh_from_db()
    assert run.status == status
    assert not run.events.exists()


def test_cancel_an_unknown_run_raises_does_not_exist():
    with pytest.raises(WorkflowRun.DoesNotExist):
        WorkflowRun.objects.cancel(uuid.uuid4())


# --- unknown workflows -----------------------------------------------------------------


def test_a_run_of_a_workflow_this_worker_does_not_know_is_left_alone():
    not_deployed = Workflow(lambda ctx: None, name="deployed-elsewhere")
    run = not_deployed.start({"x": 1})
    Worker(concurrency=2, burst=True).run()  # exits: nothing this worker knows is due
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.PENDING
    assert run.worker_id is None
    assert run.error is None


def test_a_bad_sleep_duration_is_a_value_error_naming_the_step():
    run = start("bad-sleep")
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.error["type"] == "ValueError"
    assert run.error["message"] == "duration of sleep \"nap\" '-5s' is not a duration: " + (
        "use a number with a unit (ms, s, m, h, d), e.g. '250ms', '10s', '5m', '2h', '7d'"
    )


def test_a_sleep_past_the_year_9999_is_a_value_error_naming_the_step():
    start("huge-sleep")
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.error["type"] == "ValueError"
    message = 'sleep "nap" (3000000 days, 0:00:00) would end after the year 9999'
    assert run.error["message"] == message


def test_the_context_carries_input_run_id_and_version():
    run = start("context", {"a": [1, 2]})
    run = claim_and_execute()
    assert run.output == {"run_id": str(run.pk), "version": "v3", "input": {"a": [1, 2]}}


@pytest.mark.postgres
@pytest.mark.parametrize("prepared", [None, True, False])
def test_the_postgres_fast_path_prepares_its_statements_unless_told_not_to(prepared):
    from django.test import override_settings

    from django_openworkflow.pooler import behind_pooler

    if behind_pooler("default"):
        pytest.skip("behind a pooler, pg_prepared_statements is some server session's")
    with override_settings(OPENWORKFLOW={"PREPARED_STATEMENTS": prepared}):
        run = start("three-steps", {"i": 1})
        run = claim_and_execute()
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s",
                ["%INSERT INTO django_openworkflow_stepattempt%"],
            )
            [count] = cursor.fetchone()
    assert run.status == "completed"
    assert (count > 0) is (prepared is not False)  # None: prepared, not behind a pooler


# --- payload size limit -----------------------------------------------------------


@pytest.fixture
def small_payloads(settings):
    settings.OPENWORKFLOW = {"MAX_PAYLOAD_BYTES": 100}


def test_a_too_large_input_is_refused_at_start(small_payloads):
    with pytest.raises(ValueError) as info:
        start("echo", {"blob": "x" * 200})
    assert str(info.value) == (
        'input of workflow "echo" is too large: it is 211 bytes of JSON, '
        "more than OPENWORKFLOW['MAX_PAYLOAD_BYTES'] (100)"
    )
    assert not WorkflowRun.objects.exists()


def test_a_too_large_step_result_fails_at_once_and_again_on_replay(small_payloads):
    run = start("big-result", {"size": 500})
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.error["type"] == "ValueError"
    assert run.error["message"] == (
        f'step "big" of run {run.pk} returned a value that is too large: it is 502 bytes '
        "of JSON, more than OPENWORKFLOW['MAX_PAYLOAD_BYTES'] (100)"
    )
    [attempt] = attempts(run)
    assert (attempt.status, attempt.error["retryable"]) == ("failed", False)
    assert effects(run, "big") == 1


def test_a_small_enough_result_passes_the_limit(small_payloads):
    run = start("big-result", {"size": 50})
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.COMPLETED


# --- determinism ---------------------------------------------------------------------


def test_steps_record_their_place_in_the_call_order():
    run = start("three-steps", {"i": 1})
    run = claim_and_execute()
    assert [(a.step_name, a.position) for a in attempts(run)] == [("s0", 0), ("s1", 1), ("s2", 2)]


def test_a_workflow_that_calls_its_steps_in_another_order_on_replay_fails_clearly():
    run = start("changes-order")
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.PENDING  # "a" ran, now sleeping
    SideEffect.objects.create(run_id=run.pk, step="flip")
    make_due(run)
    StepAttempt.objects.filter(workflow_run=run, step_name="pause").update(wake_at=Now())
    run = claim_and_execute()
    assert run.status == WorkflowRun.Status.FAILED
    assert run.error == {
        "type": "NonDeterministicWorkflow",
        "message": f'run {run.pk} called step "b" as step call #1, where an earlier execution '
        'called "a": the workflow function must call its steps in the same order every time '
        "it is replayed (to change a workflow under running runs, branch on ctx.version)",
    }
    assert effects(run, "b") == 0  # refused before running the step


def test_an_unchanged_order_replays_normally():
    run = start("changes-order")
    claim_and_execute()
    make_due(run)
    StepAttempt.objects.filter(workflow_run=run, step_name="pause").update(wake_at=Now())
    run = claim_and_execute()
    assert (run.status, run.output) == ("completed", 2)


# --- BaseException from user code -----------------------------------------------------

BASE_EXCEPTION_TYPES = [("cancelled", "CancelledError"), ("boom", "Boom"), ("exit", "SystemExit")]


@pytest.mark.parametrize(("raised", "kind"), BASE_EXCEPTION_TYPES)
def test_a_base_exception_from_a_step_is_a_failure_of_the_step(raised, kind):
    start("step-raises-base-exception", {"raise": raised})
    run = claim_and_execute()
    assert (run.status, run.claim_token) == (WorkflowRun.Status.PENDING, None)  # retry at 10 ms
    make_due(run)
    run = claim_and_execute()
    assert (run.status, run.error["type"], run.error["step"]) == ("failed", "StepFailed", "step")
    assert [(a.status, a.error["type"]) for a in attempts(run)] == [("failed", kind)] * 2
    assert effects(run, "step") == 2


@pytest.mark.parametrize(("raised", "kind"), BASE_EXCEPTION_TYPES)
def test_a_base_exception_from_the_workflow_function_is_a_failure_of_the_run(raised, kind):
    start("workflow-raises-base-exception", {"raise": raised})
    run = claim_and_execute()
    assert (run.status, run.attempts, run.error["type"]) == ("pending", 1, kind)
    make_due(run)
    run = claim_and_execute()
    assert (run.status, run.attempts, run.error["type"]) == ("failed", 2, kind)
    assert run.claim_token is None


def test_keyboard_interrupt_from_a_step_interrupts_the_pass_and_is_no_failure():
    run = start("interrupted-once")
    with pytest.raises(KeyboardInterrupt):
        claim_and_execute()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.RUNNING  # as if the process had stopped here
    assert [a.status for a in attempts(run)] == ["running"]


def test_each_attempt_records_the_worker_whose_claim_stored_it():
    """StepAttempt.worker_id: the step's and the sleep's from one worker, the next from another
    (the run page and the task backend's worker_ids read it)."""
    run = get_workflow("sleeper").start({"sleep": "1h"})
    claim_and_execute(worker_id="worker-a")
    StepAttempt.objects.filter(workflow_run=run, step_name="nap").update(wake_at=Now())
    make_due(run)  # time travel: the hour passed
    claim_and_execute(worker_id="worker-b")

    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED
    stored = list(run.step_attempts.order_by("id").values_list("step_name", "worker_id"))
    assert stored == [("before", "worker-a"), ("nap", "worker-a"), ("after", "worker-b")]
