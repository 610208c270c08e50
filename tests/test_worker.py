"""The worker: real ``runworker`` processes and in-process workers on the test database."""

import signal
import sys
import threading
import time

import pytest
from django.db import connection
from django.db.models import Count

from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.worker import Worker
from tests.testapp.models import SideEffect
from tests.testapp.workflows import echo, sleeper, three_steps, waits_for_file

pytestmark = pytest.mark.django_db(transaction=True)


def wait_until(predicate, timeout=20.0, message="condition"):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {message}"
        time.sleep(0.05)


def running_attempt(run, step):
    return StepAttempt.objects.filter(workflow_run=run, step_name=step, status="running").exists()


@pytest.mark.postgres
def test_two_worker_processes_drain_300_runs_each_step_exactly_once(worker_process):
    runs = [three_steps.start({"i": i}) for i in range(300)]
    began = time.monotonic()
    workers = [worker_process("--concurrency", "4") for _ in range(2)]
    wait_until(lambda: not WorkflowRun.objects.active().exists(), timeout=120, message="300 runs")
    seconds = time.monotonic() - began
    sys.stderr.write(
        f"\n300 runs x 3 steps drained in {seconds:.2f}s: {300 / seconds:.0f} runs/s\n"
    )

    assert WorkflowRun.objects.filter(status="completed").count() == 300
    assert StepAttempt.objects.count() == 900
    assert StepAttempt.objects.exclude(status="completed").count() == 0
    # every step function ran exactly once
    per_step = SideEffect.objects.values("run_id", "step").annotate(n=Count("id"))
    assert len(per_step) == 900
    assert {row["n"] for row in per_step} == {1}
    # no run was held by two workers: all steps of a run ran in one process
    per_run = SideEffect.objects.values("run_id").annotate(pids=Count("pid", distinct=True))
    assert {row["pids"] for row in per_run} == {1}
    # both processes took part
    assert SideEffect.objects.values("pid").distinct().count() == 2
    assert {r.pk for r in runs} == set(WorkflowRun.objects.values_list("pk", flat=True))
    for proc in workers:
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0


@pytest.mark.postgres
def test_a_worker_killed_mid_step_is_replaced_and_finished_steps_are_not_repeated(
    worker_process, tmp_path
):
    flag = tmp_path / "go"
    run = waits_for_file.start({"path": str(flag)})
    first = worker_process("--lease", "1")
    wait_until(lambda: running_attempt(run, "block"), message="the blocking step")
    first.signal(signal.SIGKILL)
    first.wait()
    flag.touch()
    worker_process("--lease", "1")
    assert run.result(timeout=30) == 3

    assert SideEffect.objects.filter(run_id=run.pk, step="first").count() == 1
    assert SideEffect.objects.filter(run_id=run.pk, step="block").count() == 2
    assert SideEffect.objects.filter(run_id=run.pk, step="last").count() == 1
    lost = StepAttempt.objects.get(workflow_run=run, step_name="block", status="failed")
    assert lost.error["type"] == "WorkerLost"


def test_sigterm_finishes_the_run_in_flight_then_exits_0(worker_process, tmp_path):
    flag = tmp_path / "go"
    run = waits_for_file.start({"path": str(flag)})
    proc = worker_process("--concurrency", "2")
    wait_until(lambda: running_attempt(run, "block"), message="the blocking step")
    proc.signal(signal.SIGTERM)
    wait_until(lambda: "stopping worker=" in proc.output(), message="the worker to stop")
    late = echo.start({"late": True})  # a stopping worker takes no new run
    flag.touch()
    assert proc.wait(timeout=30) == 0
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED
    assert run.output == 3
    late.refresh_from_db()
    assert late.status == WorkflowRun.Status.PENDING


def test_while_a_run_sleeps_another_runs_on_a_single_slot(worker_process):
    napping = sleeper.start({"sleep": "3s"})
    worker_process("--concurrency", "1", "--poll-interval", "0.1")
    wait_until(
        lambda: StepAttempt.objects.filter(workflow_run=napping, step_name="nap").exists(),
        message="the sleep to start",
    )
    quick = echo.start({"n": 1})
    assert quick.result(timeout=10) == {"n": 1}
    napping.refresh_from_db()
    assert napping.status == WorkflowRun.Status.PENDING  # still asleep, holding no slot
    assert napping.worker_id is None
    assert napping.result(timeout=15) == 2


@pytest.mark.postgres
def test_new_runs_are_picked_up_through_notify_not_the_poll(worker_process):
    proc = worker_process("--poll-interval", "60")
    wait_until(lambda: "listening channel=" in proc.output(), message="LISTEN")
    time.sleep(0.2)  # the worker has gone idle: its next poll is a minute away
    run = echo.start({"n": 2})
    assert run.result(timeout=10) == {"n": 2}


def test_in_process_worker_stops_when_asked():
    worker = Worker(concurrency=2, poll_interval=0.05)
    thread = threading.Thread(target=lambda: (worker.run(), connection.close()))
    thread.start()
    run = echo.start({"n": 3})
    assert run.result(timeout=10) == {"n": 3}
    worker.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert worker.runs_executed == 1


def test_burst_worker_exits_when_nothing_is_due():
    runs = [three_steps.start({"i": i}) for i in range(5)]
    worker = Worker(concurrency=3, burst=True)
    worker.run()
    assert worker.runs_executed == 5
    assert all(WorkflowRun.objects.get(pk=r.pk).status == "completed" for r in runs)


def test_lease_is_renewed_while_a_step_runs(worker_process, tmp_path):
    flag = tmp_path / "go"
    run = waits_for_file.start({"path": str(flag)})
    worker_process("--lease", "1.5")
    wait_until(lambda: running_attempt(run, "block"), message="the blocking step")
    run.refresh_from_db()
    first_lease = run.available_at
    time.sleep(2.0)  # longer than the lease: only heartbeats keep the claim
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.RUNNING
    assert run.available_at > first_lease
    flag.touch()
    assert run.result(timeout=10) == 3
    assert SideEffect.objects.filter(run_id=run.pk, step="block").count() == 1
