"""Run workflows to completion inside your own tests, without waiting.

```python
from django_openworkflow.testing import run_to_completion

def test_order_ships(db):
    run = run_to_completion(process_order, {"order_id": order.pk})
    assert run.status == "completed"
```

``drain()`` executes every due run on the calling thread (so it works inside
a test's transaction: ``TestCase``, or pytest-django's ``db``; an async step
runs on an event loop of its own, its ORM calls on the calling thread), and when
nothing is due it *travels in time*: every timer of the active runs (sleeps,
retry delays, wait timeouts, deadlines) is moved closer by the same amount,
so the next one is due at once. Runs waiting for a signal without a timeout
stay waiting: send the signal, then call ``drain()`` again.

``drain(time_travel="sleeps")`` skips only sleeps and retry delays (step and
workflow retries): those runs become due at once, while every other timer
stays where it is, so a wait's timeout (signal or child) and a deadline never
pass. Use it to bring a run to its ``wait_for_signal`` and test what happens
when the signal arrives in time. ``run.waiting_for()`` says what a run waits
for.

``pause_at()`` stops a thread of the engine at a named pause point (see
``django_openworkflow.pauses``) so a test can force a race deterministically.

``assert_replays(run)`` checks that the code still replays a run's stored
history (running no step function): a run of the test's database, or one
exported from production with ``manage.py export_run ID > run.json`` and read
back with ``load_run(path)``, to pin a real history as a regression test.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, Literal

from django.db.models import F, Min
from django.utils import timezone

from .clock import Now
from .conf import app_settings
from .engine import Execution
from .engine.loops import run_in_caller
from .exports import LoadedRun, load_run
from .models import QueueStart, StepAttempt, WorkflowRun
from .pauses import add_hook, remove_hook
from .registry import Workflow, get_workflow, workflow_names
from .replay import replay_run
from .store import get_store

__all__ = [
    "TEST_WORKER_ID",
    "LoadedRun",
    "Pause",
    "assert_replays",
    "drain",
    "load_run",
    "next_timer",
    "pause_at",
    "run_to_completion",
    "skip_sleeps_and_retries",
    "travel",
]

TEST_WORKER_ID = "django_openworkflow.testing"


def drain(*, time_travel: bool | Literal["sleeps"] = True, max_passes: int = 10_000) -> int:
    """Execute due runs until none is due (travelling in time past timers).

    ``time_travel``: True moves every timer (sleeps, retries, wait timeouts,
    deadlines); ``"sleeps"`` skips only sleeps and retry delays; False none.
    Returns how many execution passes ran. Raises ``RuntimeError`` after
    ``max_passes`` (a workflow that never finishes).
    """
    if time_travel not in (True, False, "sleeps"):
        raise ValueError(f'time_travel must be True, False or "sleeps", not {time_travel!r}')
    namespace = app_settings.NAMESPACE
    names = workflow_names()
    store = get_store()
    passes = 0
    idle = False
    while True:
        claimed = store.claim(
            worker_id=TEST_WORKER_ID,
            workflow_names=names,
            limit=1,
            lease_seconds=app_settings.LEASE_SECONDS,
            namespace=namespace,
        )
        if claimed:
            idle = False
            workflow = get_workflow(claimed[0].run.workflow_name)
            assert workflow is not None  # claims only ask for registered names
            Execution(
                claimed[0], workflow, store=store, max_parallel=1, run_coroutine=run_in_caller
            ).execute()
            passes += 1
            if passes >= max_passes:
                raise RuntimeError(f"drain() stopped after {max_passes} passes; a run never ends")
            continue
        store.fail_overdue(namespace)
        if not time_travel:
            return passes
        if time_travel == "sleeps":
            if not skip_sleeps_and_retries(namespace, names):
                return passes
            continue
        # The next moment something can happen: a timer ahead, or a full rate window's
        # oldest start leaving it. Due runs a limit holds back need one of these (or a
        # run to end, which cannot happen here): without them nothing is left to do.
        moments = [at for at in (next_timer(namespace, names), claimed.retry_at) if at]
        if not moments:
            if idle:  # claimed nothing twice, and no timer ahead between the two
                return passes
            idle = True  # a timer may have passed since the claim: claim once more
            continue
        idle = False
        travel(min(moments) - timezone.now() + timedelta(milliseconds=1))


def next_timer(namespace: str, workflow_names: list[str]) -> datetime | None:
    """When the earliest active run of these workflows that is not due yet becomes due."""
    runs = WorkflowRun.objects.using(app_settings.DATABASE).in_namespace(namespace).active()
    ahead = runs.filter(workflow_name__in=workflow_names, available_at__gt=Now())
    return ahead.aggregate(at=Min("available_at"))["at"]  # type: ignore[no-any-return]


def travel(delta: timedelta) -> None:
    """Move every timer of the active runs ``delta`` closer (time passes by ``delta``).

    The starts that rate limits count move back too, so their windows slide.
    """
    if delta <= timedelta(0):
        return
    using = app_settings.DATABASE
    QueueStart.objects.using(using).filter(namespace=app_settings.NAMESPACE).update(
        started_at=F("started_at") - delta
    )
    active = WorkflowRun.objects.using(using).in_namespace(app_settings.NAMESPACE).active()
    active.filter(available_at__isnull=False).update(available_at=F("available_at") - delta)
    active.filter(deadline_at__isnull=False).update(deadline_at=F("deadline_at") - delta)
    StepAttempt.objects.using(using).filter(
        workflow_run__in=active, status=StepAttempt.Status.RUNNING, wake_at__isnull=False
    ).update(wake_at=F("wake_at") - delta)


def skip_sleeps_and_retries(namespace: str, workflow_names: list[str]) -> int:
    """Make the runs that sleep or wait for a retry due now; return how many."""
    now = timezone.now()
    skipped = 0
    using = app_settings.DATABASE
    parked = (
        WorkflowRun.objects.using(using)
        .in_namespace(namespace)
        .filter(
            status=WorkflowRun.Status.PENDING,
            workflow_name__in=workflow_names,
            available_at__gt=now,
        )
    )
    for run in parked:
        wait = run.waiting_for()
        if wait is None or wait.kind not in ("sleep", "retry"):
            continue
        if wait.kind == "sleep":
            StepAttempt.objects.using(using).filter(
                workflow_run=run,
                step_name=wait.step,
                status=StepAttempt.Status.RUNNING,
                resume_generation=run.resume_generation,
            ).update(wake_at=now)
        WorkflowRun.objects.using(using).filter(pk=run.pk).update(available_at=now)
        skipped += 1
    return skipped


def run_to_completion(
    workflow: Workflow,
    input: Any = None,
    *,
    time_travel: bool | Literal["sleeps"] = True,
    **start_kwargs: Any,
) -> WorkflowRun:
    """Start a run of ``workflow``, ``drain()``, and return the run as it ended (or waits)."""
    run = workflow.start(input, **start_kwargs)
    drain(time_travel=time_travel)
    run.refresh_from_db()
    return run


class Pause:
    """One thread held at a pause point; see ``pause_at``."""

    def __init__(self, name: str, when: Callable[[dict[str, Any]], bool] | None, hold: float):
        self.name = name
        self.context: dict[str, Any] = {}
        self._when = when
        self._hold = hold
        self._reached = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()

    def _hook(self, context: dict[str, Any]) -> None:
        if self._when is not None and not self._when(context):
            return
        with self._lock:
            if self._reached.is_set():  # only the first thread that matches is held
                return
            self.context = context
            self._reached.set()
        self._released.wait(self._hold)

    @property
    def reached(self) -> bool:
        return self._reached.is_set()

    def wait(self, timeout: float = 10.0) -> dict[str, Any]:
        """Block until a thread stands at the point; return the point's context."""
        if not self._reached.wait(timeout):
            raise AssertionError(f"no thread reached pause point {self.name!r} in {timeout} s")
        return self.context

    def release(self) -> None:
        """Let the held thread (and any later one) go on."""
        self._released.set()


@contextmanager
def pause_at(
    name: str, *, when: Callable[[dict[str, Any]], bool] | None = None, hold: float = 60.0
) -> Iterator[Pause]:
    """Hold the first thread that reaches pause point ``name`` (and matches ``when``).

    The thread waits until ``pause.release()`` or the end of the ``with``
    block (or ``hold`` seconds, so a broken test cannot hang the suite).
    """
    pause = Pause(name, when, hold)
    add_hook(name, pause._hook)
    try:
        yield pause
    finally:
        pause.release()
        remove_hook(name, pause._hook)


def assert_replays(run: WorkflowRun | LoadedRun) -> None:
    """Fail (``AssertionError``) unless the code replays ``run``'s stored history in order.

    ``run``: a ``WorkflowRun`` (its attempts are read from the database) or a
    ``LoadedRun`` from ``load_run()``. No step function runs and nothing is
    written; the message is the finding's, as ``manage.py check_inflight_runs``
    prints it.
    """
    __tracebackhide__ = True
    if isinstance(run, LoadedRun):
        model, attempts = run.to_models()
        finding = replay_run(model, attempts)
    elif isinstance(run, WorkflowRun):
        using = run._state.db or app_settings.DATABASE
        stored = StepAttempt.objects.using(using).filter(workflow_run_id=run.pk).order_by("id")
        finding = replay_run(run, stored, using=using)
    else:
        raise TypeError(f"assert_replays() takes a WorkflowRun or a LoadedRun, not {run!r}")
    if finding is not None:
        raise AssertionError(finding.message)
