"""Adversarial review of ``WorkflowTaskBackend`` (django_openworkflow/tasks.py).

Each test is a case tried against the backend: hostile task code (exceptions,
return values, arguments), every state a result can be read in, the write
paths' transactions and faults, Django's signals, real worker processes, the
pages. The tasks are in tests/testapp/review_tasks.py, which no start-up code
imports.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import signal
import socket
import threading
import time
import uuid

import django
import pytest
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models.functions import Now
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_openworkflow.exceptions import WorkflowCanceled, WorkflowError, WorkflowFailed
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.tasks import (
    InvalidTask,
    TaskResultDoesNotExist,
    TaskResultStatus,
    task_enqueued,
    task_finished,
    task_started,
)
from django_openworkflow.worker import Worker
from tests.conftest import backend_pid, claim, drain
from tests.testapp import review_tasks as rt
from tests.testapp import tasks
from tests.testapp.models import Ledger
from tests.testapp.workflows import three_steps

try:
    from django.tasks import default_task_backend, task
except ImportError:  # Django 5.2: the backport
    from django_tasks import default_task_backend, task

pytestmark = pytest.mark.django_db(transaction=True)

CANCELED_PATH = "django_openworkflow.exceptions.WorkflowCanceled"
HOUR = datetime.timedelta(hours=1)


def finished(result):
    """Run the queued tasks (in-process workers), then refresh ``result``."""
    drain()
    result.refresh()
    return result


@pytest.fixture
def held_task():
    """Run ``review_tasks.held`` on a worker thread; yields once the function is running.

    The worker has one slot, which the held task fills: it takes no other run meanwhile."""
    rt.running.clear()
    rt.let_go.clear()
    result = rt.held.enqueue()
    worker = threading.Thread(target=Worker(concurrency=1, burst=True, poll_interval=0.02).run)
    worker.start()
    assert rt.running.wait(10), "the held task did not start"
    try:
        yield result
    finally:
        rt.let_go.set()
        worker.join(30)


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "exception", "last_line"),
    [
        ("nan", TypeError, "is nan, which JSON cannot hold"),
        ("int keys", TypeError, "has the key 1 of type int; JSON keys are strings"),
        ("nul", TypeError, "contains the character U+0000 (NUL)"),
    ],
)
def test_a_refused_return_value_is_the_builtin_error_not_the_engines_refusal(
    kind, exception, last_line
):
    # Found: the stored error's path named django_openworkflow.errors.Refused (an internal
    # class) while its type said TypeError/ValueError; exception_class was Refused.
    result = finished(rt.returns.enqueue(kind))
    assert result.status == TaskResultStatus.FAILED
    assert [e.exception_class for e in result.errors] == [exception]
    assert last_line in result.errors[0].traceback
    attempt = StepAttempt.objects.get(workflow_run_id=result.id)
    assert attempt.error["type"] == exception.__name__
    assert "path" not in attempt.error


def test_a_return_value_too_large_is_a_value_error():
    from django.conf import settings
    from django.test import override_settings

    with override_settings(OPENWORKFLOW={**settings.OPENWORKFLOW, "MAX_PAYLOAD_BYTES": 1000}):
        result = finished(rt.big_return.enqueue(5000))
    assert [e.exception_class for e in result.errors] == [ValueError]
    assert "returned a value that is too large: it is 5,002 bytes" in result.errors[0].traceback


def test_a_task_canceled_while_running_has_one_canceled_error_that_imports(held_task):
    # Found: the running attempt's error (stored by the cancel, with no path) was
    # "builtins.WorkflowCanceled", whose exception_class raised ImportError, and the
    # result added a second WorkflowCanceled after it.
    WorkflowRun.objects.cancel(held_task.id)
    held_task.refresh()
    assert held_task.status == TaskResultStatus.FAILED
    assert [e.exception_class for e in held_task.errors] == [WorkflowCanceled]
    assert held_task.errors[0].traceback == (
        "WorkflowCanceled: canceled while the step was running\n"
    )
    rt.let_go.set()
    drain()
    held_task.refresh()  # the function's late return changes nothing
    assert (held_task.status, len(held_task.errors)) == (TaskResultStatus.FAILED, 1)


def test_a_task_canceled_before_it_ran_has_one_canceled_error_naming_the_run():
    result = rt.args_back.enqueue()
    WorkflowRun.objects.cancel(result.id)
    result.refresh()
    assert [e.exception_class_path for e in result.errors] == [CANCELED_PATH]
    assert result.errors[0].exception_class is WorkflowCanceled
    assert result.errors[0].traceback == f"WorkflowCanceled: run {result.id} was canceled\n"


def test_a_keyboard_interrupt_in_a_task_fails_it_with_an_error_that_imports():
    # The slot survives (the run is released and replayed); the interrupted attempt is
    # then WorkerLost, which used to be "builtins.WorkerLost" (ImportError on access).
    result = finished(rt.interrupts.enqueue())
    assert result.status == TaskResultStatus.FAILED
    assert result.attempts == 1  # one attempt: Django's tasks promise no retries
    (error,) = result.errors
    assert error.exception_class is WorkflowError
    assert error.traceback.startswith("WorkerLost: the worker executing this step stopped")


@pytest.mark.parametrize(
    ("task", "path", "last_line"),
    [
        (rt.generator_exit, "builtins.GeneratorExit", "GeneratorExit: closed"),
        (
            rt.nul_and_surrogate,
            "builtins.ValueError",
            "ValueError: nul \\x00 and a lone surrogate \\ud800 here",
        ),
        (
            rt.unprintable,
            "tests.testapp.review_tasks.UnprintableError",
            "tests.testapp.review_tasks.UnprintableError: <exception str() failed>",
        ),
    ],
)
def test_hostile_exceptions_are_stored_and_read_back(task, path, last_line):
    result = finished(task.enqueue())
    assert result.status == TaskResultStatus.FAILED
    (error,) = result.errors
    assert error.exception_class_path == path
    assert issubclass(error.exception_class, BaseException)
    assert error.traceback.splitlines()[-1] == last_line


def test_a_huge_message_is_cut_and_the_raise_site_kept():
    result = finished(rt.huge_message.enqueue())
    (error,) = result.errors
    assert error.exception_class is ValueError
    assert error.traceback.startswith("… [")  # the start is cut, the end kept
    assert len(error.traceback) < 50_100
    run = WorkflowRun.objects.get(pk=result.id)
    assert len(run.error["message"]) < 5_000


def test_an_exception_class_defined_in_a_function_is_named_as_django_names_it():
    """Held, as Django's own backends do: the path has ``<locals>`` and cannot be imported."""
    result = finished(rt.local_class.enqueue())
    (error,) = result.errors
    assert error.exception_class_path == (
        "tests.testapp.review_tasks.local_class.<locals>.LocalError"
    )
    with pytest.raises(ImportError):
        error.exception_class  # noqa: B018
    assert error.traceback.endswith("LocalError: defined in the function\n")


# --- arguments and priorities at enqueue -----------------------------------------------


def immediate_backend() -> str:
    return (
        "django.tasks.backends.immediate.ImmediateBackend"
        if django.VERSION >= (6, 0)
        else "django_tasks.backends.immediate.ImmediateBackend"
    )


def test_arguments_are_normalized_as_djangos_backends_normalize_them():
    # Found: a tuple or bytes in the arguments was a TypeError here, where Django's
    # backends (immediate, django-tasks-db) store them as lists and text: moving "by one
    # setting" broke such calls.
    call = ((1, (2, 3)), b"text"), {"when": {"pair": ("a", "b")}}
    expected = [[[1, [2, 3]], "text"], {"when": {"pair": ["a", "b"]}}]
    with override_settings(TASKS={"default": {"BACKEND": immediate_backend(), "QUEUES": []}}):
        immediate = rt.args_back.enqueue(*call[0], **call[1])
    result = rt.args_back.enqueue(*call[0], **call[1])
    assert (result.args, result.kwargs) == (immediate.args, immediate.kwargs)
    assert WorkflowRun.objects.get(pk=result.id).input["args"] == [[1, [2, 3]], "text"]
    assert finished(result).return_value == immediate.return_value == expected


def loop() -> list:
    itself: list = []
    itself.append(itself)
    return itself


@pytest.mark.parametrize(
    ("args", "kwargs", "problem"),
    [
        ((object(),), {}, r"\$\['args'\]\[0\] is a builtins\.object"),
        (({1, 2},), {}, r"\$\['args'\]\[0\] is a builtins\.set"),
        ((float("nan"),), {}, r"\$\['args'\]\[0\] is nan"),
        ((), {"k": "a\x00b"}, r"\$\['kwargs'\]\['k'\] contains the character U\+0000"),
        ((b"\xff",), {}, r"\$\['args'\]\[0\] is a builtins\.bytes"),
        ((loop(),), {}, "nested too deeply for JSON"),
    ],
)
def test_arguments_that_are_not_json_are_refused_naming_the_task_and_the_value(
    args, kwargs, problem
):
    with pytest.raises(TypeError, match=problem) as refused:
        rt.args_back.enqueue(*args, **kwargs)
    assert 'arguments of task "tests.testapp.review_tasks.args_back"' in str(refused.value)
    assert not WorkflowRun.objects.exists()


def test_arguments_too_large_together_are_refused_naming_the_task():
    # Found: args and kwargs each under MAX_PAYLOAD_BYTES but over it together were refused
    # as the input of workflow "django-task", naming no task.
    with (
        override_settings(OPENWORKFLOW={**settings.OPENWORKFLOW, "MAX_PAYLOAD_BYTES": 1000}),
        pytest.raises(ValueError, match="more than OPENWORKFLOW") as refused,
    ):
        rt.args_back.enqueue("x" * 600, k="y" * 600)
    assert str(refused.value).startswith(
        'arguments of task "tests.testapp.review_tasks.args_back" is too large: it is 1,2'
    )
    assert not WorkflowRun.objects.exists()


@pytest.mark.parametrize(("priority", "stored"), [(5.0, 5), (-100.0, -100), (True, 1)])
def test_a_priority_django_accepts_is_the_runs_priority(priority, stored):
    # Found: 5.0, which Django's validation accepts (a whole number), was a TypeError
    # naming the workflow "django-task".
    result = rt.args_back.using(priority=priority).enqueue()
    assert WorkflowRun.objects.get(pk=result.id).priority == stored


@pytest.mark.parametrize("priority", [101, -101, 1.5])
def test_a_priority_out_of_range_is_djangos_invalid_task(priority):
    with pytest.raises(InvalidTask, match="priority must be a whole number between -100 and 100"):
        rt.args_back.using(priority=priority)


# --- reading results: ids, namespaces, backends, inputs changed by people ---------------


def test_a_task_of_another_namespace_is_no_result_here_and_its_worker_runs_it():
    # Found: get_result() read runs of every namespace, so a project sharing the database
    # saw (and imported the task paths of) another project's tasks.
    other = {**settings.OPENWORKFLOW, "NAMESPACE": "other-project"}
    with override_settings(OPENWORKFLOW=other):
        theirs = tasks.get_task_id.enqueue()
    ours = tasks.get_task_id.enqueue()
    assert WorkflowRun.objects.get(pk=theirs.id).namespace == "other-project"
    with pytest.raises(TaskResultDoesNotExist):
        default_task_backend.get_result(theirs.id)
    with pytest.raises(TaskResultDoesNotExist):
        theirs.refresh()

    # A worker of that namespace (runworker --namespace, settings unchanged) executes it:
    # the task's own context reads its run whatever the namespace.
    Worker(namespace="other-project", burst=True, poll_interval=0.02).run()
    run = WorkflowRun.objects.get(pk=theirs.id)
    assert (run.status, run.output) == ("completed", theirs.id)
    with override_settings(OPENWORKFLOW=other):
        theirs.refresh()
    assert theirs.return_value == theirs.id
    assert default_task_backend.get_result(ours.id).status == TaskResultStatus.READY


@pytest.mark.parametrize(
    "result_id",
    [
        lambda r: uuid.UUID(r.id),
        lambda r: r.id.upper(),
        lambda r: r.id.replace("-", ""),
    ],
)
def test_ids_django_reads_as_the_uuid_find_the_result(result_id):
    result = rt.args_back.enqueue()
    assert default_task_backend.get_result(result_id(result)).id == result.id


@pytest.mark.parametrize(
    "result_id", [None, "", " x", "\x00", "x" * 10_000, 1.5, b"id", ["id"], {"id": 1}]
)
def test_ids_that_are_no_uuid_do_not_exist(result_id):
    rt.args_back.enqueue()
    with pytest.raises(TaskResultDoesNotExist):
        default_task_backend.get_result(result_id)


def test_the_result_names_the_backend_that_enqueued_the_task():
    # Found: read through another alias, the result (and its task) named that alias.
    result = tasks.flaky.enqueue(1)
    assert result.backend == "retrying"
    fetched = default_task_backend.get_result(result.id)
    assert (fetched.backend, fetched.task.backend) == ("retrying", "retrying")
    plain = rt.args_back.using(backend="retrying").enqueue()
    assert default_task_backend.get_result(plain.id).backend == "retrying"


def test_one_task_on_two_aliases_with_two_retry_policies():
    once = rt.always_fails.enqueue()
    thrice = rt.always_fails.using(backend="retrying").enqueue()
    drain()  # waits out the retrying backend's 1 s and 2 s backoff
    once.refresh()
    thrice.refresh()
    assert [e.traceback.splitlines()[-1] for e in once.errors] == ["PermissionError: attempt 1"]
    assert [e.traceback.splitlines()[-1] for e in thrice.errors] == [
        f"PermissionError: attempt {n}" for n in (1, 2, 3)
    ]


@pytest.mark.parametrize(
    "bad_input",
    [
        [1, 2],
        "text",
        None,
        {"args": []},
        {
            "task": "tests.testapp.review_tasks.args_back",
            "args": {"a": 1},
            "kwargs": {},
            "backend": "default",
        },
        {"task": "tests.testapp.review_tasks.args_back", "kwargs": [1], "backend": "default"},
    ],
)
def test_an_input_resumed_with_changes_into_no_task_fails_the_run_naming_it(bad_input):
    # Found: "Resume with changes" can make a task run's input anything. A list made
    # get_result() raise AttributeError (a 500 where a view reads it) and task_finished
    # was lost; "args": {"a": 1} called the task with the dict's keys.
    result = finished(rt.always_fails.enqueue())
    WorkflowRun.objects.resume(result.id, input=bad_input)
    drain()
    run = WorkflowRun.objects.get(pk=result.id)
    assert run.status == "failed"
    problem = f"run {result.id} is no task that can be run or read: its input must be"
    assert problem in run.error["message"]
    with pytest.raises(InvalidTask, match=re.escape(problem)):
        default_task_backend.get_result(result.id)
    assert StepAttempt.objects.filter(workflow_run_id=result.id).count() == 1  # not called


def test_a_task_queued_before_its_alias_moved_to_another_backend_still_runs():
    # Found: the step read its own result through the alias's backend of the moment; once
    # TASKS named the immediate backend for it, every queued task failed with
    # NotImplementedError ("does not support retrieving or refreshing results").
    result = tasks.get_task_id.enqueue()
    with override_settings(TASKS={"default": {"BACKEND": immediate_backend(), "QUEUES": []}}):
        drain()
    run = WorkflowRun.objects.get(pk=result.id)
    assert (run.status, run.output) == ("completed", result.id)
    result.refresh()
    assert result.return_value == result.id


# --- every state a result is read in ------------------------------------------------------


def test_a_pending_task_is_ready_with_nothing_started():
    result = default_task_backend.get_result(rt.args_back.enqueue(1).id)
    assert (result.status, result.attempts, result.errors) == (TaskResultStatus.READY, 0, [])
    assert (result.started_at, result.last_attempted_at, result.finished_at) == (None,) * 3
    assert result.enqueued_at == WorkflowRun.objects.get(pk=result.id).created_at
    with pytest.raises(ValueError, match="Task has not finished yet"):
        result.return_value  # noqa: B018


def test_a_task_parked_for_its_retry_is_ready_with_its_error(monkeypatch):
    result = rt.always_fails.using(backend="retrying").enqueue()
    Worker(burst=True, poll_interval=0.02).run()  # the first attempt; the retry waits 1 s
    result.refresh()
    run = WorkflowRun.objects.get(pk=result.id)
    assert (run.status, run.available_at > run.started_at) == ("pending", True)
    assert (result.status, result.attempts, result.finished_at) == (TaskResultStatus.READY, 1, None)
    assert result.started_at == run.started_at
    assert [e.exception_class for e in result.errors] == [PermissionError]


def test_a_running_task_is_running_with_its_worker(held_task):
    result = default_task_backend.get_result(held_task.id)
    assert (result.status, result.attempts) == (TaskResultStatus.RUNNING, 1)
    assert result.finished_at is None
    assert result.worker_ids == [WorkflowRun.objects.get(pk=result.id).worker_id]
    assert result.started_at <= result.last_attempted_at


def test_a_resumed_task_is_ready_again_and_counts_every_attempt():
    result = finished(rt.always_fails.enqueue())
    assert result.finished_at is not None
    WorkflowRun.objects.resume(result.id)
    result.refresh()
    assert (result.status, result.finished_at, result.attempts) == (TaskResultStatus.READY, None, 1)
    finished(result)
    # TaskContext.attempt is Django's task_result.attempts: the attempts before the resume
    # count too (docs/tasks.md says so).
    assert [e.traceback.splitlines()[-1] for e in result.errors] == [
        "PermissionError: attempt 1",
        "PermissionError: attempt 2",
    ]


def test_a_task_resumed_with_a_given_output_succeeds_with_it_and_no_new_attempt():
    result = finished(rt.always_fails.enqueue())
    step = "tests.testapp.review_tasks.always_fails"
    WorkflowRun.objects.resume(result.id, step_outputs={step: {"given": [1, 2]}})
    finished(result)
    assert (result.status, result.return_value) == (TaskResultStatus.SUCCESSFUL, {"given": [1, 2]})
    assert result.attempts == 1  # the given output is no attempt
    assert [e.exception_class for e in result.errors] == [PermissionError]
    assert (
        result.last_attempted_at
        == StepAttempt.objects.get(workflow_run_id=result.id, given_in__isnull=True).started_at
    )


def test_a_rerun_task_is_ready_again_then_reports_the_new_outcome():
    result = finished(rt.args_back.enqueue("a"))
    first_finish = result.finished_at
    WorkflowRun.objects.rerun(result.id)
    result.refresh()
    assert (result.status, result.finished_at) == (TaskResultStatus.READY, None)
    with pytest.raises(ValueError, match="not finished"):
        result.return_value  # noqa: B018
    finished(result)
    assert (result.status, result.return_value, result.attempts) == ("SUCCESSFUL", [["a"], {}], 2)
    assert result.finished_at > first_finish


def test_a_purged_or_deleted_task_run_no_longer_exists():
    from django_openworkflow.retention import purge

    purged = finished(rt.args_back.enqueue())
    deleted = rt.args_back.enqueue()
    two_hours_ago = timezone.now() - datetime.timedelta(hours=2)
    WorkflowRun.objects.filter(pk=purged.id).update(
        created_at=two_hours_ago, finished_at=two_hours_ago
    )
    purge({"completed": datetime.timedelta(hours=1)})
    WorkflowRun.objects.filter(pk=deleted.id).delete()
    for result in (purged, deleted):
        with pytest.raises(TaskResultDoesNotExist):
            result.refresh()
        with pytest.raises(TaskResultDoesNotExist):
            default_task_backend.get_result(result.id)


def test_takes_context_after_a_resume_counts_the_attempts_before_it():
    result = finished(tasks.context_attempt.enqueue())
    assert result.return_value == {"attempt": 1, "status": "RUNNING"}
    WorkflowRun.objects.rerun(result.id)
    assert finished(result).return_value == {"attempt": 2, "status": "RUNNING"}


# --- the write paths: transactions and faults ----------------------------------------------


def test_a_rolled_back_savepoint_drops_only_the_tasks_enqueued_inside_it():
    with transaction.atomic():
        kept = rt.writes.enqueue("kept")
        with pytest.raises(RuntimeError), transaction.atomic():
            dropped = rt.writes.enqueue("dropped")
            raise RuntimeError("roll the savepoint back")
        after = rt.writes.enqueue("after")
    drain()
    with pytest.raises(TaskResultDoesNotExist):
        dropped.refresh()
    assert [finished(r).return_value for r in (kept, after)] == ["kept", "after"]
    assert sorted(Ledger.objects.values_list("note", flat=True)) == ["after", "kept"]


def test_a_task_enqueued_receiver_that_raises_inside_atomic_rolls_the_task_back():
    """As in Django's backends, task_enqueued is sent (and may raise) once the run is
    stored: inside transaction.atomic the exception rolls it back with everything else;
    outside one the task stays queued and runs (docs/tasks.md says so)."""

    def broken(sender, task_result, **kwargs):
        raise RuntimeError("receiver broke")

    task_enqueued.connect(broken)
    try:
        with pytest.raises(RuntimeError, match="receiver broke"), transaction.atomic():
            rt.writes.enqueue("rolled back")
        assert not WorkflowRun.objects.exists()
        with pytest.raises(RuntimeError, match="receiver broke"):
            rt.writes.enqueue("stays")
    finally:
        task_enqueued.disconnect(broken)
    (run,) = WorkflowRun.objects.all()
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", "stays")


@pytest.mark.skipif(connection.vendor == "sqlite", reason="kills its own server connection")
def test_a_lost_connection_at_enqueue_stores_nothing_and_the_next_enqueue_works():
    pid = backend_pid()
    killer = connection.copy()
    try:
        with killer.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
            else:
                cursor.execute(f"KILL {int(pid)}")
    finally:
        killer.close()
    with pytest.raises((OperationalError, InterfaceError)):
        rt.args_back.enqueue("lost")
    connection.close()  # what close_old_connections() does with a broken connection
    assert not WorkflowRun.objects.exists()
    assert finished(rt.args_back.enqueue("next")).return_value == [["next"], {}]


# --- Django's signals --------------------------------------------------------------------


@pytest.fixture
def signals_seen():
    seen: list[tuple[str, str, str, int]] = []

    def record(name):
        def receiver(sender, task_result, **kwargs):
            seen.append((name, task_result.id, str(task_result.status), task_result.attempts))

        return receiver

    receivers = {
        task_enqueued: record("enqueued"),
        task_started: record("started"),
        task_finished: record("finished"),
    }
    for django_signal, receiver in receivers.items():
        django_signal.connect(receiver)
    yield seen
    for django_signal, receiver in receivers.items():
        django_signal.disconnect(receiver)


def test_a_retried_then_successful_task_finishes_once(signals_seen):
    result = tasks.flaky.enqueue(2)
    drain()
    assert [s for s in signals_seen if s[1] == result.id] == [
        ("enqueued", result.id, "READY", 0),
        ("started", result.id, "RUNNING", 1),
        ("started", result.id, "RUNNING", 2),
        ("finished", result.id, "SUCCESSFUL", 2),
    ]


def test_a_task_canceled_before_it_ran_finishes_once_and_never_starts(signals_seen):
    result = rt.args_back.enqueue()
    WorkflowRun.objects.cancel(result.id)
    drain()
    assert signals_seen == [
        ("enqueued", result.id, "READY", 0),
        ("finished", result.id, "FAILED", 0),
    ]


def test_a_task_canceled_while_running_finishes_once(signals_seen, held_task):
    WorkflowRun.objects.cancel(held_task.id)
    rt.let_go.set()
    drain()
    assert [s[0] for s in signals_seen if s[1] == held_task.id] == [
        "enqueued",
        "started",
        "finished",
    ]


def test_a_task_started_receiver_that_raises_fails_the_task_as_django_tasks_db_does():
    def broken(sender, task_result, **kwargs):
        raise RuntimeError("started receiver broke")

    task_started.connect(broken)
    try:
        result = finished(rt.writes.enqueue("never"))
    finally:
        task_started.disconnect(broken)
    assert result.status == TaskResultStatus.FAILED
    assert result.errors[0].traceback.endswith("RuntimeError: started receiver broke\n")
    assert not Ledger.objects.exists()  # the function was not called


def test_a_task_finished_receiver_that_raises_breaks_no_run(caplog):
    def broken(sender, task_result, **kwargs):
        raise RuntimeError("finished receiver broke")

    task_finished.connect(broken)
    try:
        result = rt.args_back.enqueue("ok")
        other = three_steps.start({"i": 1})
        drain()
    finally:
        task_finished.disconnect(broken)
    assert finished(result).status == TaskResultStatus.SUCCESSFUL
    other.refresh_from_db()
    assert other.status == "completed"
    assert "signal receiver failed receiver=finished" in caplog.text


def test_the_finished_receiver_costs_other_workflows_no_query():
    from django_openworkflow.tasks import finished as task_finished_receiver

    run = three_steps.start({"i": 1})
    drain()
    run.refresh_from_db()
    with CaptureQueriesContext(connection) as queries:
        task_finished_receiver(sender=WorkflowRun, run=run)
    assert len(queries) == 0


@pytest.mark.django_db(databases=["default", "workflows"], transaction=True)
def test_with_the_engine_on_another_database_enqueue_is_atomic_with_that_databases_transaction():
    """OPENWORKFLOW["DATABASE"] = "workflows": as start() (docs/settings.md), enqueue() is
    atomic with a transaction on the engine's database, not with one on "default"."""
    engine = {**settings.OPENWORKFLOW, "DATABASE": "workflows"}
    with override_settings(
        OPENWORKFLOW=engine, DATABASE_ROUTERS=["django_openworkflow.routers.WorkflowRouter"]
    ):
        with pytest.raises(RuntimeError), transaction.atomic(using="workflows"):
            dropped = rt.args_back.enqueue("dropped")
            raise RuntimeError("roll back")
        with pytest.raises(RuntimeError), transaction.atomic():  # "default": not the engine's
            kept = tasks.get_task_id.enqueue()
            raise RuntimeError("roll back")
        with pytest.raises(TaskResultDoesNotExist):
            dropped.refresh()
        drain()
        kept.refresh()
        assert kept.return_value == kept.id
        assert kept.worker_ids == [
            StepAttempt.objects.using("workflows").get(workflow_run_id=kept.id).worker_id
        ]
    assert not WorkflowRun.objects.using("default").exists()


def test_a_task_enqueued_in_a_step_atomic_that_fails_once_is_queued_once():
    run = rt.enqueue_in_step_atomic.start()
    drain()  # the step's retry waits out its backoff
    run.refresh_from_db()
    assert run.status == "completed"
    (task_run,) = WorkflowRun.objects.filter(workflow_name="django-task")
    assert run.output == str(task_run.pk)
    assert task_run.status == "completed"


# --- real worker processes ------------------------------------------------------------------


def test_a_worker_process_runs_tasks_of_a_module_it_never_imported(worker_process):
    ok = rt.args_back.enqueue((1, 2), key="value")
    failing = rt.always_fails.enqueue()
    context = tasks.get_task_id.enqueue()
    proc = worker_process("--concurrency", "2")
    for result in (ok, failing, context):
        with contextlib.suppress(WorkflowFailed):
            WorkflowRun.objects.get(pk=result.id).result(timeout=60)
    assert ok.status == TaskResultStatus.READY  # until refreshed
    ok.refresh()
    failing.refresh()
    context.refresh()
    assert ok.return_value == [[[1, 2]], {"key": "value"}]
    assert context.return_value == context.id
    assert failing.status == TaskResultStatus.FAILED
    assert failing.errors[0].exception_class is PermissionError
    assert failing.errors[0].traceback.endswith("PermissionError: attempt 1\n")
    workers = {*ok.worker_ids, *failing.worker_ids, *context.worker_ids}
    assert len(workers) == 1
    assert next(iter(workers)).startswith(f"{socket.gethostname()}:{proc.pid}:")


# --- the pages -------------------------------------------------------------------------------


def run_due() -> None:
    """Execute the due runs once (a burst worker): unlike drain(), a running run may stay."""
    Worker(burst=True, poll_interval=0.02).run()


def pages_of(run_id) -> list[str]:
    return [
        reverse("django_openworkflow:run-detail", args=[run_id]),
        reverse("django_openworkflow:run-correct", args=[run_id]),
        reverse("admin:django_openworkflow_workflowrun_change", args=[run_id]),
        reverse("django_openworkflow:run-list"),
        reverse("admin:django_openworkflow_workflowrun_changelist"),
    ]


def test_the_pages_of_task_runs_in_every_state_and_their_buttons(admin_client, held_task):
    xss = "<script>alert('task')</script>"
    pending = rt.args_back.enqueue(xss, key=xss)
    WorkflowRun.objects.filter(pk=pending.id).update(available_at=timezone.now() + HOUR)
    failed = rt.always_fails.using(priority=3).enqueue()
    done = rt.args_back.enqueue("done")
    canceled = rt.args_back.enqueue("canceled")
    WorkflowRun.objects.cancel(canceled.id)
    run_due()
    claimed = rt.args_back.enqueue("claimed, no attempt yet")
    assert claim("django-task")
    states = dict(WorkflowRun.objects.values_list("pk", "status"))
    assert sorted(states.values()) == [
        "canceled",
        "completed",
        "failed",
        "pending",
        "running",
        "running",
    ]
    for result in (pending, held_task, claimed, failed, done, canceled):
        for url in pages_of(result.id):
            response = admin_client.get(url)
            assert response.status_code == 200, (url, states[uuid.UUID(result.id)])
            assert xss not in response.content.decode()

    step = "tests.testapp.review_tasks.always_fails"
    correct = reverse("django_openworkflow:run-correct", args=[failed.id])
    run = WorkflowRun.objects.get(pk=failed.id)
    form = {
        "input": json.dumps(run.input),
        "generation": str(run.resume_generation),
        "step-TOTAL_FORMS": "1",
        "step-INITIAL_FORMS": "1",
        "step-MIN_NUM_FORMS": "0",
        "step-MAX_NUM_FORMS": "1000",
        "step-0-name": step,
        "step-0-use": "on",
        "step-0-output": '"given"',
    }
    assert admin_client.post(correct, {**form, "preview": "1"}).status_code == 200
    assert admin_client.post(correct, {**form, "confirm": "1"}).status_code == 302
    for result, action in ((pending, "run-cancel"), (done, "run-rerun")):
        url = reverse(f"django_openworkflow:{action}", args=[result.id])
        assert admin_client.post(url).status_code == 302
    run_due()
    failed.refresh()
    assert (failed.status, failed.return_value) == (TaskResultStatus.SUCCESSFUL, "given")
    pending.refresh()
    assert pending.status == TaskResultStatus.FAILED  # canceled
    done.refresh()
    assert (done.status, done.return_value) == (TaskResultStatus.SUCCESSFUL, [["done"], {}])
    for result in (failed, pending, done):
        assert admin_client.get(pages_of(result.id)[0]).status_code == 200


def test_resume_from_the_run_page_of_a_failed_task(admin_client):
    result = finished(rt.always_fails.enqueue())
    response = admin_client.post(reverse("django_openworkflow:run-resume", args=[result.id]))
    assert response.status_code == 302
    result.refresh()
    assert result.status == TaskResultStatus.READY


# --- placement: run_after, queues, names -------------------------------------------------------


def test_a_naive_run_after_is_djangos_invalid_task():
    naive = datetime.datetime(2030, 1, 1, 12, 0)
    with pytest.raises(InvalidTask, match="run_after must be an aware datetime"):
        rt.args_back.using(run_after=naive)


def test_a_run_after_in_the_past_runs_at_once_and_is_reported_as_given():
    past = timezone.now() - datetime.timedelta(days=3)
    result = rt.args_back.using(run_after=past).enqueue("late")
    run_due()  # no time travel: it is due
    result.refresh()
    assert result.return_value == [["late"], {}]
    assert result.task.run_after == past


def test_a_backend_limited_to_a_queue_puts_its_tasks_there_for_the_workers_of_that_queue():
    queues = {"default": {}, "emails": {"concurrency": 1}}
    backend = {"BACKEND": "django_openworkflow.tasks.WorkflowTaskBackend", "QUEUES": ["emails"]}
    with override_settings(
        OPENWORKFLOW={**settings.OPENWORKFLOW, "QUEUES": queues}, TASKS={"default": backend}
    ):
        with pytest.raises(InvalidTask, match="Queue 'default' is not valid for backend"):
            rt.args_back.enqueue()
        result = rt.args_back.using(queue_name="emails").enqueue("mail")
        Worker(burst=True, poll_interval=0.02, queues=["default"]).run()
        assert WorkflowRun.objects.get(pk=result.id).status == "pending"
        Worker(burst=True, poll_interval=0.02, queues=["emails"]).run()
        result.refresh()
        assert (result.return_value, result.task.queue_name) == ([["mail"], {}], "emails")


def test_a_task_whose_module_path_cannot_name_a_step_is_refused_when_defined():
    def long_named():
        return None

    long_named.__qualname__ = "f" * 300
    with pytest.raises(InvalidTask, match="longer than 255 characters, which cannot name its step"):
        task(long_named)


@pytest.mark.django_db  # docs/tasks.md: drain() runs queued tasks in the test's transaction
def test_testing_drain_runs_queued_tasks_inside_the_tests_transaction():
    from django_openworkflow.testing import drain as testing_drain

    result = rt.always_fails.using(backend="retrying").enqueue()
    ok = rt.args_back.using(run_after=timezone.now() + HOUR).enqueue("later")
    testing_drain()  # travels past the retries' backoff and the run_after
    result.refresh()
    ok.refresh()
    assert (result.status, result.attempts) == (TaskResultStatus.FAILED, 3)
    assert ok.return_value == [["later"], {}]


@pytest.mark.row_locks
def test_a_task_whose_worker_is_killed_fails_unless_its_backend_retries(worker_process, tmp_path):
    """docs/tasks.md: a task survives its worker's crash as a run does, with one attempt by
    default: the killed attempt is WorkerLost, which fails the task (to be resumed); a
    backend with a retry_policy runs it again on another worker."""
    flag = tmp_path / "go"
    once = rt.waits_for_file.enqueue(str(flag))
    retried = rt.waits_for_file.using(backend="retrying").enqueue(str(flag))
    first = worker_process("--lease", "1", "--concurrency", "2")
    end = time.monotonic() + 30
    while StepAttempt.objects.filter(status="running").count() < 2:
        assert time.monotonic() < end, first.output()[-3000:]
        time.sleep(0.05)
    first.signal(signal.SIGKILL)
    first.wait()
    flag.touch()
    second = worker_process("--lease", "1")
    for result in (once, retried):
        with contextlib.suppress(WorkflowFailed):
            WorkflowRun.objects.get(pk=result.id).result(timeout=60)
        result.refresh()

    assert once.status == TaskResultStatus.FAILED
    assert [e.exception_class for e in once.errors] == [WorkflowError]
    assert once.errors[0].traceback.startswith("WorkerLost: the worker executing this step")
    assert (retried.status, retried.return_value) == (TaskResultStatus.SUCCESSFUL, "done")
    assert [w.split(":")[1] for w in retried.worker_ids] == [str(first.pid), str(second.pid)]


def test_a_task_failed_by_its_deadline_before_it_ran_has_that_error():
    # Found: a run failed by the deadline sweep before its step started was a FAILED
    # result with no error at all.
    result = rt.args_back.enqueue()
    WorkflowRun.objects.filter(pk=result.id).update(deadline_at=Now())
    finished(result)
    assert result.status == TaskResultStatus.FAILED
    assert [e.exception_class for e in result.errors] == [WorkflowError]
    assert result.errors[0].traceback == (
        "DeadlineExceeded: deadline passed: the run did not finish before its deadline_at\n"
    )


def test_a_task_failed_by_its_deadline_while_waiting_to_retry_ends_with_that_error():
    result = rt.always_fails.using(backend="retrying").enqueue()
    run_due()  # the first attempt fails; the retry waits a second
    WorkflowRun.objects.filter(pk=result.id).update(deadline_at=Now())
    finished(result)
    assert [e.traceback.splitlines()[-1] for e in result.errors] == [
        "PermissionError: attempt 1",
        "DeadlineExceeded: deadline passed: the run did not finish before its deadline_at",
    ]


def test_a_task_failed_by_its_step_has_only_the_steps_errors():
    """The run's own error (StepFailed, or the TypeError of a refused result) repeats the
    step's: it is not added."""
    failed = finished(rt.always_fails.enqueue())
    refused = finished(rt.returns.enqueue("nan"))
    assert [e.exception_class for e in failed.errors] == [PermissionError]
    assert [e.exception_class for e in refused.errors] == [TypeError]
