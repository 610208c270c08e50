"""What a workflow function sees: ``ctx`` and its ``ctx.step`` operations."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from django.db import DatabaseError

from ..durations import Duration, RetryPolicy
from ..subjects import load_subject
from .control import EngineDatabaseError

if TYPE_CHECKING:
    from django.db import models

    from ..registry import Workflow
    from ..replay import ReplayPass
    from .execution import Execution

_UNREAD = object()  # ctx.subject not read yet in this pass

F = TypeVar("F", bound=Callable[..., Any])


def engine_statements(method: F) -> F:
    """A ``DatabaseError`` out of a ``ctx.step`` operation is the engine's own (a step
    function's errors are its step's failures): unwind as ``EngineDatabaseError``."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except DatabaseError as exc:
            raise EngineDatabaseError(exc) from exc

    return wrapper  # type: ignore[return-value]


class WorkflowContext:
    """What a workflow function sees.

    ``ctx.input``, ``ctx.run_id``, ``ctx.version``, ``ctx.scheduled_at`` (the
    schedule's tick, an aware datetime; None for a run no schedule started),
    ``ctx.subject`` and ``ctx.step``. The worker's pass gives it an
    ``Execution``; the replay check (``replay.py``) a ``ReplayPass``, which
    only replays.
    """

    def __init__(self, execution: Execution | ReplayPass) -> None:
        run = execution.run
        self._run = run
        self._subject: object = _UNREAD
        self.input = run.input
        self.run_id = run.pk
        self.version = run.version
        self.scheduled_at = run.scheduled_at
        self.step = StepApi(execution)

    def __repr__(self) -> str:
        return f"<WorkflowContext run={self.run_id}>"

    @property
    def subject(self) -> models.Model | None:
        """The model instance the run is about (``start(..., subject=obj)``), or None.

        Read from the database at the first access in each pass of the
        workflow function (no query when the workflow never asks), so it is
        the object as it is *now*, not as it was when an earlier pass ran:
        read it inside a step when the workflow branches on a value that
        must stay the same on replay. None when the run has no subject or
        the object was deleted.
        """
        if self._subject is _UNREAD:
            self._subject = load_subject(self._run.subject_type_id, self._run.subject_id)
        return self._subject  # type: ignore[return-value]


class StepApi:
    """``ctx.step``: the durable operations a workflow is made of."""

    def __init__(self, execution: Execution | ReplayPass) -> None:
        self._execution = execution

    @engine_statements
    def run(
        self, name: str, fn: Callable[[], Any], *, retry_policy: RetryPolicy | None = None
    ) -> Any:
        """Run ``fn`` once and store its JSON result; on replay return the stored result."""
        return self._execution.steps.run(name, fn, retry_policy, atomic=False)

    @engine_statements
    def atomic(
        self, name: str, fn: Callable[[], Any], *, retry_policy: RetryPolicy | None = None
    ) -> Any:
        """Like ``run``, but ``fn``'s database writes commit together with the step's result."""
        return self._execution.steps.run(name, fn, retry_policy, atomic=True)

    @engine_statements
    def parallel(
        self,
        steps: Iterable[tuple[str, Callable[[], Any]]],
        *,
        retry_policy: RetryPolicy | None = None,
    ) -> list[Any]:
        """Run independent ``(name, fn)`` steps at once, each stored as its own attempt.

        Returns their results in the given order. Each ``fn`` runs on its own
        thread (and database connection); replay returns stored results.
        """
        return self._execution.steps.parallel(steps, retry_policy)

    @engine_statements
    def sleep(self, name: str, duration: Duration) -> None:
        """Park the run for ``duration`` without holding a worker slot."""
        return self._execution.waits.sleep(name, duration)

    @engine_statements
    def run_workflow(
        self,
        workflow: Workflow | str,
        input: Any = None,
        *,
        name: str | None = None,
        timeout: Duration | None = None,
        queue: str | None = None,
        priority: int | None = None,
        concurrency_key: str | None = None,
    ) -> Any:
        """Start a child run and park until it ends; return its output.

        A failed or canceled child, or a ``timeout`` that passes first, fails
        the step (``StepFailed``); on timeout the child keeps running. The
        child takes its workflow's queue and priority unless given here.
        """
        return self._execution.waits.run_workflow(
            workflow,
            input,
            name=name,
            timeout=timeout,
            placement=(queue, priority, concurrency_key),
        )

    @engine_statements
    def send_signal(self, signal: str, data: Any = None, *, name: str | None = None) -> list[str]:
        """Deliver ``data`` to the runs waiting on ``signal`` now (exactly once, as a step)."""
        return self._execution.waits.send_signal(signal, data, name=name)

    @engine_statements
    def wait_for_signal(
        self, signal: str, *, name: str | None = None, timeout: Duration | None = None
    ) -> dict[str, Any] | None:
        """Park until ``signal`` arrives: ``{"data": payload}``, or ``None`` on timeout."""
        return self._execution.waits.wait_for_signal(signal, name=name, timeout=timeout)
