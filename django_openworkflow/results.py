"""``WorkflowRun.result()`` and ``aresult()``: wait for a run to finish.

A run started inside ``transaction.atomic()`` exists for workers only once
that transaction commits, so ``result()`` called before the commit could
only time out (or, without a timeout, wait forever). It raises
``TransactionManagementError`` at once instead, naming the run; wait after
the block, or in ``transaction.on_commit()``.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async
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
    """``run.result()``: poll the run's row until it finished, sleeping between reads."""
    using = run._state.db or app_settings.DATABASE
    wait = Wait(run, timeout)
    while True:
        state = poll(run, using)
        if state is not WAITING and state is not WAITING_IN_TRANSACTION:
            return state
        time.sleep(wait.delay(in_transaction=state is WAITING_IN_TRANSACTION))


async def await_result(run: WorkflowRun, timeout: float | None) -> Any:
    """``await run.aresult()``: as ``wait_for_result``, but the reads are awaited
    (``sync_to_async``) and so are the pauses between them: no thread waits."""
    using = run._state.db or app_settings.DATABASE
    wait = Wait(run, timeout)
    read = sync_to_async(poll)
    while True:
        state = await read(run, using)
        if state is not WAITING and state is not WAITING_IN_TRANSACTION:
            return state
        await asyncio.sleep(wait.delay(in_transaction=state is WAITING_IN_TRANSACTION))


WAITING = object()  # poll(): the run has not finished
WAITING_IN_TRANSACTION = object()  # ... and the caller is inside an atomic() block


def poll(run: WorkflowRun, using: str) -> Any:
    """Read the run's row once: its output when it completed, ``WAITING`` (or
    ``WAITING_IN_TRANSACTION``) while it has not finished.

    Raises ``WorkflowFailed`` or ``WorkflowCanceled`` for a run that ended so,
    and ``TransactionManagementError`` when the caller waits inside the
    transaction that started the run.
    """
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
    if not connections[using].in_atomic_block:
        return WAITING
    if run in _uncommitted:
        raise transaction.TransactionManagementError(
            f"run {run.pk} is not committed yet: result() is waiting inside the "
            "transaction that started it, where no worker can see the run. Call "
            "result() after the atomic() block, or in transaction.on_commit()."
        )
    return WAITING_IN_TRANSACTION


class Wait:
    """The pauses between two reads of a waiting ``result()``: growing from 5 ms to
    a quarter of a second, and ending in ``TimeoutError`` once ``timeout`` has passed."""

    def __init__(self, run: WorkflowRun, timeout: float | None) -> None:
        self.run = run
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.next = 0.005

    def delay(self, *, in_transaction: bool) -> float:
        """Seconds to wait before the next read; ``TimeoutError`` when the time is up."""
        delay = self.next
        self.next = min(delay * 2, 0.25)
        if self.deadline is None:
            return delay
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"run {self.run.pk} did not finish within {self.timeout} s "
                f"(it is {self.run.status})" + (IN_TRANSACTION_HINT if in_transaction else "")
            )
        return min(delay, left)


IN_TRANSACTION_HINT = (
    "; result() was called inside transaction.atomic(): a run started in this "
    "transaction is seen by workers only after it commits"
)
