"""Workflow signals: deliver data to the runs waiting for a signal right now.

``send_signal()`` works from anywhere (a view, a shell); ``ctx.step.send_signal``
does the same from a workflow, as a step. Delivery locks each waiting run's
row, completes its waiting step with ``{"data": data}`` and makes the run due
at once, all in one transaction: a run that is on its way to parking either
parks first (and is woken) or sees the delivered step when it re-checks under
its own lock. Runs that start waiting later do not get the signal.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async

from .clock import Now
from .conf import app_settings
from .models import WorkflowSignal
from .names import check_name
from .registry import IDEMPOTENCY_WINDOW
from .serialization import ensure_json
from .store import get_store


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
    store = get_store()
    using = store.using
    with store.atomic():
        if idempotency_key is not None:
            store.lock_key("signal", namespace, signal, idempotency_key)
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
        woken = store.deliver_signal(namespace, signal, data)
        if idempotency_key is not None:
            WorkflowSignal.objects.using(using).create(
                namespace=namespace,
                signal=signal,
                idempotency_key=idempotency_key,
                data=data,
                delivered_to=[str(run_id) for run_id in woken],
            )
    return [str(run_id) for run_id in woken]


async def asend_signal(*args: Any, **kwargs: Any) -> list[str]:
    """``send_signal()`` for async code (an async view): the same arguments, awaited."""
    return await sync_to_async(send_signal)(*args, **kwargs)
