"""The async API (Django's "a" prefix): ``astart``, ``aresult``, ``asend_signal``,
``aresume``, ``acancel``, ``arerun``, from async code and from an async view.

The test bodies are coroutines run by asgiref's ``async_to_sync``, as Django runs
its own async tests: no pytest plugin is needed.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db import transaction
from django.test import AsyncClient

import django_openworkflow
from django_openworkflow import WorkflowCanceled, WorkflowFailed
from django_openworkflow.models import WorkflowRun
from tests.conftest import WorkerThreads
from tests.testapp import async_steps as flows
from tests.testapp.models import SideEffect
from tests.testapp.workflows import echo, three_steps

transactional = pytest.mark.django_db(transaction=True)


def asynchronous(test):
    """Run an ``async def`` test body in an event loop."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        return async_to_sync(test)(*args, **kwargs)

    return run


@sync_to_async
def waits_for_a_signal(run):
    wait = WorkflowRun.objects.get(pk=run.pk).waiting_for()
    return wait is not None and wait.kind == "signal"


@pytest.fixture
def workers():
    started = WorkerThreads(poll_interval=0.05, concurrency=2)
    yield started
    started.stop_all()


@transactional
@asynchronous
async def test_astart_then_aresult_with_a_worker_running(workers):
    workers.start()
    run = await flows.async_steps.astart()
    assert isinstance(run, WorkflowRun)
    output = await run.aresult(timeout=30)
    assert output["plain"] == "plain"
    assert run.status == "completed"  # the run was refreshed, as result() does
    runs = await echo.astart_many([{"n": 1}, {"n": 2}])
    assert [await r.aresult(timeout=30) for r in runs] == [{"n": 1}, {"n": 2}]


@transactional
@asynchronous
async def test_aresult_waits_without_blocking_the_loop_while_asend_signal_wakes_the_run(
    workers,
):
    workers.start()
    run = await flows.async_waits_for_signal.astart({"signal": "go-async"})
    waiting = asyncio.ensure_future(run.aresult(timeout=30))
    while not await waits_for_a_signal(run):
        await asyncio.sleep(0.02)
    assert not waiting.done()
    # On this same loop while aresult() waits: it holds neither the loop nor the thread
    # that sync_to_async calls run on.
    assert await django_openworkflow.asend_signal("go-async", 21) == [str(run.pk)]
    assert await waiting == 42


@transactional
@asynchronous
async def test_aresume_acancel_and_arerun_take_the_managers_arguments(workers):
    workers.start()
    failing = await flows.async_fails_until_told.astart()
    with pytest.raises(WorkflowFailed):
        await failing.aresult(timeout=30)
    await SideEffect.objects.acreate(run_id=failing.pk, step="go")
    resumed = await WorkflowRun.objects.aresume(failing.pk, by=None)
    assert resumed.status == "pending"
    assert await failing.aresult(timeout=30) == "went"

    again = await WorkflowRun.objects.arerun(failing, from_step="step")
    assert (again.pk, again.status) == (failing.pk, "pending")
    assert await failing.aresult(timeout=30) == "went"

    waiting = await flows.async_waits_for_signal.astart({"signal": "never"})
    canceled = await WorkflowRun.objects.acancel(waiting)
    assert canceled.status == "canceled"
    with pytest.raises(WorkflowCanceled):
        await waiting.aresult(timeout=30)


@transactional
@asynchronous
async def test_aresult_times_out_and_the_async_transitions_refuse_as_the_sync_ones():
    run = await three_steps.astart({"i": 1})  # no worker: it never finishes
    began = time.monotonic()
    with pytest.raises(TimeoutError) as raised:
        await run.aresult(timeout=0.1)
    assert time.monotonic() - began >= 0.1
    assert str(raised.value) == f"run {run.pk} did not finish within 0.1 s (it is pending)"
    with pytest.raises(django_openworkflow.InvalidTransition) as refused:
        await WorkflowRun.objects.aresume(run)
    assert str(refused.value) == (
        f"cannot resume run {run.pk}: it is pending; only failed runs can be resumed"
    )
    with pytest.raises(TypeError):
        await flows.async_steps.astart(object())  # not JSON: refused as start() does


@pytest.mark.django_db
def test_aresult_inside_the_transaction_that_started_the_run_is_refused_at_once():
    # The test's transaction: async_to_sync sends the sync calls back to this thread.
    async def start_and_wait():
        run = await echo.astart({"n": 1})
        await run.aresult(timeout=30)

    began = time.monotonic()
    with pytest.raises(transaction.TransactionManagementError) as raised:
        async_to_sync(start_and_wait)()
    assert time.monotonic() - began < 10
    assert "is not committed yet: result() is waiting inside the transaction" in str(raised.value)


@transactional
@asynchronous
async def test_an_async_view_starts_a_run_and_awaits_its_result(workers):
    workers.start()
    response = await AsyncClient().get("/async/start-and-wait/")
    assert response.status_code == 200
    body = response.json()
    assert body["output"]["plain"] == "plain"
    run = await WorkflowRun.objects.aget(pk=body["run"])
    assert (run.workflow_name, run.status) == ("async-steps", "completed")


def test_asend_signal_is_exported_with_send_signal():
    from django_openworkflow.signaling import asend_signal

    assert "asend_signal" in django_openworkflow.__all__
    assert django_openworkflow.asend_signal is asend_signal
    assert inspect.iscoroutinefunction(asend_signal)
