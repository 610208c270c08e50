"""``@workflow``, ``Workflow.start()`` and the name -> workflow registry."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.utils import timezone

from .clock import Now
from .conf import app_settings
from .cron import schedules_of
from .durations import RetryPolicy
from .names import check_name, text_problem
from .queues import (
    DEFAULT_QUEUE,
    MAX_QUEUE_LENGTH,
    check_concurrency_key,
    check_priority,
    check_queue,
)
from .serialization import ensure_json
from .subjects import subject_key
from .tracing import starting

if TYPE_CHECKING:
    from django.db import models

    from .engine import WorkflowContext
    from .models import WorkflowRun
    from .store import Store

IDEMPOTENCY_WINDOW = datetime.timedelta(hours=24)
MAX_VERSION_LENGTH = 100  # WorkflowRun.version

_registry: dict[str, Workflow] = {}
_duplicates: list[tuple[Workflow, Workflow]] = []


class Workflow:
    """A registered workflow function; call ``start()`` to queue a run of it."""

    def __init__(
        self,
        fn: Callable[[WorkflowContext], Any],
        *,
        name: str,
        version: str | None = None,
        retry_policy: RetryPolicy | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        schedule: Any = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"workflow {name!r} must wrap a callable, not {fn!r}")
        if is_async_function(fn):
            raise TypeError(async_body_message(name, fn))
        check_name(name, "workflow name", blank=False)
        if version is not None and not isinstance(version, str):
            raise TypeError(f"version of workflow {name!r} must be a string, not {version!r}")
        if version is not None and len(version) > MAX_VERSION_LENGTH:
            raise ValueError(
                f"version of workflow {name!r} is {len(version)} characters; "
                f"at most {MAX_VERSION_LENGTH}"
            )
        if version is not None and (problem := text_problem(version)):
            raise ValueError(f"version {version!r} of workflow {name!r} {problem}")
        if retry_policy is not None and not isinstance(retry_policy, RetryPolicy):
            raise TypeError(
                f"retry_policy of workflow {name!r} must be a RetryPolicy, not {retry_policy!r}"
            )
        self.fn = fn
        self.name = name
        self.version = version
        self.retry_policy = retry_policy
        of = f' of workflow "{name}"'
        self.queue = check_name(queue, "queue", of=of, blank=False, max_length=MAX_QUEUE_LENGTH)
        self.priority = check_priority(priority, of)
        self.schedules = schedules_of(name, schedule)
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Workflow {self.name!r}>"

    def __call__(self, ctx: WorkflowContext) -> Any:
        return self.fn(ctx)

    def start(
        self,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        available_at: datetime.datetime | None = None,
        deadline_at: datetime.datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        concurrency_key: str | None = None,
        subject: models.Model | None = None,
    ) -> WorkflowRun:
        """Queue a run of this workflow and return its ``WorkflowRun``.

        Inside the caller's ``transaction.atomic()`` the run exists only if
        that transaction commits. With ``idempotency_key``, a run of this
        workflow started with the same key in the last 24 hours is returned
        instead of a new one. ``queue`` and ``priority`` override the
        workflow's; ``concurrency_key`` shares the queue's ``key_concurrency``
        limit with the other runs of that key. ``subject`` is the saved model
        instance the run is about (``run.subject``, ``ctx.subject``,
        ``WorkflowRun.objects.for_subject(obj)``).
        """
        from .results import started
        from .store import get_store

        ensure_json(input, f'input of workflow "{self.name}"')
        available_at = _aware(available_at, "available_at", self.name)
        deadline_at = _aware(deadline_at, "deadline_at", self.name)
        if idempotency_key is not None:
            check_name(idempotency_key, "idempotency_key", of=f' of workflow "{self.name}"')
        subject_fields: dict[str, Any] = {}
        if subject is not None:
            subject_type_id, subject_id = subject_key(subject, f' of workflow "{self.name}"')
            subject_fields = {"subject_type_id": subject_type_id, "subject_id": subject_id}
        namespace = app_settings.NAMESPACE
        store = get_store()
        fields = {
            "namespace": namespace,
            "workflow_name": self.name,
            "version": self.version,
            "input": input,
            "available_at": available_at,
            "deadline_at": deadline_at,
            **self.placement(queue, priority, concurrency_key),
            **subject_fields,
        }
        with starting(self.name) as trace_context:
            fields["trace_context"] = trace_context
            if idempotency_key is None:
                return started(store.insert_run(**fields), store.using)
            return self.start_once(store, idempotency_key, fields)

    async def astart(self, *args: Any, **kwargs: Any) -> WorkflowRun:
        """``start()`` for async code (an async view): the same arguments, awaited."""
        return await sync_to_async(self.start)(*args, **kwargs)

    def start_once(self, store: Store, idempotency_key: str, fields: dict[str, Any]) -> WorkflowRun:
        """``start()`` with a key: the run started with it in the last 24 hours, or a new one."""
        from .models import WorkflowRun
        from .results import started

        namespace = fields["namespace"]
        with store.atomic():
            store.lock_key("start", namespace, self.name, idempotency_key)
            existing = (
                WorkflowRun.objects.using(store.using)
                .filter(
                    namespace=namespace,
                    workflow_name=self.name,
                    idempotency_key=idempotency_key,
                    created_at__gte=Now() - IDEMPOTENCY_WINDOW,
                )
                .order_by("-created_at")
                .first()
            )
            if existing is not None:
                return existing
            run = store.insert_run(**fields, idempotency_key=idempotency_key)
        return started(run, store.using)

    def start_many(
        self,
        inputs: Iterable[Any],
        *,
        available_at: datetime.datetime | None = None,
        deadline_at: datetime.datetime | None = None,
        queue: str | None = None,
        priority: int | None = None,
        concurrency_key: str | None = None,
    ) -> list[WorkflowRun]:
        """Queue one run per input in one statement and one transaction; return the runs.

        For bulk enqueueing (imports, fan-out from a view, benchmarks); use
        ``start()`` when a run needs an idempotency key or a subject. ``queue``,
        ``priority`` and ``concurrency_key`` apply to every run.
        """
        from .models import WorkflowRun
        from .store import get_store

        inputs = list(inputs)
        for index, value in enumerate(inputs):
            ensure_json(value, f'input {index} of workflow "{self.name}"')
        available_at = _aware(available_at, "available_at", self.name)
        deadline_at = _aware(deadline_at, "deadline_at", self.name)
        namespace = app_settings.NAMESPACE
        store = get_store()
        extra: dict[str, Any] = self.placement(queue, priority, concurrency_key)
        if available_at:
            extra["available_at"] = available_at
        with starting(self.name, runs=len(inputs)) as trace_context:
            runs = [
                WorkflowRun(
                    namespace=namespace,
                    workflow_name=self.name,
                    version=self.version,
                    input=value,
                    deadline_at=deadline_at,
                    trace_context=trace_context,
                    **extra,
                )
                for value in inputs
            ]
            with store.atomic():
                created = WorkflowRun.objects.using(store.using).bulk_create(runs, batch_size=1000)
                if created:
                    store.notify(namespace)
        return created

    async def astart_many(self, *args: Any, **kwargs: Any) -> list[WorkflowRun]:
        """``start_many()`` for async code: the same arguments, awaited."""
        return await sync_to_async(self.start_many)(*args, **kwargs)

    def placement(
        self, queue: str | None, priority: int | None, concurrency_key: str | None
    ) -> dict[str, Any]:
        """The queue, priority and concurrency key of a new run: checked, defaults filled in."""
        of = f' of workflow "{self.name}"'
        return {
            "queue": check_queue(self.queue if queue is None else queue, of),
            "priority": self.priority if priority is None else check_priority(priority, of),
            "concurrency_key": check_concurrency_key(concurrency_key, of),
        }


def is_async_function(fn: Any) -> bool:
    """Whether calling ``fn`` makes a coroutine: an ``async def`` function, a
    ``functools.partial`` of one, or an object whose ``__call__`` is one."""
    return iscoroutinefunction(fn) or iscoroutinefunction(type(fn).__call__)


def async_body_message(name: str, fn: Any) -> str:
    """Why a workflow function cannot be ``async def`` (docs/async.md)."""
    return (
        f"workflow {name!r} is an async function ({fn!r}): a workflow function is "
        "replayed from the top on every pass and each of its steps is a durable call "
        "that waits on the database, so it must be a plain def; make its steps async "
        "instead: ctx.step.run(name, async_fn)"
    )


def _aware(value: Any, what: str, name: str) -> datetime.datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime.datetime):
        raise TypeError(
            f'{what} of workflow "{name}" must be a datetime, not {type(value).__name__} {value!r}'
        )
    if timezone.is_naive(value):
        return timezone.make_aware(value)
    return value


def workflow(
    name: str | Callable[..., Any] | None = None,
    *,
    version: str | None = None,
    retry_policy: RetryPolicy | None = None,
    queue: str = DEFAULT_QUEUE,
    priority: int = 0,
    schedule: Any = None,
) -> Any:
    """Register a workflow function. Use as ``@workflow(name="charge-order")`` or ``@workflow``.

    ``name`` defaults to the function's dotted path. ``queue`` and
    ``priority`` are the defaults of its runs (``start()`` may override them).
    ``schedule`` starts runs on a cron schedule: a cron string, a ``Schedule``
    or a list of them (see docs/schedules.md).
    """
    if callable(name):
        return workflow()(name)
    if name is not None:
        check_name(name, "workflow name", blank=False)

    def decorator(fn: Callable[..., Any]) -> Workflow:
        if not callable(fn):
            raise TypeError(f"@workflow must decorate a function, not {fn!r}")
        wf_name = name or f"{fn.__module__}.{fn.__qualname__}"
        wf = Workflow(
            fn,
            name=wf_name,
            version=version,
            retry_policy=retry_policy,
            queue=queue,
            priority=priority,
            schedule=schedule,
        )
        register(wf)
        return wf

    return decorator


def register(wf: Workflow) -> None:
    previous = _registry.get(wf.name)
    if previous is not None and qualified_name(previous.fn) != qualified_name(wf.fn):
        _duplicates.append((previous, wf))
    _registry[wf.name] = wf


def qualified_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"


def get_workflow(name: str) -> Workflow | None:
    return _registry.get(name)


def registered_workflows() -> list[Workflow]:
    return [_registry[name] for name in sorted(_registry)]


def workflow_names() -> list[str]:
    return sorted(_registry)


def duplicate_registrations() -> list[tuple[Workflow, Workflow]]:
    return list(_duplicates)


def schedule_clashes() -> list[tuple[str, list[str]]]:
    """Schedule names declared by more than one workflow: (name, the workflows' names)."""
    owners: dict[str, list[str]] = {}
    for wf in registered_workflows():
        for declared in wf.schedules:
            owners.setdefault(declared.name, []).append(wf.name)  # type: ignore[arg-type]
    return [(name, names) for name, names in sorted(owners.items()) if len(names) > 1]
