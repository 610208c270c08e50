"""Fencing: a worker that lost its claim writes nothing, at every write of a run.

Each test here was written against a mutation that no other test caught:
a fence condition removed by hand (see issue 10), with the whole suite green.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models.functions import Now

from django_openworkflow.engine import Execution
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.registry import get_workflow
from tests.testapp import workflows
from tests.testapp.workflows import Gate

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def gates():
    """Gates for the "names-its-finisher" workflow, by thread name; all opened at the end."""
    yield workflows.gates
    for gate in workflows.gates.values():
        gate.opened.set()
    workflows.gates.clear()


def claim(workflow_name, *, worker_id):
    [run] = WorkflowRun.objects.claim(
        worker_id=worker_id,
        workflow_names=[workflow_name],
        limit=1,
        lease_seconds=30,
        namespace="default",
    )
    return run


def expire_lease(run):
    WorkflowRun.objects.filter(pk=run.pk).update(available_at=Now() - timedelta(seconds=1))


def execute_in_thread(claimed, name):
    """Execute one pass of a claimed run on a thread called ``name`` (its own connection)."""

    def target():
        try:
            Execution(claimed, get_workflow(claimed.workflow_name), lease_seconds=30).execute()
        finally:
            connection.close()

    thread = threading.Thread(target=target, name=name)
    thread.start()
    return thread


def join(thread):
    thread.join(10)
    assert not thread.is_alive()


def attempts(run, step):
    return list(
        StepAttempt.objects.filter(workflow_run=run, step_name=step)
        .order_by("id")
        .values_list("status", "output", "error__type")
    )


def test_a_worker_that_lost_its_claim_in_the_last_step_cannot_finish_the_run(gates):
    """A is frozen in the last step past its lease; B takes over; A wakes and tries to finish.

    A's finish (PostgreSQL: fastpath.FINISH; elsewhere: finish_claimed) must
    be refused by the claim token: the run is still ``running`` (B's), so only
    the token tells A's claim from B's.
    """
    run = get_workflow("names-its-finisher").start()
    gate_a = gates["worker-a"] = Gate()
    gate_b = gates["worker-b"] = Gate()
    claim_a = claim("names-its-finisher", worker_id="worker-a")
    thread_a = execute_in_thread(claim_a, "worker-a")
    assert gate_a.entered.wait(10)

    expire_lease(run)
    claim_b = claim("names-its-finisher", worker_id="worker-b")
    thread_b = execute_in_thread(claim_b, "worker-b")
    assert gate_b.entered.wait(10)  # B replayed "first", runs "who" again

    gate_a.opened.set()  # A's "who" returns "worker-a"; its finish must be refused
    join(thread_a)
    run.refresh_from_db()
    assert (run.status, run.output, run.worker_id, run.claim_token) == (
        "running",
        None,
        "worker-b",
        claim_b.claim_token,
    )

    gate_b.opened.set()
    join(thread_b)
    run.refresh_from_db()
    assert (run.status, run.output, run.error) == ("completed", "worker-b", None)
    assert attempts(run, "first") == [("completed", 1, None)]
    assert attempts(run, "who") == [
        ("failed", None, "WorkerLost"),  # A's attempt, as B found it; A's result not stored
        ("completed", "worker-b", None),
    ]
