"""Adversarial review of retention (SPEC section 11), 2026-11-30: each test failed on the code
before it (ae85901) and pins the fix."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from django_openworkflow import retention
from django_openworkflow.checks import check_settings
from django_openworkflow.models import StepAttempt, WorkflowLease, WorkflowRun
from django_openworkflow.retention import Purged, purge
from django_openworkflow.testing import pause_at
from django_openworkflow.worker import Worker
from tests.conftest import ROW_LOCKS
from tests.test_retention import ALL, DAY, HOUR, exists, make_run, make_signal
from tests.testapp.workflows import echo

# --- the dry run -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_dry_run_counts_a_signal_past_its_window_once():
    """A run that finished 25 hours ago with a keyed signal sent 26 hours ago: the batch
    counts the signal, and purge_signals (the day after the window) counts it again."""
    now = timezone.now()
    run = make_run("completed", age=25 * HOUR)
    WorkflowRun.objects.filter(pk=run.pk).update(created_at=now - 30 * HOUR)
    make_signal(run, sent_at=now - 26 * HOUR)

    dry = purge(ALL, dry_run=True)
    real = purge(ALL)

    assert real == Purged(runs=1, attempts=1, events=1, signals=1)
    assert dry == real


# --- SQLite: a batch of ordinary runs ------------------------------------------------------------


@pytest.mark.django_db
def test_a_batch_of_a_thousand_runs_that_ran_one_after_another_purges():
    """Runs that ran one after another (the usual history): each is its own span of
    sent_at in _signals_going, a thousand OR-ed ranges in one WHERE. SQLite refuses an
    expression tree deeper than 1000, so every pass fails at its first batch."""
    start = timezone.now() - 30 * DAY
    runs = WorkflowRun.objects.bulk_create(
        WorkflowRun(
            workflow_name="echo",
            status="completed",
            created_at=start + timedelta(minutes=i),
            finished_at=start + timedelta(minutes=i, seconds=5),
        )
        for i in range(1000)
    )
    StepAttempt.objects.bulk_create(StepAttempt(workflow_run=run, step_name="s") for run in runs)

    assert purge(ALL) == Purged(runs=1000, attempts=1000)


# --- the setting -------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("forever", [timedelta.max, "3000000d"])
def test_a_retention_check_e014_accepts_does_not_break_every_purge(forever):
    """ "Keep failed runs for ever" written as timedelta.max (or a huge number of days):
    E014 accepts it, then now() minus it is out of the database's range and every
    query of the purge (old_enough() names every status) fails, so no completed run
    is ever purged either."""
    completed = make_run("completed", age=3 * DAY)
    failed = make_run("failed", age=3 * DAY)
    value = {"completed": "1d", "failed": forever}
    with override_settings(OPENWORKFLOW={"RETENTION": value}):
        problems = check_settings()
        if not problems:  # accepted: then it must work
            purged = purge()
            assert purged.runs == 1
            assert exists(completed, failed) == [False, True]
        else:  # or refused, naming the value
            assert str(forever) in problems[0].msg or repr(forever) in problems[0].msg


# --- the background purge ------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@override_settings(OPENWORKFLOW={"RETENTION": {"completed": "1h"}, "POLL_INTERVAL": 0.05})
def test_a_worker_that_stops_while_its_purge_rests_hands_the_lease_back(monkeypatch):
    """docs/retention.md: "A worker that stops finishes its batch, hands the lease back and
    exits". While runs execute, the purge rests 3x its batch with time.sleep, which the
    stop does not interrupt: the worker joins the thread for 5 s only and exits, the
    lease still held (5 minutes, nobody purges) and the thread still asleep."""
    make_run("completed", age=3 * HOUR)
    make_run("completed", age=3 * HOUR)
    make_run("running", namespace="elsewhere")  # another namespace's run executes

    class Clock:  # the batch "took" 4 s: a rest of 12 s (real time.sleep)
        ticks = iter([0.0, 4.0])
        sleep = staticmethod(time.sleep)

        @classmethod
        def monotonic(cls):
            return next(cls.ticks, 4.0)

    monkeypatch.setattr(retention, "time", Clock)
    worker = Worker(concurrency=1, worker_id="purger")
    thread = threading.Thread(target=worker.run)
    with pause_at("purge.before-runs") as batch:
        thread.start()
        batch.wait()
    deadline = time.monotonic() + 10
    while WorkflowRun.objects.filter(status="completed").exists():  # the batch committed
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)  # the purge thread rests now
    began = time.monotonic()
    worker.stop()
    thread.join(15)
    stopped_in = time.monotonic() - began

    assert not thread.is_alive()
    lease = WorkflowLease.objects.get()
    assert lease.expires_at <= timezone.now(), (
        f"the lease is still held by {lease.holder} until {lease.expires_at} "
        f"(the worker stopped in {stopped_in:.1f} s)"
    )
    assert not [t for t in threading.enumerate() if t.name == "openworkflow-purge"]


# --- idempotency keys -------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not ROW_LOCKS, reason="SQLite's write lock serializes start() after the purge")
def test_start_with_the_key_of_a_run_being_purged_never_returns_the_purged_run():
    """SPEC 11: "Purging never makes an old idempotency key return a purged run". With a
    retention under the key's 24 hours, start() reads the run while the purge's batch
    (which does not take the key's lock) is deleting it, and returns it: a run that is
    gone a moment later, whose result never comes."""
    key = "order-8"
    old = echo.start({"n": 1}, idempotency_key=key)
    WorkflowRun.objects.filter(pk=old.pk).update(
        status="completed",
        finished_at=timezone.now() - 2 * HOUR,
        created_at=timezone.now() - 3 * HOUR,  # inside the key's 24 hours
    )
    result = {}

    def purging():
        try:
            result["purged"] = purge(ALL)
        finally:
            connection.close()

    def starting():
        try:
            result["started"] = echo.start({"n": 2}, idempotency_key=key)
        finally:
            connection.close()

    with pause_at("purge.before-runs") as pause:
        purger = threading.Thread(target=purging)
        purger.start()
        pause.wait()
        starter = threading.Thread(target=starting)
        starter.start()
        starter.join(1)  # with the key locked by the purge, start() waits for it
    purger.join(10)
    starter.join(10)

    assert result["purged"].runs == 1
    started = result["started"]
    assert WorkflowRun.objects.filter(pk=started.pk).exists(), (
        f"start() returned run {started.pk}, which the purge deleted"
    )
    assert started.pk != old.pk


# --- a project's own models that link to runs ----------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("on_delete", ["SET_NULL", "CASCADE", "PROTECT"])
def test_a_project_model_linking_to_a_run_gets_what_a_delete_would_do(on_delete):
    """A project's model with a ForeignKey to WorkflowRun (an Order that remembers the run
    that shipped it) is the common way to link them. The purge deletes without Django's
    collector: it used to leave the key, so the batch failed at its commit (PostgreSQL,
    SQLite) or its statement (MariaDB), and since roots go oldest first, every later pass
    failed at that same batch. Now the key's on_delete applies as for a delete, and a
    protected run's family stays."""
    from django.db import models

    class Order(models.Model):  # noqa: DJ008
        run = models.ForeignKey(WorkflowRun, null=True, on_delete=getattr(models, on_delete))

        class Meta:
            app_label = "testapp"
            db_table = "review_retention_order"

    with connection.schema_editor() as editor:
        editor.create_model(Order)
    try:
        linked = make_run("completed", age=3 * DAY)
        later = make_run("completed", age=2 * DAY)
        order = Order.objects.create(run=linked)
        purged = purge(ALL)
        if on_delete == "PROTECT":
            assert purged.runs == 1
            assert exists(linked, later) == [True, False]
            assert Order.objects.get().run_id == linked.pk
        else:
            assert purged.runs == 2
            assert exists(linked, later) == [False, False]
            if on_delete == "SET_NULL":
                order.refresh_from_db()
                assert order.run_id is None
            else:
                assert not Order.objects.exists()
    finally:
        Order.objects.all().delete()
        with connection.schema_editor() as editor:
            editor.delete_model(Order)
        from django.apps import apps

        apps.all_models["testapp"].pop("order", None)
        apps.clear_cache()
