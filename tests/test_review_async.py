"""Review of issue 16: async steps and the async API, attacked.

Slots that run async steps at once, a slot's loop over many runs (no leak), the
companion thread's connection lost between steps, base exceptions from a step's
sync calls, timeouts and exception groups, a release while an async step runs, the
waiting coroutine canceled, the async transitions' errors, and an async view that
must neither block its loop nor hold the thread that serves its sync calls.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import threading

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db import connection
from django.http import JsonResponse
from django.test import AsyncClient, override_settings
from django.urls import path

import django_openworkflow
from django_openworkflow import InvalidTransition, RetryPolicy, WorkflowFailed, workflow
from django_openworkflow.engine import loops
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.pauses import add_hook, remove_hook
from tests.conftest import backend_pid
from tests.test_async_steps import attempts_of, execute
from tests.testapp.models import SideEffect
from tests.testapp.workflows import three_steps

try:
    from django.tasks import TaskResultStatus, task
except ImportError:  # Django 5.2: the backport
    from django_tasks import TaskResultStatus, task

transactional = pytest.mark.django_db(transaction=True)

ONCE = RetryPolicy(maximum_attempts=1)
TWO_TRIES = RetryPolicy(maximum_attempts=2, initial_interval="10ms")


pytestmark = pytest.mark.usefixtures("close_this_threads_loop")


def threads():
    return {t for t in threading.enumerate() if not t.name.endswith("(join)")}


def companion_identity():
    """On the companion thread: which thread, which connection."""
    SideEffect.objects.exists()  # a connection, opened if need be
    return {
        "thread": threading.get_ident(),
        "pid": backend_pid(),
        "raw": id(connection.connection),
    }


# --- several slots at once -------------------------------------------------------------------

meeting: dict[str, threading.Barrier] = {}


def meet_on_companion():
    """Every slot's companion waits for the others: a companion shared by two slots
    (or asgiref's one thread for the process) could never let all of them through."""
    identity = companion_identity()
    meeting["barrier"].wait()
    return identity


@workflow(name="review-async-meet")
def meet(ctx):
    async def step():
        return await sync_to_async(meet_on_companion)()

    async def where():
        return {
            "slot": threading.get_ident(),
            "loop": id(asyncio.get_running_loop()),
            "companion": await sync_to_async(threading.get_ident)(),
        }

    ctx.step.run("meet", step, retry_policy=ONCE)
    return ctx.step.run("where", where, retry_policy=ONCE)


@transactional
def test_slots_running_async_steps_at_once_share_no_loop_and_no_companion(workers):
    slots = 3
    workers.start(concurrency=slots)
    rounds = []
    for _ in range(2):
        meeting["barrier"] = threading.Barrier(slots, timeout=20)
        runs = [meet.start() for _ in range(slots)]
        rounds.append({tuple(sorted(run.result(timeout=30).items())) for run in runs})
    first, second = rounds
    assert len(first) == slots
    for key in ("slot", "loop", "companion"):
        assert len({dict(entry)[key] for entry in first}) == slots, key
    assert second == first  # each slot kept its loop and its companion


# --- one slot's loop over many runs --------------------------------------------------------


@workflow(name="review-async-where")
def where(ctx):
    async def step():
        await SideEffect.objects.acreate(run_id=ctx.run_id, step="where")
        identity = await sync_to_async(companion_identity)()
        identity["loop"] = id(asyncio.get_running_loop())
        return identity

    async def pure():
        await asyncio.sleep(0)
        return None

    ctx.step.run("pure", pure)
    return ctx.step.run("where", step)


def live_tasks():
    return sum(1 for o in gc.get_objects() if isinstance(o, asyncio.Task))


@transactional
def test_a_slots_loop_runs_hundreds_of_runs_without_leaking_threads_tasks_or_connections():
    first = execute(where.start()).output
    step_loop = loops.thread_loop()
    gc.collect()
    before = (threads(), live_tasks(), len(step_loop.loop._scheduled))
    outputs = [execute(where.start()).output for _ in range(200)]
    gc.collect()
    assert {tuple(sorted(o.items())) for o in outputs} == {tuple(sorted(first.items()))}
    assert loops.thread_loop() is step_loop
    assert step_loop.steps == 2 * 201
    assert not asyncio.all_tasks(step_loop.loop)
    assert threads() == before[0]
    assert live_tasks() <= before[1]
    assert len(step_loop.loop._scheduled) <= max(before[2], 100)  # canceled timers get cleaned
    companion = next(t for t in threads() if t.ident == first["thread"])
    loops.close_thread_loop()
    companion.join(10)
    assert not companion.is_alive()


# --- the companion's connection lost between steps --------------------------------------------


def terminate(pid):
    """On the slot's connection: end backend ``pid`` and wait until it is gone."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        for _ in range(1000):
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
            if cursor.fetchone()[0] == 0:
                return pid
            threading.Event().wait(0.01)
    raise AssertionError(f"backend {pid} did not end")


@workflow(name="review-async-companion-killed")
def companion_killed(ctx):
    """The companion's backend ends between two async steps (a restart, a failover, an
    idle timeout), as the slot's own may between runs."""

    async def identity():
        return await sync_to_async(companion_identity)()

    first = ctx.step.run("before", identity, retry_policy=ONCE)
    ctx.step.run("kill", functools.partial(terminate, first["pid"]), retry_policy=ONCE)
    second = ctx.step.run("after", identity, retry_policy=ONCE)
    return [first, second]


@pytest.mark.postgres
@transactional
def test_a_companion_connection_lost_between_steps_is_replaced_before_the_next_steps_query():
    run = execute(companion_killed.start())
    assert run.status == "completed", (run.error, attempts_of(run))
    first, second = run.output
    assert first["thread"] == second["thread"]  # the same companion, a new connection
    assert first["pid"] != second["pid"]
    assert [status for _, status, _ in attempts_of(run)] == ["completed"] * 3


# --- base exceptions, timeouts and exception groups ---------------------------------------------


class Boom(BaseException):
    pass


def raises(name):
    exc = {
        "cancelled": asyncio.CancelledError("gave up"),
        "exit": SystemExit(3),
        "generator-exit": GeneratorExit(),
        "boom": Boom("boom"),
        "interrupt": KeyboardInterrupt(),
    }[name]
    raise exc


@workflow(name="review-async-raises")
def async_raises(ctx):
    """Its async step raises ctx.input["raise"] from the coroutine or from a sync call
    (on the companion thread), the first time only when ctx.input["once"]."""

    async def step():
        await SideEffect.objects.acreate(run_id=ctx.run_id, step="step")
        tries = await SideEffect.objects.filter(run_id=ctx.run_id, step="step").acount()
        if ctx.input.get("once") and tries > 1:
            return "done"
        if ctx.input["where"] == "sync":
            await sync_to_async(raises)(ctx.input["raise"])
        raises(ctx.input["raise"])

    return ctx.step.run("step", step, retry_policy=TWO_TRIES)


@transactional
@pytest.mark.parametrize("origin", ["coroutine", "sync"])
@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        ("cancelled", "CancelledError"),
        ("exit", "SystemExit"),
        ("generator-exit", "GeneratorExit"),
        ("boom", "Boom"),
    ],
)
def test_a_base_exception_from_an_async_step_or_its_sync_call_fails_the_step(
    workers, origin, raised, kind
):
    run = async_raises.start({"raise": raised, "where": origin})
    workers.start(concurrency=1)
    with pytest.raises(WorkflowFailed):
        run.result(timeout=30)
    assert attempts_of(run) == [("step", "failed", kind)] * 2
    assert where.start().result(timeout=30)["thread"]  # the one slot runs on


@transactional
@pytest.mark.parametrize("origin", ["coroutine", "sync"])
def test_a_keyboard_interrupt_from_an_async_steps_sync_call_crashes_the_pass_as_in_a_sync_step(
    workers, origin
):
    run = async_raises.start({"raise": "interrupt", "where": origin, "once": True})
    workers.start(concurrency=1, lease_seconds=600)
    assert run.result(timeout=30) == "done"  # released, replayed a second later
    assert attempts_of(run) == [("step", "failed", "WorkerLost"), ("step", "completed", None)]
    assert where.start().result(timeout=30)["thread"]


@workflow(name="review-async-timeouts")
def async_timeouts(ctx):
    async def times_out():
        await asyncio.wait_for(asyncio.sleep(3600), 0.01)

    async def catches_its_timeout():
        try:
            await asyncio.wait_for(asyncio.sleep(3600), 0.01)
        except TimeoutError:
            return "timed out"

    async def group():
        async def fails(n):
            await asyncio.sleep(0)
            raise ValueError(f"child {n}")

        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(asyncio.sleep(3600))
            tasks.create_task(fails(1))
            tasks.create_task(fails(2))

    caught = ctx.step.run("catches", catches_its_timeout, retry_policy=ONCE)
    which = ctx.input["which"]
    fn = {"timeout": times_out, "group": group}[which]
    return [caught, ctx.step.run(which, fn, retry_policy=ONCE)]


@transactional
def test_a_timeout_inside_an_async_step_fails_it_and_one_it_catches_does_not():
    run = execute(async_timeouts.start({"which": "timeout"}))
    assert attempts_of(run) == [
        ("catches", "completed", None),
        ("timeout", "failed", "TimeoutError"),
    ]
    assert run.error["step"] == "timeout"
    assert not asyncio.all_tasks(loops.thread_loop().loop)


@transactional
def test_an_exception_group_from_an_async_step_is_stored_with_its_members():
    run = execute(async_timeouts.start({"which": "group"}))
    [*_, (name, status, kind)] = attempts_of(run)
    assert (name, status, kind) == ("group", "failed", "ExceptionGroup")
    error = StepAttempt.objects.get(workflow_run=run, step_name="group").error
    assert "ValueError: child 1" in error["traceback"]
    assert "ValueError: child 2" in error["traceback"]
    assert not asyncio.all_tasks(loops.thread_loop().loop)  # the sleeping sibling too


@workflow(name="review-async-writes-then-raises")
def writes_then_raises(ctx):
    """Its async step's write commits (on the companion, on its own), then it raises."""

    async def step():
        await SideEffect.objects.acreate(run_id=ctx.run_id, step="write")
        count = await SideEffect.objects.filter(run_id=ctx.run_id).acount()
        if count == 1:
            raise RuntimeError("after the write")
        return count

    return ctx.step.run("step", step, retry_policy=TWO_TRIES)


@transactional
def test_an_async_step_that_raises_after_its_write_committed_keeps_the_write_and_retries():
    run = execute(writes_then_raises.start())
    assert (run.status, run.output) == ("completed", 2)
    assert attempts_of(run) == [("step", "failed", "RuntimeError"), ("step", "completed", None)]


# --- a step that blocks its loop; a release while an async step runs ---------------------------

gates: dict[str, threading.Event] = {}
calls: list[int] = []  # the loop of each call of the step


@workflow(name="review-async-blocks")
def blocks(ctx):
    """Its first async step blocks its thread (and so its loop) until the test lets it go,
    the first time only; it returns which call it was and the loop it ran on."""

    async def step():
        calls.append(id(asyncio.get_running_loop()))
        number = len(calls)
        if number == 1:
            gates["entered"].set()
            gates["release"].wait(30)  # time.sleep-like: the loop cannot run meanwhile
        return {"call": number, "loop": id(asyncio.get_running_loop())}

    return [ctx.step.run("blocks", step), ctx.step.run("after", lambda: "after")]


@pytest.fixture
def gated():
    calls.clear()
    gates.update(entered=threading.Event(), release=threading.Event())
    yield gates
    gates["release"].set()


def lease_of(run):
    return WorkflowRun.objects.values_list("available_at", "claim_token", "status").get(pk=run.pk)


@transactional
def test_the_heartbeat_keeps_the_lease_of_a_step_that_blocks_its_loop(workers, gated):
    renewals = threading.Semaphore(0)

    def renewing(context):
        renewals.release()

    run = blocks.start()
    add_hook("heartbeat.before-renew", renewing)
    try:
        workers.start(concurrency=1, lease_seconds=1.5)  # renewed every 0.5 s
        assert gated["entered"].wait(30)
        started_lease, token, status = lease_of(run)
        for _ in range(4):  # three renewals done, at least: the lease's length and more
            assert renewals.acquire(timeout=30)
        renewed_lease, still, status = lease_of(run)
    finally:
        remove_hook("heartbeat.before-renew", renewing)
        gated["release"].set()
    assert (still, status) == (token, "running")
    assert (renewed_lease - started_lease).total_seconds() >= 1.0
    assert run.result(timeout=30)[0]["call"] == 1
    assert attempts_of(run) == [("blocks", "completed", None), ("after", "completed", None)]


@transactional
def test_a_run_released_while_its_async_step_runs_is_taken_over_and_the_late_result_refused(
    workers, gated
):
    first = workers.start(concurrency=1, worker_id="review-first")
    run = blocks.start()
    assert gated["entered"].wait(30)
    assert first.release_in_flight() == 1
    second = workers.start(concurrency=1, worker_id="review-second")
    output = run.result(timeout=30)  # the second worker's replay, while the first blocks
    assert output[0]["call"] == 2
    second.stop()
    workers.started[-1][1].join(20)
    gated["release"].set()  # the first worker's step returns: its result must not land
    again = where.start().result(timeout=30)  # only the first worker runs now
    run.refresh_from_db()
    assert run.output == output
    assert attempts_of(run) == [
        ("blocks", "failed", "WorkerLost"),
        ("blocks", "completed", None),
        ("after", "completed", None),
    ]
    assert again["loop"] == calls[0]  # the first worker's slot kept its loop, and it runs


# --- the async API --------------------------------------------------------------------------


def asynchronous(test):
    @functools.wraps(test)
    def run(*args, **kwargs):
        return async_to_sync(test)(*args, **kwargs)

    return run


@transactional
@asynchronous
async def test_a_canceled_aresult_leaves_no_thread_blocked_and_the_loop_free():
    run = await three_steps.astart({"i": 1})  # no worker: it never finishes
    before = await sync_to_async(threads)()
    polls = 0
    waiting = asyncio.ensure_future(run.aresult(timeout=30))
    while polls < 5:  # a few reads and pauses
        await asyncio.sleep(0.01)
        polls += 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 5)
    assert await sync_to_async(lambda: 1)() == 1  # the thread serving sync calls is free
    assert await sync_to_async(threads)() == before


@transactional
@asynchronous
async def test_the_async_transitions_raise_the_sync_ones_errors_unchanged():
    run = await three_steps.astart({"i": 1})
    await WorkflowRun.objects.acancel(run)
    with pytest.raises(InvalidTransition) as refused:
        await WorkflowRun.objects.acancel(run)
    assert str(refused.value).startswith(f"cannot cancel run {run.pk}: it is canceled")
    with pytest.raises(ValueError) as raised:
        await WorkflowRun.objects.arerun(run, from_step="nope")
    assert str(raised.value) == (
        f'cannot rerun run {run.pk} from step "nope": it is not on the '
        "run's stored path (it has no stored steps)"
    )
    for bad in ({"signal": ""}, {"signal": "s", "data": {1, 2}}):
        with pytest.raises((ValueError, TypeError)) as raised:
            await django_openworkflow.asend_signal(**bad)
        with pytest.raises(type(raised.value)) as sync_raised:
            await sync_to_async(django_openworkflow.send_signal)(**bad)
        assert str(sync_raised.value) == str(raised.value)
    with pytest.raises(WorkflowRun.DoesNotExist):
        await WorkflowRun.objects.aresume(0)


@workflow(name="review-async-view-waits")
def view_waits(ctx):
    return ctx.step.wait_for_signal(ctx.input["signal"])["data"]


async def starts_and_awaits(request):
    run = await view_waits.astart({"signal": request.GET["signal"]})
    return JsonResponse({"run": str(run.pk), "output": await run.aresult(timeout=20)})


urlpatterns = [path("review/waits/", starts_and_awaits)]


@transactional
@override_settings(ROOT_URLCONF=__name__)
@asynchronous
async def test_an_async_view_awaiting_a_run_leaves_its_loop_and_its_sync_thread_to_others(
    workers,
):
    """While the view awaits the run, a coroutine of the same loop must reach the database
    (through the thread that serves sync_to_async) and signal the run: a view that blocked
    the loop, or a sync view holding that thread in result(), would wait out its timeout."""
    workers.start(concurrency=1)

    async def signal_when_waiting():
        while True:
            waiting = await WorkflowRun.objects.filter(
                workflow_name="review-async-view-waits", status="pending"
            ).afirst()
            if waiting is not None and await sync_to_async(waiting.waiting_for)() is not None:
                return await django_openworkflow.asend_signal("review-go", 42)
            await asyncio.sleep(0.01)

    request = asyncio.ensure_future(AsyncClient().get("/review/waits/", {"signal": "review-go"}))
    woken = await asyncio.wait_for(signal_when_waiting(), 20)
    response = await asyncio.wait_for(request, 20)
    assert response.status_code == 200
    assert response.json() == {"run": woken[0], "output": 42}


# --- the task backend's async path, on a worker's loop ------------------------------------------


@task(takes_context=True)
async def async_task_with_orm(context, note):
    await SideEffect.objects.acreate(run_id=context.task_result.id, step=note)
    count = await SideEffect.objects.filter(step=note).acount()
    return {"attempt": context.attempt, "count": count, "slot": threading.get_ident()}


@task
async def async_task_canceled():
    raise asyncio.CancelledError("the task gave up")


@transactional
def test_an_async_task_runs_on_the_slots_loop_with_its_orm_calls_and_fails_on_cancellation(
    workers,
):
    workers.start(concurrency=1)
    result = async_task_with_orm.enqueue("review-task")
    canceled = async_task_canceled.enqueue()
    run = WorkflowRun.objects.get(pk=result.id)
    done = run.result(timeout=30)
    with pytest.raises(WorkflowFailed):
        WorkflowRun.objects.get(pk=canceled.id).result(timeout=30)
    result.refresh()
    canceled.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert (done["attempt"], done["count"]) == (1, 1)
    assert where.start().result(timeout=30)["thread"]  # the slot runs on
    assert canceled.status == TaskResultStatus.FAILED
    assert canceled.errors[0].exception_class_path == "asyncio.exceptions.CancelledError"


stuck_call = {"release": threading.Event()}


@workflow(name="review-async-times-out-a-sync-call")
def times_out_a_sync_call(ctx):
    """A timeout around a sync call: the await ends, the call runs on (a thread cannot be
    canceled) and holds the companion past the step."""

    def blocking():
        stuck_call["thread"] = threading.current_thread()
        stuck_call["release"].wait(30)

    async def gives_up():
        try:
            await asyncio.wait_for(sync_to_async(blocking)(), 0.01)
        except TimeoutError:
            return id(asyncio.get_running_loop())

    async def after():
        return id(asyncio.get_running_loop())

    return [ctx.step.run("gives-up", gives_up), ctx.step.run("after", after)]


@transactional
def test_a_sync_call_a_step_timed_out_keeps_the_result_and_costs_the_loop(monkeypatch):
    monkeypatch.setattr(loops, "LEFTOVER_GRACE", 0.05)
    stuck_call["release"].clear()
    try:
        run = execute(times_out_a_sync_call.start())
        companion = stuck_call["thread"]
        assert companion.is_alive()
    finally:
        stuck_call["release"].set()
    gave_up_on, after_on = run.output
    assert run.status == "completed"
    assert after_on != gave_up_on  # the loop and its busy companion were abandoned
    companion.join(10)
    assert not companion.is_alive()
