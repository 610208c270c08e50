"""Workers with a wrong clock: leases, sleeps, retries and deadlines follow the database clock."""

import ast
from datetime import timedelta
from pathlib import Path

import pytest
from django.db.models.functions import Now
from django.utils import timezone

import django_openworkflow
from django_openworkflow import clock
from django_openworkflow.engine import Execution
from django_openworkflow.managers import now_plus
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.registry import get_workflow
from django_openworkflow.store import get_store
from tests.testapp.workflows import flaky, sleeper

pytestmark = pytest.mark.django_db(transaction=True)


def db_now():
    return WorkflowRun.objects.annotate(now=Now()).values_list("now", flat=True).first()


@pytest.mark.parametrize("skew", ["-3600", "3600"], ids=["an-hour-slow", "an-hour-fast"])
def test_a_worker_with_a_skewed_clock_sleeps_and_retries_on_database_time(worker_process, skew):
    napping = sleeper.start({"sleep": "500ms"})
    failing = flaky.start({"failures": 1, "initial": "300ms"})
    worker_process("--poll-interval", "0.1", env={"OPENWORKFLOW_TEST_CLOCK_SKEW": skew})

    assert napping.result(timeout=20) == 2
    assert failing.result(timeout=20) == 2
    now = db_now()

    nap = StepAttempt.objects.get(workflow_run=napping, step_name="nap")
    # the wake-up time was computed on the database clock, not an hour off
    assert abs(nap.wake_at - nap.created_at - timedelta(milliseconds=500)) < timedelta(seconds=2)
    assert abs(now - nap.wake_at) < timedelta(minutes=1)
    first, second = StepAttempt.objects.filter(workflow_run=failing).order_by("id")
    gap = second.started_at - first.finished_at
    assert timedelta(milliseconds=250) < gap < timedelta(seconds=5)
    lease_runs = WorkflowRun.objects.filter(pk__in=[napping.pk, failing.pk])
    assert all(abs(run.finished_at - now) < timedelta(minutes=1) for run in lease_runs)


def test_the_clock_plus_nothing_is_the_clock_itself():
    # One statement reads one "now" (SQLite and PostgreSQL alike). On SQLite Django's
    # Now() has milliseconds and Now() + interval microseconds: compared as text, a run
    # released "now" was not due until the next millisecond.
    run = sleeper.start({"sleep": "1s"})
    same = WorkflowRun.objects.alias(at=now_plus(0)).filter(pk=run.pk, at=clock.Now())
    assert same.exists()


def test_the_package_reads_the_clock_through_its_own_now():
    package = Path(django_openworkflow.__file__).parent
    users = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            imported = {alias.name for alias in node.names}
            if (node.module or "").startswith("django.db.models.functions") and "Now" in imported:
                users.append(path.relative_to(package).as_posix())
    # models.py: the columns' db_default, as its migrations have it
    assert sorted(users) == ["clock.py", "models.py"]


def test_a_run_that_waits_for_a_slot_keeps_the_clock_of_its_claim(monkeypatch):
    run = sleeper.start({"sleep": "1s"})
    store = get_store()
    [claim] = store.claim(
        namespace="default",
        workflow_names=[sleeper.name],
        limit=1,
        worker_id="w1",
        lease_seconds=30,
    )
    claimed_at = timezone.now
    # ten minutes pass on this machine before a slot gets to the run
    monkeypatch.setattr(timezone, "now", lambda: claimed_at() + timedelta(minutes=10))
    execution = Execution(claim, get_workflow(run.workflow_name), store=store)
    assert execution.now() - claim.db_now > timedelta(minutes=9)
