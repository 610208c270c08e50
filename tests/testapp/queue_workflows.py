"""Workflows for the queue tests with real workers (tests/test_queue_workers.py).

Not autodiscovered: ``runworker --workflows-module tests.testapp.queue_workflows``
loads them. Each run records when its work began and ended as ``SideEffect``
rows (``step`` "begin" and "end", ``at`` the worker's clock), written by every
execution, a killed one included: the tests compute overlaps from them. The
recorded interval of a run lies inside the time it is in progress (from its
claim to its finish), so an overlap of the recorded intervals is a real one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from django_openworkflow import workflow

from .models import SideEffect


def mark(ctx, event: str) -> None:
    SideEffect.objects.create(run_id=ctx.run_id, step=event, pid=os.getpid())


def hold_until(path: str, max_wait: float = 30.0) -> None:
    end = time.monotonic() + max_wait
    while not Path(path).exists():
        if time.monotonic() > end:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.02)


@workflow(name="queue-hold")
def hold(ctx):
    """One step that holds its slot ``input["seconds"]``, or until ``input["until"]`` exists."""

    def work():
        mark(ctx, "begin")
        if ctx.input.get("until"):
            hold_until(ctx.input["until"])
        time.sleep(ctx.input.get("seconds", 0))
        mark(ctx, "end")
        return True

    return ctx.step.run("work", work)


@workflow(name="queue-parks")
def parks(ctx):
    """A step, then parked (``input["park"]``: "sleep" or "signal"), then a step."""
    ctx.step.run("before", lambda: mark(ctx, "begin") or 1)
    if ctx.input["park"] == "sleep":
        ctx.step.sleep("nap", ctx.input.get("sleep", "1s"))
    else:
        ctx.step.wait_for_signal(ctx.input["signal"])
    return ctx.step.run("after", lambda: mark(ctx, "end") or 2)
