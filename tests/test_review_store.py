"""The adversarial review of issue 11 (the store): old write paths against new ones.

Each test is one interleaving or fault that the engine before the store
(commit 4e07a54: engine.py, fastpath.py, managers.py) survived in a certain
way; the test checks the store-based engine keeps that behaviour.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.pauses import add_hook, remove_hook
from django_openworkflow.registry import get_workflow
from django_openworkflow.signals import step_failed
from django_openworkflow.store import get_store
from django_openworkflow.testing import pause_at
from tests.test_store import execute, expire, stores, take
from tests.testapp.models import SideEffect

pytestmark = pytest.mark.django_db(transaction=True)


@contextmanager
def on_point(name, action, **match):
    """Run ``action`` once on the engine's own thread when it reaches pause point ``name``."""
    done = []

    def hook(context):
        if not done and all(context.get(key) == value for key, value in match.items()):
            done.append(action())

    add_hook(name, hook)
    try:
        yield done
    finally:
        remove_hook(name, hook)


def history(run):
    return [
        (a.step_name, a.status, a.error and a.error["type"])
        for a in StepAttempt.objects.filter(workflow_run=run).order_by("id")
    ]


@pytest.fixture(params=stores(), ids=lambda cls: cls.__name__)
def store(request):
    return request.param("default")


# --- the lease: the ORM stores renewed it at every step start ------------------------------


@pytest.mark.parametrize(
    "store_class",
    [cls for cls in stores() if cls.__name__ != "PostgresStore"],
    ids=lambda cls: cls.__name__,
)
def test_an_orm_store_renews_the_lease_when_a_step_starts(store_class):
    # 4e07a54: on every database but PostgreSQL, starting a step fenced with renew=True,
    # so a run that makes progress keeps its lease even when heartbeats fail (SQLite's
    # "database is locked", say). PostgreSQL's one-statement start left it to the heartbeat.
    store = store_class("default")
    run = get_workflow("review-two-steps").start()
    [claim] = take(store, "review-two-steps")
    expire(claim)  # no heartbeat got through since the claim

    def another_worker_claims():
        return [c.run_id for c in take(store, "review-two-steps", worker="other")]

    with on_point("step.before-fence", another_worker_claims, step="b") as taken:
        execute(store, claim)  # step "a" started, ran; then "b" is about to start
    assert taken == [[]]  # "a" started under a renewed lease: nobody could take the run
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", 3)
    assert SideEffect.objects.filter(run_id=run.pk, step="a").count() == 1


# --- the deadline: a result that lost the race to the sweep is kept for a resume ------------


def test_a_deferred_result_is_kept_when_the_sweep_fails_the_run_before_the_worker_does(
    store, monkeypatch
):
    # The run passes its deadline after "a" returned (its result deferred): "b"'s start
    # is refused, the worker finds the run running, its own and past the deadline, and
    # goes to fail it; the deadline sweep fails it first. 4e07a54's _finish then fell
    # back to _claim_lost, which stored the late result over the sweep's failure.
    run = get_workflow("review-two-steps").start()
    [claim] = take(store, "review-two-steps")
    fail_at_deadline = store.fail_at_deadline

    def sweep_first(*args, **kwargs):
        assert store.fail_overdue("default") == 1
        return fail_at_deadline(*args, **kwargs)

    monkeypatch.setattr(store, "fail_at_deadline", sweep_first)

    def deadline_passes():
        WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=timezone.now())

    with on_point("step.before-fence", deadline_passes, step="b") as done:
        execute(store, claim)
    assert done
    run.refresh_from_db()
    assert (run.status, run.error["type"]) == ("failed", "DeadlineExceeded")
    assert history(run) == [("a", "completed", None)]  # "a" returned 1: kept
    monkeypatch.undo()
    WorkflowRun.objects.resume(run, deadline_at=timezone.now() + timedelta(hours=1))
    while claims := take(store, "review-two-steps"):
        execute(store, claims[0])
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", 3)
    assert SideEffect.objects.filter(run_id=run.pk, step="a").count() == 1


# --- signals: after the commit of the engine's database --------------------------------------


def test_step_failed_is_sent_after_the_commit_of_the_engines_database(monkeypatch):
    # run_started/run_completed/run_failed name the store's database; step_failed must too,
    # or with OPENWORKFLOW["DATABASE"] = "workflows" it is sent at once (the default
    # database has no transaction open), before the failure it reports has committed.
    using = get_store().using
    aliases = []
    real_on_commit = transaction.on_commit

    def on_commit(func, using=None, robust=False):
        aliases.append(using)
        return real_on_commit(func, using=using, robust=robust)

    failures = []

    def receiver(sender, run, step_name, **kwargs):
        failures.append(step_name)

    monkeypatch.setattr(transaction, "on_commit", on_commit)
    step_failed.connect(receiver)
    try:
        run = get_workflow("flaky").start({"failures": 1})
        [claim] = take(get_store(), "flaky")
        execute(get_store(), claim)
    finally:
        step_failed.disconnect(receiver)
    assert history(run) == [("flaky", "failed", "ValueError")]
    assert failures == ["flaky"]  # sent once
    assert aliases and set(aliases) == {using}


# --- claims: first start, resume and cancel ----------------------------------------------------


def test_a_resumed_run_starts_again_and_replays_its_history(store):
    # Claim.first_start: true for a new run and for a resumed one (started_at cleared), so
    # run_started is sent again; the history is skipped only for generation 0.
    run = get_workflow("review-two-steps").start(deadline_at=timezone.now() + timedelta(hours=1))
    [first] = take(store, "review-two-steps")
    assert first.first_start

    def deadline_passes():
        WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=timezone.now())

    with on_point("step.before-fence", deadline_passes, step="b"):
        execute(store, first)
    WorkflowRun.objects.resume(run, deadline_at=timezone.now() + timedelta(hours=1))
    [resumed] = take(store, "review-two-steps")
    assert (resumed.first_start, resumed.run.resume_generation) == (True, 1)
    execute(store, resumed)
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", 3)
    assert SideEffect.objects.filter(run_id=run.pk, step="a").count() == 1  # replayed


def test_a_cancel_between_a_step_and_the_next_drops_the_result_and_writes_nothing(store):
    run = get_workflow("review-two-steps").start()
    [claim] = take(store, "review-two-steps")
    with on_point("step.before-fence", lambda: WorkflowRun.objects.cancel(run), step="b"):
        execute(store, claim)
    run.refresh_from_db()
    assert (run.status, run.output) == ("canceled", None)
    assert history(run) == [("a", "failed", "WorkflowCanceled")]


# --- PostgreSQL: the fence is a row lock without a write --------------------------------------


@pytest.mark.row_locks
def test_held_a_cancel_waits_for_a_replay_that_holds_the_fence_then_cancels_the_wait():
    from tests.conftest import Backend, blocked_on_a_lock, make_due
    from tests.test_races import claim as claim_one
    from tests.test_races import execute as execute_claim

    run = get_workflow("waiter").start({"signal": "review11-never"})
    execute_claim(claim_one("waiter"))()  # "before", then the wait parks the run
    make_due(run)  # woken early: it replays while nothing was sent
    replay = Backend(execute_claim(claim_one("waiter")))
    cancel = Backend(lambda: WorkflowRun.objects.cancel(run))
    with pause_at("wait.before-park", when=lambda c: c["run_id"] == run.pk) as pause:
        replay.start()
        pause.wait()  # the replay fenced (PostgreSQL: FOR NO KEY UPDATE, no write)
        cancel.start()
        assert blocked_on_a_lock(cancel)
    replay.finish()
    cancel.finish()
    run.refresh_from_db()
    assert (run.status, run.claim_token, run.available_at) == ("canceled", None, None)
    assert history(run) == [
        ("before", "completed", None),
        ("review11-never", "failed", "WorkflowCanceled"),
    ]


# --- PostgreSQL: a run started in a transaction wakes the workers at its commit -------------------


@pytest.mark.postgres
@pytest.mark.parametrize("key", [None, "review11-key"], ids=["no-key", "idempotency-key"])
@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_a_start_inside_a_transaction_notifies_at_its_commit_only(key, outcome):
    import psycopg
    from django.db import connection

    from django_openworkflow.store.postgres import NOTIFY_CHANNEL

    params = connection.get_connection_params()
    for option in ("cursor_factory", "context", "server_side_binding"):
        params.pop(option, None)
    with psycopg.connect(**params, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")

        def heard_until_sentinel():
            # A NOTIFY of the listener's own, after the others: what came before it was sent.
            listener.execute("SELECT pg_notify(%s, 'sentinel')", [NOTIFY_CHANNEL])
            heard = []
            for notice in listener.notifies(timeout=10):
                if notice.payload == "sentinel":
                    return heard
                heard.append(notice.payload)
            raise AssertionError("the sentinel never came")

        class Rollback(Exception):
            pass

        try:
            with transaction.atomic():
                get_workflow("echo").start(1, idempotency_key=key)
                assert heard_until_sentinel() == []  # not yet: uncommitted
                if outcome == "rollback":
                    raise Rollback
        except Rollback:
            pass
        assert heard_until_sentinel() == (["default"] if outcome == "commit" else [])
    assert WorkflowRun.objects.count() == (1 if outcome == "commit" else 0)


# --- names: an empty step name is refused everywhere now -----------------------------------


def test_an_empty_child_step_name_is_refused_rather_than_replaced_by_the_childs_name():
    # Changed on purpose (names.py, d2cbec8): 4e07a54 took name="" for the child's name
    # (``name or child_name``); every empty name is refused now, as step.run("") was.
    run = get_workflow("bad-child-name").start({"length": 3, "step": ""})
    [claim] = take(get_store(), "bad-child-name")
    execute(get_store(), claim)
    run.refresh_from_db()
    assert run.error["type"] == "TypeError"
    assert "must be a non-empty string" in run.error["message"]
    assert not WorkflowRun.objects.filter(workflow_name="xxx").exists()
