"""``WorkflowTaskBackend``: Django's task framework on durable runs (SPEC section 14).

The behaviours Django's own tests ask of a backend (enqueue, results, errors,
priorities, queues, context, signals), against ours: on Django 6 through
``django.tasks``, on Django 5.2 through the ``django-tasks`` backport. Runs are
executed by real (in-process) workers.
"""

from __future__ import annotations

import datetime
import socket
import uuid

import django
import pytest
from asgiref.sync import async_to_sync
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from django_openworkflow.models import WorkflowRun
from django_openworkflow.tasks import (
    TASK_WORKFLOW,
    InvalidTask,
    InvalidTaskBackend,
    TaskResultDoesNotExist,
    TaskResultStatus,
    WorkflowTaskBackend,
    task_backends,
    task_enqueued,
    task_finished,
    task_started,
)
from django_openworkflow.worker import Worker
from tests.conftest import drain, make_due
from tests.testapp import tasks
from tests.testapp.models import Ledger

try:
    from django.tasks import default_task_backend
    from django.tasks.exceptions import TaskResultMismatch
except ImportError:  # Django 5.2: the backport
    from django_tasks import default_task_backend
    from django_tasks.exceptions import TaskResultMismatch

pytestmark = pytest.mark.django_db(transaction=True)

EMAILS = {"QUEUES": {"default": {}, "emails": {"concurrency": 2}}, "POLL_INTERVAL": 0.2}


def run_of(result) -> WorkflowRun:
    return WorkflowRun.objects.get(pk=result.id)


def test_the_backend_is_ours_and_declares_what_it_supports():
    backend = task_backends["default"]
    assert isinstance(backend, WorkflowTaskBackend)
    assert default_task_backend.alias == "default"
    assert (
        backend.supports_defer,
        backend.supports_async_task,
        backend.supports_get_result,
        backend.supports_priority,
    ) == (True, True, True, True)


def test_enqueue_starts_a_run_of_the_task_workflow_and_the_worker_executes_it():
    result = tasks.echo.enqueue(1, "two", three=[3])

    assert result.status == TaskResultStatus.READY
    assert not result.is_finished
    assert (result.args, result.kwargs) == ([1, "two"], {"three": [3]})
    assert result.task == tasks.echo
    run = run_of(result)
    assert run.workflow_name == TASK_WORKFLOW
    assert (run.queue, run.priority, run.status) == ("default", 0, "pending")
    assert run.input["task"] == "tests.testapp.tasks.echo"
    pending = default_task_backend.get_result(result.id)
    assert (pending.status, pending.attempts, pending.started_at) == ("READY", 0, None)

    drain()

    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.is_finished
    assert result.return_value == {"args": [1, "two"], "kwargs": {"three": [3]}}
    assert result.attempts == 1
    assert result.errors == []
    assert result.enqueued_at <= result.started_at <= result.last_attempted_at
    assert result.last_attempted_at <= result.finished_at
    fetched = tasks.echo.get_result(result.id)
    assert fetched.task == tasks.echo
    assert (fetched.args, fetched.kwargs) == ([1, "two"], {"three": [3]})
    assert fetched.return_value == result.return_value


def test_a_task_returning_none_is_successful_with_none():
    result = tasks.noop_task.enqueue(1, two=3)
    drain()
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value is None


@pytest.mark.parametrize(
    ("task", "exception", "message"),
    [
        (tasks.failing_task_value_error, ValueError, "This Task failed due to ValueError"),
        (tasks.failing_task_system_exit, SystemExit, "This Task failed due to SystemExit"),
    ],
)
def test_an_exception_fails_the_task_after_one_attempt(task, exception, message):
    result = task.enqueue()
    drain()
    result.refresh()

    assert result.status == TaskResultStatus.FAILED
    with pytest.raises(ValueError, match="Task failed"):
        result.return_value  # noqa: B018
    assert result.attempts == 1  # Django's tasks promise no retries: one attempt by default
    assert len(result.errors) == 1
    assert result.errors[0].exception_class is exception
    assert result.errors[0].traceback.endswith(f"{exception.__name__}: {message}\n")
    assert result.started_at <= result.finished_at
    assert run_of(result).status == WorkflowRun.Status.FAILED


def test_the_error_names_a_projects_own_exception_class_by_its_dotted_path():
    result = tasks.failing_task_custom_error.enqueue(12)
    drain()
    result.refresh()
    error = result.errors[0]
    assert error.exception_class_path == "tests.testapp.tasks.PaymentDeclined"
    assert error.exception_class is tasks.PaymentDeclined
    assert "card declined for 12" in error.traceback


def test_an_exception_wrapping_an_exception_and_a_return_value_that_is_not_json():
    wrapped = tasks.complex_exception.enqueue()
    not_json = tasks.complex_return_value.enqueue()
    drain()

    wrapped.refresh()
    assert wrapped.status == TaskResultStatus.FAILED
    assert wrapped.errors[0].exception_class is ValueError
    assert "This task failed" in wrapped.errors[0].traceback
    not_json.refresh()
    assert not_json.status == TaskResultStatus.FAILED
    assert not_json.errors[0].exception_class is TypeError
    assert "Unsupported type" in not_json.errors[0].traceback


def test_takes_context_gets_the_result_of_its_own_run_and_the_attempt_number():
    own_id = tasks.get_task_id.enqueue()
    attempt = tasks.context_attempt.enqueue()
    drain()
    own_id.refresh()
    attempt.refresh()
    assert own_id.return_value == own_id.id
    assert attempt.return_value == {"attempt": 1, "status": "RUNNING"}


def test_the_backends_retry_policy_retries_with_the_steps_attempt_number():
    succeeds = tasks.flaky.enqueue(2)
    gives_up = tasks.flaky.enqueue(5)
    assert task_backends["retrying"].retry_policy.maximum_attempts == 3
    drain()  # waits out the 1 s and 2 s backoff

    succeeds.refresh()
    assert succeeds.status == TaskResultStatus.SUCCESSFUL
    assert succeeds.return_value == 2  # TaskContext.attempt was the step's: 1, then 2
    assert succeeds.attempts == 2
    assert len(succeeds.worker_ids) == 2
    assert all(worker.startswith(f"{socket.gethostname()}:") for worker in succeeds.worker_ids)
    assert [e.exception_class for e in succeeds.errors] == [ConnectionError]
    gives_up.refresh()
    assert gives_up.status == TaskResultStatus.FAILED
    assert gives_up.attempts == 3
    assert [e.traceback.splitlines()[-1] for e in gives_up.errors] == [
        f"ConnectionError: attempt {n} failed" for n in (1, 2, 3)
    ]


def test_priority_and_queue_go_to_the_run():
    with override_settings(OPENWORKFLOW=EMAILS):
        result = tasks.add.using(priority=50, queue_name="emails").enqueue(1, 2)
        run = run_of(result)
        assert (run.queue, run.priority) == ("emails", 50)
        fetched = default_task_backend.get_result(result.id)
        assert (fetched.task.queue_name, fetched.task.priority) == ("emails", 50)
        drain()
        result.refresh()
    assert result.return_value == 3


def test_higher_priority_runs_first():
    low = tasks.add.using(priority=-100).enqueue(1, 1)
    high = tasks.add.using(priority=100).enqueue(2, 2)
    drain(concurrency=1)
    low.refresh()
    high.refresh()
    assert high.started_at < low.started_at


def test_a_queue_not_in_openworkflow_queues_is_refused_as_django_refuses_one():
    with pytest.raises(InvalidTask, match="Queue 'unknown_queue' is not valid for backend"):
        tasks.noop_task.using(queue_name="unknown_queue").enqueue()
    with pytest.raises(InvalidTask, match="known queues: default"):
        tasks.noop_task.using(queue_name="unknown_queue")
    assert not WorkflowRun.objects.exists()


def test_the_backends_own_queues_list_is_enforced_too():
    queues = {
        "default": {"BACKEND": "django_openworkflow.tasks.WorkflowTaskBackend", "QUEUES": ["a"]}
    }
    with (
        override_settings(OPENWORKFLOW={"QUEUES": {"default": {}, "a": {}}}, TASKS=queues),
        pytest.raises(InvalidTask, match="Queue 'default' is not valid for backend"),
    ):
        tasks.noop_task.using(backend="default").enqueue()


def test_enqueue_and_aenqueue_check_the_queue_again():
    with override_settings(OPENWORKFLOW=EMAILS):
        task = tasks.noop_task.using(queue_name="emails")

    async def enqueue():
        return await task.aenqueue()

    with pytest.raises(InvalidTask, match="Queue 'emails' is not valid for backend"):
        task.enqueue()
    with pytest.raises(InvalidTask, match="Queue 'emails' is not valid for backend"):
        async_to_sync(enqueue)()
    assert not WorkflowRun.objects.exists()


def test_run_after_is_the_runs_available_at():
    later = timezone.now() + datetime.timedelta(hours=1)
    result = tasks.add.using(run_after=later).enqueue(2, 3)
    run = run_of(result)
    assert run.available_at == later
    assert default_task_backend.get_result(result.id).task.run_after == later
    Worker(burst=True, poll_interval=0.02).run()  # nothing is due: it waits for run_after
    result.refresh()
    assert result.status == TaskResultStatus.READY

    make_due(run)
    drain()
    result.refresh()
    assert result.return_value == 5


def test_enqueue_inside_a_transaction_is_atomic_with_it():
    with transaction.atomic():
        kept = tasks.write_ledger.enqueue(str(uuid.uuid4()), "kept")
    with pytest.raises(RuntimeError), transaction.atomic():
        dropped = tasks.write_ledger.enqueue(str(uuid.uuid4()), "dropped")
        raise RuntimeError("roll back")

    with pytest.raises(TaskResultDoesNotExist):
        default_task_backend.get_result(dropped.id)
    drain()
    kept.refresh()
    assert kept.return_value == "kept"
    assert list(Ledger.objects.values_list("note", flat=True)) == ["kept"]


def test_get_result_of_an_unknown_a_malformed_or_a_non_task_id_does_not_exist():
    from tests.testapp.workflows import echo

    other = echo.start()
    for result_id in (str(uuid.uuid4()), "not-an-id", str(other.pk), 123):
        with pytest.raises(TaskResultDoesNotExist):
            default_task_backend.get_result(result_id)


def test_get_result_through_another_task_is_a_mismatch():
    result = tasks.add.enqueue(1, 2)
    with pytest.raises(TaskResultMismatch):
        tasks.echo.get_result(result.id)


def test_aenqueue_aget_result_and_arefresh():
    async def scenario():
        result = await tasks.add.aenqueue(20, 22)
        fetched = await default_task_backend.aget_result(result.id)
        return result, fetched

    result, fetched = async_to_sync(scenario)()
    assert fetched.status == TaskResultStatus.READY
    drain()

    async def refresh():
        await result.arefresh()
        return await tasks.add.aget_result(result.id)

    again = async_to_sync(refresh)()
    assert result.return_value == 42
    assert again.return_value == 42


def test_an_async_task_function_is_awaited_on_the_worker():
    result = tasks.async_add.enqueue(40, 2)
    noop = tasks.noop_task_async.enqueue()
    drain()
    result.refresh()
    noop.refresh()
    assert result.return_value == 42
    assert noop.status == TaskResultStatus.SUCCESSFUL


def test_a_failed_task_run_can_be_resumed_and_the_result_reports_the_new_state():
    result = tasks.needs_permission.enqueue()
    drain()
    result.refresh()
    assert result.status == TaskResultStatus.FAILED

    Ledger.objects.create(run_id=uuid.uuid4(), note="allowed")
    WorkflowRun.objects.resume(result.id)
    result.refresh()
    assert result.status == TaskResultStatus.READY
    assert result.finished_at is None
    drain()

    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == "done"
    assert result.attempts == 2
    assert [e.exception_class for e in result.errors] == [PermissionError]


def test_a_canceled_task_run_is_a_failed_result_naming_the_cancel():
    result = tasks.add.enqueue(1, 2)
    WorkflowRun.objects.cancel(result.id)
    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    assert result.errors[-1].exception_class_path == (
        "django_openworkflow.exceptions.WorkflowCanceled"
    )


def test_signals_enqueued_started_and_finished_carry_the_result():
    seen = []

    def record(signal_name):
        def receiver(sender, task_result, **kwargs):
            seen.append((signal_name, task_result.id, str(task_result.status)))

        return receiver

    receivers = {
        task_enqueued: record("enqueued"),
        task_started: record("started"),
        task_finished: record("finished"),
    }
    for signal, receiver in receivers.items():
        signal.connect(receiver)
    try:
        ok = tasks.add.enqueue(1, 2)
        failing = tasks.failing_task_value_error.enqueue()
        drain(concurrency=1)
    finally:
        for signal, receiver in receivers.items():
            signal.disconnect(receiver)

    assert [s for s in seen if s[1] == ok.id] == [
        ("enqueued", ok.id, "READY"),
        ("started", ok.id, "RUNNING"),
        ("finished", ok.id, "SUCCESSFUL"),
    ]
    assert [s for s in seen if s[1] == failing.id] == [
        ("enqueued", failing.id, "READY"),
        ("started", failing.id, "RUNNING"),
        ("finished", failing.id, "FAILED"),
    ]


def test_arguments_that_are_not_json_are_refused_at_enqueue_naming_the_task():
    with pytest.raises(TypeError, match=r'arguments of task "tests\.testapp\.tasks\.echo"'):
        tasks.echo.enqueue(object())
    assert not WorkflowRun.objects.exists()


def test_a_bad_retry_policy_is_an_invalid_backend_naming_the_alias():
    for options, message in (
        ({"retry_policy": 3}, "must be a dict of RetryPolicy's arguments"),
        ({"retry_policy": {"tries": 3}}, "is not valid"),
    ):
        with pytest.raises(InvalidTaskBackend, match=r"TASKS\['bad'\]\['OPTIONS'\]"):
            WorkflowTaskBackend("bad", {"OPTIONS": options})
        with pytest.raises(InvalidTaskBackend, match=message):
            WorkflowTaskBackend("bad", {"OPTIONS": options})


def test_the_system_check_names_a_backend_queue_that_is_not_configured():
    queues = {
        "default": {
            "BACKEND": "django_openworkflow.tasks.WorkflowTaskBackend",
            "QUEUES": ["default", "reports"],
        }
    }
    with override_settings(TASKS=queues):
        errors = list(task_backends["default"].check())  # what Django's check_tasks runs
    assert [e.id for e in errors] == ["django_openworkflow.E018"]
    assert "'reports'" in errors[0].msg


def test_a_task_whose_code_is_gone_fails_its_run_with_an_error_naming_the_path():
    gone = tasks.add.enqueue(1, 2)
    plain = tasks.add.enqueue(1, 2)
    WorkflowRun.objects.filter(pk=gone.id).update(
        input={**run_of(gone).input, "task": "tests.testapp.tasks.removed"}
    )
    WorkflowRun.objects.filter(pk=plain.id).update(
        input={**run_of(plain).input, "task": "tests.testapp.tasks.not_a_task"}
    )
    drain()

    for result, problem in ((gone, "cannot be imported"), (plain, "is not a task")):
        run = run_of(result)
        assert run.status == WorkflowRun.Status.FAILED
        assert problem in run.error["message"]
        with pytest.raises(InvalidTask, match=problem):
            default_task_backend.get_result(result.id)


def test_a_task_whose_backend_was_removed_fails_with_the_invalid_backend():
    result = tasks.add.enqueue(1, 2)
    WorkflowRun.objects.filter(pk=result.id).update(
        input={**run_of(result).input, "backend": "removed"}
    )
    drain()
    run = run_of(result)
    assert run.status == WorkflowRun.Status.FAILED
    assert "removed" in run.error["message"]


def test_a_subclass_of_the_backend_registers_the_task_workflow_too():
    from django_openworkflow.apps import uses_task_backend

    sub = {"default": {"BACKEND": "tests.testapp.tasks.SubclassBackend"}}
    other = {"default": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"}}
    missing = {"default": {"BACKEND": "nowhere.Backend"}}
    with override_settings(TASKS=sub):
        assert uses_task_backend()
    with override_settings(TASKS=other):
        assert not uses_task_backend()
    with override_settings(TASKS=missing):
        assert not uses_task_backend()


def test_moving_from_the_immediate_backend_is_one_setting():
    """docs/tasks.md: the same tasks and calls, only TASKS' BACKEND changed."""
    immediate = (
        "django.tasks.backends.immediate.ImmediateBackend"
        if django.VERSION >= (6, 0)
        else "django_tasks.backends.immediate.ImmediateBackend"
    )
    outcomes = {}
    for backend in (immediate, "django_openworkflow.tasks.WorkflowTaskBackend"):
        with override_settings(TASKS={"default": {"BACKEND": backend, "QUEUES": []}}):
            result = tasks.add.enqueue(2, 3)
            failed = tasks.failing_task_value_error.enqueue()
            if backend != immediate:
                assert not WorkflowRun.objects.filter(status="completed").exists()
                drain()
                result.refresh()
                failed.refresh()
            outcomes[backend] = (
                result.status,
                result.return_value,
                failed.status,
                failed.errors[0].exception_class,
            )
    assert outcomes[immediate] == ("SUCCESSFUL", 5, "FAILED", ValueError)
    assert outcomes["django_openworkflow.tasks.WorkflowTaskBackend"] == outcomes[immediate]
