"""The worker: real ``runworker`` processes and in-process workers on the test database."""

import logging
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import Count
from django.db.models.functions import Now
from django.utils import timezone

from django_openworkflow import WorkflowFailed
from django_openworkflow.checks import SQLITE_LOCKED_HINT
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.registry import Workflow
from django_openworkflow.testing import pause_at
from django_openworkflow.worker import Worker
from tests.testapp.models import SideEffect
from tests.testapp.workflows import (
    echo,
    interrupted_once,
    sleeper,
    step_raises_base_exception,
    three_steps,
    waits_for_file,
)

pytestmark = pytest.mark.django_db(transaction=True)


def wait_until(predicate, timeout=20.0, message="condition"):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {message}"
        time.sleep(0.05)


def running_attempt(run, step):
    return StepAttempt.objects.filter(workflow_run=run, step_name=step, status="running").exists()


@pytest.mark.row_locks
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


@pytest.mark.row_locks
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
    # A poll far longer than the test: the loop waits for a wake-up, so the
    # signal reaches it there, not half-way through a claim.
    proc = worker_process("--concurrency", "2", "--poll-interval", "600")
    wait_until(lambda: running_attempt(run, "block"), message="the blocking step")
    proc.signal(signal.SIGTERM)
    proc.wait_for("stopping, send the signal again to exit now worker=")
    late = echo.start({"late": True})  # a stopping worker takes no new run
    flag.touch()
    assert proc.wait(timeout=30) == 0
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED
    assert run.output == 3
    late.refresh_from_db()
    assert late.status == WorkflowRun.Status.PENDING
    assert "signal=SIGTERM in_flight=1\n" in proc.output()


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
    proc = worker_process("--poll-interval", "600")
    proc.wait_until_idle()
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


# --- in-process workers ---------------------------------------------------------------


@contextmanager
def worker_thread(**options):
    """A ``Worker`` running on its own thread until the block ends."""
    worker = Worker(poll_interval=0.05, **options)
    thread = threading.Thread(target=worker.run, name="test-worker")
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(30)
        assert not thread.is_alive()


@pytest.mark.parametrize(
    ("raised", "kind"), [("cancelled", "CancelledError"), ("boom", "Boom"), ("exit", "SystemExit")]
)
def test_a_step_raising_a_base_exception_fails_per_policy_and_the_slot_runs_on(raised, kind):
    run = step_raises_base_exception.start({"raise": raised})
    with worker_thread(concurrency=1):
        with pytest.raises(WorkflowFailed):
            run.result(timeout=30)
        later = echo.start({"n": 1})
        assert later.result(timeout=30) == {"n": 1}  # on the one slot there is
    run.refresh_from_db()
    assert (run.error["type"], run.error["step"], run.claim_token) == ("StepFailed", "step", None)
    attempts = StepAttempt.objects.filter(workflow_run=run).order_by("id")
    assert [(a.status, a.error["type"]) for a in attempts] == [("failed", kind)] * 2


def test_a_run_that_escapes_the_engine_is_released_replayed_and_the_slot_survives(
    caplog,
):
    caplog.set_level(logging.ERROR, logger="django_openworkflow")
    run = interrupted_once.start()
    with worker_thread(concurrency=1, lease_seconds=600):
        assert run.result(timeout=30) == "done"  # long before its 600 s lease would end
        later = echo.start({"n": 2})
        assert later.result(timeout=30) == {"n": 2}
    lost, done = StepAttempt.objects.filter(workflow_run=run).order_by("id")
    assert (lost.status, lost.error["type"], done.status) == ("failed", "WorkerLost", "completed")
    assert [r.getMessage() for r in caplog.records] == [
        f"run crashed the engine, releasing it run={run.pk} workflow=interrupted-once "
        "error=KeyboardInterrupt"
    ]
    assert caplog.records[0].exc_info[0] is KeyboardInterrupt


def test_a_run_claimed_again_while_its_last_slot_finishes_stays_in_flight():
    """The first pass parks the run (a sleep); the same worker claims it again while the
    first pass's slot is still in its ``finally``: that slot must not drop the new claim."""
    run = sleeper.start({"sleep": "10ms"})
    first = pause_at("worker.after-execute", when=lambda c: c["run_id"] == run.pk)
    second = pause_at(
        "step.before-fence", when=lambda c: c["run_id"] == run.pk and c["step"] == "after"
    )
    # lease 3 s: the heartbeat renews every second
    with (
        first as first_done,
        second as second_pass,
        worker_thread(concurrency=2, lease_seconds=3) as worker,
    ):
        old_token = first_done.wait()["token"]
        second_pass.wait()  # claimed again by this worker, executing on the other slot
        claim = WorkflowRun.objects.get(pk=run.pk)
        assert (claim.status, claim.worker_id) == ("running", worker.worker_id)
        assert claim.claim_token != old_token
        first_done.release()
        wait_until(lambda: worker.runs_executed == 1, message="the first slot to finish")
        with pause_at(
            "heartbeat.before-renew", when=lambda c: claim.claim_token in c["tokens"]
        ) as beat:
            beat.wait(timeout=5)
        with pause_at("heartbeat.before-renew") as next_beat:  # the renewal above is done
            next_beat.wait(timeout=5)
        renewed = WorkflowRun.objects.get(pk=run.pk)
        assert (renewed.claim_token, renewed.status) == (claim.claim_token, "running")
        assert renewed.available_at > claim.available_at
        second_pass.release()
        assert run.result(timeout=30) == 2


def test_a_worker_holds_no_more_runs_than_its_slots_when_one_claim_takes_several(tmp_path):
    """One claim's runs share its claim token; each is a run in flight all the same."""
    gate = tmp_path / "open"
    runs = [waits_for_file.start({"path": str(gate)}) for _ in range(6)]
    with worker_thread(concurrency=2) as worker:
        wait_until(
            lambda: StepAttempt.objects.filter(step_name="block", status="running").count() == 2,
            message="both slots in the blocking step",
        )
        for _ in range(3):  # two whole turns of the loop with every slot busy
            with pause_at("worker.before-poll") as turn:
                turn.wait()
        held = WorkflowRun.objects.filter(status="running", worker_id=worker.worker_id)
        assert held.count() == 2
        gate.touch()
        assert [run.result(timeout=30) for run in runs] == [3] * 6


def warnings_logged(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def swept():
    """A run that only a sweep changes: past its deadline, it is failed by the next sweep."""
    run = echo.start({}, available_at=timezone.now() + timedelta(hours=1))
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=timezone.now() - timedelta(seconds=1))
    return run


def test_due_runs_of_an_unknown_workflow_name_are_reported_once_per_name(caplog):
    caplog.set_level(logging.WARNING, logger="django_openworkflow")
    typo = Workflow(lambda ctx: None, name="send-reciept")  # never registered
    typo.start()
    typo.start()
    Workflow(lambda ctx: None, name="other-typo").start()
    typo.start(available_at=timezone.now() + timedelta(hours=1))  # not due: not counted
    expected = [
        "unknown workflow, no @workflow with this name is registered in this worker "
        "name=other-typo runs=1",
        "unknown workflow, no @workflow with this name is registered in this worker "
        "name=send-reciept runs=2",
    ]
    with worker_thread(concurrency=1):
        wait_until(lambda: len(warnings_logged(caplog)) == 2, message="the warnings")
        assert warnings_logged(caplog) == expected
        typo.start()  # one more run of a name already reported
        for _ in range(2):  # two later sweeps (each fails its overdue run)
            overdue = swept()
            wait_until(
                lambda run=overdue: WorkflowRun.objects.get(pk=run.pk).status == "failed",
                message="a sweep",
            )
    assert warnings_logged(caplog) == expected


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's database-wide write lock")
def test_database_is_locked_in_the_worker_log_names_the_sqlite_settings(caplog):
    import sqlite3

    caplog.set_level(logging.WARNING, logger="django_openworkflow")
    options = connection.settings_dict["OPTIONS"]
    saved = dict(options)
    options["timeout"] = 0.05  # the worker's own connections give up waiting at once
    holder = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock

    def loop_errors():
        return [m for m in warnings_logged(caplog) if m.startswith("database error worker=")]

    try:
        with worker_thread(concurrency=1):
            wait_until(loop_errors, message="a database error")
            holder.execute("ROLLBACK")
    finally:
        holder.close()
        options.clear()
        options.update(saved)
    message = loop_errors()[0]
    assert message.endswith(
        f" error=OperationalError detail=database is locked hint={SQLITE_LOCKED_HINT}"
    )
    # The worker registry's own writes (its row, at start) say it too.
    registry = next(m for m in warnings_logged(caplog) if m.startswith("worker registry"))
    assert "action=register " in registry
    assert "error=OperationalError detail=database is locked" in registry
    assert registry.endswith(f" hint={SQLITE_LOCKED_HINT}")
    assert 'OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20}' in SQLITE_LOCKED_HINT


def test_a_worker_with_every_slot_busy_reports_unknown_names_once_a_slot_is_free(caplog):
    caplog.set_level(logging.WARNING, logger="django_openworkflow")
    held = echo.start({"n": 1})
    hold = pause_at("step.before-fence", when=lambda c: c["run_id"] == held.pk)
    with hold as busy, worker_thread(concurrency=1):
        busy.wait()  # the one slot is taken
        Workflow(lambda ctx: None, name="send-reciept").start()
        for _ in range(2):  # two sweeps while busy: the query over due runs is skipped
            overdue = swept()
            wait_until(
                lambda run=overdue: WorkflowRun.objects.get(pk=run.pk).status == "failed",
                message="a sweep",
            )
        assert warnings_logged(caplog) == []
        busy.release()
        wait_until(lambda: warnings_logged(caplog), message="the warning")
    assert warnings_logged(caplog) == [
        "unknown workflow, no @workflow with this name is registered in this worker "
        "name=send-reciept runs=1"
    ]
    assert held.result(timeout=10) == {"n": 1}


def test_a_stop_just_before_the_loop_clears_its_wake_up_is_not_lost():
    worker = Worker(concurrency=1, poll_interval=600)
    thread = threading.Thread(target=worker.run)
    with pause_at("worker.before-poll") as poll:
        thread.start()
        poll.wait()
        worker.stop()  # sets the wake-up the loop is about to clear
    thread.join(10)
    assert not thread.is_alive()


def test_a_run_that_crashes_the_engine_is_replayed_a_second_later_not_at_once():
    run = interrupted_once.start()
    with (
        pause_at("worker.after-execute", when=lambda c: c["run_id"] == run.pk) as crashed,
        worker_thread(concurrency=1, lease_seconds=600),
    ):
        crashed.wait()  # released after the crash, before the slot takes anything else
        released = WorkflowRun.objects.filter(pk=run.pk).annotate(now=Now()).get()
        assert released.available_at > released.now  # not due at once: no crash loop
        assert released.available_at <= released.now + timedelta(seconds=1)
        crashed.release()
        assert run.result(timeout=30) == "done"
