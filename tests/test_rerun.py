"""WorkflowRun.objects.rerun(run, from_step=..., by=...): a finished run runs again in place
(SPEC section 13). The engine runs on the test's thread (``testing.drain``)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.db import OperationalError
from django.utils import timezone

from django_openworkflow import InvalidTransition, RetryPolicy, send_signal
from django_openworkflow.exceptions import Refusal
from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowRunEvent
from django_openworkflow.signals import run_rerun
from django_openworkflow.store import get_store
from django_openworkflow.testing import drain, pause_at, run_to_completion
from tests.conftest import Backend, assert_no_stuck_runs, blocked_on_a_lock
from tests.conftest import drain as work
from tests.testapp.models import SideEffect
from tests.testapp.workflows import (
    catches_step_failure,
    changes_order,
    counts_executions,
    fan_out,
    parent,
    repeated_names,
    reserve_then_charge,
    three_steps,
    waiter,
)
from tests.users import create_user

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_stuck_runs():
    """Whatever a test leaves behind, no run is stuck (``diagnostics.stuck_runs``)."""
    yield
    assert_no_stuck_runs()


def effects(run, step):
    return SideEffect.objects.filter(run_id=run.pk, step=step).count()


def children_of(run):
    return list(
        WorkflowRun.objects.filter(parent_step_attempt__workflow_run=run).order_by("created_at")
    )


def snapshot(run):
    return (
        list(WorkflowRun.objects.filter(pk=run.pk).values()),
        list(StepAttempt.objects.filter(workflow_run=run).values().order_by("id")),
        list(WorkflowRunEvent.objects.values().order_by("id")),
        list(WorkflowRun.objects.exclude(pk=run.pk).values("pk", "status").order_by("pk")),
        LogEntry.objects.count(),
    )


# --- the stored path ---------------------------------------------------------------------


def test_the_stored_path_of_a_completed_run_lists_its_steps_in_call_order():
    run = run_to_completion(three_steps, {"i": 1})
    assert run.stored_path() == ["s0", "s1", "s2"]


def test_the_stored_path_of_a_failed_run_ends_at_the_step_that_failed():
    run = run_to_completion(reserve_then_charge, {"failures": 1})
    assert run.stored_path() == ["reserve", "charge"]


def test_a_run_resumed_then_canceled_before_a_step_keeps_the_path_it_failed_on():
    run = run_to_completion(reserve_then_charge, {"failures": 1})
    WorkflowRun.objects.resume(run)
    WorkflowRun.objects.cancel(run)  # before any worker took the new generation

    assert run.stored_path() == ["reserve", "charge"]
    run = WorkflowRun.objects.rerun(run, from_step="charge")
    assert run.events.last().details["rerun_steps"] == ["charge"]


def test_replay_takes_a_superseded_result_for_neither_a_result_nor_an_open_wait():
    """Pure History: whatever generation holds it, a superseded completed attempt runs again."""
    from django_openworkflow.engine.history import History

    def attempt(generation, superseded_by_id=None, status="completed"):
        return StepAttempt(
            step_name="s",
            status=status,
            output="old",
            resume_generation=generation,
            position=0,
            superseded_by_id=superseded_by_id,
        )

    for generation in (0, 1):  # an earlier generation's, and (by hand) the current one's
        history = History("run", 1)
        history.load([attempt(generation, superseded_by_id=7)])
        assert (history.completed, history.waiting) == ({}, {})
        assert history.replay("s", RetryPolicy()) == (False, None)
    history = History("run", 1)
    history.load([attempt(0)])
    assert history.replay("s", RetryPolicy()) == (True, "old")


def test_the_stored_path_names_repeated_calls_as_stored():
    run = run_to_completion(repeated_names)
    assert run.stored_path() == ["x:1", "x", "x:2", "x:3", "x:2:1"]


# --- rerunning completed runs -------------------------------------------------------------


def test_a_rerun_from_the_start_executes_every_step_again_in_place():
    run = run_to_completion(counts_executions)
    assert run.output == {"a": 1, "b": 1, "c": 1}
    user = create_user("ops", "change_workflowrun")
    rerun = WorkflowRun.objects.rerun(run.pk, by=user)
    assert rerun.pk == run.pk
    run.refresh_from_db()
    assert (run.status, run.output, run.resume_generation) == ("pending", None, 1)
    assert (run.error, run.worker_id, run.started_at, run.finished_at, run.attempts) == (
        None,
        None,
        None,
        None,
        0,
    )
    assert WorkflowRun.objects.due().filter(pk=run.pk).exists()
    [event] = run.events.all()
    assert (event.action, event.by, event.cleared_error) == ("rerun", user, None)
    assert event.details == {
        "from_step": None,
        "generation": 1,
        "rerun_steps": ["a", "b", "c"],
        "canceled_children": [],
    }
    first = StepAttempt.objects.filter(workflow_run=run, resume_generation=0)
    assert [a.superseded_by_id for a in first] == [event.pk] * 3

    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"a": 2, "b": 2, "c": 2})
    assert WorkflowRun.objects.count() == 1  # in place: nothing new, nothing deleted
    assert StepAttempt.objects.filter(workflow_run=run).count() == 6


def test_a_rerun_from_a_middle_step_serves_the_steps_before_it():
    run = run_to_completion(counts_executions)
    WorkflowRun.objects.rerun(run, from_step="b")
    assert run.events.get().details["rerun_steps"] == ["b", "c"]
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"a": 1, "b": 2, "c": 2})
    kept = StepAttempt.objects.get(workflow_run=run, step_name="a")
    assert (kept.resume_generation, kept.superseded_by_id) == (0, None)


def test_reruns_add_up():
    run = run_to_completion(counts_executions)
    WorkflowRun.objects.rerun(run, from_step="c")
    drain()
    WorkflowRun.objects.rerun(run, from_step="b")
    drain()
    WorkflowRun.objects.rerun(run)
    drain()
    run.refresh_from_db()
    assert (run.output, run.resume_generation) == ({"a": 2, "b": 3, "c": 4}, 3)
    assert run.stored_path() == ["a", "b", "c"]


def test_a_rerun_of_part_of_a_parallel_group():
    run = run_to_completion(fan_out, {"concurrent": False})
    assert run.output == "ABC"
    WorkflowRun.objects.rerun(run, from_step="b")
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", "ABC")
    assert [effects(run, s) for s in "abc"] == [1, 2, 2]


def test_repeated_names_replay_in_order_after_a_rerun_from_the_middle():
    run = run_to_completion(repeated_names)
    WorkflowRun.objects.rerun(run, from_step="x:2")
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", ["a", "b", "c", "d", "e"])


def test_a_rerun_from_the_start_lets_changed_code_take_its_new_path():
    run = run_to_completion(changes_order)
    SideEffect.objects.create(run_id=run.pk, step="flip")  # the code now calls "b" first
    WorkflowRun.objects.rerun(run)
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", 2)  # no NonDeterministicWorkflow


def test_steps_served_by_a_rerun_must_still_come_in_the_stored_order():
    run = run_to_completion(changes_order)
    SideEffect.objects.create(run_id=run.pk, step="flip")
    WorkflowRun.objects.rerun(run, from_step="b")  # "a" is served at its place
    drain()
    run.refresh_from_db()
    assert (run.status, run.error["type"]) == ("failed", "NonDeterministicWorkflow")


def test_a_step_before_from_step_with_nothing_stored_runs_again():
    """A failure the workflow caught is no result: the step runs again (as after a resume)."""
    run = run_to_completion(catches_step_failure)
    assert (run.status, effects(run, "bad")) == ("completed", 2)
    assert run.stored_path() == ["bad", "pause", "compensate"]
    WorkflowRun.objects.rerun(run, from_step="compensate")
    drain()
    run.refresh_from_db()
    assert run.status == "completed"
    assert effects(run, "bad") == 4  # its full budget again
    pause = StepAttempt.objects.get(workflow_run=run, step_name="pause")
    assert pause.superseded_by_id is None  # served


# --- refusals -----------------------------------------------------------------------------


def test_an_unknown_step_is_a_value_error_listing_the_path():
    run = run_to_completion(three_steps)
    before = snapshot(run)
    with pytest.raises(ValueError) as info:
        WorkflowRun.objects.rerun(run, from_step="s9")
    assert str(info.value) == (
        f'cannot rerun run {run.pk} from step "s9": it is not on the run\'s stored path '
        '("s0", "s1", "s2")'
    )
    assert snapshot(run) == before


def test_a_run_without_steps_has_an_empty_path():
    run = WorkflowRun.objects.create(workflow_name="echo", status="failed")
    with pytest.raises(ValueError) as info:
        WorkflowRun.objects.rerun(run, from_step="echo")
    assert str(info.value) == (
        f'cannot rerun run {run.pk} from step "echo": it is not on the run\'s stored path '
        "(it has no stored steps)"
    )


@pytest.mark.parametrize(
    ("from_step", "kind", "message"),
    [
        (3, TypeError, "from_step of the rerun of run {run} must be a non-empty string, not 3"),
        ("", TypeError, "from_step of the rerun of run {run} must be a non-empty string, not ''"),
        (
            "s\x00",
            ValueError,
            "from_step 's\\x00' of the rerun of run {run} contains the character U+0000 (NUL), "
            "which PostgreSQL cannot store",
        ),
    ],
)
def test_a_from_step_that_is_no_name_is_refused(from_step, kind, message):
    run = run_to_completion(three_steps)
    with pytest.raises(kind) as info:
        WorkflowRun.objects.rerun(run, from_step=from_step)
    assert str(info.value) == message.format(run=run.pk)


@pytest.mark.parametrize("status", ["pending", "running"])
def test_an_active_run_is_refused(status):
    run = WorkflowRun.objects.create(workflow_name="echo", status=status, worker_id="w")
    before = snapshot(run)
    with pytest.raises(InvalidTransition) as info:
        WorkflowRun.objects.rerun(run)
    assert str(info.value) == (
        f"cannot rerun run {run.pk}: it is {status}; only completed, failed or canceled runs "
        "can be rerun"
    )
    assert (info.value.reason, info.value.status, info.value.run_id) == (
        Refusal.STATUS,
        status,
        run.pk,
    )
    assert snapshot(run) == before
    assert not run.can_rerun()


def test_an_unknown_or_malformed_id_does_not_exist():
    for pk in (uuid.uuid4(), "not-a-uuid"):
        with pytest.raises(WorkflowRun.DoesNotExist):
            WorkflowRun.objects.rerun(pk)


def test_a_passed_deadline_needs_a_new_future_one():
    run = run_to_completion(three_steps)
    past = timezone.now() - timedelta(minutes=1)
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=past)
    run.refresh_from_db()
    assert run.rerun_refusal() is Refusal.DEADLINE
    assert not WorkflowRun.objects.rerunnable().filter(pk=run.pk).exists()
    before = snapshot(run)
    with pytest.raises(InvalidTransition) as info:
        WorkflowRun.objects.rerun(run)
    assert str(info.value) == (
        f"cannot rerun run {run.pk}: its deadline_at {past.isoformat()} has passed; "
        "pass a future deadline_at= to rerun it"
    )
    assert info.value.reason is Refusal.DEADLINE
    earlier = timezone.now() - timedelta(seconds=5)
    with pytest.raises(InvalidTransition) as info:
        WorkflowRun.objects.rerun(run, deadline_at=earlier)
    assert str(info.value) == (
        f"cannot rerun run {run.pk}: the new deadline_at {earlier.isoformat()} is not in the future"
    )
    assert info.value.reason is Refusal.NEW_DEADLINE
    with pytest.raises(ValueError, match=r"^deadline_at must be an aware datetime \(timezone"):
        WorkflowRun.objects.rerun(run, deadline_at="tomorrow")
    assert snapshot(run) == before

    later = timezone.now() + timedelta(hours=1)
    WorkflowRun.objects.rerun(run, deadline_at=later)
    run.refresh_from_db()
    assert (run.status, run.deadline_at) == ("pending", later)
    drain(time_travel="sleeps")
    run.refresh_from_db()
    assert run.status == "completed"


def test_a_stale_expected_generation_is_refused():
    run = run_to_completion(three_steps)
    WorkflowRun.objects.rerun(run)
    drain()
    before = snapshot(run)
    with pytest.raises(InvalidTransition) as info:
        WorkflowRun.objects.rerun(run, expected_generation=0)
    assert str(info.value) == (
        f"run {run.pk} was resumed or rerun since it was read: it is at generation 1, not 0"
    )
    assert info.value.reason is Refusal.STALE
    assert snapshot(run) == before
    WorkflowRun.objects.rerun(run, expected_generation=1)


# --- failed and canceled runs --------------------------------------------------------------


def test_a_failed_run_is_rerun_and_its_error_cleared():
    run = run_to_completion(reserve_then_charge, {"failures": 1})
    error = run.error
    WorkflowRun.objects.rerun(run)
    event = run.events.get()
    assert event.cleared_error == error
    run.refresh_from_db()
    assert run.error is None
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", "charged")
    assert (effects(run, "reserve"), effects(run, "charge")) == (2, 2)


def test_a_rerun_then_a_resume_after_it_fails_again():
    run = run_to_completion(reserve_then_charge, {"failures": 2})
    WorkflowRun.objects.rerun(run, from_step="charge")
    drain()
    run.refresh_from_db()
    assert (run.status, run.resume_generation) == ("failed", 1)  # charge failed again
    WorkflowRun.objects.resume(run)
    drain()
    run.refresh_from_db()
    assert (run.status, run.output, run.resume_generation) == ("completed", "charged", 2)
    assert (effects(run, "reserve"), effects(run, "charge")) == (1, 3)
    assert list(run.events.values_list("action", flat=True)) == ["rerun", "resume"]


def test_a_canceled_run_is_rerun():
    run = waiter.start({"signal": "rerun-canceled"})
    drain()
    WorkflowRun.objects.cancel(run)
    WorkflowRun.objects.rerun(run)
    drain()
    run.refresh_from_db()
    assert run.status == "pending"  # waiting for its signal again
    assert send_signal("rerun-canceled", 5) == [str(run.pk)]
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"data": 5})
    assert effects(run, "before") == 2


# --- open waits and child runs --------------------------------------------------------------


def failed_at_deadline(run):
    """Time travel: the run's deadline passes while it waits; the sweep fails it."""
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=timezone.now() - timedelta(1))
    assert get_store().fail_overdue("default") == 1
    run.refresh_from_db()
    assert run.status == "failed"


def test_a_parent_failed_at_its_deadline_while_its_child_runs_starts_a_new_child():
    run = parent.start({"child": "waiter", "child_input": {"signal": "child-go"}})
    drain(time_travel=False)
    [old] = children_of(run)
    failed_at_deadline(run)
    wait = StepAttempt.objects.get(workflow_run=run, step_name="waiter")
    assert wait.status == "running"  # kept open for a resume
    with pytest.raises(InvalidTransition, match="has passed; pass a future deadline_at= to rerun"):
        WorkflowRun.objects.rerun(run)
    user = create_user("ops")
    WorkflowRun.objects.rerun(run, deadline_at=timezone.now() + timedelta(hours=1), by=user)
    old.refresh_from_db()
    wait.refresh_from_db()
    assert old.status == "canceled"
    assert old.events.get().by == user
    assert (wait.status, wait.resume_generation, wait.error["type"]) == ("failed", 0, "Rerun")
    assert wait.error["message"] == (
        f"closed by the rerun of run {run.pk} from the start (generation 1): the step runs again"
    )
    assert run.events.get().details["canceled_children"] == [str(old.pk)]

    drain(time_travel=False)
    old_child, new = children_of(run)
    assert old_child == old and new.status == "pending"
    assert send_signal("child-go", 7) == [str(new.pk)]  # not the canceled child
    drain(time_travel=False)
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"child": {"data": 7}})


def test_a_parent_whose_child_step_timed_out_cancels_the_old_child_when_the_step_runs_again():
    run = parent.start({"child": "waiter", "child_input": {"signal": "slow"}, "timeout": "1h"})
    drain()  # the hour passes: the step fails, the child keeps running
    run.refresh_from_db()
    [old] = children_of(run)
    assert (run.status, old.status) == ("failed", "pending")
    WorkflowRun.objects.rerun(run, from_step="waiter")
    old.refresh_from_db()
    assert old.status == "canceled"
    drain(time_travel="sleeps")
    [_, new] = children_of(run)
    assert send_signal("slow", 1) == [str(new.pk)]
    drain(time_travel="sleeps")
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"child": {"data": 1}})


def test_the_old_child_of_a_caught_timeout_before_from_step_is_canceled_too():
    """The timed-out child step is before from_step but has no result: it runs again."""
    run = run_to_completion(
        parent,
        {"child": "waiter", "child_input": {"signal": "late"}, "timeout": "1h", "catch": True},
    )
    [old] = children_of(run)
    assert (run.status, old.status) == ("completed", "pending")
    assert run.stored_path() == ["waiter"]  # the caught failure ended its path
    WorkflowRun.objects.rerun(run)
    old.refresh_from_db()
    assert old.status == "canceled"
    assert run.events.get().details["canceled_children"] == [str(old.pk)]


def test_children_and_their_descendants_of_steps_that_run_again_are_canceled():
    run = parent.start(
        {"child": "parent", "child_input": {"child": "waiter", "child_input": {"signal": "deep"}}}
    )
    drain(time_travel=False)
    [child] = children_of(run)
    [grandchild] = children_of(child)
    failed_at_deadline(run)
    WorkflowRun.objects.rerun(run, deadline_at=timezone.now() + timedelta(hours=1))
    child.refresh_from_db()
    grandchild.refresh_from_db()
    assert (child.status, grandchild.status) == ("canceled", "canceled")
    assert run.events.get().details["canceled_children"] == [str(child.pk), str(grandchild.pk)]


def test_finished_children_of_steps_that_run_again_are_left_as_they_are():
    run = run_to_completion(parent, {"child": "echo", "child_input": 3})
    [old] = children_of(run)
    WorkflowRun.objects.rerun(run)
    drain()
    run.refresh_from_db()
    assert children_of(run)[0] == old
    old.refresh_from_db()
    new = children_of(run)[1]
    assert (old.status, old.events.count(), new.status) == ("completed", 0, "completed")
    assert run.output == {"child": 3}
    assert run.events.get().details["canceled_children"] == []


def test_children_of_served_steps_are_untouched():
    run = run_to_completion(parent, {"child": "echo", "child_input": 3})
    WorkflowRun.objects.rerun(run, from_step="after")
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"child": 3})
    assert len(children_of(run)) == 1
    assert effects(run, "after") == 2


def test_a_rerun_while_a_signal_wait_is_open_reaches_only_the_new_wait():
    run = waiter.start({"signal": "open-wait"})
    drain(time_travel=False)
    failed_at_deadline(run)
    WorkflowRun.objects.rerun(run, deadline_at=timezone.now() + timedelta(hours=1))
    [closed] = StepAttempt.objects.filter(workflow_run=run, kind="signal_wait")
    assert (closed.status, closed.resume_generation) == ("failed", 0)
    assert send_signal("open-wait", 1) == []  # sent before the rerun waits again: no one waits
    drain(time_travel=False)
    assert send_signal("open-wait", 2) == [str(run.pk)]
    drain(time_travel=False)
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"data": 2})
    closed.refresh_from_db()
    assert closed.status == "failed"  # it took neither signal
    new = StepAttempt.objects.get(workflow_run=run, kind="signal_wait", resume_generation=1)
    assert (new.status, new.output) == ("completed", {"data": 2})


def served_wait_history(run, wait_step):
    """No pass of the engine stores a step after an open wait (a run parks on it): build one,
    so the rule for waits of served steps is tested. The run failed at its deadline while it
    waited; a completed step "later" is added after the wait, in the same generation."""
    wait = StepAttempt.objects.get(workflow_run=run, step_name=wait_step, status="running")
    StepAttempt.objects.create(
        workflow_run=run,
        step_name="later",
        status="completed",
        output="stored",
        resume_generation=wait.resume_generation,
        position=wait.position + 1,
        finished_at=timezone.now(),
    )
    return wait


def test_a_served_signal_wait_is_kept_and_takes_the_signal():
    run = waiter.start({"signal": "kept-wait"})
    drain(time_travel=False)
    failed_at_deadline(run)
    wait = served_wait_history(run, "kept-wait")
    WorkflowRun.objects.rerun(
        run, from_step="later", deadline_at=timezone.now() + timedelta(hours=1)
    )
    wait.refresh_from_db()
    assert (wait.status, wait.resume_generation) == ("running", 1)  # in the new generation
    assert send_signal("kept-wait", 3) == [str(run.pk)]
    wait.refresh_from_db()
    assert (wait.status, wait.output) == ("completed", {"data": 3})


def test_a_served_child_wait_is_kept_and_the_same_child_output_used():
    run = parent.start({"child": "waiter", "child_input": {"signal": "same-child"}})
    drain(time_travel=False)
    [child] = children_of(run)
    failed_at_deadline(run)
    served_wait_history(run, "waiter")
    WorkflowRun.objects.rerun(
        run, from_step="later", deadline_at=timezone.now() + timedelta(hours=1)
    )
    child.refresh_from_db()
    assert child.status == "pending"  # not canceled
    assert run.events.get().details["canceled_children"] == []
    send_signal("same-child", 4)
    drain(time_travel=False)
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"child": {"data": 4}})
    assert children_of(run) == [child]


# --- a child run ----------------------------------------------------------------------------


def test_rerunning_a_child_does_not_touch_its_parent():
    run = run_to_completion(parent, {"child": "echo", "child_input": 3})
    [child] = children_of(run)
    before = list(WorkflowRun.objects.filter(pk=run.pk).values())
    WorkflowRun.objects.rerun(child)
    drain()
    child.refresh_from_db()
    assert (child.status, child.resume_generation) == ("completed", 1)
    assert list(WorkflowRun.objects.filter(pk=run.pk).values()) == before
    assert not run.events.exists()


# --- records, bulk, signal, all or nothing -------------------------------------------------------


def test_a_rerun_by_a_user_is_written_to_the_admin_history():
    user = create_user("ops", "change_workflowrun")
    run = run_to_completion(three_steps)
    WorkflowRun.objects.rerun(run, by=user)
    drain()
    WorkflowRun.objects.rerun(run, from_step="s1", by=user)
    WorkflowRun.objects.filter(pk=run.pk).update(status="completed")
    WorkflowRun.objects.rerun(run)  # no user: nothing written
    messages = [e.get_change_message() for e in LogEntry.objects.order_by("id")]
    assert messages == ["Rerun from the start", 'Rerun from step "s1"']
    assert {e.user for e in LogEntry.objects.all()} == {user}


def test_run_rerun_is_sent_after_the_commit(django_capture_on_commit_callbacks):
    received = []

    def receiver(sender, run, by, from_step, **kwargs):
        received.append((run.pk, by, from_step))

    run = run_to_completion(three_steps)
    run_rerun.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            WorkflowRun.objects.rerun(run, from_step="s2")
            assert received == []
    finally:
        run_rerun.disconnect(receiver)
    assert received == [(run.pk, None, "s2")]


def test_bulk_rerun_reruns_finished_runs_from_the_start_and_skips_active_ones():
    done = [run_to_completion(three_steps), run_to_completion(reserve_then_charge, {"failures": 5})]
    active = WorkflowRun.objects.create(workflow_name="echo", status="running")
    overdue = WorkflowRun.objects.create(
        workflow_name="echo", status="completed", deadline_at=timezone.now() - timedelta(1)
    )
    rerun = WorkflowRun.objects.all().rerun()
    assert sorted(r.pk for r in rerun) == sorted(r.pk for r in done)
    assert sorted(WorkflowRun.objects.rerunnable().values_list("pk", flat=True)) == []
    active.refresh_from_db()
    overdue.refresh_from_db()
    assert (active.status, overdue.status) == ("running", "completed")
    assert WorkflowRunEvent.objects.count() == 2


@pytest.mark.parametrize(
    "fault",
    [
        RuntimeError("the admin history is down"),
        KeyboardInterrupt(),  # a BaseException: the transaction rolls back all the same
        OperationalError("server closed the connection unexpectedly"),  # a lost connection
    ],
    ids=["exception", "base-exception", "lost-connection"],
)
def test_a_failure_inside_the_transaction_changes_nothing(monkeypatch, fault):
    run = parent.start({"child": "waiter", "child_input": {"signal": "rollback"}})
    drain(time_travel=False)
    failed_at_deadline(run)
    before = snapshot(run)

    def broken(*args, **kwargs):
        raise fault

    monkeypatch.setattr("django_openworkflow.managers.log_run_change", broken)
    with pytest.raises(type(fault)):
        WorkflowRun.objects.rerun(run, deadline_at=timezone.now() + timedelta(hours=1))
    assert snapshot(run) == before  # the child not canceled, the wait not closed


# --- two reruns at once (PostgreSQL, MariaDB: row locks) --------------------------------------


@pytest.mark.row_locks
@pytest.mark.django_db(transaction=True)
def test_two_reruns_at_once_rerun_exactly_once():
    run = run_to_completion(three_steps)
    first = Backend(lambda: WorkflowRun.objects.rerun(run, from_step="s1"))
    second = Backend(lambda: WorkflowRun.objects.rerun(run))
    with pause_at("rerun.locked", when=lambda c: c["run_id"] == run.pk) as pause:
        first.start()
        pause.wait()
        second.start()
        assert blocked_on_a_lock(second)
    first.finish()
    second.join(15)
    assert isinstance(second.error, InvalidTransition)
    assert str(second.error) == (
        f"cannot rerun run {run.pk}: it is pending; only completed, failed or canceled runs "
        "can be rerun"
    )
    run.refresh_from_db()
    assert run.resume_generation == 1
    [event] = run.events.all()
    assert event.details["from_step"] == "s1"


# --- on real workers ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_rerun_runs_on_workers_in_threads():
    run = fan_out.start({})  # its parallel steps meet at a barrier: they run at once
    work()
    WorkflowRun.objects.rerun(run)
    work()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", "ABC")
    assert [effects(run, s) for s in "abc"] == [2, 2, 2]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_rerun_run_is_picked_up_at_once_by_a_waiting_worker(worker_process):
    run = three_steps.start({"i": 2})
    work()
    proc = worker_process("--poll-interval", "600")
    proc.wait_until_idle()
    WorkflowRun.objects.rerun(run)
    run.refresh_from_db()
    assert run.result(timeout=10) == {"total": 3}
    assert effects(run, "s0") == 2
