"""Workflows with ``async def`` steps (tests/test_async_steps.py, tests/test_async.py)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import sys
import threading

from asgiref.sync import sync_to_async
from django.db import connection, connections, transaction

from django_openworkflow import RetryPolicy, workflow

from .models import SideEffect

TWO_TRIES = RetryPolicy(maximum_attempts=2, initial_interval="10ms")
ONCE = RetryPolicy(maximum_attempts=1)


def loop_id() -> int:
    return id(asyncio.get_running_loop())


async def record(ctx, step):
    """An async ORM write: ``SideEffect``'s pre_save sees the thread it runs on."""
    await SideEffect.objects.acreate(run_id=ctx.run_id, step=step)


@workflow(name="async-steps")
def async_steps(ctx):
    """Two async steps, each with an ORM write; each returns where it ran."""

    async def step(name):
        await record(ctx, name)
        count = await SideEffect.objects.filter(run_id=ctx.run_id).acount()
        return {"thread": threading.get_ident(), "loop": loop_id(), "count": count}

    first = ctx.step.run("first", functools.partial(step, "first"))
    second = ctx.step.run("second", lambda: step("second"))
    never_awaits = ctx.step.run("plain", plain)
    return {"first": first, "second": second, "plain": never_awaits}


async def plain():
    """A coroutine that never awaits anything."""
    return "plain"


class Boom(BaseException):
    """Neither an ``Exception`` nor a ``CancelledError``."""


async def raise_cancelled():
    raise asyncio.CancelledError("step gave up")


async def cancel_itself():
    asyncio.current_task().cancel()
    await asyncio.sleep(0)


async def raise_boom():
    raise Boom("boom")


async def exit_now():
    sys.exit(3)


ASYNC_BASE_EXCEPTIONS = {
    "cancelled": raise_cancelled,
    "cancels-itself": cancel_itself,
    "boom": raise_boom,
    "exit": exit_now,
}


@workflow(name="async-step-raises-base-exception")
def async_step_raises_base_exception(ctx):
    """Its async step raises what ASYNC_BASE_EXCEPTIONS[ctx.input['raise']] raises."""

    async def step():
        await record(ctx, "step")
        await ASYNC_BASE_EXCEPTIONS[ctx.input["raise"]]()

    return ctx.step.run("step", step, retry_policy=TWO_TRIES)


@workflow(name="async-interrupted-once")
def async_interrupted_once(ctx):
    """Its async step raises KeyboardInterrupt the first time it runs."""

    async def step():
        await record(ctx, "step")
        if await SideEffect.objects.filter(run_id=ctx.run_id, step="step").acount() == 1:
            raise KeyboardInterrupt
        return "done"

    return ctx.step.run("step", step)


# --- what a step leaves on its loop -------------------------------------------------------

left_behind: list[str] = []  # what the tasks a step left did when canceled


@workflow(name="async-leaves-a-task")
def async_leaves_a_task(ctx):
    """The first step starts a task and returns; the second counts the loop's tasks."""

    async def forever():
        try:
            await asyncio.sleep(3600)
        finally:
            left_behind.append("canceled")

    async def starts():
        asyncio.get_running_loop().create_task(forever())
        await asyncio.sleep(0)  # it started
        return loop_id()

    async def counts():
        return {"tasks": len(asyncio.all_tasks()), "loop": loop_id()}

    return {"first": ctx.step.run("starts", starts), "then": ctx.step.run("counts", counts)}


stubborn_stop = threading.Event()


@workflow(name="async-leaves-a-stubborn-task")
def async_leaves_a_stubborn_task(ctx):
    """The first step leaves a task that ignores its cancellation."""

    async def stubborn():
        while not stubborn_stop.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                left_behind.append("ignored")

    async def starts():
        asyncio.get_running_loop().create_task(stubborn())
        await asyncio.sleep(0)
        return loop_id()

    async def after():
        return loop_id()

    return {"first": ctx.step.run("starts", starts), "then": ctx.step.run("after", after)}


kept_loops: list[asyncio.AbstractEventLoop] = []


@workflow(name="async-loop-stopped-or-closed")
def async_loop_stopped_or_closed(ctx):
    """A step stops its loop (its first attempt fails); a sync step closes it."""

    async def stops():
        kept_loops.append(asyncio.get_running_loop())
        await record(ctx, "stops")
        if await SideEffect.objects.filter(run_id=ctx.run_id, step="stops").acount() == 1:
            asyncio.get_running_loop().stop()
            await asyncio.sleep(0.01)
        return loop_id()

    stopped_on = ctx.step.run("stops", stops, retry_policy=TWO_TRIES)
    ctx.step.run("closes", lambda: kept_loops[-1].close())
    return {"stopped": stopped_on, "after": ctx.step.run("after", lambda: plain_loop_id())}


async def plain_loop_id():
    return loop_id()


# --- refusals -------------------------------------------------------------------------------


async def one(value=1):
    return value


@workflow(name="async-atomic")
def async_atomic(ctx):
    """``step.atomic`` given an async function, a partial of one, or a lambda returning
    a coroutine (by ctx.input["how"])."""
    fn = {
        "function": one,
        "partial": functools.partial(one, 2),
        "lambda": lambda: one(3),
    }[ctx.input["how"]]
    return ctx.step.atomic("write", fn)


class Awaitable:
    def __await__(self):
        yield from asyncio.sleep(0).__await__()
        return 1


@workflow(name="async-returns-an-awaitable")
def async_returns_an_awaitable(ctx):
    def future():
        loop = asyncio.new_event_loop()
        try:
            return loop.create_future()
        finally:
            loop.close()

    fn = {"future": future, "object": Awaitable}[ctx.input["what"]]
    return ctx.step.run("awaitable", fn)


@workflow(name="async-coroutine-not-function")
def async_coroutine_not_function(ctx):
    return ctx.step.run("fetch", one())


@workflow(name="async-nests-a-step")
def async_nests_a_step(ctx):
    """An async step calls a step: directly, or from a sync call (another thread)."""

    async def direct():
        return ctx.step.run("inner", lambda: 1)

    async def through_sync_to_async():
        return await sync_to_async(lambda: ctx.step.run("inner", lambda: 1))()

    fn = {"direct": direct, "sync_to_async": through_sync_to_async}[ctx.input["how"]]
    return ctx.step.run("outer", fn)


# --- connections of the companion thread -----------------------------------------------------


@workflow(name="async-leaves-a-transaction")
def async_leaves_a_transaction(ctx):
    """A step's sync call opens a transaction, writes, and never commits."""

    def write_uncommitted():
        transaction.set_autocommit(False)
        SideEffect.objects.create(run_id=ctx.run_id, step="uncommitted")

    async def leaves():
        await sync_to_async(write_uncommitted)()

    async def reads():
        await record(ctx, "reads")
        return await SideEffect.objects.filter(run_id=ctx.run_id, step="uncommitted").acount()

    ctx.step.run("leaves", leaves)
    return ctx.step.run("reads", reads)


@workflow(name="async-loses-its-connection")
def async_loses_its_connection(ctx):
    """The first attempt ends its own connection (PostgreSQL); the retry reads on a new one."""

    def terminate():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    async def step():
        done = await sync_to_async(
            lambda: SideEffect.objects.filter(run_id=ctx.run_id, step="step").count()
        )()
        if done == 0:
            await sync_to_async(SideEffect.objects.create)(run_id=ctx.run_id, step="step")
            await sync_to_async(terminate)()
        return await SideEffect.objects.filter(run_id=ctx.run_id).acount()

    return ctx.step.run("step", step, retry_policy=TWO_TRIES)


# --- context, parallel ------------------------------------------------------------------------

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


@workflow(name="async-sees-context")
def async_sees_context(ctx):
    """The workflow function sets a context variable; its async step reads it."""
    request_id.set(f"req-{ctx.input['n']}")

    async def step():
        return request_id.get("unset")

    return ctx.step.run("reads", step)


@workflow(name="async-parallel")
def async_parallel(ctx):
    async def step(name):
        await record(ctx, name)
        return {"name": name, "thread": threading.get_ident(), "loop": loop_id()}

    return ctx.step.parallel(
        [(name, functools.partial(step, name)) for name in ("a", "b", "c")]
        + [("sync", lambda: "sync")]
    )


@workflow(name="async-waits-for-signal")
def async_waits_for_signal(ctx):
    """Waits for the signal ctx.input["signal"], then an async step doubles its data."""
    got = ctx.step.wait_for_signal(ctx.input["signal"])

    async def double():
        return got["data"] * 2

    return ctx.step.run("double", double)


@workflow(name="async-fails-until-told")
def async_fails_until_told(ctx):
    """Its async step fails until a SideEffect "go" row exists for the run."""

    async def step():
        if not await SideEffect.objects.filter(run_id=ctx.run_id, step="go").aexists():
            raise RuntimeError("not yet")
        return "went"

    return ctx.step.run("step", step, retry_policy=ONCE)


# --- the workflow function itself ------------------------------------------------------------


async def async_body(ctx):
    return ctx.step.run("never", lambda: 1)


# A plain callable around an async body: not refused at registration (nothing to see),
# the run fails at its first pass with the reason.
async_body_wrapped = workflow(name="async-body-wrapped")(lambda ctx: async_body(ctx))


@workflow(name="async-calls-the-orm-synchronously")
def async_calls_the_orm_synchronously(ctx):
    async def step():
        return SideEffect.objects.count()  # a sync ORM call while the loop runs

    return ctx.step.run("count", step, retry_policy=ONCE)


stuck = {"entered": threading.Event(), "release": threading.Event()}


@workflow(name="async-leaves-a-sync-call-running")
def async_leaves_a_sync_call_running(ctx):
    """The first step leaves a task whose sync call (on the companion thread, with a
    connection open) runs until the test releases it."""

    def blocking():
        SideEffect.objects.count()
        stuck["thread"] = threading.current_thread()
        stuck["connection"] = connections["default"]
        stuck["entered"].set()
        stuck["release"].wait(30)

    async def starts():
        asyncio.get_running_loop().create_task(sync_to_async(blocking)())
        while not stuck["entered"].is_set():
            await asyncio.sleep(0.001)
        return loop_id()

    async def after():
        return loop_id()

    return {"first": ctx.step.run("starts", starts), "then": ctx.step.run("after", after)}
