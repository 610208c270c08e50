"""``async def`` step functions: one event loop per worker thread (``engine/loops.py``),
their ORM calls on one companion thread, failures as steps fail, refusals."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import threading
import warnings

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db.models.signals import pre_save

from django_openworkflow import WorkflowFailed
from django_openworkflow.engine import loops
from django_openworkflow.engine.steps import async_atomic_message
from django_openworkflow.models import StepAttempt
from django_openworkflow.registry import (
    _registry,
    async_body_message,
    is_async_function,
    workflow,
)
from django_openworkflow.replay import replay_run
from django_openworkflow.testing import assert_replays, drain, run_to_completion
from tests.conftest import claim_and_execute, make_due
from tests.testapp import async_steps as flows
from tests.testapp.models import SideEffect
from tests.testapp.workflows import echo

transactional = pytest.mark.django_db(transaction=True)


# Tests that execute runs on their own thread leave that thread's StepLoop: closed after each.
pytestmark = pytest.mark.usefixtures("close_this_threads_loop")


@pytest.fixture
def orm_threads():
    """``{step: [thread idents]}``: where each SideEffect row was saved."""
    seen: dict[str, list[int]] = {}

    def saved(sender, instance, **kwargs):
        seen.setdefault(instance.step, []).append(threading.get_ident())

    pre_save.connect(saved, sender=SideEffect)
    yield seen
    pre_save.disconnect(saved, sender=SideEffect)


def threads():
    """The threads alive, but asgiref's own short-lived ones that join an executor it
    shuts down (ThreadSensitiveContext's exit): the executor's thread has ended then."""
    return {t for t in threading.enumerate() if not t.name.endswith("(join)")}


def execute(run, passes=20):
    """Execute passes of ``run`` on this thread until it is finished (parked runs made due)."""
    for _ in range(passes):
        make_due(run)
        claim_and_execute()
        run.refresh_from_db()
        if run.is_finished:
            return run
    raise AssertionError(f"run {run.pk} is still {run.status}")


def attempts_of(run):
    return [
        (a.step_name, a.status, (a.error or {}).get("type"))
        for a in StepAttempt.objects.filter(workflow_run=run).order_by("id")
    ]


# --- the worker: one loop per slot, one companion thread -----------------------------------


@transactional
def test_a_slot_runs_its_async_steps_on_one_loop_and_their_orm_calls_on_one_companion_thread(
    workers, orm_threads
):
    asgiref_thread = asyncio.run(sync_to_async(threading.get_ident)())  # its process-wide one
    workers.start(concurrency=1)
    runs = [flows.async_steps.start() for _ in range(2)]
    outputs = [run.result(timeout=30) for run in runs]

    slot = outputs[0]["first"]["thread"]
    steps = [output[name] for output in outputs for name in ("first", "second")]
    assert {(step["thread"], step["loop"]) for step in steps} == {(slot, steps[0]["loop"])}
    assert [step["count"] for step in steps] == [1, 2, 1, 2]  # each read saw its step's write
    assert [output["plain"] for output in outputs] == ["plain", "plain"]
    companions = set(orm_threads["first"] + orm_threads["second"])
    assert len(orm_threads["first"]) == len(orm_threads["second"]) == 2
    assert len(companions) == 1
    [companion] = companions
    assert companion not in (slot, asgiref_thread)
    workers.stop_all()
    assert companion not in {thread.ident for thread in threading.enumerate()}  # closed


@transactional
def test_an_async_step_without_sync_calls_makes_no_companion_thread():
    before = threads()
    run = execute(flows.async_sees_context.start({"n": 1}))
    assert run.output == "req-1"
    assert threads() == before
    execute(flows.async_fails_until_told.start())  # its ORM call makes one
    [companion] = threads() - before
    loops.close_thread_loop()
    assert not companion.is_alive()


@transactional
@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        ("cancelled", "CancelledError"),
        ("cancels-itself", "CancelledError"),
        ("boom", "Boom"),
        ("exit", "SystemExit"),
    ],
)
def test_an_async_step_raising_a_base_exception_fails_per_policy_and_the_slot_runs_on(
    workers, raised, kind
):
    run = flows.async_step_raises_base_exception.start({"raise": raised})
    workers.start(concurrency=1)
    with pytest.raises(WorkflowFailed):
        run.result(timeout=30)
    assert flows.async_steps.start().result(timeout=30)["plain"] == "plain"  # the one slot
    assert echo.start({"n": 1}).result(timeout=30) == {"n": 1}
    run.refresh_from_db()
    assert (run.error["type"], run.error["step"], run.claim_token) == ("StepFailed", "step", None)
    assert attempts_of(run) == [("step", "failed", kind)] * 2


@transactional
def test_a_keyboard_interrupt_in_an_async_step_crashes_the_pass_as_in_a_sync_step(workers, caplog):
    caplog.set_level(logging.ERROR, logger="django_openworkflow")
    run = flows.async_interrupted_once.start()
    workers.start(concurrency=1, lease_seconds=600)
    assert run.result(timeout=30) == "done"  # replayed a second later, not at lease's end
    assert flows.async_steps.start().result(timeout=30)["plain"] == "plain"
    assert attempts_of(run) == [("step", "failed", "WorkerLost"), ("step", "completed", None)]
    assert [r.getMessage() for r in caplog.records] == [
        f"run crashed the engine, releasing it run={run.pk} workflow=async-interrupted-once "
        "error=KeyboardInterrupt"
    ]


@transactional
def test_parallel_async_steps_run_each_on_a_loop_of_their_thread_closed_after_the_call(
    orm_threads,
):
    before = threads()
    run = execute(flows.async_parallel.start())
    assert run.status == "completed"
    results = run.output[:3]
    assert [r["name"] for r in results] + [run.output[3]] == ["a", "b", "c", "sync"]
    assert len({r["thread"] for r in results}) == len({r["loop"] for r in results}) == 3
    for name in ("a", "b", "c"):  # each ORM call on a companion thread, not the step's own
        assert orm_threads[name][0] not in {r["thread"] for r in results}
    assert threads() == before  # the pool's threads and their companions ended


# --- what a step leaves on its loop ----------------------------------------------------------


@transactional
def test_the_tasks_an_async_step_leaves_are_canceled_before_the_next_step():
    flows.left_behind.clear()
    run = execute(flows.async_leaves_a_task.start())
    assert run.output == {"first": run.output["then"]["loop"], "then": run.output["then"]}
    assert run.output["then"]["tasks"] == 1  # the step's own
    assert flows.left_behind == ["canceled"]


@transactional
def test_a_task_that_ignores_its_cancellation_is_abandoned_with_its_loop(monkeypatch, caplog):
    monkeypatch.setattr(loops, "LEFTOVER_GRACE", 0.05)
    flows.left_behind.clear()
    flows.stubborn_stop.clear()
    caplog.set_level(logging.WARNING, logger="django_openworkflow")
    try:
        run = execute(flows.async_leaves_a_stubborn_task.start())
    finally:
        flows.stubborn_stop.set()
    gc.collect()  # the abandoned task ("destroyed but it is pending", logged by asyncio)
    assert run.status == "completed"
    assert run.output["then"] != run.output["first"]  # a new loop for the next step
    assert flows.left_behind[0] == "ignored"
    assert (
        "async step left tasks that ignored their cancellation, abandoning its event loop "
        f"run={run.pk} workflow=async-leaves-a-stubborn-task step=starts tasks=1 grace=0.05s"
    ) in [r.getMessage() for r in caplog.records]


@transactional
def test_an_abandoned_companion_closes_its_connections_once_its_stuck_call_returns(
    monkeypatch, caplog
):
    """A canceled task's sync call runs on: the check after the step cannot reach the
    companion thread, so the loop is abandoned and the next step gets a new one."""
    monkeypatch.setattr(loops, "LEFTOVER_GRACE", 0.05)
    caplog.set_level(logging.WARNING, logger="django_openworkflow")
    for event in ("entered", "release"):
        flows.stuck[event].clear()
    try:
        run = execute(flows.async_leaves_a_sync_call_running.start())
        assert run.status == "completed"
        assert run.output["then"] != run.output["first"]  # the loop was abandoned
        companion = flows.stuck["thread"]
        assert companion.is_alive()  # still in the stuck call
        assert (
            "async step left a sync call running on its companion thread, abandoning its "
            f"event loop run={run.pk} workflow=async-leaves-a-sync-call-running step=starts "
            "grace=0.05s"
        ) in [r.getMessage() for r in caplog.records]
    finally:
        flows.stuck["release"].set()
    companion.join(10)
    assert not companion.is_alive()
    assert flows.stuck["connection"].connection is None  # closed, not left to the GC


@transactional
def test_a_loop_stopped_by_a_step_fails_that_step_and_one_closed_by_a_step_is_replaced():
    run = execute(flows.async_loop_stopped_or_closed.start())
    assert run.status == "completed", run.error
    assert run.output["after"] != run.output["stopped"]
    stopped = StepAttempt.objects.filter(workflow_run=run, step_name="stops").order_by("id")
    assert [a.status for a in stopped] == ["failed", "completed"]
    assert stopped[0].error["message"] == "Event loop stopped before Future completed."


@transactional
def test_an_async_step_sees_the_context_variables_of_the_workflow_function():
    assert execute(flows.async_sees_context.start({"n": 7})).output == "req-7"


@transactional
def test_a_thread_serving_async_to_sync_runs_async_steps_with_their_orm_calls_on_the_companion():
    """claim_and_execute() through sync_to_async from async code: the step's sync calls
    must not go back to the thread that serves async_to_sync (it runs the step's loop)."""
    run = flows.async_fails_until_told.start()
    SideEffect.objects.create(run_id=run.pk, step="go")

    async def from_async_code():
        await sync_to_async(claim_and_execute)()

    async_to_sync(from_async_code)()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", "went"), run.error


# --- the companion thread's connection ------------------------------------------------------


@transactional
def test_a_transaction_an_async_step_leaves_open_is_rolled_back_not_carried_on():
    run = execute(flows.async_leaves_a_transaction.start())
    assert (run.status, run.output) == ("completed", 0)
    assert not SideEffect.objects.filter(run_id=run.pk, step="uncommitted").exists()


@pytest.mark.postgres
@transactional
def test_a_connection_an_async_step_lost_is_replaced_for_its_retry():
    run = execute(flows.async_loses_its_connection.start())
    assert (run.status, run.output) == ("completed", 1), run.error
    assert attempts_of(run) == [("step", "failed", "OperationalError"), ("step", "completed", None)]


@transactional
def test_a_failed_check_after_an_async_step_keeps_its_result_and_replaces_the_loop(
    monkeypatch, caplog
):
    def broken():
        raise RuntimeError("check failed")

    monkeypatch.setattr(loops, "check_connections", broken)
    caplog.set_level(logging.WARNING, logger="django_openworkflow")
    run = execute(flows.async_steps.start())
    assert run.status == "completed"
    assert run.output["first"]["loop"] != run.output["second"]["loop"]  # a new loop
    assert [s for s, status, _ in attempts_of(run) if status == "completed"] == [
        "first",
        "second",
        "plain",
    ]
    assert len(attempts_of(run)) == 3  # none failed
    assert (
        "async step cleanup failed, the step's event loop is replaced "
        f"run={run.pk} workflow=async-steps step=first error=RuntimeError"
    ) in [r.getMessage() for r in caplog.records]


@transactional
def test_a_sync_orm_call_in_an_async_step_fails_it_as_django_refuses_it():
    run = execute(flows.async_calls_the_orm_synchronously.start())
    assert attempts_of(run) == [("count", "failed", "SynchronousOnlyOperation")]


# --- refusals --------------------------------------------------------------------------------


@transactional
@pytest.mark.parametrize("how", ["function", "partial"])
def test_step_atomic_refuses_an_async_function_before_the_step_starts(how):
    run = execute(flows.async_atomic.start({"how": how}))
    fn = {"function": flows.one}.get(how)
    assert run.status == "failed"
    assert run.error["type"] == "TypeError"
    assert run.error["message"].startswith(f'step.atomic "write" of run {run.pk} was given an ')
    if fn is not None:
        assert run.error["message"] == async_atomic_message("write", run.pk, fn)
    assert "Django's transaction.atomic() is synchronous" in run.error["message"]
    assert attempts_of(run) == []


@transactional
def test_step_atomic_refuses_a_coroutine_from_a_plain_callable_without_awaiting_it():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would fail
        run = execute(flows.async_atomic.start({"how": "lambda"}))
        gc.collect()
    assert (run.status, run.error["type"]) == ("failed", "TypeError")
    assert run.error["message"].startswith(f'step.atomic "write" of run {run.pk} was given ')
    assert attempts_of(run) == [("write", "failed", "TypeError")]


@transactional
@pytest.mark.parametrize(("what", "kind"), [("future", "Future"), ("object", "Awaitable")])
def test_a_step_returning_an_awaitable_that_is_no_coroutine_fails_saying_so(what, kind):
    run = execute(flows.async_returns_an_awaitable.start({"what": what}))
    assert (run.status, run.error["type"]) == ("failed", "TypeError")
    assert run.error["message"] == (
        f'step "awaitable" of run {run.pk} returned an awaitable that is not a coroutine '
        f"({kind}): a step awaits what an async def function returns; await this one "
        "inside an async def step function and return its result"
    )
    assert attempts_of(run) == [("awaitable", "failed", "TypeError")]  # not retried


@transactional
def test_a_coroutine_given_for_a_step_function_is_refused_and_closed():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = execute(flows.async_coroutine_not_function.start())
        gc.collect()
    assert (run.status, run.error["type"]) == ("failed", "TypeError")
    assert run.error["message"].startswith("step 'fetch' needs a callable, not the coroutine ")
    assert run.error["message"].endswith(
        ": pass the async function itself (or a lambda or functools.partial calling it), "
        "which the step calls once, and not on replay"
    )


@transactional
@pytest.mark.parametrize("how", ["direct", "sync_to_async"])
def test_a_step_called_from_an_async_step_is_refused_as_nested(how):
    run = execute(flows.async_nests_a_step.start({"how": how}))
    assert (run.status, run.error["type"]) == ("failed", "TypeError")
    assert run.error["message"] == (
        f'step "inner" was called inside the function of step "outer" of run {run.pk}: '
        "steps cannot be nested; call them from the workflow function"
    )
    assert attempts_of(run) == [("outer", "failed", "TypeError")]


class AsyncCallable:
    async def __call__(self):
        return 1


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (flows.one, True),
        (functools.partial(flows.one, 2), True),
        (AsyncCallable(), True),
        (lambda: flows.one(), False),  # known only once called: refused then
        (flows.Awaitable, False),
        (len, False),
    ],
)
def test_is_async_function(fn, expected):
    assert is_async_function(fn) is expected


def test_an_async_workflow_function_is_refused_at_registration():
    async def body(ctx):
        return None

    with pytest.raises(TypeError) as raised:
        workflow(name="async-body")(body)
    assert str(raised.value) == async_body_message("async-body", body)
    assert str(raised.value).startswith("workflow 'async-body' is an async function (")
    assert "async-body" not in _registry


@transactional
def test_a_workflow_function_that_returns_a_coroutine_fails_its_run_with_the_reason():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = execute(flows.async_body_wrapped.start())
        gc.collect()
    assert (run.status, run.error["type"]) == ("failed", "TypeError")
    assert run.error["message"].startswith("workflow 'async-body-wrapped' is an async function (")


# --- the testing helpers and the replay check ---------------------------------------------


@pytest.mark.django_db
def test_run_to_completion_runs_async_steps_with_their_orm_calls_in_the_tests_transaction(
    orm_threads,
):
    run = flows.async_fails_until_told.start()
    SideEffect.objects.create(run_id=run.pk, step="go")  # uncommitted: this test's transaction
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", "went"), run.error
    done = run_to_completion(flows.async_steps)
    assert done.status == "completed"
    assert orm_threads["first"] == orm_threads["second"] == [threading.get_ident()]
    assert done.output["first"]["thread"] != threading.get_ident()  # a loop of its own


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        ("cancelled", "CancelledError"),
        ("cancels-itself", "CancelledError"),
        ("boom", "Boom"),
        ("exit", "SystemExit"),
    ],
)
def test_run_to_completion_fails_async_steps_that_raise_base_exceptions(raised, kind):
    run = run_to_completion(flows.async_step_raises_base_exception, {"raise": raised})
    assert (run.status, run.error["type"]) == ("failed", "StepFailed")
    assert attempts_of(run) == [("step", "failed", kind)] * 2


@pytest.mark.django_db
def test_run_to_completion_refuses_a_step_nested_in_an_async_step():
    run = run_to_completion(flows.async_nests_a_step, {"how": "sync_to_async"})
    assert (run.status, run.error["type"]) == ("failed", "TypeError")
    assert "steps cannot be nested" in run.error["message"]


@transactional
def test_the_replay_check_replays_async_steps_without_running_them(orm_threads):
    run = execute(flows.async_steps.start())
    effects = SideEffect.objects.count()
    assert_replays(run)
    assert SideEffect.objects.count() == effects


@pytest.mark.django_db
def test_the_replay_check_reports_step_atomic_with_an_async_function():
    run = flows.async_atomic.start({"how": "function"})
    finding = replay_run(run, [])
    assert finding is not None
    assert finding.kind == "raised"
    assert finding.message == (
        f"run {run.pk} (async-atomic): the workflow function raised after 0 step calls: "
        f"TypeError: {async_atomic_message('write', run.pk, flows.one)}"
    )


def test_loops_close_thread_loop_is_a_no_op_without_a_loop():
    loops.close_thread_loop()
    loops.close_thread_loop()


def test_a_step_loop_closed_twice_closes_once():
    step_loop = loops.StepLoop()
    step_loop.close()
    step_loop.close()
    assert step_loop.loop.is_closed()
    assert repr(step_loop) == "<StepLoop steps=0 closed=True>"
