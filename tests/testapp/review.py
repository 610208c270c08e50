"""Workflows for the adversarial review of the engine (tests/test_review.py)."""

from __future__ import annotations

import asyncio
import collections
import datetime

from django.db import transaction
from django.db.models.functions import Now

from django_openworkflow import RetryPolicy, workflow
from django_openworkflow.models import WorkflowRun

from .models import Ledger, SideEffect

# A file name that is not UTF-8, as os.listdir() returns it (surrogateescape).
UNDECODABLE = b"invoice-\xff.pdf".decode("utf-8", "surrogateescape")


def effect(ctx, step):
    SideEffect.objects.create(run_id=ctx.run_id, step=step)


@workflow(name="review-bad-step-name")
def bad_step_name(ctx):
    """A step named after an undecodable file name (a lone surrogate)."""
    return ctx.step.run(f"process {UNDECODABLE}", lambda: 1)


@workflow(name="review-bad-signal-name")
def bad_signal_name(ctx):
    return ctx.step.wait_for_signal(f"uploaded {UNDECODABLE}")


@workflow(name="review-base-exception")
def base_exception(ctx):
    """Workflow code (outside any step) raises a BaseException that is no Exception."""
    ctx.step.run("before", lambda: 1)
    if ctx.input == "cancelled":
        raise asyncio.CancelledError()
    raise SystemExit(3)


@workflow(name="review-atomic-rollback")
def atomic_rollback(ctx):
    """step.atomic whose function marks its transaction for rollback."""

    def write():
        Ledger.objects.create(run_id=ctx.run_id, note="written")
        transaction.set_rollback(True)
        return "written"

    written = ctx.step.atomic("write", write, retry_policy=RetryPolicy(maximum_attempts=1))
    return ctx.step.run("after", lambda: written + " and after")


@workflow(name="review-atomic-cancels-itself")
def atomic_cancels_itself(ctx):
    """step.atomic that cancels its own run (say, "cancel every run of this order")."""

    def cancel():
        Ledger.objects.create(run_id=ctx.run_id, note="canceled")
        WorkflowRun.objects.cancel(ctx.run_id)
        return "canceled"

    ctx.step.atomic("cancel", cancel)
    return ctx.step.run("after", lambda: "not reached")


@workflow(name="review-two-steps")
def two_steps(ctx):
    a = ctx.step.run("a", lambda: effect(ctx, "a") or 1)
    b = ctx.step.run("b", lambda: effect(ctx, "b") or 2)
    return a + b


FAR = RetryPolicy(initial_interval="4000000d", maximum_interval="4000000d", maximum_attempts=3)


@workflow(name="review-far-workflow-retry", retry_policy=FAR)
def far_workflow_retry(ctx):
    """A workflow retry delay that ends after the year 9999."""
    raise ValueError("broken input")


@workflow(name="review-far-step-retry")
def far_step_retry(ctx):
    def broken():
        raise ValueError("broken step")

    return ctx.step.run("broken", broken, retry_policy=FAR)


# run id -> (entered, release): a step function that waits for the test, once per run
GATES: dict = {}


def gate(ctx):
    pair = GATES.pop(ctx.run_id, None)
    if pair is not None:
        entered, release = pair
        entered.set()
        assert release.wait(30), "the test never released the step"


@workflow(name="review-atomic-gated")
def atomic_gated(ctx):
    """step.atomic that writes a Ledger row, then (first time only) waits for the test."""

    def write():
        Ledger.objects.create(run_id=ctx.run_id, note="written")
        gate(ctx)
        return "written"

    return ctx.step.atomic("write", write)


@workflow(name="review-nested-steps")
def nested_steps(ctx):
    """A step called inside another step's function (a misuse the engine must refuse)."""
    outer = ctx.step.atomic if ctx.input["outer"] == "atomic" else ctx.step.run
    if ctx.input["inner"] == "sleep":
        return outer("outer", lambda: ctx.step.sleep("nap", "1h") or 1)
    return outer("outer", lambda: ctx.step.run("inner", lambda: 2))


@workflow(name="review-mutates-result")
def mutates_result(ctx):
    """Workflow code that changes a step's result in place (sorts it, adds to it)."""
    order = ctx.step.run("load", lambda: {"items": [3, 1, 2]})
    order["items"].append(4)
    if ctx.input == "date":
        order["at"] = datetime.date(2026, 1, 1)  # not JSON; never meant to be stored
    ctx.step.sleep("pause", "10ms")  # a replay starts from the stored result
    return ctx.step.run("total", lambda: len(order["items"]))


@workflow(name="review-steps-in-user-transaction")
def steps_in_user_transaction(ctx):
    """Workflow code that wraps its steps in its own transaction.atomic()."""
    with transaction.atomic():
        Ledger.objects.create(run_id=ctx.run_id, note="order locked")
        ctx.step.run("charge", lambda: 1)
        ctx.step.sleep("cool-off", "1h")
    return ctx.step.run("ship", lambda: 2)


@workflow(name="review-counter")
def counter(ctx):
    """A step that returns a Counter: missing keys count 0, until a replay makes it a dict."""
    counts = ctx.step.run("count", lambda: collections.Counter(["a", "a", "b"]))
    ctx.step.sleep("pause", "10ms")
    return counts["a"] + counts["c"]


@workflow(name="review-deep-result")
def deep_result(ctx):
    """A step result nested 600 lists deep (JSON allows it; a deepcopy would not)."""

    def deep():
        value: list = []
        for _ in range(599):
            value = [value]
        return value

    value = ctx.step.run("deep", deep)
    ctx.step.sleep("pause", "10ms")
    depth = 0
    while isinstance(value, list):
        value, depth = (value[0] if value else None), depth + 1
    return depth


@workflow(name="review-deadline-in-last-step")
def deadline_in_last_step(ctx):
    """The last step's function returns just as the deadline passes (it moves it, here)."""

    def last():
        effect(ctx, "last")
        WorkflowRun.objects.filter(pk=ctx.run_id).update(deadline_at=Now())
        return 1

    return ctx.step.run("last", last)
