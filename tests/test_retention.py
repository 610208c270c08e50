"""Retention: the purge of old families, its setting, its command and the background purge."""

from __future__ import annotations

import itertools
import threading
from datetime import timedelta

import pytest
from django.core.checks import Error
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from django_openworkflow import leases
from django_openworkflow.checks import check_settings
from django_openworkflow.conf import app_settings
from django_openworkflow.models import (
    StepAttempt,
    WorkflowLease,
    WorkflowRun,
    WorkflowRunEvent,
    WorkflowSignal,
)
from django_openworkflow.pauses import add_hook, remove_hook
from django_openworkflow.retention import BackgroundPurge, Purge, Purged, purge, purge_thread
from django_openworkflow.testing import pause_at
from django_openworkflow.worker import Worker
from tests.testapp.workflows import echo

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
ALL = {"completed": HOUR, "failed": HOUR, "canceled": HOUR}
_names = itertools.count()


def make_run(status="completed", *, age=2 * HOUR, parent=None, **fields):
    """A run that finished ``age`` ago (active runs: started then), with one step attempt
    and one event; with ``parent``, a child run started by a step of ``parent``."""
    now = timezone.now()
    finished = status in WorkflowRun.FINISHED_STATUSES
    attempt = None
    if parent is not None:
        attempt = StepAttempt.objects.create(
            workflow_run=parent,
            step_name=f"child-{next(_names)}",
            kind="workflow",
            status="completed" if finished else "running",
        )
    run = WorkflowRun.objects.create(
        workflow_name="echo",
        status=status,
        parent_step_attempt=attempt,
        finished_at=now - age if finished else None,
        **fields,
    )
    # created before it finished, and after its parent (the lock order: oldest first)
    created = now - age - timedelta(minutes=1) + timedelta(microseconds=next(_names))
    WorkflowRun.objects.filter(pk=run.pk).update(created_at=created)
    if attempt is not None:
        attempt.child_workflow_run = run
        attempt.save(update_fields=["child_workflow_run"])
    StepAttempt.objects.create(workflow_run=run, step_name="work", status="completed")
    WorkflowRunEvent.objects.create(run=run, action="resume")
    return run


def make_signal(*receivers, sent_at=None):
    """A keyed signal delivered to ``receivers``, sent while the first of them waited."""
    signal = WorkflowSignal.objects.create(
        signal="paid",
        idempotency_key=f"key-{next(_names)}",
        delivered_to=[str(run.pk) for run in receivers],
    )
    if sent_at is None and receivers:
        sent_at = WorkflowRun.objects.get(pk=receivers[0].pk).finished_at - timedelta(seconds=30)
    WorkflowSignal.objects.filter(pk=signal.pk).update(sent_at=sent_at or timezone.now())
    return signal


def exists(*objects):
    return [type(o).objects.filter(pk=o.pk).exists() for o in objects]


# --- the setting ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            ["30d"],
            "OPENWORKFLOW['RETENTION']: must be a dict of status -> duration, or None, "
            "not ['30d'].",
        ),
        (
            {"done": "30d"},
            "OPENWORKFLOW['RETENTION']: 'done' is not a finished status "
            "(completed, failed, canceled).",
        ),
        (
            {"running": "30d"},
            "OPENWORKFLOW['RETENTION']: 'running' is not a finished status "
            "(completed, failed, canceled).",
        ),
        (
            {"completed": "30 days"},
            "OPENWORKFLOW['RETENTION']: the retention of completed runs '30 days' is not a "
            "duration: use a number with a unit (ms, s, m, h, d), e.g. '250ms', '10s', '5m', "
            "'2h', '7d'.",
        ),
        (
            {"failed": -1},
            "OPENWORKFLOW['RETENTION']: the retention of failed runs -1 is negative.",
        ),
    ],
)
def test_a_bad_retention_is_check_e014_naming_the_value(value, message):
    with override_settings(OPENWORKFLOW={"RETENTION": value}):
        errors = check_settings()
    assert [(e.msg, e.id) for e in errors] == [(message, "django_openworkflow.E014")]
    assert isinstance(errors[0], Error)


def test_retention_is_read_as_timedeltas():
    with override_settings(OPENWORKFLOW={}):
        assert app_settings.RETENTION is None
        assert check_settings() == []
    value = {"completed": "30d", "failed": timedelta(hours=12), "canceled": 3600}
    with override_settings(OPENWORKFLOW={"RETENTION": value}):
        assert check_settings() == []
        retention = app_settings.RETENTION
    assert retention == {
        "completed": timedelta(days=30),
        "failed": timedelta(hours=12),
        "canceled": timedelta(hours=1),
    }
    with (
        override_settings(OPENWORKFLOW={"RETENTION": {"completed": "soon"}}),
        pytest.raises(ValueError) as info,
    ):
        app_settings.RETENTION  # noqa: B018
    assert str(info.value).startswith(
        "OPENWORKFLOW['RETENTION']: the retention of completed runs 'soon' is not a duration"
    )


def test_a_purge_refuses_an_active_status():
    with pytest.raises(ValueError) as info:
        Purge({"running": HOUR})
    assert str(info.value) == "not a finished status: running"


# --- which families go -----------------------------------------------------------------------


@pytest.mark.django_db
def test_an_old_family_goes_whole_with_its_attempts_events_and_signals():
    root = make_run("completed", age=3 * DAY)
    child = make_run("failed", age=3 * DAY, parent=root)
    grandchild = make_run("canceled", age=3 * DAY, parent=child)
    signal = make_signal(grandchild)
    other = make_run("completed", age=10 * 60 * timedelta(seconds=1))  # 10 minutes: young

    purged = purge(ALL)

    assert purged == Purged(runs=3, attempts=5, events=3, signals=1)
    assert exists(root, child, grandchild, signal) == [False] * 4
    assert list(WorkflowRun.objects.all()) == [other]
    assert StepAttempt.objects.filter(workflow_run=other).count() == 1
    assert WorkflowRunEvent.objects.filter(run=other).count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("shape", "kept"),
    [
        ("finished child of an active parent", True),
        ("old parent with a young child", True),
        ("old parent with an active grandchild", True),
        ("old parent with a young grandchild", True),
        ("old family", False),
    ],
)
def test_a_family_goes_only_when_every_member_is_finished_and_old(shape, kept):
    root = make_run("running" if shape.endswith("active parent") else "completed", age=3 * HOUR)
    child_age = timedelta(minutes=5) if shape.endswith("young child") else 3 * HOUR
    child = make_run("completed", age=child_age, parent=root)
    grandchild_status = "pending" if shape.endswith("active grandchild") else "completed"
    grandchild_age = timedelta(minutes=5) if shape.endswith("young grandchild") else 3 * HOUR
    grandchild = make_run(grandchild_status, age=grandchild_age, parent=child)

    purge(ALL)

    assert exists(root, child, grandchild) == [kept] * 3
    if kept:  # and whole: no link cleared
        child.refresh_from_db()
        grandchild.refresh_from_db()
        assert child.parent_step_attempt.workflow_run_id == root.pk
        assert grandchild.parent_step_attempt.workflow_run_id == child.pk


@pytest.mark.django_db
def test_each_status_has_its_own_retention():
    completed = make_run("completed", age=3 * HOUR)
    failed = make_run("failed", age=3 * HOUR)
    old_failed = make_run("failed", age=3 * DAY)
    canceled = make_run("canceled", age=3 * DAY)  # no retention: kept
    mixed = make_run("completed", age=3 * HOUR)
    mixed_child = make_run("canceled", age=3 * DAY, parent=mixed)

    purged = purge({"completed": HOUR, "failed": DAY})

    assert purged.runs == 2
    assert exists(completed, failed, old_failed, canceled) == [False, True, False, True]
    assert exists(mixed, mixed_child) == [True, True]


@pytest.mark.django_db
def test_a_purge_keeps_to_its_namespace():
    ours = make_run("completed", age=3 * DAY)
    theirs = make_run("completed", age=3 * DAY, namespace="billing")
    their_signal = make_signal(theirs)
    WorkflowSignal.objects.filter(pk=their_signal.pk).update(namespace="billing")

    assert purge(ALL) == Purged(runs=1, attempts=1, events=1)
    assert exists(ours, theirs, their_signal) == [False, True, True]
    assert purge(ALL, namespace="billing") == Purged(runs=1, attempts=1, events=1, signals=1)


@pytest.mark.django_db
def test_a_batch_of_a_thousand_families_fits_in_one_statement():
    old = timezone.now() - 3 * HOUR
    runs = WorkflowRun.objects.bulk_create(
        WorkflowRun(workflow_name="echo", status="completed", created_at=old, finished_at=old)
        for _ in range(1200)
    )
    StepAttempt.objects.bulk_create(StepAttempt(workflow_run=run, step_name="s") for run in runs)

    assert purge(ALL) == Purged(runs=1200, attempts=1200)
    assert not StepAttempt.objects.exists()


@pytest.mark.django_db
def test_without_retention_nothing_goes():
    run = make_run("completed", age=300 * DAY)
    with override_settings(OPENWORKFLOW={}):
        assert purge() == Purged()
    assert exists(run) == [True]


@pytest.mark.django_db
def test_a_dry_run_counts_what_would_go_and_deletes_nothing():
    root = make_run("completed", age=3 * DAY)
    child = make_run("completed", age=3 * DAY, parent=root)
    make_signal(child)
    make_signal(child, root)
    young = make_run("completed", age=timedelta(minutes=1))
    make_signal(young)
    before = (
        WorkflowRun.objects.count(),
        StepAttempt.objects.count(),
        WorkflowRunEvent.objects.count(),
        WorkflowSignal.objects.count(),
    )

    assert purge(ALL, dry_run=True) == Purged(runs=2, attempts=3, events=2, signals=2)
    assert before == (3, 4, 3, 3)
    assert (
        WorkflowRun.objects.count(),
        StepAttempt.objects.count(),
        WorkflowRunEvent.objects.count(),
        WorkflowSignal.objects.count(),
    ) == before
    assert purge(ALL) == Purged(runs=2, attempts=3, events=2, signals=2)


# --- signals -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_signal_goes_with_the_last_of_its_runs_once_past_its_window():
    now = timezone.now()
    first = make_run("completed", age=3 * DAY)
    second = make_run("completed", age=30 * timedelta(minutes=1))  # young, started long ago
    WorkflowRun.objects.filter(pk=second.pk).update(created_at=now - 4 * DAY)
    shared = make_signal(first, second)
    third = make_run("completed", age=2 * HOUR)
    recent = make_signal(third)  # still inside its 24 hours when its run goes
    unheard = make_signal(sent_at=now - 3 * DAY)  # delivered to nobody: not a purge's business

    assert purge(ALL) == Purged(runs=2, attempts=2, events=2, signals=0)
    assert exists(first, third, shared, recent, unheard) == [False, False, True, True, True]

    WorkflowRun.objects.filter(pk=second.pk).update(finished_at=now - 2 * HOUR)
    WorkflowSignal.objects.filter(pk=recent.pk).update(sent_at=now - 25 * HOUR)  # a day later
    assert purge(ALL) == Purged(runs=1, attempts=1, events=1, signals=2)
    assert exists(shared, recent, unheard) == [False, False, True]


@pytest.mark.django_db
def test_a_signal_left_without_runs_goes_in_the_day_after_its_window():
    run = make_run("completed", age=2 * HOUR)
    signal = make_signal(run)
    purge(ALL)
    assert exists(signal) == [True]

    WorkflowSignal.objects.filter(pk=signal.pk).update(sent_at=timezone.now() - 49 * HOUR)
    assert purge(ALL) == Purged()  # past the day after: no pass looks that far back
    WorkflowSignal.objects.filter(pk=signal.pk).update(sent_at=timezone.now() - 47 * HOUR)
    assert purge(ALL, dry_run=True) == Purged(signals=1)
    assert purge(ALL) == Purged(signals=1)
    assert exists(signal) == [False]


@pytest.mark.django_db
def test_a_repeated_signal_inside_its_window_still_delivers_nothing_after_a_purge():
    from django_openworkflow import send_signal

    run = make_run("completed", age=3 * HOUR)
    signal = make_signal(run)  # three hours ago
    purge(ALL)
    assert exists(run, signal) == [False, True]
    waiting = make_run("pending")
    StepAttempt.objects.create(
        workflow_run=waiting, step_name="wait", kind="signal_wait", signal="paid"
    )

    assert send_signal("paid", idempotency_key=signal.idempotency_key) == []


# --- batches and interruptions --------------------------------------------------------------------


@pytest.mark.django_db
def test_batches_hold_batch_size_families_and_a_stop_between_them_leaves_whole_families():
    families = []
    for hours in (5, 4, 3):
        root = make_run("completed", age=hours * HOUR)
        families.append((root, make_run("completed", age=hours * HOUR, parent=root)))
    asked = []

    def keep_going():
        asked.append(True)
        return len(asked) == 1  # one batch, then "the worker stops"

    purge = Purge(ALL, batch_size=2, keep_going=keep_going)

    assert purge.run() == Purged(runs=4, attempts=6, events=4)
    assert purge.stopped
    assert [exists(*family) for family in families] == [[False, False]] * 2 + [[True, True]]
    root, child = families[2]
    child.refresh_from_db()
    assert child.parent_step_attempt.workflow_run_id == root.pk
    assert Purge(ALL, batch_size=2).run().runs == 2


@pytest.mark.django_db
def test_an_exception_inside_a_batch_rolls_the_whole_batch_back():
    root = make_run("completed", age=3 * DAY)
    child = make_run("completed", age=3 * DAY, parent=root)
    signal = make_signal(child)

    def crash(context):
        assert set(context["runs"]) == {root.pk, child.pk}
        raise RuntimeError("killed")

    add_hook("purge.before-runs", crash)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            purge(ALL)
    finally:
        remove_hook("purge.before-runs", crash)

    assert exists(root, child, signal) == [True] * 3
    assert StepAttempt.objects.count() == 3
    assert WorkflowRunEvent.objects.count() == 2
    child.refresh_from_db()
    assert child.parent_step_attempt.workflow_run_id == root.pk
    assert StepAttempt.objects.get(kind="workflow").child_workflow_run_id == child.pk


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("change", ["resume", "delete", "child"])
def test_a_family_changed_before_the_batch_locks_it_stays(change):
    root = make_run("completed", age=3 * HOUR)
    child = make_run("failed", age=3 * HOUR, parent=root)
    other = make_run("completed", age=3 * HOUR)
    result = {}

    def purging():
        try:
            result["purged"] = purge(ALL)
        finally:
            connection.close()

    with pause_at("purge.before-lock") as pause:
        thread = threading.Thread(target=purging)
        thread.start()
        assert set(pause.wait()["runs"]) == {root.pk, child.pk, other.pk}
        if change == "resume":  # the child goes back to the queue
            WorkflowRun.objects.resume(child)
        elif change == "delete":  # the admin deletes the child: its parent is woken
            WorkflowRun.objects.filter(pk=child.pk).delete()
        else:  # a child appears (a family read and changed meanwhile)
            make_run("completed", age=3 * HOUR, parent=child)
    thread.join(10)

    assert result["purged"].runs == 1
    assert exists(other) == [False]
    assert exists(root) == [True]
    assert WorkflowRun.objects.count() == {"resume": 2, "delete": 1, "child": 3}[change]


@pytest.mark.django_db
def test_an_idempotency_key_after_a_purge_starts_a_new_run():
    key = "order-7"
    old = echo.start({"n": 1}, idempotency_key=key)
    WorkflowRun.objects.filter(pk=old.pk).update(
        status="completed",
        finished_at=timezone.now() - 2 * HOUR,
        created_at=timezone.now() - 3 * HOUR,  # inside the key's 24 hours
    )
    assert echo.start({"n": 2}, idempotency_key=key).pk == old.pk

    purge(ALL)

    new = echo.start({"n": 3}, idempotency_key=key)
    assert new.pk != old.pk
    assert new.status == "pending"
    assert new.input == {"n": 3}


# --- the command -------------------------------------------------------------------------------


def run_command(*args):
    from io import StringIO

    out = StringIO()
    call_command("purge_workflow_runs", *args, stdout=out)
    return out.getvalue().strip()


@pytest.mark.django_db
def test_the_command_needs_a_retention_or_older_than():
    with override_settings(OPENWORKFLOW={}), pytest.raises(CommandError) as info:
        run_command()
    assert str(info.value) == (
        "Nothing to purge by: OPENWORKFLOW['RETENTION'] is not set. Pass --older-than "
        '(e.g. --older-than 30d) or set OPENWORKFLOW["RETENTION"].'
    )


@pytest.mark.django_db
def test_the_command_refuses_a_status_the_retention_does_not_name():
    with (
        override_settings(OPENWORKFLOW={"RETENTION": {"completed": "1h"}}),
        pytest.raises(CommandError) as info,
    ):
        run_command("--status", "failed")
    assert str(info.value) == (
        "OPENWORKFLOW['RETENTION'] names no retention for failed runs: pass --older-than or "
        "add them to it."
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "soon"], "argument --older-than: duration 'soon' is not a duration"),
        (["--status", "running"], "argument --status: invalid choice: 'running'"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, not 0"),
    ],
)
def test_the_command_refuses_bad_options(args, message):
    with pytest.raises(CommandError) as info:
        run_command(*args)
    assert str(info.value).startswith(f"Error: {message}")


@pytest.mark.django_db
def test_the_command_uses_the_setting_and_its_options_win():
    completed = make_run("completed", age=3 * HOUR)
    failed = make_run("failed", age=3 * DAY)
    canceled = make_run("canceled", age=3 * DAY)
    with override_settings(OPENWORKFLOW={"RETENTION": {"completed": "1h", "failed": "7d"}}):
        assert run_command("--dry-run") == (
            "would delete 1 run, 1 step attempt, 1 event, 0 signals"
        )
        assert exists(completed) == [True]
        assert run_command("--status", "failed") == (
            "deleted 0 runs, 0 step attempts, 0 events, 0 signals"
        )
        assert run_command("--older-than", "2d", "--status", "failed") == (
            "deleted 1 run, 1 step attempt, 1 event, 0 signals"
        )
        assert exists(completed, failed, canceled) == [True, False, True]
        assert run_command("--older-than", "7200") == (
            "deleted 2 runs, 2 step attempts, 2 events, 0 signals"
        )
    assert not WorkflowRun.objects.exists()


@pytest.mark.django_db
def test_the_command_deletes_in_batches(monkeypatch):
    for hours in (5, 4, 3):
        make_run("completed", age=hours * HOUR)
    batches = []
    real = Purge._batch

    def batch(self, roots):
        batches.append(roots)
        return real(self, roots)

    monkeypatch.setattr(Purge, "_batch", batch)

    assert run_command("--older-than", "1h", "--batch-size", "2") == (
        "deleted 3 runs, 3 step attempts, 3 events, 0 signals"
    )
    assert [len(roots) for roots in batches] == [2, 1]


# --- the lease and the background purge ----------------------------------------------------------


@pytest.mark.django_db
def test_a_lease_has_one_holder_until_it_expires():
    assert leases.take("purge", "a", 60, using="default")
    assert not leases.take("purge", "b", 60, using="default")
    assert not leases.take("purge", "a", 60, using="default")  # not twice either
    assert not leases.renew("purge", "b", 60, using="default")
    assert leases.renew("purge", "a", 60, using="default")
    WorkflowLease.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert leases.take("purge", "b", 60, using="default")
    assert not leases.renew("purge", "a", 60, using="default")
    assert WorkflowLease.objects.get().holder == "b"


def test_no_purge_thread_without_retention():
    def thread():
        return purge_thread("w", threading.Event(), using="default", namespace="default")

    with override_settings(OPENWORKFLOW={}):
        assert thread() is None
    with override_settings(OPENWORKFLOW={"RETENTION": {"completed": "nope"}}):
        assert thread() is None
    with override_settings(OPENWORKFLOW={"RETENTION": {"completed": "30d"}}):
        assert thread().name == "openworkflow-purge"


@pytest.mark.django_db(transaction=True)
@override_settings(OPENWORKFLOW={"RETENTION": {"completed": "1h"}})
def test_one_worker_purges_at_a_time_and_then_none_until_the_interval_passes():
    root = make_run("completed", age=3 * HOUR)
    child = make_run("completed", age=3 * HOUR, parent=root)
    stopping = threading.Event()
    first, second = (
        BackgroundPurge(name, stopping, using="default", namespace="default") for name in "ab"
    )
    results = {}

    def tick():
        try:
            results["a"] = first.tick()
        finally:
            connection.close()

    with pause_at("purge.leased", when=lambda c: c["holder"] == "a") as pause:
        thread = threading.Thread(target=tick)
        thread.start()
        pause.wait()
        assert second.tick() is None  # "a" holds the lease
        assert exists(root, child) == [True, True]
    thread.join(10)

    assert results["a"] == Purged(runs=2, attempts=3, events=2)
    assert exists(root, child) == [False, False]
    lease = WorkflowLease.objects.get()
    assert (lease.name, lease.holder) == ("purge:default", "a")
    assert lease.expires_at > timezone.now() + timedelta(minutes=9)  # the next purge's time
    assert second.tick() is None
    assert first.tick() is None


@pytest.mark.django_db(transaction=True)
@override_settings(OPENWORKFLOW={"RETENTION": {"completed": "1h"}, "POLL_INTERVAL": 0.05})
def test_a_worker_purges_in_the_background_on_a_thread_of_its_own():
    root = make_run("completed", age=3 * HOUR)
    child = make_run("completed", age=3 * HOUR, parent=root)
    worker = Worker(concurrency=1, worker_id="purger")
    thread = threading.Thread(target=worker.run)
    with pause_at("purge.before-runs") as batch:
        with pause_at("purge.leased") as leased:
            thread.start()
            assert leased.wait() == {"holder": "purger"}
            run = echo.start({"n": 1})  # the claim loop goes on while the purge is held
            with pause_at("worker.after-execute", when=lambda c: c["run_id"] == run.pk) as done:
                done.wait()
        assert set(batch.wait()["runs"]) == {root.pk, child.pk}
    worker.stop()
    thread.join(15)

    assert not thread.is_alive()
    assert exists(root, child) == [False, False]
    assert WorkflowLease.objects.get().holder == "purger"


@pytest.mark.django_db
@pytest.mark.parametrize("working", [True, False])
def test_a_purge_rests_after_each_batch_only_while_runs_are_in_progress(monkeypatch, working):
    from django_openworkflow import retention

    for _ in range(3):
        make_run()
    if working:
        make_run("running")  # a worker executes it now
    rests = []
    monkeypatch.setattr(retention.time, "sleep", rests.append)
    purged = Purge(ALL, batch_size=1).run()
    assert purged.runs == 3
    assert len(rests) == (3 if working else 0)
    assert all(rest >= 0 for rest in rests)
