"""``WorkflowRun.result()``: wait for a run to finish.

A run started inside ``transaction.atomic()`` exists for workers only once
that transaction commits, so ``result()`` called before the commit could
only time out (or, without a timeout, wait forever). It raises
``TransactionManagementError`` at once instead, naming the run; wait after
the block, or in ``transaction.on_commit()``.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any

from django.db import connections, transaction

from .conf import app_settings
from .exceptions import WorkflowCanceled, WorkflowFailed

if TYPE_CHECKING:
    from .models import WorkflowRun

# Runs started inside a transaction that has not committed yet (by identity
# and primary key, so a copy fetched again in that transaction counts too).
_uncommitted: weakref.WeakSet[WorkflowRun] = weakref.WeakSet()


def started(run: WorkflowRun, using: str) -> WorkflowRun:
    """Note a newly inserted run; inside ``atomic()`` it is uncommitted until the commit."""
    if connections[using].in_atomic_block:
        _uncommitted.add(run)
        transaction.on_commit(lambda: _uncommitted.discard(run), using=using)
    return run


def wait_for_result(run: WorkflowRun, timeout: float | None) -> Any:
    using = run._state.db or app_settings.DATABASE
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.005
    while True:
        row = (
            type(run)
            .objects.using(using)
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
        in_transaction = connections[using].in_atomic_block
        if in_transaction and run in _uncommitted:
            raise transaction.TransactionManagementError(
                f"run {run.pk} is not committed yet: result() is waiting inside the "
                "transaction that started it, where no worker can see the run. Call "
                "result() after the atomic() block, or in transaction.on_commit()."
            )
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"run {run.pk} did not finish within {timeout} s (it is {run.status})"
                    + (IN_TRANSACTION_HINT if in_transaction else "")
                )
            delay = min(delay, left)
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


IN_TRANSACTION_HINT = (
    "; result() was called inside transaction.atomic(): a run started in this "
    "transaction is seen by workers only after it commits"
)
