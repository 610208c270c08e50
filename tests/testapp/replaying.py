"""Workflows of the replay check's tests (tests/test_replay_check.py, tests/test_export_run.py).

Each step function records a ``SideEffect`` row, so a test can count that the
replay check runs none. Each workflow ends waiting for the signal
``end:<run id>``, so its runs stay active with their steps stored.
``OBSERVED`` collects what the workflow functions saw (a worker's pass and a
replay alike): code outside steps that touches no database.
"""

from __future__ import annotations

from typing import Any

from django_openworkflow import RetryPolicy, workflow

from .models import SideEffect

OBSERVED: list[Any] = []


def effect_of(ctx, step: str, value: Any):
    """A step function that records its execution and returns ``value``."""

    def fn():
        SideEffect.objects.create(run_id=ctx.run_id, step=step)
        return value

    return fn


def end(ctx):
    return ctx.step.wait_for_signal(f"end:{ctx.run_id}")


@workflow(name="replay-order")
def replay_order(ctx):
    total = ctx.step.run("load", effect_of(ctx, "load", 1))
    total += ctx.step.run("charge", effect_of(ctx, "charge", 2))
    total += ctx.step.run("ship", effect_of(ctx, "ship", 3))
    end(ctx)
    return total


@workflow(name="replay-everything", version="2")
def replay_everything(ctx):
    """Every kind of step, a repeated name, and the values each returns."""
    seen = [
        ctx.step.run("tick", effect_of(ctx, "tick", 1)),
        ctx.step.run("tick", effect_of(ctx, "tick:1", 2)),
        ctx.step.parallel(
            [("left", effect_of(ctx, "left", "L")), ("right", effect_of(ctx, "right", "R"))]
        ),
        ctx.step.sleep("nap", "1h"),
        ctx.step.run_workflow("echo", {"x": 1}),
        ctx.step.send_signal(f"nobody:{ctx.run_id}", {"hi": 1}),
        ctx.step.wait_for_signal(f"go:{ctx.run_id}"),
        ctx.step.atomic("finish", effect_of(ctx, "finish", "done")),
    ]
    OBSERVED.append(seen)
    end(ctx)
    return seen


@workflow(name="replay-versioned", version="2")
def replay_versioned(ctx):
    """Version 2 charges with 3-D Secure; runs started by version 1 keep their old step."""
    ctx.step.run("load", effect_of(ctx, "load", 1))
    if ctx.version == "1":
        ctx.step.run("charge", effect_of(ctx, "charge", 2))
    else:
        ctx.step.run("charge-3ds", effect_of(ctx, "charge-3ds", 2))
    end(ctx)


@workflow(name="replay-resumed")
def replay_resumed(ctx):
    """Step "b" fails its first two runs (one attempt each): resumed twice, it passes."""
    ctx.step.run("a", effect_of(ctx, "a", 1))

    def b():
        SideEffect.objects.create(run_id=ctx.run_id, step="b")
        if SideEffect.objects.filter(run_id=ctx.run_id, step="b").count() <= 2:
            raise ValueError("not yet")
        return 2

    ctx.step.run("b", b, retry_policy=RetryPolicy(maximum_attempts=1))
    end(ctx)


@workflow(
    name="replay-retried",
    retry_policy=RetryPolicy(maximum_attempts=3, initial_interval="1h"),
)
def replay_retried(ctx):
    """Raises after its step: the run waits an hour for a workflow retry."""
    ctx.step.run("a", effect_of(ctx, "a", 1))
    raise ValueError("not yet\nthe second line is never shown")


@workflow(name="replay-context")
def replay_context(ctx):
    """Records what the workflow function sees of its context."""
    ctx.step.run("one", effect_of(ctx, "one", 1))
    seen = {name: getattr(ctx, name) for name in dir(ctx) if not name.startswith("_")}
    seen["step"] = type(seen["step"])
    OBSERVED.append(seen)
    end(ctx)
