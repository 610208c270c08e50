"""``@workflow``, ``Workflow.start()`` and the name -> workflow registry."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from django.db import connections, router, transaction
from django.db.models.functions import Now
from django.utils import timezone

from .conf import app_settings
from .durations import RetryPolicy
from .serialization import check_name_text, ensure_json, text_problem

if TYPE_CHECKING:
    from .engine import WorkflowContext
    from .models import WorkflowRun

IDEMPOTENCY_WINDOW = datetime.timedelta(hours=24)
KEY_LOCK_SLOTS = 65_536  # MySQL/MariaDB: rows of WorkflowKeyLock that keys hash to
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
    ) -> None:
        if not callable(fn):
            raise TypeError(f"workflow {name!r} must wrap a callable, not {fn!r}")
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"workflow name must be a non-empty string, not {name!r}")
        check_name_text(name, "workflow name")
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
    ) -> WorkflowRun:
        """Queue a run of this workflow and return its ``WorkflowRun``.

        Inside the caller's ``transaction.atomic()`` the run exists only if
        that transaction commits. With ``idempotency_key``, a run of this
        workflow started with the same key in the last 24 hours is returned
        instead of a new one.
        """
        from .managers import notify
        from .models import WorkflowRun
        from .results import started

        ensure_json(input, f'input of workflow "{self.name}"')
        available_at = _aware(available_at, "available_at", self.name)
        deadline_at = _aware(deadline_at, "deadline_at", self.name)
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str) or not idempotency_key
        ):
            raise TypeError(
                f'idempotency_key of workflow "{self.name}" must be a non-empty string, '
                f"not {idempotency_key!r}"
            )
        if idempotency_key is not None and len(idempotency_key) > 255:
            raise ValueError(
                f'idempotency_key of workflow "{self.name}" is {len(idempotency_key)} '
                "characters long; at most 255 are allowed"
            )
        if idempotency_key is not None and (problem := text_problem(idempotency_key)):
            raise ValueError(
                f'idempotency_key {idempotency_key!r} of workflow "{self.name}" {problem}'
            )
        namespace = app_settings.NAMESPACE
        using = router.db_for_write(WorkflowRun)
        if idempotency_key is None and connections[using].vendor == "postgresql":
            from . import fastpath

            run = fastpath.start_run(
                using,
                namespace=namespace,
                workflow_name=self.name,
                version=self.version,
                input=input,
                available_at=available_at,
                deadline_at=deadline_at,
            )
            return started(run, using)
        with transaction.atomic(using=using):
            if idempotency_key is not None:
                lock_key(using, "start", namespace, self.name, idempotency_key)
                existing = (
                    WorkflowRun.objects.using(using)
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
            fields: dict[str, Any] = {
                "namespace": namespace,
                "workflow_name": self.name,
                "version": self.version,
                "input": input,
                "idempotency_key": idempotency_key,
                "deadline_at": deadline_at,
            }
            if available_at is not None:
                fields["available_at"] = available_at
            run = WorkflowRun.objects.using(using).create(**fields)
            notify(using, namespace)
        return started(run, using)

    def start_many(
        self,
        inputs: Iterable[Any],
        *,
        available_at: datetime.datetime | None = None,
        deadline_at: datetime.datetime | None = None,
    ) -> list[WorkflowRun]:
        """Queue one run per input in one statement and one transaction; return the runs.

        For bulk enqueueing (imports, fan-out from a view, benchmarks); use
        ``start()`` when a run needs an idempotency key.
        """
        from .managers import notify
        from .models import WorkflowRun

        inputs = list(inputs)
        for index, value in enumerate(inputs):
            ensure_json(value, f'input {index} of workflow "{self.name}"')
        available_at = _aware(available_at, "available_at", self.name)
        deadline_at = _aware(deadline_at, "deadline_at", self.name)
        namespace = app_settings.NAMESPACE
        using = router.db_for_write(WorkflowRun)
        extra: dict[str, Any] = {"available_at": available_at} if available_at else {}
        runs = [
            WorkflowRun(
                namespace=namespace,
                workflow_name=self.name,
                version=self.version,
                input=value,
                deadline_at=deadline_at,
                **extra,
            )
            for value in inputs
        ]
        with transaction.atomic(using=using):
            created = WorkflowRun.objects.using(using).bulk_create(runs, batch_size=1000)
            if created:
                notify(using, namespace)
        return created


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


def lock_key(using: str, *parts: str) -> None:
    """Serialize transactions that use the same idempotency key until they end.

    PostgreSQL: a transaction-level advisory lock on a hash of the parts.
    SQLite: the IMMEDIATE transaction already holds the database write lock.
    MySQL/MariaDB: an InnoDB row lock on the key's ``WorkflowKeyLock`` slot, taken
    by ``INSERT ... ON DUPLICATE KEY UPDATE`` (an exclusive lock on the new or the
    existing row, also for waiters, so they never deadlock upgrading a shared one).
    Like the advisory lock it ends with the outermost transaction, commit or
    rollback. (``GET_LOCK`` would not: it belongs to the session and outlives a
    rollback, for which Django has no hook.)
    """
    connection = connections[using]
    text = "\x1f".join(("django_openworkflow", *parts))
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [text])
    elif connection.vendor == "mysql":
        from .models import WorkflowKeyLock

        digest = hashlib.sha256(text.encode()).digest()
        table = connection.ops.quote_name(WorkflowKeyLock._meta.db_table)
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} (slot) VALUES (%s) ON DUPLICATE KEY UPDATE slot = slot",
                [int.from_bytes(digest[:8], "big") % KEY_LOCK_SLOTS],
            )


def workflow(
    name: str | Callable[..., Any] | None = None,
    *,
    version: str | None = None,
    retry_policy: RetryPolicy | None = None,
) -> Any:
    """Register a workflow function. Use as ``@workflow(name="charge-order")`` or ``@workflow``.

    ``name`` defaults to the function's dotted path.
    """
    if callable(name):
        return workflow()(name)
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise TypeError(f"workflow name must be a non-empty string, not {name!r}")

    def decorator(fn: Callable[..., Any]) -> Workflow:
        if not callable(fn):
            raise TypeError(f"@workflow must decorate a function, not {fn!r}")
        wf_name = name or f"{fn.__module__}.{fn.__qualname__}"
        wf = Workflow(fn, name=wf_name, version=version, retry_policy=retry_policy)
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
