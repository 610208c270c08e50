"""WorkflowRun.objects.resume(run, input=..., step_outputs=..., by=...): resume with changes
(SPEC section 13). The engine runs on the test's thread (``testing.drain``)."""

from __future__ import annotations

import uuid

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.core.exceptions import PermissionDenied
from django.db import OperationalError
from django.test import override_settings
from django.utils import timezone

from django_openworkflow import InvalidTransition
from django_openworkflow.corrections import NOT_GIVEN
from django_openworkflow.display import refusal_text, timeline
from django_openworkflow.exceptions import Refusal
from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowRunEvent
from django_openworkflow.signals import run_resumed
from django_openworkflow.store import get_store
from django_openworkflow.testing import drain, pause_at, run_to_completion
from tests.conftest import Backend, assert_no_stuck_runs, blocked_on_a_lock
from tests.testapp.models import Ledger, SideEffect
from tests.testapp.workflows import atomic_writer, charge_card, parent, recovers_then_fails
from tests.users import create_user

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_stuck_runs():
    """Whatever a test leaves behind, no run is stuck (``diagnostics.stuck_runs``)."""
    yield
    assert_no_stuck_runs()


NUL = "U+0000 (NUL), which PostgreSQL cannot store"


def effects(run, step):
    return SideEffect.objects.filter(run_id=run.pk, step=step).count()


def declined(**extra):
    """A charge-card run that failed at 'charge-card'."""
    run = run_to_completion(charge_card, {"card": "declined", **extra})
    assert run.status == "failed", run.error
    return run


def history(run):
    return [
        (a.step_name, a.status, a.resume_generation, a.given_in_id is not None)
        for a in StepAttempt.objects.filter(workflow_run=run).order_by("id")
    ]


def unchanged(run, before):
    """The run, its attempts and events are as they were (``before = snapshot(run)``)."""
    assert snapshot(run) == before


def snapshot(run):
    row = WorkflowRun.objects.filter(pk=run.pk).values(
        "status", "input", "error", "resume_generation", "available_at", "deadline_at"
    )
    return (
        list(row),
        list(StepAttempt.objects.filter(workflow_run=run).values().order_by("id")),
        list(WorkflowRunEvent.objects.filter(run=run).values()),
        LogEntry.objects.count(),
    )


@pytest.fixture
def corrector():
    return create_user("corrector", "change_workflowrun", "correct_workflowrun")


# --- what a correction does ------------------------------------------------------------


def test_the_new_input_replaces_the_old_and_the_replay_sees_it(corrector):
    run = declined()
    error = run.error
    WorkflowRun.objects.resume(run, input={"card": "4242"}, by=corrector)
    run.refresh_from_db()
    assert (run.status, run.input, run.resume_generation) == ("pending", {"card": "4242"}, 1)
    [event] = run.events.all()
    assert (event.action, event.by, event.cleared_error) == ("resume", corrector, error)
    assert event.details == {"input": {"old": {"card": "declined"}, "new": {"card": "4242"}}}
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"shipped": {"card": "4242"}})
    assert (effects(run, "reserve"), effects(run, "charge-card")) == (1, 2)


def test_none_is_an_input_like_any_other(corrector):
    run = declined()
    WorkflowRun.objects.resume(run, input=None, by=corrector)
    run.refresh_from_db()
    assert run.input is None
    assert run.events.get().details == {"input": {"old": {"card": "declined"}, "new": None}}


def test_a_given_output_is_served_and_the_step_is_not_executed_again(corrector):
    run = declined()
    [failure] = StepAttempt.objects.filter(workflow_run=run, step_name="charge-card")
    WorkflowRun.objects.resume(
        run, step_outputs={"charge-card": {"card": "paid by phone"}}, by=corrector
    )
    event = WorkflowRunEvent.objects.get(run=run)
    given = StepAttempt.objects.get(workflow_run=run, given_in=event)
    assert (given.step_name, given.status, given.output) == (
        "charge-card",
        "completed",
        {"card": "paid by phone"},
    )
    assert (given.kind, given.atomic, given.position, given.resume_generation) == (
        failure.kind,
        failure.atomic,
        failure.position,
        1,
    )
    assert given.started_at == given.finished_at
    assert event.details == {
        "step_outputs": {"charge-card": {"old": failure.error, "new": {"card": "paid by phone"}}}
    }
    assert event.by == corrector
    assert list(event.given_outputs.all()) == [given]

    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"shipped": {"card": "paid by phone"}})
    assert (effects(run, "reserve"), effects(run, "charge-card"), effects(run, "ship")) == (1, 1, 1)
    assert history(run) == [
        ("reserve", "completed", 0, False),
        ("charge-card", "failed", 0, False),
        ("charge-card", "completed", 1, True),  # given, before the steps that came after it
        ("ship", "completed", 1, False),
    ]
    attempts = list(run.step_attempts.order_by("id"))
    groups = timeline(run, attempts, now=timezone.now())
    assert [[a.step_name for a in g["attempts"]] for g in groups] == [
        ["reserve", "charge-card"],
        ["charge-card", "ship"],
    ]
    given = groups[1]["attempts"][0]
    assert given.started_at <= groups[1]["attempts"][1].started_at


def test_input_and_outputs_together(corrector):
    run = declined(ship_fails=True)
    WorkflowRun.objects.resume(
        run, input={"card": "declined"}, step_outputs={"charge-card": None}, by=corrector
    )
    details = run.events.get().details
    assert set(details) == {"input", "step_outputs"}
    assert details["step_outputs"]["charge-card"]["new"] is None
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"shipped": None})  # None was given


def test_a_given_output_of_a_step_atomic_is_served(corrector):
    run = run_to_completion(atomic_writer, {"fail": True})
    assert run.status == "failed"
    WorkflowRun.objects.resume(run, step_outputs={"write": 99}, by=corrector)
    given = StepAttempt.objects.get(workflow_run=run, resume_generation=1)
    assert given.atomic is True
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", 99)  # the input still says fail: not run
    assert not Ledger.objects.filter(run_id=run.pk).exists()


def test_a_failed_child_step_takes_the_given_output_and_starts_no_child(corrector):
    run = run_to_completion(parent, {"child": "fails-at-once"})
    assert run.status == "failed"
    [child] = WorkflowRun.objects.filter(parent_step_attempt__workflow_run=run)
    WorkflowRun.objects.resume(run, step_outputs={"fails-at-once": {"order": 7}}, by=corrector)
    given = StepAttempt.objects.get(workflow_run=run, resume_generation=1)
    assert (given.kind, given.child_workflow_run_id) == ("workflow", None)
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"child": {"order": 7}})
    assert list(WorkflowRun.objects.filter(parent_step_attempt__workflow_run=run)) == [child]
    child.refresh_from_db()
    assert child.status == "failed"  # untouched


def test_a_given_output_is_superseded_by_a_later_rerun_like_any_result(corrector):
    run = declined()
    WorkflowRun.objects.resume(run, step_outputs={"charge-card": {"card": "x"}}, by=corrector)
    drain()
    WorkflowRun.objects.rerun(run, from_step="charge-card")
    drain()
    run.refresh_from_db()
    assert run.status == "failed"  # the card is still declined: the step ran again
    assert effects(run, "charge-card") == 2


# --- bad values: refused before the lock, nothing changes ---------------------------------


@pytest.mark.parametrize(
    ("kwargs", "kind", "message"),
    [
        (
            {"input": {1, 2}},
            TypeError,
            "input of run {run} is not a JSON value: $ is a builtins.set ({{1, 2}})",
        ),
        (
            {"input": {"card": "a\x00b"}},
            TypeError,
            "input of run {run} is not a JSON value: $['card'] contains the character " + NUL,
        ),
        (
            {"step_outputs": {"charge-card": float("nan")}},
            TypeError,
            'output given for step "charge-card" of run {run} is not a JSON value: '
            "$ is nan, which JSON cannot hold",
        ),
        (
            {"step_outputs": [("charge-card", 1)]},
            TypeError,
            "step_outputs of run {run} must be a dict of step names to outputs, "
            "not [('charge-card', 1)]",
        ),
        (
            {"step_outputs": {1: "x"}},
            TypeError,
            "step name in step_outputs of run {run} must be a non-empty string, not 1",
        ),
        (
            {"step_outputs": {"charge\x00card": "x"}},
            ValueError,
            "step name 'charge\\x00card' in step_outputs of run {run} contains the character "
            + NUL,
        ),
        (
            {"expected_generation": "0"},
            TypeError,
            "expected_generation must be an int (a run's resume_generation), not '0'",
        ),
    ],
)
def test_bad_values_are_refused_and_nothing_changes(corrector, kwargs, kind, message):
    run = declined()
    before = snapshot(run)
    with pytest.raises(kind) as info:
        WorkflowRun.objects.resume(run, by=corrector, **kwargs)
    assert str(info.value) == message.format(run=run.pk)
    unchanged(run, before)


def test_a_value_too_large_is_refused(corrector):
    run = declined()
    before = snapshot(run)
    with override_settings(OPENWORKFLOW={"MAX_PAYLOAD_BYTES": 100}):
        with pytest.raises(ValueError) as info:
            WorkflowRun.objects.resume(run, step_outputs={"charge-card": "x" * 200}, by=corrector)
        assert str(info.value) == (
            f'output given for step "charge-card" of run {run.pk} is too large: it is 202 '
            "bytes of JSON, more than OPENWORKFLOW['MAX_PAYLOAD_BYTES'] (100)"
        )
        with pytest.raises(ValueError, match=f"^input of run {run.pk} is too large: it is 202 "):
            WorkflowRun.objects.resume(run, input="x" * 200, by=corrector)
    unchanged(run, before)


def nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


def test_values_whose_record_nests_deeper_than_the_database_stores_are_refused(corrector):
    """The event's details hold a step's output three levels down ({"step_outputs": {step:
    {"new": ...}}}): on MySQL and MariaDB, whose JSON nests at most 30 deep here, a value
    that fits as an output may not fit there. Refused with a ValueError, nothing changed;
    elsewhere stored."""
    run = declined()
    before = snapshot(run)
    if get_store().max_json_depth:
        with pytest.raises(ValueError) as info:  # the database refuses 32 deep
            WorkflowRun.objects.resume(run, step_outputs={"charge-card": nested(29)}, by=corrector)
        assert str(info.value) == (
            f"cannot resume run {run.pk} with these changes: the record of the old and new "
            "values cannot be stored: $ is nested 32 deep; MySQL and MariaDB store JSON "
            "nested at most 30 deep"
        )
        unchanged(run, before)
        WorkflowRun.objects.resume(run, step_outputs={"charge-card": nested(27)}, by=corrector)
    else:
        WorkflowRun.objects.resume(run, step_outputs={"charge-card": nested(29)}, by=corrector)
    drain()
    run.refresh_from_db()
    assert run.status == "completed"


# --- steps that did not fail ------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "reason"),
    [
        ("ship", "it has no failed attempt in generation 0"),  # never reached
        ("reserve", "it has no failed attempt in generation 0"),  # completed
        ("no-such-step", "it has no failed attempt in generation 0"),
    ],
)
def test_an_output_for_a_step_that_did_not_fail_is_a_value_error(corrector, step, reason):
    run = declined()
    before = snapshot(run)
    with pytest.raises(ValueError) as info:
        WorkflowRun.objects.resume(
            run, input={"card": "4242"}, step_outputs={step: 1}, by=corrector
        )
    assert str(info.value) == (
        f'cannot resume run {run.pk} with an output for step "{step}": {reason}; '
        'the steps that failed: "charge-card"'
    )
    unchanged(run, before)


def test_a_step_that_failed_then_completed_takes_no_output(corrector):
    run = run_to_completion(recovers_then_fails)
    assert run.status == "failed"
    before = snapshot(run)
    with pytest.raises(ValueError) as info:
        WorkflowRun.objects.resume(run, step_outputs={"wobbly": "x"}, by=corrector)
    assert str(info.value) == (
        f'cannot resume run {run.pk} with an output for step "wobbly": it completed after it '
        'failed (its stored output is served); the steps that failed: "final"'
    )
    unchanged(run, before)


def test_only_failures_of_the_current_generation_count(corrector):
    run = declined(ship_fails=True)
    WorkflowRun.objects.resume(run, input={"card": "4242", "ship_fails": True}, by=corrector)
    drain()
    run.refresh_from_db()
    assert (run.status, run.resume_generation) == ("failed", 1)  # now at "ship"
    with pytest.raises(ValueError) as info:
        WorkflowRun.objects.resume(run, step_outputs={"charge-card": {}}, by=corrector)
    assert str(info.value) == (
        f'cannot resume run {run.pk} with an output for step "charge-card": it has no failed '
        'attempt in generation 1; the steps that failed: "ship"'
    )
    WorkflowRun.objects.resume(run, step_outputs={"ship": "by hand"}, by=corrector)
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", "by hand")


def test_a_step_already_given_an_output_takes_no_second_one(corrector):
    run = declined(ship_fails=True)
    WorkflowRun.objects.resume(run, step_outputs={"charge-card": {"card": "x"}}, by=corrector)
    drain()
    with pytest.raises(ValueError, match='"charge-card": it has no failed attempt in generation 1'):
        WorkflowRun.objects.resume(run, step_outputs={"charge-card": {"card": "y"}}, by=corrector)


def test_a_run_that_is_not_failed_takes_no_correction(corrector):
    run = run_to_completion(charge_card, {"card": "4242"})
    before = snapshot(run)
    with pytest.raises(InvalidTransition) as info:
        WorkflowRun.objects.resume(run, input={"card": "1"}, by=corrector)
    assert str(info.value) == (
        f"cannot resume run {run.pk}: it is completed; only failed runs can be resumed"
    )
    unchanged(run, before)


def test_an_unknown_run_is_does_not_exist(corrector):
    with pytest.raises(WorkflowRun.DoesNotExist):
        WorkflowRun.objects.resume(uuid.uuid4(), input=1, by=corrector)


# --- who may correct ---------------------------------------------------------------------


def test_a_user_without_correct_workflowrun_is_refused_and_nothing_changes():
    user = create_user("operator", "change_workflowrun")
    run = declined()
    before = snapshot(run)
    for changes in ({"input": {"card": "4242"}}, {"step_outputs": {"charge-card": 1}}):
        with pytest.raises(PermissionDenied) as info:
            WorkflowRun.objects.resume(run, by=user, **changes)
        assert str(info.value) == (
            f"user operator may not resume run {run.pk} with changes: that needs the "
            "permission django_openworkflow.correct_workflowrun"
        )
    unchanged(run, before)
    WorkflowRun.objects.resume(run, by=user, step_outputs={})  # a plain resume needs no more
    run.refresh_from_db()
    assert (run.status, run.events.get().details) == ("pending", None)


@pytest.mark.parametrize("who", ["holder", "superuser", "shell"])
def test_who_may_correct(who):
    by = {
        "holder": lambda: create_user("holder", "correct_workflowrun"),
        "superuser": lambda: create_user("root", superuser=True),
        "shell": lambda: None,
    }[who]()
    run = declined()
    WorkflowRun.objects.resume(run, input={"card": "4242"}, by=by)
    run.refresh_from_db()
    assert (run.status, run.input, run.events.get().by) == ("pending", {"card": "4242"}, by)


def test_an_inactive_user_may_not_correct():
    user = create_user("gone", superuser=True)
    user.is_active = False
    user.save()
    run = declined()
    with pytest.raises(PermissionDenied):
        WorkflowRun.objects.resume(run, input={"card": "4242"}, by=user)


# --- the generation a page showed --------------------------------------------------------


def test_a_stale_expected_generation_is_refused(corrector):
    run = declined()
    WorkflowRun.objects.resume(run)  # someone else resumed it meanwhile ...
    drain()  # ... and it failed again
    run.refresh_from_db()
    assert (run.status, run.resume_generation) == ("failed", 1)
    before = snapshot(run)
    with pytest.raises(InvalidTransition) as info:
        WorkflowRun.objects.resume(run, input={"card": "4242"}, expected_generation=0, by=corrector)
    assert str(info.value) == (
        f"run {run.pk} was resumed or rerun since it was read: it is at generation 1, not 0"
    )
    assert (info.value.reason, info.value.status) == (Refusal.STALE, "failed")
    unchanged(run, before)
    WorkflowRun.objects.resume(run, input={"card": "4242"}, expected_generation=1, by=corrector)
    run.refresh_from_db()
    assert run.resume_generation == 2


# --- records -----------------------------------------------------------------------------


def test_a_correction_by_a_user_is_written_to_the_admin_history(corrector):
    run = declined()
    WorkflowRun.objects.resume(
        run, input={"card": "4242"}, step_outputs={"charge-card": 1}, by=corrector
    )
    [entry] = LogEntry.objects.all()
    assert (entry.user, entry.object_id, entry.action_flag) == (corrector, str(run.pk), CHANGE)
    assert entry.get_change_message() == 'Resumed with changes: input, step "charge-card"'
    assert entry.content_type.model_class() is WorkflowRun


def test_no_admin_history_without_a_user_or_a_change(corrector):
    WorkflowRun.objects.resume(declined(), input={"card": "4242"})  # the shell
    WorkflowRun.objects.resume(declined(), by=corrector)  # a plain resume: the caller logs it
    assert not LogEntry.objects.exists()


@pytest.mark.django_db(databases=["default", "workflows"])
def test_the_admin_history_on_another_database_is_written_after_the_commit(
    django_capture_on_commit_callbacks,
):
    """The engine on "workflows", the admin's LogEntry on "default" (the router sends it
    there): the entry is written once the correction has committed on "workflows"."""
    from django.conf import settings

    with override_settings(
        OPENWORKFLOW={**settings.OPENWORKFLOW, "DATABASE": "workflows"},
        DATABASE_ROUTERS=["django_openworkflow.routers.WorkflowRouter"],
    ):
        corrector = create_user("corrector", "correct_workflowrun")
        run = declined()
        assert run._state.db == "workflows"
        with django_capture_on_commit_callbacks(using="workflows", execute=True):
            WorkflowRun.objects.resume(run, input={"card": "4242"}, by=corrector)
            assert not LogEntry.objects.using("default").exists()  # not before the commit
        [entry] = LogEntry.objects.using("default").all()
        assert (entry.object_id, entry.change_message) == (
            str(run.pk),
            "Resumed with changes: input",
        )
        assert not WorkflowRun.objects.using("default").exists()


def test_run_resumed_is_sent_after_the_commit(corrector, django_capture_on_commit_callbacks):
    received = []

    def receiver(sender, run, by, **kwargs):
        received.append((run.pk, by, run.input))

    run = declined()
    run_resumed.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            WorkflowRun.objects.resume(run, input={"card": "1"}, by=corrector)
            assert received == []
    finally:
        run_resumed.disconnect(receiver)
    assert received == [(run.pk, corrector, {"card": "1"})]


@pytest.mark.parametrize(
    "fault",
    [
        RuntimeError("the admin history is down"),
        KeyboardInterrupt(),  # a BaseException: the transaction rolls back all the same
        OperationalError("server closed the connection unexpectedly"),  # a lost connection
    ],
    ids=["exception", "base-exception", "lost-connection"],
)
def test_a_failure_inside_the_transaction_changes_nothing(corrector, monkeypatch, fault):
    """The last write of the transaction (the admin history) fails: everything before it
    (the run, the event, the given attempt) is rolled back with it."""
    run = declined()
    before = snapshot(run)

    def broken(*args, **kwargs):
        raise fault

    monkeypatch.setattr("django_openworkflow.managers.log_run_change", broken)
    with pytest.raises(type(fault)):
        WorkflowRun.objects.resume(
            run, input={"card": "4242"}, step_outputs={"charge-card": 1}, by=corrector
        )
    unchanged(run, before)


def test_the_pages_say_why_a_stale_change_was_refused():
    assert refusal_text(Refusal.STALE, "failed") == "it was resumed or rerun since it was shown"


def test_the_sentinel_reads_as_not_given():
    assert repr(NOT_GIVEN) == "NOT_GIVEN"
    assert type(NOT_GIVEN)() is NOT_GIVEN


# --- two corrections at once (PostgreSQL, MariaDB: row locks) ----------------------------


@pytest.mark.row_locks
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("expected", "refused"),
    [
        (0, "run {run} was resumed or rerun since it was read: it is at generation 1, not 0"),
        (None, "cannot resume run {run}: it is pending; only failed runs can be resumed"),
    ],
)
def test_two_corrections_at_once_exactly_one_wins(expected, refused):
    corrector = create_user("corrector", "correct_workflowrun")
    run = declined()

    def correct(output):
        return lambda: WorkflowRun.objects.resume(
            run, step_outputs={"charge-card": output}, expected_generation=expected, by=corrector
        )

    first, second = Backend(correct("first")), Backend(correct("second"))
    with pause_at("resume.locked", when=lambda c: c["run_id"] == run.pk) as pause:
        first.start()
        pause.wait()  # the first holds the row lock and has decided nothing yet
        second.start()
        assert blocked_on_a_lock(second)  # waits for the lock, not on a stale read
    first.finish()
    second.join(15)
    assert isinstance(second.error, InvalidTransition)
    assert str(second.error) == refused.format(run=run.pk)
    given = StepAttempt.objects.filter(workflow_run=run, given_in__isnull=False)
    assert [a.output for a in given] == ["first"]
    assert run.events.count() == 1
    assert LogEntry.objects.count() == 1


def test_the_steps_a_correction_may_give_an_output_to():
    run = declined(ship_fails=True)
    [failure] = StepAttempt.objects.filter(workflow_run=run, status="failed")
    assert run.correctable_steps() == {"charge-card": failure}
    assert run.correctable_steps()["charge-card"].error["message"] == "card declined was declined"
    run = WorkflowRun.objects.resume(run, input={"card": "4242", "ship_fails": True})
    assert run.correctable_steps() == {}  # nothing failed in the new generation yet
    drain()
    run.refresh_from_db()
    assert list(run.correctable_steps()) == ["ship"]
    assert run_to_completion(recovers_then_fails).correctable_steps().keys() == {"final"}
    assert run_to_completion(charge_card, {"card": "4242"}).correctable_steps() == {}
