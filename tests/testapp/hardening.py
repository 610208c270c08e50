"""Workflows for the engine's hardening tests (issue 10): each reproduces one broken promise."""

from __future__ import annotations

import asyncio
import uuid

from django.db import transaction

from django_openworkflow import RetryPolicy, StepFailed, workflow
from django_openworkflow.models import WorkflowRunEvent

from .models import Ledger, SideEffect

TWICE = RetryPolicy(maximum_attempts=2, initial_interval="10ms")
ONCE = RetryPolicy(maximum_attempts=1)


def effect(ctx, step):
    SideEffect.objects.create(run_id=ctx.run_id, step=step)


def executions(ctx, step):
    return SideEffect.objects.filter(run_id=ctx.run_id, step=step).count()


class MailServerDown(ConnectionError):
    pass


@workflow(name="atomic-hook-raises")
def atomic_hook_raises(ctx):
    """step.atomic whose transaction.on_commit hook raises after the commit (send_mail, say)."""

    def charge():
        effect(ctx, "charge")  # rolled back with the step when the step really fails
        Ledger.objects.create(run_id=ctx.run_id, note="charged")

        def send_mail():
            raise MailServerDown("mail server down")

        transaction.on_commit(send_mail)
        return "charged"

    charged = ctx.step.atomic("charge", charge)
    return ctx.step.run("after", lambda: charged + " and mailed")


_broken_once: set[uuid.UUID] = set()


@workflow(name="atomic-commit-fails")
def atomic_commit_fails(ctx):
    """step.atomic whose first commit fails (a deferred foreign key checked at COMMIT)."""

    def write():
        first = ctx.run_id not in _broken_once
        _broken_once.add(ctx.run_id)  # in memory: the failed commit rolls back any row
        Ledger.objects.create(run_id=ctx.run_id, note="written")
        if first and ctx.input.get("break"):
            # Django's foreign keys are DEFERRABLE INITIALLY DEFERRED: this fails at COMMIT.
            WorkflowRunEvent.objects.create(run_id=uuid.uuid4(), action="cancel")
        return Ledger.objects.filter(run_id=ctx.run_id).count()

    return ctx.step.atomic("write", write, retry_policy=TWICE)


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no text for you")


@workflow(name="bad-error-text")
def bad_error_text(ctx):
    """A step.run result waits to be stored; then a step fails with text PostgreSQL refuses."""
    first = ctx.step.run("first", lambda: effect(ctx, "first") or "kept")

    def fail():
        effect(ctx, "fail")
        if ctx.input["kind"] == "nul":
            raise ValueError("bad byte \x00 and a lone \ud800 surrogate")
        raise Unprintable()

    ctx.step.run("fail", fail, retry_policy=TWICE)
    return first


@workflow(name="cancelled-step")
def cancelled_step(ctx):
    """asyncio.run() inside a step raises CancelledError, a BaseException."""

    async def cancelled():
        raise asyncio.CancelledError()

    def step():
        effect(ctx, "cancelled")
        return asyncio.run(cancelled())

    return ctx.step.run("cancelled", step, retry_policy=TWICE)


@workflow(name="parallel-refused")
def parallel_refused(ctx):
    """One parallel step returns a value that is not JSON; its sibling fails for real."""

    def refused():
        return {1, 2}

    def broken():
        raise KeyError("the sibling's own error")

    return ctx.step.parallel([("refused", refused), ("broken", broken)], retry_policy=ONCE)


@workflow(name="compensates")
def compensates(ctx):
    """The pattern of docs/api.md (Resuming failed runs): catch StepFailed, compensate, re-raise."""
    ctx.step.run("reserve", lambda: effect(ctx, "reserve") or "reserved")

    def charge():
        effect(ctx, "charge")
        if not SideEffect.objects.filter(run_id=ctx.run_id, step="card-fixed").exists():
            raise ValueError("card declined")
        return "charged"

    try:
        charged = ctx.step.run("charge", charge, retry_policy=ONCE)
    except StepFailed:
        ctx.step.run("release-stock", lambda: effect(ctx, "release-stock") or "released")
        raise
    ctx.step.run("ship", lambda: effect(ctx, "ship") or "shipped")
    return charged


@workflow(name="atomic-reply-lost")
def atomic_reply_lost(ctx):
    """step.atomic whose connection dies right after its COMMIT (PostgreSQL): the reply is lost."""

    def write():
        from django.db import connection

        Ledger.objects.create(run_id=ctx.run_id, note="written")

        def kill_own_session():
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        transaction.on_commit(kill_own_session)
        return "written"

    return ctx.step.atomic("write", write)
