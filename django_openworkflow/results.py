"""``WorkflowRun.result()``: wait for a run to finish."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .exceptions import WorkflowCanceled, WorkflowFailed

if TYPE_CHECKING:
    from .models import WorkflowRun


def wait_for_result(run: WorkflowRun, timeout: float | None) -> Any:
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.005
    while True:
        row = (
            type(run)
            .objects.using(run._state.db or "default")
            .filter(pk=run.pk)
            .values("status", "output", "error", "finished_at")
            .get()
        )
        for field, value in row.items():
            setattr(run, field, value)
        if run.status == run.Status.COMPLETED:
            return run.output
        if run.status == run.Status.FAILED:
            raise WorkflowFailed(run.pk, run.error)
        if run.status == run.Status.CANCELED:
            raise WorkflowCanceled(run.pk)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"run {run.pk} did not finish within {timeout} s (it is {run.status})"
                )
            delay = min(delay, left)
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
