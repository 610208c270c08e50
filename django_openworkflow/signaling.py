"""Workflow signals: deliver data to the runs waiting for a signal right now.

``send_signal()`` works from anywhere (a view, a shell); ``ctx.step.send_signal``
does the same from a workflow, as a step. Delivery locks each waiting run's
row, completes its waiting step with ``{"data": data}`` and makes the run due
at once, all in one transaction: a run that is on its way to parking either
parks first (and is woken) or sees the delivered step when it re-checks under
its own lock. Runs that start waiting later do not get the signal.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.db import router, transaction
from django.db.models import F
from django.db.models.functions import Now

from .conf import app_settings
from .managers import ACTIVE, notify
from .models import StepAttempt, WorkflowRun, WorkflowSignal
from .names import check_name
from .pauses import pause_point
from .registry import IDEMPOTENCY_WINDOW, lock_key
from .serialization import ensure_json


def deliver(
    using: str, namespace: str, signal: str, data: Any, *, sender: Any = None
) -> list[uuid.UUID]:
    """Inside a transaction: deliver ``data`` to every step waiting on ``signal`` now.

    Locks the waiting runs (and the ``sender``, a run sending as a step) in
    the lock order, then re-reads who is still waiting. Only waits of a
    run's current resume generation take the signal.
    """
    waiting = StepAttempt.objects.using(using).filter(
        kind=StepAttempt.Kind.SIGNAL_WAIT,
        status=StepAttempt.Status.RUNNING,
        signal=signal,
        resume_generation=F("workflow_run__resume_generation"),
        workflow_run__namespace=namespace,
        workflow_run__status__in=ACTIVE,
    )
    run_ids = set(waiting.values_list("workflow_run_id", flat=True))
    locked = WorkflowRun.objects.db_manager(using).lock(
        run_ids if sender is None else run_ids | {sender}
    )
    if not run_ids:
        return []
    targets = list(waiting.filter(workflow_run_id__in=locked).values_list("pk", "workflow_run_id"))
    if not targets:
        return []
    pause_point("signal.locked", signal=signal, run_ids=locked)
    StepAttempt.objects.using(using).filter(pk__in=[pk for pk, _ in targets]).update(
        status=StepAttempt.Status.COMPLETED, output={"data": data}, finished_at=Now()
    )
    woken = sorted({run_id for _, run_id in targets})
    WorkflowRun.objects.using(using).filter(pk__in=woken, status=WorkflowRun.Status.PENDING).update(
        available_at=Now(), updated_at=Now()
    )
    notify(using, namespace)
    return woken


def send_signal(signal: str, data: Any = None, *, idempotency_key: str | None = None) -> list[str]:
    """Deliver ``data`` to every run waiting on ``signal`` now; return their ids as strings.

    A repeat with the same ``idempotency_key`` for the same signal within 24
    hours delivers nothing and returns ``[]``.
    """
    check_name(signal, "signal")
    ensure_json(data, f'data of signal "{signal}"')
    if idempotency_key is not None:
        check_name(idempotency_key, f'idempotency_key of signal "{signal}"')
    namespace = app_settings.NAMESPACE
    using = router.db_for_write(WorkflowRun)
    with transaction.atomic(using=using):
        if idempotency_key is not None:
            lock_key(using, "signal", namespace, signal, idempotency_key)
            if (
                WorkflowSignal.objects.using(using)
                .filter(
                    namespace=namespace,
                    signal=signal,
                    idempotency_key=idempotency_key,
                    sent_at__gte=Now() - IDEMPOTENCY_WINDOW,
                )
                .exists()
            ):
                return []
        woken = deliver(using, namespace, signal, data)
        if idempotency_key is not None:
            WorkflowSignal.objects.using(using).create(
                namespace=namespace,
                signal=signal,
                idempotency_key=idempotency_key,
                data=data,
                delivered_to=[str(run_id) for run_id in woken],
            )
    return [str(run_id) for run_id in woken]
