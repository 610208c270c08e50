"""Django signals for the run lifecycle, sent after the change commits.

Each is sent with ``sender=WorkflowRun`` and keyword arguments:

- ``run_started(run)``: a worker claimed a run that had not started (new or resumed).
- ``step_failed(run, step_name, error, attempt)``: a step attempt failed (it may be retried).
- ``run_completed(run)``, ``run_failed(run)``: the run finished so.
- ``run_resumed(run, by)``, ``run_canceled(run, by)``: a person (or code) resumed or canceled it.
- ``run_rerun(run, by, from_step)``: a person (or code) reran it (``from_step``: the step it
  runs again from, None for the start).

Receivers run after the transaction that made the change has committed; an
exception in a receiver is logged, never raised into the engine or the view.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from django.dispatch import Signal

logger = logging.getLogger(__name__)

run_started = Signal()
step_failed = Signal()
run_completed = Signal()
run_failed = Signal()
run_resumed = Signal()
run_canceled = Signal()
run_rerun = Signal()


def send_after_commit(signal: Signal, run: Any, *, using: str | None = None, **kwargs: Any) -> None:
    """Send ``signal`` once the current transaction commits (at once outside one)."""
    if not signal.has_listeners():
        return

    def send() -> None:
        for receiver, result in signal.send_robust(sender=type(run), run=run, **kwargs):
            if isinstance(result, Exception):
                # With the traceback: the receiver's bug is recorded nowhere else.
                logger.error(
                    "signal receiver failed receiver=%s run=%s workflow=%s error=%s",
                    getattr(receiver, "__qualname__", receiver),
                    run.pk,
                    run.workflow_name,
                    type(result).__name__,
                    exc_info=result,
                )

    transaction.on_commit(send, using=using)
