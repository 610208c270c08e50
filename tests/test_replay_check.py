"""The in-flight replay check: ``replay.replay_run``, ``manage.py check_inflight_runs`` and
``testing.assert_replays`` on runs of the test database.

A changed deploy is simulated by registering another function under the
workflow's name (``deployed()``); its step functions must never be called.
"""

from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from django_openworkflow import send_signal
from django_openworkflow.engine import StepApi
from django_openworkflow.engine.steps import Steps
from django_openworkflow.engine.waits import Waits
from django_openworkflow.inflight import check_inflight
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.registry import Workflow, _registry
from django_openworkflow.replay import Finding, ReplaySteps, ReplayWaits, replay_run
from django_openworkflow.testing import assert_replays, drain
from tests.test_progress import TTY
from tests.testapp.models import SideEffect
from tests.testapp.replaying import (
    OBSERVED,
    end,
    replay_context,
    replay_everything,
    replay_order,
    replay_resumed,
    replay_retried,
    replay_versioned,
)

pytestmark = pytest.mark.django_db


def never():
    raise AssertionError("the replay check called a step function")


@contextmanager
def deployed(name: str, fn):
    """The code now deployed: ``fn`` registered as workflow ``name`` (a changed file)."""
    old = _registry[name]
    _registry[name] = Workflow(fn, name=name, version=old.version)
    try:
        yield
    finally:
        _registry[name] = old


@contextmanager
def unregistered(name: str):
    old = _registry.pop(name)
    try:
        yield
    finally:
        _registry[name] = old


def started(workflow, input=None, *, time_travel="sleeps", **fields) -> WorkflowRun:
    """A run of ``workflow`` driven as far as it goes (sleeps skipped): active, its steps
    stored. ``fields`` are set on the run before it is executed."""
    run = workflow.start(input)
    if fields:
        WorkflowRun.objects.filter(pk=run.pk).update(**fields)
    drain(time_travel=time_travel)
    run.refresh_from_db()
    return run


def replayed(run: WorkflowRun) -> Finding | None:
    return replay_run(run, StepAttempt.objects.filter(workflow_run=run).order_by("id"))


@pytest.fixture
def order():
    run = started(replay_order)
    assert run.waiting_for().signal == f"end:{run.pk}"
    return run


@pytest.fixture
def effects():
    """Asserts, at the end of the test, that no step function ran after the setup."""
    counted = {}

    def setup_done():
        counted["before"] = SideEffect.objects.count()

    yield setup_done
    if "before" in counted:
        assert SideEffect.objects.count() == counted["before"]


# --- runs the code still replays -------------------------------------------------------


def test_a_run_the_code_replays_has_no_finding(order, effects):
    effects()
    assert replayed(order) is None


def test_every_kind_of_step_replays_the_value_the_worker_saw(effects):
    run = started(replay_everything)
    send_signal(f"go:{run.pk}", {"ok": True})
    drain(time_travel="sleeps")
    run.refresh_from_db()
    assert run.waiting_for().signal == f"end:{run.pk}"
    worker_saw = OBSERVED[-1]
    assert worker_saw == [1, 2, ["L", "R"], None, {"x": 1}, [], {"data": {"ok": True}}, "done"]
    assert StepAttempt.objects.filter(workflow_run=run, step_name="tick:1").exists()
    effects()
    OBSERVED.clear()

    assert replayed(run) is None
    assert [worker_saw] == OBSERVED


def test_a_run_standing_at_each_kind_of_open_step_replays(effects):
    """Stopped at a sleep, a child run, a signal wait and a parallel step with one result:
    each open step is where the replay ends."""
    sleeping = replay_everything.start()
    drain(time_travel=False)
    sleeping.refresh_from_db()
    assert sleeping.waiting_for().kind == "sleep"
    waiting_for_go = started(replay_everything)
    assert waiting_for_go.waiting_for().signal == f"go:{waiting_for_go.pk}"
    half_done = started(replay_everything)  # then its worker died while "right" ran:
    right = StepAttempt.objects.get(workflow_run=half_done, step_name="right")
    StepAttempt.objects.filter(workflow_run=half_done, id__gt=right.id).delete()
    StepAttempt.objects.filter(pk=right.pk).update(status="running", output=None)
    effects()
    for run in (sleeping, waiting_for_go, half_done):
        run.refresh_from_db()
        assert replayed(run) is None, run


def test_a_run_that_branches_on_its_version_replays_under_both_versions(effects):
    old = started(replay_versioned, version="1")
    new = started(replay_versioned)
    assert list(old.step_attempts.values_list("step_name", flat=True)) == [
        "load",
        "charge",
        f"end:{old.pk}",
    ]
    assert new.version == "2"
    effects()
    assert replayed(old) is None
    assert replayed(new) is None

    def without_the_branch(ctx):
        ctx.step.run("load", never)
        ctx.step.run("charge-3ds", never)
        end(ctx)

    with deployed("replay-versioned", without_the_branch):
        assert replayed(new) is None
        assert replayed(old).kind == "renamed"


def test_a_run_resumed_twice_replays_its_three_generations(effects):
    run = started(replay_resumed)
    for _ in range(2):
        assert run.status == "failed"
        WorkflowRun.objects.resume(run)
        drain()
        run.refresh_from_db()
    assert run.status == "pending"
    assert run.resume_generation == 2
    assert list(run.step_attempts.values_list("step_name", "resume_generation", "status")) == [
        ("a", 0, "completed"),
        ("b", 0, "failed"),
        ("b", 1, "failed"),
        ("b", 2, "completed"),
        (f"end:{run.pk}", 2, "running"),
    ]
    effects()
    assert replayed(run) is None

    def b_removed(ctx):
        ctx.step.run("a", never)
        end(ctx)

    with deployed("replay-resumed", b_removed):
        assert replayed(run).message == (
            f'run {run.pk} (replay-resumed): step call #2 asks for "end:{run.pk}", where the '
            f'stored history has "b": the code no longer calls "b" there (removed)'
        )


def test_a_run_never_started_replays():
    run = replay_order.start()
    assert replayed(run) is None


def test_the_replay_sees_the_context_the_worker_saw(effects):
    """The same WorkflowContext and StepApi, with the same input, run id, version, schedule
    tick (and whatever else the worker's context offers)."""
    tick = WorkflowRun.objects.values_list("created_at", flat=True).first()
    run = started(replay_context, {"n": 1}, scheduled_at=tick, version="7")
    worker_saw = OBSERVED[-1]
    effects()
    OBSERVED.clear()
    assert replayed(run) is None
    [replay_saw] = OBSERVED
    assert replay_saw == worker_saw
    assert replay_saw["step"] is StepApi
    assert (replay_saw["input"], replay_saw["run_id"], replay_saw["version"]) == (
        {"n": 1},
        run.pk,
        "7",
    )
    assert replay_saw["scheduled_at"] == tick


# --- runs the code no longer replays ---------------------------------------------------


def test_a_renamed_step(order, effects):
    effects()

    def renamed(ctx):
        ctx.step.run("load", never)
        ctx.step.run("charge-card", never)
        ctx.step.run("ship", never)
        end(ctx)

    with deployed("replay-order", renamed):
        assert replayed(order) == Finding(
            run=str(order.pk),
            workflow="replay-order",
            version=None,
            kind="renamed",
            position=1,
            stored_step="charge",
            asked_for="charge-card",
            message=f'run {order.pk} (replay-order): step call #2 asks for "charge-card", '
            'where the stored history has "charge": the history has no step "charge-card" '
            "(renamed)",
        )


def test_a_removed_step(order, effects):
    effects()

    def removed(ctx):
        ctx.step.run("load", never)
        ctx.step.run("ship", never)
        end(ctx)

    with deployed("replay-order", removed):
        finding = replayed(order)
    assert (finding.kind, finding.position, finding.stored_step, finding.asked_for) == (
        "removed",
        1,
        "charge",
        "ship",
    )
    assert finding.message == (
        f'run {order.pk} (replay-order): step call #2 asks for "ship", where the stored '
        'history has "charge": the code no longer calls "charge" there (removed)'
    )


def test_two_steps_swapped(order, effects):
    effects()

    def swapped(ctx):
        ctx.step.run("load", never)
        ctx.step.run("ship", never)
        ctx.step.run("charge", never)
        end(ctx)

    with deployed("replay-order", swapped):
        finding = replayed(order)
    assert (finding.kind, finding.position, finding.stored_step, finding.asked_for) == (
        "reordered",
        1,
        "charge",
        "ship",
    )
    assert finding.message == (
        f'run {order.pk} (replay-order): step call #2 asks for "ship", where the stored '
        'history has "charge": "charge" comes later now (reordered)'
    )


def test_a_new_step_before_stored_ones(order, effects):
    effects()

    def inserted(ctx):
        ctx.step.run("load", never)
        fraud = ctx.step.run("fraud-check", never)  # no stored result: None in the survey
        if fraud is not None:
            raise AssertionError("unreachable")
        ctx.step.run("charge", never)
        ctx.step.run("ship", never)
        end(ctx)

    with deployed("replay-order", inserted):
        finding = replayed(order)
    assert (finding.kind, finding.stored_step, finding.asked_for) == (
        "reordered",
        "charge",
        "fraud-check",
    )
    assert finding.message.endswith(
        'step call #2 asks for "fraud-check", where the stored history has "charge": '
        '"charge" comes later now (reordered)'
    )


def test_code_that_returns_before_its_stored_steps(order, effects):
    effects()

    def returns_early(ctx):
        ctx.step.run("load", never)
        return "done"

    with deployed("replay-order", returns_early):
        assert replayed(order) == Finding(
            run=str(order.pk),
            workflow="replay-order",
            version=None,
            kind="not-reached",
            position=1,
            stored_step="charge",
            asked_for=None,
            message=f"run {order.pk} (replay-order): the workflow function returned after 1 "
            'step call, before reaching stored step "charge" (step call #2)',
        )


def test_code_that_raises_before_its_stored_steps(order, effects):
    effects()

    def raises(ctx):
        ctx.step.run("load", never)
        return ctx.input["coupon"]

    with deployed("replay-order", raises):
        finding = replayed(order)
    assert (finding.kind, finding.position, finding.stored_step, finding.asked_for) == (
        "not-reached",
        1,
        "charge",
        None,
    )
    assert finding.message == (
        f"run {order.pk} (replay-order): the workflow function raised after 1 step call, "
        "before reaching stored step \"charge\" (step call #2): TypeError: 'NoneType' object "
        "is not subscriptable"
    )


def test_a_body_that_raises_after_its_stored_steps(effects):
    """Parked for a workflow retry: the replay raises again, as the retry will."""
    run = started(replay_retried, time_travel=False)
    assert run.waiting_for().kind == "retry"
    effects()
    assert replayed(run) == Finding(
        run=str(run.pk),
        workflow="replay-retried",
        version=None,
        kind="raised",
        position=None,
        stored_step=None,
        asked_for=None,
        message=f"run {run.pk} (replay-retried): the workflow function raised after 1 step "
        "call: ValueError: not yet",
    )


def test_a_workflow_that_is_no_longer_registered(order):
    with unregistered("replay-order"):
        assert replayed(order) == Finding(
            run=str(order.pk),
            workflow="replay-order",
            version=None,
            kind="unregistered",
            position=None,
            stored_step=None,
            asked_for=None,
            message=f'run {order.pk} (replay-order): no workflow "replay-order" is registered '
            "in the code being checked",
        )


def test_the_version_is_named_in_the_finding(effects):
    run = started(replay_everything)
    effects()

    def renamed(ctx):
        ctx.step.run("tock", never)

    with deployed("replay-everything", renamed):
        finding = replayed(run)
    assert finding.version == "2"
    assert finding.message.startswith(f"run {run.pk} (replay-everything, version 2): step call #1")


def test_a_repeated_step_name_that_loses_a_call(effects):
    run = started(replay_everything)
    effects()

    def one_tick(ctx):
        ctx.step.run("tick", never)
        ctx.step.parallel([("left", never), ("right", never)])

    with deployed("replay-everything", one_tick):
        finding = replayed(run)
    assert (finding.kind, finding.position, finding.stored_step, finding.asked_for) == (
        "removed",
        1,
        "tick:1",
        "left",
    )


def test_a_survey_that_never_ends_stops_after_the_attempt_cap(order, effects):
    effects()

    def polls(ctx):
        ctx.step.run("load", never)
        while not ctx.step.run("poll", never):  # None forever in the survey
            pass

    with deployed("replay-order", polls):
        assert replayed(order).kind == "renamed"


def test_code_outside_steps_that_writes_is_refused_and_reported(order, effects):
    effects()
    runs = list(WorkflowRun.objects.values())

    def writes(ctx):
        SideEffect.objects.create(run_id=ctx.run_id, step="outside")
        ctx.step.run("load", never)

    with deployed("replay-order", writes):
        finding = replayed(order)
    assert finding.kind == "not-reached"
    assert finding.message == (
        f"run {order.pk} (replay-order): the workflow function raised after 0 step calls, "
        'before reaching stored step "load" (step call #1): WriteRefused: replaying run '
        f'{order.pk} writes nothing, but INSERT was sent to database "default": code outside '
        "steps must not write"
    )
    assert list(WorkflowRun.objects.values()) == runs


def test_steps_inside_a_transaction_of_the_workflow_are_refused_as_the_worker_does(order):
    def in_a_transaction(ctx):
        with transaction.atomic():
            ctx.step.run("load", never)

    with deployed("replay-order", in_a_transaction):
        finding = replayed(order)
    assert finding.kind == "not-reached"
    assert (
        f'(step call #1): TypeError: step "load" of run {order.pk} was called inside a '
        "transaction.atomic() block of the workflow function"
    ) in finding.message


def test_a_failed_step_of_the_current_generation_must_be_reached():
    run = replay_resumed.start()
    drain()
    run.refresh_from_db()
    WorkflowRun.objects.resume(run)
    run.refresh_from_db()  # pending, generation 1: "b" failed in generation 0 only
    assert replayed(run) is None
    StepAttempt.objects.filter(workflow_run=run, step_name="b").update(resume_generation=1)

    def stops_at_a(ctx):
        ctx.step.run("a", never)

    with deployed("replay-resumed", stops_at_a):
        assert replayed(run).stored_step == "b"


def test_stored_steps_after_the_step_where_the_replay_stops_are_reported(order):
    """Not a history the engine writes: "charge" running with "ship" done after it."""
    StepAttempt.objects.filter(workflow_run=order, step_name="charge").update(status="running")
    finding = replayed(order)
    assert (finding.kind, finding.position, finding.stored_step) == ("not-reached", 2, "ship")
    assert finding.message == (
        f'run {order.pk} (replay-order): the replay stopped at step "charge" (step call #2), '
        'which has no stored result, before reaching stored step "ship" (step call #3)'
    )


# --- the replay mirrors the worker's steps -----------------------------------------------


@pytest.mark.parametrize(
    ("replaying_class", "engine_class"), [(ReplaySteps, Steps), (ReplayWaits, Waits)]
)
def test_the_replay_steps_have_the_signatures_of_the_engines(replaying_class, engine_class):
    public = [
        name
        for name, member in vars(replaying_class).items()
        if callable(member) and not name.startswith("_")
    ]
    assert public
    for name in public:
        assert inspect.signature(getattr(replaying_class, name)) == inspect.signature(
            getattr(engine_class, name)
        ), name


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda ctx: ctx.step.run("load", 42), "step 'load' needs a callable, not 42"),
        (lambda ctx: ctx.step.sleep("nap", "soon"), 'duration of sleep "nap"'),
        (lambda ctx: ctx.step.run_workflow(42), "run_workflow() needs a workflow or its name"),
        (lambda ctx: ctx.step.wait_for_signal("", name="w"), "signal must be a non-empty"),
        (lambda ctx: ctx.step.parallel([("a",)]), "parallel() takes (name, fn) pairs"),
    ],
)
def test_the_replay_checks_step_arguments_as_the_worker_does(order, call, error):
    with deployed("replay-order", call):
        finding = replayed(order)
    assert finding.kind == "not-reached"
    assert error in finding.message


# --- assert_replays on a run of the database ---------------------------------------------


def test_assert_replays_passes_for_a_run_that_replays(order, effects):
    effects()
    assert_replays(order)


def test_assert_replays_fails_with_the_finding(order):
    def renamed(ctx):
        ctx.step.run("load", never)
        ctx.step.run("charge-card", never)

    with deployed("replay-order", renamed), pytest.raises(AssertionError) as failed:
        assert_replays(order)
    assert str(failed.value) == replayed_message(order, renamed)


def replayed_message(run, fn) -> str:
    with deployed(run.workflow_name, fn):
        return replayed(run).message


def test_assert_replays_refuses_anything_else():
    with pytest.raises(TypeError, match="assert_replays\\(\\) takes a WorkflowRun or a LoadedRun"):
        assert_replays("run.json")


# --- manage.py check_inflight_runs -------------------------------------------------------


def check(*args, stderr=None):
    out = StringIO()
    try:
        call_command("check_inflight_runs", *args, stdout=out, stderr=stderr or StringIO())
    except SystemExit as exit:
        return exit.code, out.getvalue()
    return 0, out.getvalue()


def renamed_charge(ctx):
    ctx.step.run("load", never)
    ctx.step.run("charge-card", never)


def test_the_command_exits_0_when_every_active_run_replays(order, effects):
    started(replay_everything)
    effects()
    assert check() == (0, "checked 2 active runs: all replay\n")
    assert check("--json") == (0, json.dumps({"checked": 2, "problems": []}, indent=2) + "\n")


def test_the_command_lists_the_runs_that_would_not_replay_and_exits_1(order, effects):
    started(replay_everything)
    second = started(replay_order)
    effects()
    with deployed("replay-order", renamed_charge):
        text = check()
        code, out = check("--json")
    first, last = sorted([order, second], key=lambda r: r.pk)
    assert text == (
        1,
        f'run {first.pk} (replay-order): step call #2 asks for "charge-card", where the stored '
        'history has "charge": the history has no step "charge-card" (renamed)\n'
        f'run {last.pk} (replay-order): step call #2 asks for "charge-card", where the stored '
        'history has "charge": the history has no step "charge-card" (renamed)\n'
        "checked 3 active runs: 2 would not replay\n",
    )
    assert code == 1
    assert json.loads(out) == {
        "checked": 3,
        "problems": [
            {
                "run": str(run.pk),
                "workflow": "replay-order",
                "version": None,
                "kind": "renamed",
                "position": 1,
                "stored_step": "charge",
                "asked_for": "charge-card",
                "message": f'run {run.pk} (replay-order): step call #2 asks for "charge-card", '
                'where the stored history has "charge": the history has no step "charge-card" '
                "(renamed)",
            }
            for run in (first, last)
        ],
    }
    assert out == json.dumps(json.loads(out), indent=2) + "\n"


def test_the_command_says_one_run(order):
    with unregistered("replay-order"):
        assert check() == (
            1,
            f'run {order.pk} (replay-order): no workflow "replay-order" is registered in the '
            "code being checked\nchecked 1 active run: 1 would not replay\n",
        )


def test_finished_runs_are_not_checked(order):
    WorkflowRun.objects.filter(pk=order.pk).update(status="completed")
    failed = started(replay_resumed)
    assert failed.status == "failed"
    with deployed("replay-order", renamed_charge), deployed("replay-resumed", renamed_charge):
        assert check() == (0, "checked 0 active runs: all replay\n")


def test_the_namespace_and_workflow_filters(order):
    other = started(replay_order)
    WorkflowRun.objects.filter(pk=other.pk).update(namespace="other")
    everything = started(replay_everything)
    with deployed("replay-order", renamed_charge):
        assert check("--namespace", "other")[0] == 1
        assert check("--namespace", "other")[1].endswith(
            "checked 1 active run: 1 would not replay\n"
        )
        assert check("--namespace", "nobody") == (0, "checked 0 active runs: all replay\n")
        assert check("--workflow", "replay-everything") == (
            0,
            "checked 1 active run: all replay\n",
        )
        code, out = check("--workflow", "replay-everything", "--workflow", "replay-order")
    assert code == 1
    assert str(order.pk) in out and str(other.pk) not in out and str(everything.pk) not in out
    assert out.endswith("checked 2 active runs: 1 would not replay\n")


def test_an_empty_namespace_is_refused():
    with pytest.raises(CommandError, match="--namespace must not be empty"):
        call_command("check_inflight_runs", "--namespace", "", stdout=StringIO())


def test_the_command_writes_nothing(order, effects):
    started(replay_everything)
    started(replay_retried, time_travel=False)
    effects()
    runs = list(WorkflowRun.objects.order_by("pk").values())
    attempts = list(StepAttempt.objects.order_by("pk").values())

    def writes(ctx):
        SideEffect.objects.create(run_id=ctx.run_id, step="outside")

    with deployed("replay-order", writes):
        assert check()[0] == 1
    assert check()[0] == 1  # replay-retried raises
    assert list(WorkflowRun.objects.order_by("pk").values()) == runs
    assert list(StepAttempt.objects.order_by("pk").values()) == attempts


def test_runs_are_read_in_batches_with_their_attempts_in_one_query_a_batch():
    runs = [started(replay_order) for _ in range(5)]
    with CaptureQueriesContext(connection) as queries:
        report = check_inflight(batch_size=2)
    assert (report.checked, report.findings) == (5, [])
    reads = [q["sql"] for q in queries.captured_queries]
    of_runs = [sql for sql in reads if "django_openworkflow_workflowrun" in sql]
    of_attempts = [sql for sql in reads if "django_openworkflow_stepattempt" in sql]
    assert (len(of_runs), len(of_attempts)) == (1, 3)
    assert len(runs) == 5


def test_progress_goes_to_stderr_on_a_terminal_only(order):
    started(replay_order)
    terminal = TTY()
    assert check(stderr=terminal) == (0, "checked 2 active runs: all replay\n")
    assert "replay: 2/2 runs (100%)" in terminal.getvalue()
    piped = StringIO()
    check(stderr=piped)
    assert piped.getvalue() == ""


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_too_the_command_writes_nothing():
    """As in production: autocommit, no savepoint around the workflow functions."""
    order = started(replay_order)
    effects = SideEffect.objects.count()
    runs = list(WorkflowRun.objects.order_by("pk").values())

    def writes(ctx):
        ctx.step.run("load", never)
        SideEffect.objects.create(run_id=ctx.run_id, step="outside")

    with deployed("replay-order", writes):
        code, out = check()
    assert code == 1
    assert out == (
        f"run {order.pk} (replay-order): the workflow function raised after 1 step call, "
        'before reaching stored step "charge" (step call #2): WriteRefused: replaying run '
        f'{order.pk} writes nothing, but INSERT was sent to database "default": code outside '
        "steps must not write\nchecked 1 active run: 1 would not replay\n"
    )
    assert SideEffect.objects.count() == effects
    assert list(WorkflowRun.objects.order_by("pk").values()) == runs
