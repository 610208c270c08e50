"""The store's contract, run against every store the test database can use.

On PostgreSQL both the ORM store and the PostgreSQL store; elsewhere the ORM
store. Each rule of ``store/base.py`` is checked here for each: fencing by
claim token, the deadline, a deferred result riding on the next write, lease
takeover, finish and the parent's wake-up, park and wake, signal delivery,
the queues' claim order and limits (SPEC section 9), and the engine run end
to end (resume and cancel included) on that store.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import F
from django.db.models.functions import Now
from django.utils import timezone

from django_openworkflow.engine import Execution
from django_openworkflow.errors import DEADLINE_ERROR
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.registry import get_workflow
from django_openworkflow.signals import run_started
from django_openworkflow.store import Claim, Claims, Store, get_store
from django_openworkflow.store.orm import OrmStore
from tests.testapp.models import SideEffect

pytestmark = pytest.mark.django_db


def stores() -> list[type[Store]]:
    from django.conf import settings

    engine = settings.DATABASES["default"]["ENGINE"]
    if engine.endswith("postgresql"):
        from django_openworkflow.store.postgres import PostgresStore

        return [OrmStore, PostgresStore]
    if engine.endswith("mysql"):
        from django_openworkflow.store.mysql import MysqlStore

        return [MysqlStore]  # the ORM store with the lock order and key lock MySQL needs
    return [OrmStore]


@pytest.fixture(params=stores(), ids=lambda cls: cls.__name__)
def store(request) -> Store:
    return request.param("default")


def new_run(name="echo", input=None, **fields) -> WorkflowRun:
    return WorkflowRun.objects.create(
        namespace="default", workflow_name=name, input=input, **fields
    )


def take(store: Store, *names: str, worker="w1", limit=1, lease=30.0, queues=None) -> Claims:
    return store.claim(
        namespace="default",
        workflow_names=list(names or ["echo"]),
        limit=limit,
        worker_id=worker,
        lease_seconds=lease,
        queues=queues,
    )


def expire(claim: Claim) -> None:
    WorkflowRun.objects.filter(pk=claim.run_id).update(available_at=Now() - timedelta(seconds=1))


def execute(store: Store, claim: Claim) -> WorkflowRun:
    Execution(claim, get_workflow(claim.run.workflow_name), store=store, max_parallel=1).execute()
    return WorkflowRun.objects.get(pk=claim.run_id)


def drain(store: Store, *names: str) -> int:
    passes = 0
    while claims := take(store, *names):
        execute(store, claims[0])
        passes += 1
        assert passes < 50
    return passes


def started_step(store: Store, claim: Claim, name="s", deferred=None) -> int:
    with store.atomic():
        attempt_id = store.start_step(
            claim,
            name=name,
            generation=claim.run.resume_generation,
            position=0,
            started_at=timezone.now(),
            atomic=False,
            deferred=deferred,
        )
    assert attempt_id is not None
    return attempt_id


def test_get_store_is_the_only_switch_and_caches_per_alias():
    store = get_store()
    assert store is get_store("default")
    assert store.using == "default"
    expected = {"postgresql": "postgresql", "mysql": "mysql"}.get(connection.vendor, "orm")
    assert store.vendor == expected


# --- runs ---------------------------------------------------------------------------


def test_insert_run_makes_a_pending_run_due_now_or_later(store):
    now = store.insert_run(namespace="default", workflow_name="echo", input={"a": 1})
    later_at = timezone.now() + timedelta(hours=1)
    later = store.insert_run(
        namespace="default", workflow_name="echo", input=[1], available_at=later_at
    )
    now.refresh_from_db()
    later.refresh_from_db()
    assert (now.status, now.input, now.attempts, now.resume_generation) == (
        "pending",
        {"a": 1},
        0,
        0,
    )
    assert now.available_at <= timezone.now()
    assert later.available_at == later_at
    assert [c.run_id for c in take(store, limit=5)] == [now.pk]


def test_claim_takes_due_runs_oldest_due_first_up_to_the_limit(store):
    old = new_run(available_at=timezone.now() - timedelta(minutes=2))
    new = new_run(available_at=timezone.now() - timedelta(minutes=1))
    new_run(available_at=timezone.now() + timedelta(hours=1))  # not due
    new_run(deadline_at=timezone.now() - timedelta(seconds=1))  # past its deadline
    new_run(name="other")  # another workflow
    WorkflowRun.objects.create(namespace="elsewhere", workflow_name="echo")
    [first] = take(store)
    [second] = take(store, limit=5)
    assert [first.run_id, second.run_id] == [old.pk, new.pk]
    assert take(store, limit=5) == []
    assert first.token != second.token
    row = WorkflowRun.objects.get(pk=old.pk)
    assert (row.status, row.worker_id, row.claim_token) == ("running", "w1", first.token)
    assert row.started_at is not None
    assert row.available_at > timezone.now() + timedelta(seconds=20)  # the lease
    assert first.lease_seconds == 30.0
    assert abs((first.db_now - timezone.now()).total_seconds()) < 60


def test_claim_marks_the_first_start_and_sends_run_started_only_then(
    store, django_capture_on_commit_callbacks
):
    started = []

    def receiver(sender, run, **kwargs):
        started.append(run.pk)

    run = new_run()
    run_started.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            [first] = take(store)
        expire(first)
        with django_capture_on_commit_callbacks(execute=True):
            [again] = take(store, worker="w2")
    finally:
        run_started.disconnect(receiver)
    assert (first.first_start, again.first_start) == (True, False)
    assert again.run_id == run.pk
    assert started == [run.pk]


def test_a_claim_with_no_names_or_no_room_takes_nothing(store):
    new_run()
    assert (
        store.claim(
            namespace="default", workflow_names=[], limit=5, worker_id="w", lease_seconds=30
        )
        == []
    )
    assert take(store, limit=0) == []
    assert WorkflowRun.objects.get().status == "pending"


# --- fencing ----------------------------------------------------------------------------


def test_the_fence_holds_for_the_claim_and_stores_the_deferred_result(store):
    new_run()
    [claim] = take(store)
    attempt_id = started_step(store, claim)
    with store.atomic():
        assert store.fence(claim, deferred=(attempt_id, json.dumps({"x": [1]}), timezone.now()))
    attempt = StepAttempt.objects.get(pk=attempt_id)
    assert (attempt.status, attempt.output) == ("completed", {"x": [1]})


def test_a_lease_taken_over_fences_out_every_write_of_the_old_claim(store):
    new_run()
    [old] = take(store)
    attempt_id = started_step(store, old)
    expire(old)
    [new] = take(store, worker="w2")
    later = timezone.now() + timedelta(minutes=1)
    deferred = (attempt_id, "1", timezone.now())
    with store.atomic():
        assert not store.fence(old, deferred=deferred)
        assert not store.fence(old, renew=True)
        assert not store.complete_step(old, attempt_id, 2)
    assert (
        store.start_step(
            old,
            name="t",
            generation=0,
            position=1,
            started_at=later,
            atomic=False,
            deferred=deferred,
        )
        is None
    )
    assert not store.park(old, later)
    assert not store.finish(old, "completed", output=1, deferred=deferred)
    assert not store.release(old)
    assert StepAttempt.objects.get(pk=attempt_id).status == "running"  # no deferred stored
    assert StepAttempt.objects.count() == 1
    run = WorkflowRun.objects.get()
    assert (run.status, run.worker_id, run.claim_token) == ("running", "w2", new.token)
    with store.atomic():
        assert store.fence(new, renew=True)


def test_past_the_deadline_a_claim_may_only_fail_the_run(store):
    new_run(deadline_at=timezone.now() + timedelta(hours=1))
    [claim] = take(store)
    attempt_id = started_step(store, claim)
    WorkflowRun.objects.update(deadline_at=Now() - timedelta(seconds=1))
    with store.atomic():
        assert not store.fence(claim)
    assert not store.park(claim, timezone.now() + timedelta(minutes=1))
    assert not store.finish(claim, "completed", output=1)
    assert store.fail_at_deadline(
        claim, 0, dict(DEADLINE_ERROR), (attempt_id, '"late"', timezone.now())
    )
    run = WorkflowRun.objects.get()
    assert (run.status, run.error, run.claim_token) == ("failed", DEADLINE_ERROR, None)
    attempt = StepAttempt.objects.get(pk=attempt_id)
    assert (attempt.status, attempt.output) == ("completed", "late")


def test_renew_leases_renews_only_the_given_claims(store):
    mine, theirs = new_run(), new_run()
    claims = take(store) + take(store, worker="w2")  # two claims, two tokens
    for claim in claims:
        expire(claim)
    [claim_mine] = [c for c in claims if c.run_id == mine.pk]
    assert store.renew_leases([claim_mine.token], 60) == 1
    assert store.renew_leases([], 60) == 0
    assert [c.run_id for c in take(store, worker="w3", limit=5)] == [theirs.pk]


def test_release_ends_the_lease_now_or_after_a_delay(store):
    later, now = new_run(), new_run()
    claims = take(store, limit=2)
    [claim_later] = [c for c in claims if c.run_id == later.pk]
    [claim_now] = [c for c in claims if c.run_id == now.pk]
    assert store.release(claim_later, delay=3600)
    assert store.release(claim_now)
    [again] = take(store, worker="w2", limit=5)
    assert again.run_id == now.pk


def test_release_ends_the_claim_every_later_write_of_it_is_fenced_out(store):
    new_run()
    [claim] = take(store)
    attempt_id = started_step(store, claim)
    assert store.release(claim, delay=3600)
    # The released worker may still be executing the run: it writes nothing more.
    assert store.renew_leases([claim.token], 60) == 0
    with store.atomic():
        assert not store.fence(claim, renew=True)
    later = timezone.now() + timedelta(minutes=1)
    assert (
        store.start_step(
            claim,
            name="t",
            generation=0,
            position=1,
            started_at=later,
            atomic=False,
            deferred=(attempt_id, "1", timezone.now()),
        )
        is None
    )
    assert not store.park(claim, later)
    assert not store.finish(claim, "completed", output=1)
    assert not store.release(claim)
    run = WorkflowRun.objects.get()
    assert (run.status, run.claim_token) == ("running", None)
    assert run.available_at > timezone.now() + timedelta(minutes=30)  # still released
    assert StepAttempt.objects.get(pk=attempt_id).status == "running"


# --- steps -------------------------------------------------------------------------------


def test_start_step_stores_the_previous_result_and_a_running_attempt(store):
    new_run()
    [claim] = take(store)
    first = started_step(store, claim, "a")
    second = started_step(store, claim, "b", deferred=(first, "[1, 2]", timezone.now()))
    a, b = StepAttempt.objects.order_by("id")
    assert (a.pk, a.status, a.output) == (first, "completed", [1, 2])
    assert (b.pk, b.step_name, b.status, b.kind, b.position) == (second, "b", "running", "run", 0)


def test_fail_steps_fails_only_running_attempts(store):
    new_run()
    [claim] = take(store)
    done = started_step(store, claim, "a")
    running = started_step(store, claim, "b", deferred=(done, "1", timezone.now()))
    error = {"type": "ValueError", "message": "no"}
    with store.atomic():
        assert store.fence(claim)
        store.fail_steps([(done, error), (running, error)])
    statuses = dict(StepAttempt.objects.values_list("step_name", "status"))
    assert statuses == {"a": "completed", "b": "failed"}


# --- finish, park, wake --------------------------------------------------------------------


def test_finish_completes_the_run_with_the_last_result(store):
    new_run()
    [claim] = take(store)
    attempt_id = started_step(store, claim)
    assert store.finish(
        claim, "completed", output={"ok": True}, deferred=(attempt_id, "3", timezone.now())
    )
    run = WorkflowRun.objects.get()
    assert (run.status, run.output, run.claim_token, run.available_at) == (
        "completed",
        {"ok": True},
        None,
        None,
    )
    assert run.finished_at is not None
    assert StepAttempt.objects.get().output == 3
    assert not store.finish(claim, "failed", error={"type": "X"})  # finished once


def test_a_finishing_child_wakes_its_parked_parent(store):
    parent = new_run("parent", {"child": "echo", "child_input": 5})
    [claim] = take(store, "parent")
    execute(store, claim)  # starts the child and parks
    wait = StepAttempt.objects.get(workflow_run=parent, kind="workflow")
    WorkflowRun.objects.filter(pk=parent.pk).update(available_at=None)
    [child_claim] = take(store, "echo")
    assert child_claim.run_id == wait.child_workflow_run_id
    assert store.finish(child_claim, "completed", output=5)
    parent.refresh_from_db()
    assert parent.status == "pending"
    assert parent.available_at <= timezone.now()
    assert drain(store, "parent", "echo") == 1
    parent.refresh_from_db()
    assert (parent.status, parent.output) == ("completed", {"child": 5})


def test_park_releases_the_claim_until_a_time_or_until_woken(store):
    run = new_run()
    [claim] = take(store)
    later = timezone.now() + timedelta(hours=1)
    assert store.park(claim, later, attempts=2, error={"type": "E"})
    run.refresh_from_db()
    assert (run.status, run.available_at, run.attempts, run.error, run.claim_token) == (
        "pending",
        later,
        2,
        {"type": "E"},
        None,
    )
    assert store.next_due_at("default", ["echo"]) == later
    assert take(store) == []


def test_fail_overdue_fails_active_runs_past_their_deadline_and_wakes_parents(store):
    parent = new_run("parent", {"child": "sleeper", "child_input": {"sleep": "1h"}})
    execute(store, take(store, "parent")[0])
    child = WorkflowRun.objects.get(workflow_name="sleeper")
    WorkflowRun.objects.filter(pk=parent.pk).update(available_at=None)
    WorkflowRun.objects.filter(pk=child.pk).update(deadline_at=Now() - timedelta(seconds=1))
    assert store.fail_overdue("default") == 1
    child.refresh_from_db()
    parent.refresh_from_db()
    assert (child.status, child.error) == ("failed", DEADLINE_ERROR)
    assert parent.available_at <= timezone.now()  # woken to see its child's end
    assert store.fail_overdue("default") == 0


# --- signals ---------------------------------------------------------------------------------


def test_deliver_signal_completes_current_waits_and_wakes_their_runs(store):
    run = new_run("waiter", {"signal": "bell"})
    execute(store, take(store, "waiter")[0])  # waits for "bell"
    other = new_run("waiter", {"signal": "other"})
    execute(store, take(store, "waiter")[0])
    with store.atomic():
        assert store.deliver_signal("default", "bell", {"n": 1}) == [run.pk]
        assert store.deliver_signal("default", "bell", {"n": 2}) == []  # delivered once
    wait = StepAttempt.objects.get(workflow_run=run, kind="signal_wait")
    assert (wait.status, wait.output) == ("completed", {"data": {"n": 1}})
    run.refresh_from_db()
    assert run.available_at <= timezone.now()
    assert drain(store, "waiter") == 1
    run.refresh_from_db()
    other.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"data": {"n": 1}})
    assert other.status == "pending"


# --- the engine on this store ----------------------------------------------------------------


def test_the_engine_runs_steps_retries_and_sleeps_on_this_store(store):
    three = new_run("three-steps", {"i": 1})
    flaky = new_run("flaky", {"failures": 2, "initial": "1ms"})
    sleeper = new_run("sleeper", {"sleep": "1ms"})
    for _ in range(20):
        drain(store, "three-steps", "flaky", "sleeper")
        if not WorkflowRun.objects.active().exists():
            break
        WorkflowRun.objects.active().update(available_at=Now())
        StepAttempt.objects.filter(status="running", kind="sleep").update(wake_at=Now())
    for run in (three, flaky, sleeper):
        run.refresh_from_db()
    assert (three.status, three.output) == ("completed", {"total": 3})
    assert (flaky.status, flaky.output) == ("completed", 3)
    assert sleeper.status == "completed"
    assert SideEffect.objects.filter(run_id=three.pk).count() == 3


def test_resume_and_cancel_work_on_runs_this_store_wrote(store):
    failed = new_run("reserve-then-charge", {"failures": 1})
    drain(store, "reserve-then-charge")
    failed.refresh_from_db()
    assert failed.status == "failed"
    WorkflowRun.objects.resume(failed)
    drain(store, "reserve-then-charge")
    failed.refresh_from_db()
    assert (failed.status, failed.output) == ("completed", "charged")
    assert SideEffect.objects.filter(run_id=failed.pk, step="reserve").count() == 1

    waiting = new_run("waiter", {"signal": "never"})
    [claim] = take(store, "waiter")
    execute(store, claim)
    WorkflowRun.objects.cancel(waiting)
    assert not store.finish(claim, "completed", output=1)
    waiting.refresh_from_db()
    assert waiting.status == "canceled"


# --- queues (SPEC section 9) --------------------------------------------------------------
# With no limited queue served, PostgresStore claims with one SQL statement; with one, it
# claims as the ORM store does: "unlimited" and "limited" run both.

UNLIMITED_OR_LIMITED = pytest.mark.parametrize(
    "limits", [{}, {"concurrency": 100}], ids=["unlimited", "limited"]
)


def ago(seconds: float):
    return timezone.now() - timedelta(seconds=seconds)


def claimed_ids(claims: list[Claim]) -> set:
    return {claim.run_id for claim in claims}


def in_queue(queue: str, count: int, **fields) -> list[WorkflowRun]:
    """``count`` due runs of ``queue``, due one second apart in list order (a minute ago on)."""
    due = ago(60)
    return WorkflowRun.objects.bulk_create(
        WorkflowRun(
            namespace="default",
            workflow_name="echo",
            queue=queue,
            available_at=due + timedelta(seconds=i),
            **fields,
        )
        for i in range(count)
    )


@UNLIMITED_OR_LIMITED
def test_claim_takes_the_highest_priority_first_then_the_run_due_first(store, settings, limits):
    settings.OPENWORKFLOW = {"QUEUES": {"default": limits}}
    low = new_run(priority=-100, available_at=ago(50))
    later = new_run(available_at=ago(10))
    earlier = new_run(available_at=ago(20))
    high = new_run(priority=100, available_at=ago(1))
    assert claimed_ids(take(store, limit=2)) == {high.pk, earlier.pk}
    assert claimed_ids(take(store, limit=1)) == {later.pk}
    assert claimed_ids(take(store, limit=1)) == {low.pk}


@UNLIMITED_OR_LIMITED
def test_claim_serves_only_the_queues_it_is_asked_for(store, settings, limits):
    settings.OPENWORKFLOW = {"QUEUES": {"default": {}, "emails": limits, "billing": limits}}
    plain = new_run(available_at=ago(30))
    email = new_run(queue="emails", available_at=ago(20))
    bill = new_run(queue="billing", available_at=ago(10))
    assert claimed_ids(take(store, limit=5, queues=["emails"])) == {email.pk}
    assert take(store, limit=5, queues=["emails"]) == []
    assert claimed_ids(take(store, limit=5, queues=["billing", "default"])) == {plain.pk, bill.pk}


def test_a_queue_has_at_most_concurrency_runs_in_progress_and_a_finished_one_frees_its_slot(
    store, settings
):
    settings.OPENWORKFLOW = {"QUEUES": {"emails": {"concurrency": 2}}}
    emails = in_queue("emails", 5)
    plain = new_run()  # the default queue has no limit
    first = take(store, limit=10)
    assert claimed_ids(first) == {emails[0].pk, emails[1].pk, plain.pk}
    assert take(store, limit=10, worker="w2") == []
    by_run = {claim.run_id: claim for claim in first}
    assert store.finish(by_run[emails[0].pk], "completed")
    assert claimed_ids(take(store, limit=10, worker="w2")) == {emails[2].pk}
    assert store.finish(by_run[emails[1].pk], "failed", error={"type": "E"})
    [third] = take(store, limit=10, worker="w2")
    assert third.run_id == emails[3].pk
    WorkflowRun.objects.cancel(emails[2].pk)
    assert claimed_ids(take(store, limit=10, worker="w3")) == {emails[4].pk}
    assert WorkflowRun.objects.active().filter(queue="emails").count() == 2


def test_the_limits_count_runs_of_this_namespace_only(store, settings):
    settings.OPENWORKFLOW = {"QUEUES": {"emails": {"concurrency": 1, "key_concurrency": 1}}}
    WorkflowRun.objects.create(
        namespace="elsewhere", workflow_name="echo", queue="emails", concurrency_key="k"
    )
    store.claim(
        namespace="elsewhere", workflow_names=["echo"], limit=1, worker_id="w", lease_seconds=30
    )
    run = new_run(queue="emails", concurrency_key="k")
    assert claimed_ids(take(store)) == {run.pk}


def test_key_concurrency_limits_each_key_and_not_runs_without_one(store, settings):
    settings.OPENWORKFLOW = {"QUEUES": {"billing": {"key_concurrency": 1}}}
    a1 = new_run(queue="billing", concurrency_key="a", available_at=ago(90))
    a2 = new_run(queue="billing", concurrency_key="a", available_at=ago(80))
    b1 = new_run(queue="billing", concurrency_key="b", available_at=ago(70))
    b2 = new_run(queue="billing", concurrency_key="b", available_at=ago(65))
    keyless = in_queue("billing", 3)  # due a minute ago
    other_queue = new_run(concurrency_key="a")  # the same key in another queue: not limited
    [a1_claim] = take(store, limit=1)
    assert a1_claim.run_id == a1.pk
    assert claimed_ids(take(store, limit=10)) == {b1.pk, other_queue.pk} | {
        run.pk for run in keyless
    }
    assert take(store, limit=10) == []
    assert store.finish(a1_claim, "completed")
    assert claimed_ids(take(store, limit=10)) == {a2.pk}
    assert WorkflowRun.objects.get(pk=b2.pk).status == "pending"


def test_a_full_key_does_not_hold_back_other_keys_behind_its_due_runs(store, settings):
    settings.OPENWORKFLOW = {"QUEUES": {"billing": {"key_concurrency": 1}}}
    # more runs of key "a" ahead in claim order than a claim reads in one page
    keyed_a = in_queue("billing", 45, concurrency_key="a", priority=5)
    b = new_run(queue="billing", concurrency_key="b", available_at=ago(200))
    c = new_run(queue="billing", concurrency_key="c", available_at=ago(100))
    # key "a" fills within the claim: the runs behind it are still found
    assert claimed_ids(take(store, limit=2)) == {keyed_a[0].pk, b.pk}
    # key "a" is full before the claim begins
    assert claimed_ids(take(store, limit=5)) == {c.pk}
    assert WorkflowRun.objects.filter(status="pending").count() == 44


def test_a_full_queue_does_not_hold_back_other_queues_behind_its_due_runs(store, settings):
    settings.OPENWORKFLOW = {
        "QUEUES": {"slow": {"concurrency": 1}, "other": {"key_concurrency": 1}}
    }
    slow = in_queue("slow", 45, priority=50)
    other = in_queue("other", 2, concurrency_key="k", priority=10)
    plain = new_run(priority=-50)
    assert claimed_ids(take(store, limit=4)) == {slow[0].pk, other[0].pk, plain.pk}


def test_a_run_in_progress_is_claimed_again_whatever_the_limits_say(store, settings):
    queues = {"billing": {"concurrency": 1, "key_concurrency": 1, "rate_limit": "1/h"}}
    settings.OPENWORKFLOW = {"QUEUES": queues}
    parked, waiting = in_queue("billing", 2, concurrency_key="k")
    [claim] = take(store, limit=5)
    assert claim.run_id == parked.pk
    assert store.park(claim, None)  # waiting for a signal, say: it keeps its slot
    assert take(store, limit=5) == []
    make_due = WorkflowRun.objects.filter(pk=parked.pk)
    make_due.update(available_at=Now())  # woken
    [woken] = take(store, limit=5)
    assert (woken.run_id, woken.first_start) == (parked.pk, False)
    expire(woken)  # its worker died
    [taken_over] = take(store, limit=5, worker="w2")
    assert (taken_over.run_id, taken_over.first_start) == (parked.pk, False)
    assert WorkflowRun.objects.get(pk=waiting.pk).status == "pending"

    # above the limit (it was lowered): each run in progress is still claimed again
    settings.OPENWORKFLOW = {"QUEUES": {"billing": {}}}
    assert claimed_ids(take(store, limit=5, worker="w3")) == {waiting.pk}
    settings.OPENWORKFLOW = {"QUEUES": queues}
    WorkflowRun.objects.filter(queue="billing").update(available_at=Now() - timedelta(seconds=1))
    again = take(store, limit=5, worker="w4")
    assert claimed_ids(again) == {parked.pk, waiting.pk}
    assert [claim.first_start for claim in again] == [False, False]


def test_a_rate_limit_counts_first_starts_in_its_window_and_says_when_the_next_may_start(
    store, settings
):
    from django_openworkflow.models import QueueStart

    settings.OPENWORKFLOW = {"QUEUES": {"emails": {"rate_limit": "2/m"}}}
    emails = in_queue("emails", 3)
    first = take(store, limit=5)
    assert claimed_ids(first) == {emails[0].pk, emails[1].pk}
    held = take(store, limit=5)
    assert held == []
    assert held.retry_at == first[0].db_now + timedelta(minutes=1)
    assert QueueStart.objects.count() == 2
    # a run claimed again does not start again: it is not counted
    expire(first[0])
    assert claimed_ids(take(store, limit=5, worker="w2")) == {first[0].run_id}
    assert QueueStart.objects.count() == 2
    # a minute later (the window slides past the first starts)
    QueueStart.objects.update(started_at=F("started_at") - timedelta(seconds=61))
    last = take(store, limit=5)
    assert claimed_ids(last) == {emails[2].pk}
    assert last.retry_at is None
    assert list(QueueStart.objects.values_list("run_id", flat=True)) == [emails[2].pk]


def test_each_rate_limited_queue_counts_its_starts_in_its_own_window(store, settings):
    from django_openworkflow.models import QueueStart

    settings.OPENWORKFLOW = {
        "QUEUES": {"emails": {"rate_limit": "1/m"}, "sms": {"rate_limit": "1/s"}}
    }
    emails, sms = in_queue("emails", 2), in_queue("sms", 2)
    assert claimed_ids(take(store, limit=5)) == {emails[0].pk, sms[0].pk}
    assert take(store, limit=5) == []
    # two seconds later: out of the second's window, still in the minute's
    QueueStart.objects.update(started_at=F("started_at") - timedelta(seconds=2))
    assert claimed_ids(take(store, limit=5)) == {sms[1].pk}


@pytest.mark.postgres
@pytest.mark.django_db
@pytest.mark.parametrize("statement", ["FENCE", "FINISH"])
def test_the_fenced_writes_find_their_run_by_its_key_in_a_generic_plan(statement):
    """The worker's prepared statements are planned once, generically. Planned on
    statistics that saw no active run, "status = 'running'" made a partial index of active
    runs look empty, and the plan scanned it (every active run) instead of the key."""
    from django_openworkflow.store.postgres import FENCE, PostgresStore

    WorkflowRun.objects.bulk_create(
        WorkflowRun(workflow_name="echo", status="completed") for _ in range(200)
    )
    sql = FENCE if statement == "FENCE" else PostgresStore.FINISH
    params = sql.count("%s")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE django_openworkflow_workflowrun")
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        text = sql
        for i in range(1, params + 1):
            text = text.replace("%s", f"${i}", 1)
        cursor.execute(f"PREPARE owf_fence_plan AS {text}")
        try:
            cursor.execute("EXPLAIN EXECUTE owf_fence_plan(" + ", ".join(["NULL"] * params) + ")")
            plan = "\n".join(row[0] for row in cursor.fetchall())
        finally:
            cursor.execute("DEALLOCATE owf_fence_plan")
    assert "workflowrun_pkey" in plan, plan
