"""Fencing: a worker that lost its claim writes nothing, at every write of a run.

Each test here was written against a hand-made mutation (a fence or guard
condition removed) that the rest of the suite did not catch; see issue 10.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.db.models.functions import Now
from django.test import override_settings
from django.utils import timezone

from django_openworkflow import send_signal
from django_openworkflow.engine import Execution
from django_openworkflow.errors import DEADLINE_ERROR
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.registry import get_workflow
from django_openworkflow.store import Claim, get_store
from django_openworkflow.testing import drain, pause_at
from tests.conftest import (
    backend_pid,
    claim,
    claim_and_execute,
    expire_lease,
    make_due,
    wait_until_blocked,
)
from tests.testapp import workflows
from tests.testapp.workflows import Gate, parent, waiter

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def gates():
    """Gates for the "names-its-finisher" workflow, by thread name; all opened at the end."""
    yield workflows.gates
    for gate in workflows.gates.values():
        gate.opened.set()
    workflows.gates.clear()


class EngineThread(threading.Thread):
    """One pass of a claimed run on its own thread (and connection), named ``name``."""

    def __init__(self, claimed: Claim, name: str) -> None:
        super().__init__(name=name)
        self.claimed = claimed
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            workflow = get_workflow(self.claimed.run.workflow_name)
            Execution(self.claimed, workflow).execute()
        except BaseException as exc:  # reported by finish()
            self.error = exc
        finally:
            connection.close()

    def finish(self) -> None:
        """Join the thread; it must have ended, and without an exception."""
        self.join(10)
        assert not self.is_alive()
        assert self.error is None, repr(self.error)


def attempts(run, step):
    return list(
        StepAttempt.objects.filter(workflow_run=run, step_name=step)
        .order_by("id")
        .values_list("status", "output", "error__type")
    )


def state(run):
    return WorkflowRun.objects.values_list("status", "output", "worker_id", "claim_token").get(
        pk=run.pk
    )


# --- the last step: the finish is fenced ------------------------------------------


def start_a_then_b(gates, *, b_enters_its_step):
    """A freezes in the last step ("who"); its lease expires; B claims the run.

    With ``b_enters_its_step`` B also executes, up to its own "who" (so it has
    found A's attempt lost); otherwise B has only claimed.
    """
    run = get_workflow("names-its-finisher").start()
    gate_a = gates["worker-a"] = Gate()
    gate_b = gates["worker-b"] = Gate()
    [claim_a] = claim("names-its-finisher", worker_id="worker-a")
    thread_a = EngineThread(claim_a, "worker-a")
    assert gate_a.entered.wait(10)
    expire_lease(run)
    [claim_b] = claim("names-its-finisher", worker_id="worker-b")
    thread_b = None
    if b_enters_its_step:
        thread_b = EngineThread(claim_b, "worker-b")
        assert gate_b.entered.wait(10)
    return run, gate_a, gate_b, thread_a, claim_b, thread_b


@pytest.mark.parametrize("b_enters_its_step", [True, False], ids=["b-in-its-step", "b-claimed"])
def test_a_worker_that_lost_its_claim_in_the_last_step_cannot_finish_the_run(
    gates, b_enters_its_step
):
    """A wakes after B took over and tries to finish (the store's finish).

    The run is still ``running`` (B's): only the claim token tells A's claim
    from B's. A's result must not be stored either, even while its attempt
    is still ``running`` (B has claimed but not yet replayed).
    """
    run, gate_a, gate_b, thread_a, claim_b, thread_b = start_a_then_b(
        gates, b_enters_its_step=b_enters_its_step
    )

    gate_a.opened.set()  # A's "who" returns "worker-a"; its finish must be refused
    thread_a.finish()
    assert state(run) == ("running", None, "worker-b", claim_b.token)
    if not b_enters_its_step:
        assert attempts(run, "who") == [("running", None, None)]
        thread_b = EngineThread(claim_b, "worker-b")

    gate_b.opened.set()
    thread_b.finish()
    assert state(run) == ("completed", "worker-b", None, None)
    assert attempts(run, "first") == [("completed", 1, None)]
    assert attempts(run, "who") == [
        ("failed", None, "WorkerLost"),  # A's attempt, as B found it
        ("completed", "worker-b", None),
    ]


def test_a_worker_that_lost_its_claim_and_finds_the_deadline_passed_leaves_the_run_alone(gates):
    """A's claim is lost to B, then the deadline passes: A must not fail B's run for it."""
    run, gate_a, _gate_b, thread_a, claim_b, _thread_b = start_a_then_b(
        gates, b_enters_its_step=False
    )
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=Now() - timedelta(seconds=1))

    gate_a.opened.set()
    thread_a.finish()
    assert state(run) == ("running", None, "worker-b", claim_b.token)


def test_a_last_step_that_ends_after_the_deadline_fails_the_run(gates):
    """The deadline passes while the last step runs: the run fails, its output is not stored."""
    run = get_workflow("names-its-finisher").start(deadline_at=timezone.now() + timedelta(hours=1))
    gate = gates["worker-a"] = Gate()
    [claimed] = claim("names-its-finisher", worker_id="worker-a")
    thread = EngineThread(claimed, "worker-a")
    assert gate.entered.wait(10)
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=Now() - timedelta(seconds=1))

    gate.opened.set()
    thread.finish()
    run.refresh_from_db()
    assert (run.status, run.output, run.error, run.claim_token) == (
        "failed",
        None,
        DEADLINE_ERROR,
        None,
    )
    # the step did end: its result is stored (a resume replays it), not left "running"
    assert attempts(run, "who") == [("completed", "worker-a", None)]


# --- leases: renewed for the worker's own claims only, never reset by a wake-up ----


def test_renewing_leases_renews_only_the_runs_of_the_given_claims():
    mine = get_workflow("echo").start({"n": 1})
    theirs = get_workflow("echo").start({"n": 2})
    [claim_mine] = claim("echo", worker_id="me")
    [claim_theirs] = claim("echo", worker_id="them")
    assert {claim_mine.run_id, claim_theirs.run_id} == {mine.pk, theirs.pk}
    expire_lease(mine)
    expire_lease(theirs)

    assert get_store().renew_leases([claim_mine.token], lease_seconds=60) == 1

    due = set(WorkflowRun.objects.due().values_list("pk", flat=True))
    assert due == {claim_theirs.run_id}  # its worker is silent: its lease stays expired


@pytest.mark.row_locks
def test_renewing_leases_skips_a_run_whose_row_is_locked():
    """A step.atomic holds its run's row lock: the heartbeat skips that run, never waits."""
    get_workflow("echo").start({"n": 1})
    [claimed] = claim("echo", worker_id="me")
    locked, release = threading.Event(), threading.Event()

    def hold_lock():  # what a step.atomic's fence does
        try:
            with transaction.atomic():
                assert get_store().fence(claimed)
                locked.set()
                release.wait(10)
        finally:
            connection.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(10)
        assert get_store().renew_leases([claimed.token], lease_seconds=60) == 0
        assert holder.is_alive()  # renewing did not wait for the lock to go
    finally:
        release.set()
        holder.join(10)
    assert not holder.is_alive()


def test_a_child_that_completes_does_not_reset_the_lease_of_its_running_parent():
    """The parent woke (its wait timed out) and runs; the child completes meanwhile."""
    run = parent.start({"child": "echo", "child_input": 1, "timeout": "1h"})
    assert claim_and_execute().status == "pending"  # the parent parks for an hour
    make_due(run)
    [claimed] = claim("parent", worker_id="worker-a")

    child = claim_and_execute()  # only the child is due: the parent holds a lease
    assert (child.workflow_name, child.status) == ("echo", "completed")

    assert claim("parent", worker_id="worker-b") == []  # the lease still holds
    EngineThread(claimed, "worker-a").finish()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"child": 1})


def test_a_signal_does_not_reset_the_lease_of_the_running_run_it_wakes():
    """The waiting run woke (its timeout) and runs; the signal arrives meanwhile."""
    run = waiter.start({"signal": "bell", "timeout": "1h"})
    drain(time_travel=False)
    make_due(run)
    [claimed] = claim("waiter", worker_id="worker-a")

    assert send_signal("bell", "ding") == [str(run.pk)]

    assert claim("waiter", worker_id="worker-b") == []  # the lease still holds
    EngineThread(claimed, "worker-a").finish()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"data": "ding"})


# --- signal delivery: lock the waiting runs, then re-read who still waits ---------


@pytest.mark.row_locks
def test_a_delivery_waits_for_another_and_then_delivers_nothing():
    """Sender 1 holds the waiting run's lock; sender 2 waits for it, then finds no one waiting."""
    run = waiter.start({"signal": "bell"})
    drain(time_travel=False)
    pids: dict[str, int] = {}
    connected = {"first": threading.Event(), "second": threading.Event()}
    results: dict[str, list[str]] = {}

    def send(who):
        try:
            pids[who] = backend_pid()
            connected[who].set()
            results[who] = send_signal("bell", who)
        finally:
            connection.close()

    first = threading.Thread(target=send, args=("first",))
    second = threading.Thread(target=send, args=("second",))
    with pause_at("signal.locked") as pause:
        first.start()
        pause.wait()  # first holds the run's lock and is about to deliver
        second.start()
        assert connected["second"].wait(10)
        wait_until_blocked(pids["second"], by=pids["first"])
    first.join(10)
    assert not first.is_alive()
    second.join(10)
    assert not second.is_alive()

    assert results == {"first": [str(run.pk)], "second": []}
    [(status, output)] = StepAttempt.objects.filter(workflow_run=run, step_name="bell").values_list(
        "status", "output"
    )
    assert (status, output) == ("completed", {"data": "first"})


def test_a_signal_delivered_while_the_run_replays_keeps_its_delivery_time():
    """The run woke (its timeout) and is replaying when the signal completes its wait.

    Settling the wait then finds the step completed and leaves it as the
    signal left it (the ``status="running"`` guard in ``_settle_wait``).
    """
    run = waiter.start({"signal": "bell", "timeout": "1h"})
    drain(time_travel=False)
    make_due(run)
    [claimed] = claim("waiter", worker_id="worker-a")
    with pause_at("wait.before-settle", when=lambda c: c["run_id"] == run.pk) as pause:
        thread = EngineThread(claimed, "worker-a")
        pause.wait()  # A read the step as waiting and is about to settle it
        assert send_signal("bell", "ding") == [str(run.pk)]
        delivered = StepAttempt.objects.values_list("status", "output", "finished_at").get(
            workflow_run=run, step_name="bell"
        )
    thread.finish()

    assert delivered[:2] == ("completed", {"data": "ding"})
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"data": "ding"})
    assert (
        StepAttempt.objects.values_list("status", "output", "finished_at").get(
            workflow_run=run, step_name="bell"
        )
        == delivered
    )


# --- the manager's fenced transitions, past the deadline -------------------------


def test_fenced_transitions_refuse_a_run_past_its_deadline_except_failing_it():
    run = get_workflow("echo").start({"n": 1}, deadline_at=timezone.now() + timedelta(hours=1))
    [claimed] = claim("echo", worker_id="worker-a")
    token = claimed.token
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=Now() - timedelta(seconds=1))
    later = timezone.now() + timedelta(minutes=1)
    store = get_store()

    with transaction.atomic():
        assert not store.fence(claimed)
    assert not store.park(claimed, later)
    assert not store.finish(claimed, "completed", output=1)
    assert state(run) == ("running", None, "worker-a", token)

    assert store.finish(claimed, "failed", error=DEADLINE_ERROR)
    assert state(run) == ("failed", None, None, None)


# --- what a stop and a claim may touch: running attempts, one namespace ------------


@pytest.mark.parametrize("stop", ["cancel", "deadline"])
def test_stopping_a_run_fails_its_running_step_and_keeps_its_completed_ones(gates, stop):
    run = get_workflow("names-its-finisher").start(deadline_at=timezone.now() + timedelta(hours=1))
    gate = gates["worker-a"] = Gate()
    [claimed] = claim("names-its-finisher", worker_id="worker-a")
    thread = EngineThread(claimed, "worker-a")
    assert gate.entered.wait(10)  # "first" is stored (with the start of "who")

    if stop == "cancel":
        WorkflowRun.objects.cancel(run)
    else:
        WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=Now() - timedelta(seconds=1))
        assert get_store().fail_overdue("default") == 1
    gate.opened.set()
    thread.finish()

    assert attempts(run, "first") == [("completed", 1, None)]
    if stop == "cancel":  # a canceled run stores nothing further as success
        assert attempts(run, "who") == [("failed", None, "WorkflowCanceled")]
    else:  # its function returned after the deadline: kept, so a resume does not repeat it
        assert attempts(run, "who") == [("completed", "worker-a", None)]
    assert state(run)[:2] == ("canceled" if stop == "cancel" else "failed", None)


def test_a_claim_takes_only_runs_of_its_namespace():
    with override_settings(OPENWORKFLOW={"NAMESPACE": "other"}):
        run = get_workflow("echo").start({"n": 1})

    assert claim("echo", worker_id="worker-a") == []  # the "default" namespace
    [claimed] = get_store().claim(
        worker_id="worker-a",
        workflow_names=["echo"],
        limit=1,
        lease_seconds=30,
        namespace="other",
    )
    assert claimed.run_id == run.pk


def test_a_signal_wakes_only_runs_of_its_namespace():
    with override_settings(OPENWORKFLOW={"NAMESPACE": "other"}):
        run = waiter.start({"signal": "bell"})
        drain(time_travel=False)

    assert send_signal("bell", "from default") == []
    assert attempts(run, "bell") == [("running", None, None)]
    with override_settings(OPENWORKFLOW={"NAMESPACE": "other"}):
        assert send_signal("bell", "from other") == [str(run.pk)]
    assert attempts(run, "bell") == [("completed", {"data": "from other"}, None)]
