"""Exceptions raised by django-openworkflow.

Every public exception derives from :class:`WorkflowError`, so callers can
catch the whole family with one ``except`` clause.
"""

from __future__ import annotations

import enum
from typing import Any


class WorkflowError(Exception):
    """Base class of every error this package raises on purpose."""


class Refusal(str, enum.Enum):
    """Why a run cannot be resumed, rerun or canceled: ``InvalidTransition.reason``.

    Decided in one place, ``WorkflowRun.resume_refusal()`` /
    ``rerun_refusal()`` / ``cancel_refusal()``, which the managers, the admin
    and the pages all call.
    """

    STATUS = "status"
    """Its status does not allow it (``InvalidTransition.status`` says which)."""
    DEADLINE = "deadline"
    """Resume, rerun: its ``deadline_at`` has passed; it needs a future ``deadline_at=``."""
    NEW_DEADLINE = "new-deadline"
    """Resume, rerun: the ``deadline_at=`` given is not in the future."""
    STALE = "stale"
    """Resume, rerun: ``expected_generation=`` is not the run's ``resume_generation`` any more:
    it was resumed or rerun since the caller read it (a page showed it, say)."""
    BUSY = "busy"
    """Resume, rerun, cancel with ``lock_timeout=``: a row the transition must lock (the
    run's, or its parent's or a child's) stayed locked longer than that, by a step of a
    worker (``RunBusy``); nothing was read, so ``InvalidTransition.status`` is None."""

    def __str__(self) -> str:
        return self.value


class InvalidTransition(WorkflowError):
    """A run was asked to move to a status it cannot reach from its current one.

    ``run_id``, ``status`` (read under the row lock) and ``reason`` (a
    :class:`Refusal`) say which run and why, so callers never parse the message.
    """

    def __init__(
        self,
        message: str,
        *,
        run_id: Any = None,
        status: str | None = None,
        reason: Refusal | None = None,
    ) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.status = status
        self.reason = reason


class RunBusy(InvalidTransition):
    """A transition given ``lock_timeout=`` found a row it must lock held that long.

    The run (or its parent or a child run the transition locks with it) is in
    a step of a worker that holds the row: a ``step.atomic`` completing, say,
    and on SQLite any transaction, which holds the whole database. Nothing
    changed; trying again once the step commits will do. A subclass of
    ``InvalidTransition`` (``reason`` is ``Refusal.BUSY``, ``status`` None), so
    code that reports refused transitions reports it too; ``lock_timeout`` is
    the wait given, ``action`` the transition ("resume", "rerun", "cancel").
    Only raised when the caller passes ``lock_timeout=`` (the pages and the
    admin do: ``OPENWORKFLOW["PAGE_LOCK_TIMEOUT"]``).
    """

    def __init__(self, run_id: Any, *, action: str, lock_timeout: float) -> None:
        super().__init__(
            f"cannot {action} run {run_id} now: it is busy in a step (a row the {action} "
            f"must lock, the run's or a parent or child run's, stayed locked for "
            f"{lock_timeout:g}s); try again in a moment",
            run_id=run_id,
            reason=Refusal.BUSY,
        )
        self.action = action
        self.lock_timeout = lock_timeout


class StepFailed(WorkflowError):
    """A step used up its retry budget; carries the step's last error.

    Workflow code may catch it (to compensate, say). Uncaught, it fails the
    run outright: the workflow retry policy does not apply to it.
    """

    def __init__(self, step_name: str, error: dict[str, Any], attempts: int) -> None:
        self.step_name = step_name
        self.error = error
        self.attempts = attempts
        kind = error.get("type", "Error")
        message = error.get("message", "")
        noun = "attempt" if attempts == 1 else "attempts"
        super().__init__(f'step "{step_name}" failed after {attempts} {noun}: {kind}: {message}')


class WorkflowFailed(WorkflowError):
    """Raised by ``WorkflowRun.result()`` for a run that ended ``failed``."""

    def __init__(self, run_id: Any, error: dict[str, Any] | None) -> None:
        self.run_id = run_id
        self.error = error or {}
        kind = self.error.get("type", "Error")
        message = self.error.get("message", "")
        super().__init__(f"run {run_id} failed: {kind}: {message}")


class WorkflowCanceled(WorkflowError):
    """Raised by ``WorkflowRun.result()`` for a run that was canceled."""

    def __init__(self, run_id: Any) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id} was canceled")
