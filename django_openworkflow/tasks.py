"""Django's task framework on durable runs: ``WorkflowTaskBackend``.

``TASKS = {"default": {"BACKEND": "django_openworkflow.tasks.WorkflowTaskBackend"}}``
makes every ``@task`` a durable run: ``my_task.enqueue(...)`` starts a run of
the built-in workflow ``django-task``, which calls the task function as one
step (its name is the task's module path), and ``runworker`` executes it.
The run is stored like any other: it survives crashes and deploys, it shows
on the run pages, and a failed one can be resumed.

This works with ``django.tasks`` (Django 6) and, on Django 5.2, with the
``django-tasks`` backport (``pip install "django-openworkflow[tasks]"``).
See docs/tasks.md.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import logging
from datetime import datetime
from inspect import iscoroutinefunction
from typing import Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.utils import timezone
from django.utils.module_loading import import_string

try:  # Django 6
    from django.tasks import TaskContext, TaskResult, TaskResultStatus, task_backends
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import Task, TaskError
    from django.tasks.exceptions import InvalidTask, InvalidTaskBackend, TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started
    from django.utils.json import normalize_json
except ImportError:  # Django 5.2 with the backport (typed as django.tasks, which it mirrors)
    try:
        import django_tasks as framework
    except ImportError as missing:
        raise ImproperlyConfigured(
            "django_openworkflow.tasks needs Django's task framework: Django 6, or on "
            'Django 5.2 the django-tasks backport (pip install "django-openworkflow[tasks]")'
        ) from missing
    from django_tasks import backends, exceptions, signals, utils

    TaskContext, TaskResult = framework.TaskContext, framework.TaskResult  # type: ignore[misc,assignment]
    TaskResultStatus, task_backends = framework.TaskResultStatus, framework.task_backends  # type: ignore[misc,assignment]
    BaseTaskBackend = backends.base.BaseTaskBackend  # type: ignore[misc,assignment]
    Task, TaskError = framework.base.Task, framework.base.TaskError  # type: ignore[misc,assignment]
    InvalidTask = exceptions.InvalidTaskError  # type: ignore[misc,assignment]
    InvalidTaskBackend = exceptions.InvalidTaskBackendError  # type: ignore[misc,assignment]
    TaskResultDoesNotExist = exceptions.TaskResultDoesNotExist  # type: ignore[misc,assignment]
    task_enqueued, task_started = signals.task_enqueued, signals.task_started
    task_finished, normalize_json = signals.task_finished, utils.normalize_json

from .conf import app_settings
from .durations import RetryPolicy
from .errors import (
    ATTEMPT_CAP_EXCEEDED,
    DEADLINE_EXCEEDED,
    NON_DETERMINISTIC,
    WORKFLOW_CANCELED,
)
from .models import StepAttempt, WorkflowRun
from .names import MAX_NAME_LENGTH
from .queues import configured_queues
from .registry import workflow
from .serialization import ensure_json
from .signals import run_canceled, run_completed, run_failed
from .store import get_store

__all__ = ["TASK_WORKFLOW", "WorkflowTaskBackend"]

logger = logging.getLogger("django_openworkflow.tasks")

TASK_WORKFLOW = "django-task"  # the built-in workflow every task run is a run of
ONE_ATTEMPT = RetryPolicy(maximum_attempts=1)  # Django's tasks promise no retries
CANCELED_PATH = "django_openworkflow.exceptions.WorkflowCanceled"
ENGINE_ERROR_PATH = "django_openworkflow.exceptions.WorkflowError"


class WorkflowTaskBackend(BaseTaskBackend):
    """A task backend whose tasks are durable workflow runs.

    ``QUEUES`` (optional) limits the queue names tasks may use; every name must
    be a queue of ``OPENWORKFLOW["QUEUES"]``, and a task whose queue is not
    one is refused (``InvalidTask``), as Django's backends refuse one. The
    default, Django's, is ``["default"]``; ``[]`` allows every configured
    queue. ``OPTIONS["retry_policy"]`` takes ``RetryPolicy``'s arguments;
    without it a task makes one attempt.
    """

    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.retry_policy = retry_policy_of(alias, self.options)

    def validate_task(self, task: Task) -> None:
        super().validate_task(task)
        known = configured_queues()
        if task.queue_name not in known:
            raise InvalidTask(
                f"Queue '{task.queue_name}' is not valid for backend: it is not in "
                f"OPENWORKFLOW['QUEUES'] (known queues: {', '.join(sorted(known))})"
            )
        if len(task.module_path) > MAX_NAME_LENGTH:
            raise InvalidTask(
                f"task {task.module_path!r} has a module path longer than "
                f"{MAX_NAME_LENGTH} characters, which cannot name its step"
            )

    def enqueue(self, task: Task, args: Any, kwargs: Any) -> TaskResult:
        """Start a run of the task; inside ``transaction.atomic()`` it exists once that commits."""
        self.validate_task(task)
        path = task.module_path
        arguments = json_arguments(path, list(args), dict(kwargs))
        args, kwargs = arguments["args"], arguments["kwargs"]
        spec = {
            "task": path,
            **arguments,
            "backend": self.alias,
            "run_after": task.run_after.isoformat() if task.run_after else None,
        }
        run = task_workflow.start(
            spec,
            queue=task.queue_name,
            priority=int(task.priority),  # Django allows a whole float (5.0)
            available_at=task.run_after,
        )
        result: TaskResult = TaskResult(
            task=task,
            id=str(run.pk),
            status=TaskResultStatus.READY,
            enqueued_at=timezone.now(),
            started_at=None,
            last_attempted_at=None,
            finished_at=None,
            args=args,
            kwargs=kwargs,
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )
        task_enqueued.send(type(self), task_result=result)
        return result

    def get_result(self, result_id: Any) -> TaskResult:
        """The task's run as a ``TaskResult``; ``TaskResultDoesNotExist`` for an id that is
        no task run of this project (``OPENWORKFLOW["NAMESPACE"]``)."""
        try:
            run = task_runs().filter(pk=result_id, namespace=app_settings.NAMESPACE).first()
        except (ValidationError, ValueError, TypeError):
            run = None
        if run is None:
            raise TaskResultDoesNotExist(result_id)
        return task_result(run, alias=self.alias)

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        known = configured_queues()
        return [
            checks.Error(
                f"TASKS[{self.alias!r}]['QUEUES'] names {name!r}, which is not a queue of "
                "OPENWORKFLOW['QUEUES']",
                hint=f"Add it to OPENWORKFLOW['QUEUES'] (known: {', '.join(sorted(known))}).",
                id="django_openworkflow.E018",
            )
            for name in sorted(self.queues)
            if name not in known
        ]


def json_arguments(path: str, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The task's arguments as Django's backends store them (``normalize_json``: tuples
    become lists, bytes text), checked as JSON and, together, against ``MAX_PAYLOAD_BYTES``:
    ``TypeError``/``ValueError`` naming the task."""
    arguments: Any = {"args": args, "kwargs": kwargs}
    with contextlib.suppress(TypeError, ValueError, RecursionError):  # ensure_json says why
        arguments = normalize_json(arguments)
    ensure_json(arguments, f'arguments of task "{path}"')
    return arguments


def retry_policy_of(alias: str, options: dict[str, Any]) -> RetryPolicy:
    """The backend's ``OPTIONS["retry_policy"]`` as a ``RetryPolicy`` (one attempt without it)."""
    given = options.get("retry_policy")
    if given is None:
        return ONE_ATTEMPT
    if isinstance(given, RetryPolicy):
        return given
    if not isinstance(given, dict):
        raise InvalidTaskBackend(
            f"TASKS[{alias!r}]['OPTIONS']['retry_policy'] must be a dict of RetryPolicy's "
            f"arguments, not {given!r}"
        )
    try:
        return RetryPolicy(**given)
    except (TypeError, ValueError) as exc:
        raise InvalidTaskBackend(
            f"TASKS[{alias!r}]['OPTIONS']['retry_policy'] is not valid: {exc}"
        ) from exc


# --- the run of a task ----------------------------------------------------------


@workflow(name=TASK_WORKFLOW, retry_policy=ONE_ATTEMPT)
def task_workflow(ctx: Any) -> Any:
    """Call the task function as one step; its result is the run's output."""
    spec = task_spec(ctx.run_id, ctx.input)
    return ctx.step.run(
        spec["task"],
        functools.partial(execute, ctx.run_id, spec),
        retry_policy=step_policy(spec.get("backend")),
    )


def step_policy(alias: str | None) -> RetryPolicy:
    """The retry policy of the backend that enqueued the task (one attempt if it is gone)."""
    try:
        backend = task_backends[str(alias)]
    except Exception:  # removed from TASKS: execute() reports it as the step's error
        return ONE_ATTEMPT
    return getattr(backend, "retry_policy", ONE_ATTEMPT)


def execute(run_id: Any, spec: dict[str, Any]) -> Any:
    """The step: call the task function (an async one returns its coroutine to the engine)."""
    task = load_task(spec["task"])
    backend = task_backends[spec["backend"]]
    result = result_of(run_id, backend.alias)  # the worker's namespace may be another
    args: list[Any] = [TaskContext(task_result=result)] if task.takes_context else []
    args += spec.get("args", [])
    kwargs = spec.get("kwargs", {})
    if iscoroutinefunction(task.func):
        return call_async(task, backend, result, args, kwargs)
    task_started.send(type(backend), task_result=result)
    return normalize_json(task.func(*args, **kwargs))


async def call_async(
    task: Task, backend: Any, result: TaskResult, args: list[Any], kwargs: dict[str, Any]
) -> Any:
    await task_started.asend(type(backend), task_result=result)
    return normalize_json(await task.func(*args, **kwargs))


def load_task(path: str) -> Task:
    """The ``Task`` that ``@task`` made of the function at ``path`` (its module path)."""
    try:
        found = import_string(path)
    except ImportError as exc:
        raise InvalidTask(f"task {path!r} cannot be imported: {exc}") from exc
    if not isinstance(found, Task):
        raise InvalidTask(f"{path!r} is not a task (decorate the function with @task)")
    return found


def task_runs() -> Any:
    """The runs of tasks, of every namespace, on the engine's database."""
    return WorkflowRun.objects.using(get_store().using).filter(workflow_name=TASK_WORKFLOW)


def result_of(run_id: Any, alias: str) -> TaskResult:
    """The result of the task run ``run_id`` in any namespace (a worker's, say)."""
    return task_result(task_runs().get(pk=run_id), alias=alias)


def task_spec(run_id: Any, spec: Any) -> dict[str, Any]:
    """A task run's input, checked: "Resume with changes" may have made it anything."""
    if not (
        isinstance(spec, dict)
        and isinstance(spec.get("task"), str)
        and isinstance(spec.get("args", []), list)
        and isinstance(spec.get("kwargs", {}), dict)
    ):
        raise InvalidTask(
            f"run {run_id} is no task that can be run or read: its input must be an object "
            'of "task" (the task\'s module path), "args" (a list) and "kwargs" (an object), '
            f"not {spec!r:.200}"
        )
    return spec


def enqueued_by(spec: dict[str, Any], asked: str) -> str:
    """The alias of the backend that enqueued the task, if it is still one of ours; else
    the alias asked (as Django's database backend, a result names the backend stored)."""
    alias = spec.get("backend")
    if not isinstance(alias, str) or alias == asked:
        return asked
    try:
        ours = isinstance(task_backends[alias], WorkflowTaskBackend)
    except InvalidTaskBackend:  # removed from TASKS
        return asked
    return alias if ours else asked


def task_result(run: WorkflowRun, *, alias: str) -> TaskResult:
    """What the run of a task says as Django's ``TaskResult``."""
    spec = task_spec(run.pk, run.input)
    alias = enqueued_by(spec, alias)
    task = load_task(spec["task"])
    task = with_placement(task, run, spec, alias)
    attempts = list(
        StepAttempt.objects.using(run._state.db)
        .filter(
            workflow_run_id=run.pk,
            step_name=spec.get("task"),
            kind=StepAttempt.Kind.RUN,
            given_in__isnull=True,  # an output given by a resume is no attempt
        )
        .order_by("id")
        .values_list("status", "error", "started_at", "worker_id", "resume_generation")
    )
    errors = [task_error(error) for status, error, *_ in attempts if status == "failed" and error]
    status = STATUSES[run.status]
    if run_failed_itself(run, errors):  # a deadline, say: the run's own error says why
        own = run.error or {}
        errors.append(task_error({"type": own.get("type"), "message": own.get("message")}))
    if run.status == WorkflowRun.Status.CANCELED and not any(
        status == "failed" and (error or {}).get("type") == WORKFLOW_CANCELED
        for status, error, *_, generation in attempts
        if generation == run.resume_generation  # a cancel of the running attempt says it
    ):
        errors.append(
            TaskError(
                exception_class_path=CANCELED_PATH,
                traceback=f"{WORKFLOW_CANCELED}: run {run.pk} was canceled\n",
            )
        )
    result: TaskResult = TaskResult(
        task=task,
        id=str(run.pk),
        status=status,
        enqueued_at=run.created_at,
        started_at=run.started_at,
        last_attempted_at=attempts[-1][2] if attempts else None,
        finished_at=run.finished_at if status in FINISHED else None,
        args=spec.get("args", []),
        kwargs=spec.get("kwargs", {}),
        backend=alias,
        errors=errors,
        worker_ids=[worker or "" for *_, worker, _ in attempts],
    )
    if status == TaskResultStatus.SUCCESSFUL:
        object.__setattr__(result, "_return_value", run.output)
    return result


STATUSES: dict[str, TaskResultStatus] = {
    WorkflowRun.Status.PENDING: TaskResultStatus.READY,
    WorkflowRun.Status.RUNNING: TaskResultStatus.RUNNING,
    WorkflowRun.Status.COMPLETED: TaskResultStatus.SUCCESSFUL,
    WorkflowRun.Status.FAILED: TaskResultStatus.FAILED,
    WorkflowRun.Status.CANCELED: TaskResultStatus.FAILED,
}
FINISHED = {TaskResultStatus.SUCCESSFUL, TaskResultStatus.FAILED}
# The engine's reasons to fail a run that no failed attempt of its step states.
RUN_ERRORS = {DEADLINE_EXCEEDED, ATTEMPT_CAP_EXCEEDED, NON_DETERMINISTIC}


def run_failed_itself(run: WorkflowRun, errors: list[TaskError]) -> bool:
    """Whether the failed run's own error belongs in ``errors``: every failed result has
    one, and the engine's own reasons are not its step's (a step's failure is)."""
    if run.status != WorkflowRun.Status.FAILED or not isinstance(run.error, dict):
        return False
    return not errors or run.error.get("type") in RUN_ERRORS


def with_placement(task: Task, run: WorkflowRun, spec: dict[str, Any], alias: str) -> Task:
    """The task as it was enqueued: the run's queue and priority, its run_after, the backend."""
    run_after = spec.get("run_after")
    try:
        return dataclasses.replace(
            task,
            priority=run.priority,
            queue_name=run.queue,
            run_after=datetime.fromisoformat(run_after) if run_after else None,
            backend=alias,
        )
    except Exception:  # the task's code or settings changed since: as it is now
        return task


def task_error(error: dict[str, Any]) -> TaskError:
    """A stored step error as Django's ``TaskError`` (the class's dotted path and traceback)."""
    kind = str(error.get("type") or "Exception")
    path = error.get("path") or class_path(kind)
    trace = error.get("traceback") or f"{kind}: {error.get('message', '')}\n"
    return TaskError(exception_class_path=path, traceback=trace)


def class_path(kind: str) -> str:
    """The dotted path of an error class stored without one, so that ``exception_class``
    imports it: a builtin's, or for the engine's own errors (``WorkerLost``: the worker
    stopped mid-attempt, ``DeadlineExceeded``, ...) ``WorkflowError``, and
    ``WorkflowCanceled`` for a cancel. The traceback's last line names the type."""
    builtin = getattr(builtins, kind, None)
    if isinstance(builtin, type) and issubclass(builtin, BaseException):
        return f"builtins.{kind}"
    return CANCELED_PATH if kind == WORKFLOW_CANCELED else ENGINE_ERROR_PATH


def finished(sender: Any, run: WorkflowRun, **kwargs: Any) -> None:
    """``task_finished`` once a task's run has finished (after its commit)."""
    if run.workflow_name != TASK_WORKFLOW or not task_finished.has_listeners():
        return
    alias = (run.input or {}).get("backend") if isinstance(run.input, dict) else None
    try:
        backend = task_backends[str(alias)]
        result = result_of(run.pk, backend.alias)
    except Exception as exc:
        logger.warning(
            "task_finished not sent run=%s error=%s", run.pk, type(exc).__name__, exc_info=True
        )
        return
    task_finished.send(type(backend), task_result=result)


for _signal in (run_completed, run_failed, run_canceled):
    _signal.connect(finished, dispatch_uid=f"openworkflow-task-finished-{id(_signal)}")
