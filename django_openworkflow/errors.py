"""The errors the engine stores: every ``type`` a stored error can have, in one place.

A stored error is a JSON object: ``type`` and ``message``, and where it
applies ``traceback``, ``path`` (the dotted path of an exception class that
is not a builtin), ``step`` (the step that failed a run), ``child_run`` and
``retryable`` (``False``: the step is not retried). A failure of user
code is stored by ``serialization.describe_exception`` with the exception's
own type; the engine's own reasons are these.
"""

from __future__ import annotations

from typing import Any

from .serialization import describe_exception

WORKER_LOST = "WorkerLost"
DEADLINE_EXCEEDED = "DeadlineExceeded"
WORKFLOW_CANCELED = "WorkflowCanceled"
NON_DETERMINISTIC = "NonDeterministicWorkflow"
ATTEMPT_CAP_EXCEEDED = "AttemptCapExceeded"
CHILD_FAILED = "ChildWorkflowFailed"
CHILD_MISSING = "ChildWorkflowMissing"
CHILD_TIMEOUT = "ChildWorkflowTimeout"
RERUN = "Rerun"

WORKER_LOST_ERROR = {
    "type": WORKER_LOST,
    "message": "the worker executing this step stopped before the step finished "
    "(it crashed, lost its database connection, or its lease expired)",
}
DEADLINE_ERROR = {
    "type": DEADLINE_EXCEEDED,
    "message": "deadline passed: the run did not finish before its deadline_at",
}
CANCELED_ERROR = {"type": WORKFLOW_CANCELED, "message": "canceled while the step was running"}


class Refused(Exception):
    """A step result that cannot be stored: not JSON (TypeError) or too large (ValueError)."""

    def __init__(self, message: str, kind: type[Exception]) -> None:
        super().__init__(message)
        self.kind = kind


def step_error(exc: BaseException) -> dict[str, Any]:
    """The stored error of a failed step; a refused result is not retried."""
    error = describe_exception(exc)
    if isinstance(exc, Refused):
        error["type"] = exc.kind.__name__
        error.pop("path", None)  # a builtin's (TypeError, ValueError): not the engine's Refused
        error["retryable"] = False
    return error


def refused_again(error: dict[str, Any]) -> Exception:
    """The error a refused step result raises, again on every replay."""
    kind = ValueError if error.get("type") == "ValueError" else TypeError
    return kind(error["message"])


def deadline_error(last_error: dict[str, Any], *, step: str | None = None) -> dict[str, Any]:
    """The run's error when its next retry would start after its deadline."""
    error = dict(DEADLINE_ERROR)
    error["message"] = (
        "deadline passed: the next retry would start after the run's deadline_at; last error: "
        f"{last_error.get('type')}: {last_error.get('message')}"
    )
    if step:
        error["step"] = step
    if last_error.get("traceback"):
        error["traceback"] = last_error["traceback"]
    return error


def non_deterministic(message: str) -> dict[str, Any]:
    return {"type": NON_DETERMINISTIC, "message": message}


def attempt_cap(run_id: Any, cap: int) -> dict[str, Any]:
    return {
        "type": ATTEMPT_CAP_EXCEEDED,
        "message": f"run {run_id} reached the cap of {cap} step attempts",
    }


def child_missing(step: str) -> dict[str, Any]:
    return {
        "type": CHILD_MISSING,
        "message": f'the child run of step "{step}" no longer exists',
    }


def child_failed(child: dict[str, Any], *, canceled: bool) -> dict[str, Any]:
    """A child run (``pk``, ``workflow_name``, ``error``) that failed or was canceled."""
    child_error = child["error"] or {}
    verb = "was canceled" if canceled else "failed"
    cause = f": {child_error.get('type')}: {child_error.get('message')}" if child_error else ""
    error = {
        "type": CHILD_FAILED,
        "message": f"child run {child['pk']} ({child['workflow_name']}) {verb}{cause}",
        "child_run": str(child["pk"]),
    }
    if child_error.get("traceback"):
        error["traceback"] = child_error["traceback"]
    return error


def child_timeout(step: str, child_run_id: Any) -> dict[str, Any]:
    return {
        "type": CHILD_TIMEOUT,
        "message": (
            f'step "{step}" timed out waiting for child run {child_run_id}; the child keeps running'
        ),
        "child_run": str(child_run_id),
    }


def rerun_closed(run_id: Any, generation: int, from_step: str | None) -> dict[str, Any]:
    """The error of a wait that a rerun closed: its step runs again in ``generation``."""
    where = "from the start" if from_step is None else f'from step "{from_step}"'
    return {
        "type": RERUN,
        "message": (
            f"closed by the rerun of run {run_id} {where} (generation {generation}): "
            "the step runs again"
        ),
    }
