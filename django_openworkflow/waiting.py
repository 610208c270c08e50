"""What a pending run waits for: one rule, used by ``run.waiting_for()``, the pages and
``testing.drain()``."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .models import StepAttempt, WorkflowRun

WaitKind = Literal["sleep", "retry", "child", "signal"]


@dataclass(frozen=True)
class WaitingFor:
    """Why a pending run is parked.

    ``kind`` is ``"sleep"`` (``until`` the sleep ends), ``"retry"`` (a step,
    or the workflow when ``step`` is None, runs again at ``until``),
    ``"child"`` (``child_run_id`` must end; ``until`` is the step's timeout)
    or ``"signal"`` (``signal`` must arrive; ``until`` is the timeout). A
    timeout of None means the run waits as long as it takes.
    """

    kind: WaitKind
    step: str | None
    until: datetime | None
    child_run_id: uuid.UUID | None = None
    signal: str | None = None


def waiting_for(
    run: WorkflowRun, attempts: Iterable[StepAttempt] | None = None
) -> WaitingFor | None:
    """What ``run`` waits for, or None (not pending, or simply due or not yet started).

    ``attempts`` may give the run's step attempts (in id order) already loaded.
    """
    from .models import StepAttempt

    if run.status != run.Status.PENDING:
        return None
    if attempts is None:
        attempts = run.step_attempts.filter(resume_generation=run.resume_generation)
    current = sorted(
        (a for a in attempts if a.resume_generation == run.resume_generation), key=lambda a: a.pk
    )
    waits: dict[str, WaitKind] = {
        StepAttempt.Kind.SLEEP: "sleep",
        StepAttempt.Kind.WORKFLOW: "child",
        StepAttempt.Kind.SIGNAL_WAIT: "signal",
    }
    for attempt in reversed(current):
        if attempt.status == StepAttempt.Status.RUNNING and attempt.kind in waits:
            return WaitingFor(
                kind=waits[attempt.kind],
                step=attempt.step_name,
                until=attempt.wake_at,
                child_run_id=attempt.child_workflow_run_id,
                signal=attempt.signal,
            )
    if run.error is not None:  # a workflow-level retry keeps the last error until it runs
        return WaitingFor(kind="retry", step=None, until=run.available_at)
    completed = {a.step_name for a in current if a.status == StepAttempt.Status.COMPLETED}
    failed = [a for a in current if a.status == StepAttempt.Status.FAILED]
    retried = [a for a in failed if a.step_name not in completed]
    if retried:
        return WaitingFor(kind="retry", step=retried[-1].step_name, until=run.available_at)
    return None
