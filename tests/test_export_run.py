"""``manage.py export_run``, ``testing.load_run`` and ``assert_replays`` of a loaded run: a real
history kept in a file and pinned as a regression test."""

from __future__ import annotations

import json
import uuid
from io import StringIO

import pytest
from django.contrib.contenttypes.models import ContentType
from django.core.management import CommandError, call_command

from django_openworkflow.exports import LoadedAttempt, LoadedRun
from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowRunEvent
from django_openworkflow.testing import assert_replays, load_run
from tests.test_replay_check import deployed, never, replayed, started
from tests.testapp.models import SideEffect
from tests.testapp.replaying import (
    OBSERVED,
    end,
    replay_context,
    replay_everything,
    replay_order,
    replay_resumed,
)


def export(*args: str) -> str:
    out = StringIO()
    call_command("export_run", *args, stdout=out)
    return out.getvalue()


def exported_to(tmp_path, run: WorkflowRun, name: str = "run.json"):
    path = tmp_path / name
    path.write_text(export(str(run.pk), "--indent", "2"))
    return path


def time(value) -> str | None:
    return None if value is None else value.isoformat()


def renamed_charge(ctx):
    ctx.step.run("load", never)
    ctx.step.run("charge-card", never)
    ctx.step.run("ship", never)
    end(ctx)


# --- export_run ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_export_writes_the_run_and_its_attempts_in_id_order():
    run = started(replay_everything, {"order": 42})
    attempts = list(StepAttempt.objects.filter(workflow_run=run).order_by("id"))
    child = attempts[5].child_workflow_run_id
    assert child is not None

    def attempt(a, **fields):
        return {
            "step_name": a.step_name,
            "kind": "run",
            "atomic": False,
            "status": "completed",
            "output": None,
            "error": None,
            "resume_generation": 0,
            "position": attempts.index(a),
            "superseded": False,
            "given": False,
            "signal": None,
            "child_workflow_run": None,
            "started_at": time(a.started_at),
            "finished_at": time(a.finished_at),
            **fields,
        }

    expected = {
        "format": "django-openworkflow run",
        "format_version": 1,
        "run": {
            "id": str(run.pk),
            "namespace": "default",
            "workflow_name": "replay-everything",
            "version": "2",
            "status": "pending",
            "input": {"order": 42},
            "output": None,
            "error": None,
            "resume_generation": 0,
            "scheduled_at": None,
            "created_at": time(run.created_at),
            "subject": None,
        },
        "attempts": [
            attempt(attempts[0], output=1),
            attempt(attempts[1], output=2),
            attempt(attempts[2], output="L"),
            attempt(attempts[3], output="R"),
            attempt(attempts[4], kind="sleep"),
            attempt(attempts[5], kind="workflow", output={"x": 1}, child_workflow_run=str(child)),
            attempt(attempts[6], kind="signal_send", output=[], signal=f"nobody:{run.pk}"),
            attempt(attempts[7], kind="signal_wait", status="running", signal=f"go:{run.pk}"),
        ],
    }
    assert [a["step_name"] for a in expected["attempts"]] == [
        "tick",
        "tick:1",
        "left",
        "right",
        "nap",
        "echo",
        f"nobody:{run.pk}",
        f"go:{run.pk}",
    ]
    assert export(str(run.pk)) == json.dumps(expected) + "\n"
    assert export(str(run.pk), "--indent", "2") == json.dumps(expected, indent=2) + "\n"


@pytest.mark.django_db
def test_export_names_the_subject_by_model_and_id():
    run = replay_order.start()
    effect = SideEffect.objects.create(run_id=run.pk, step="subject")
    content_type = ContentType.objects.get_for_model(SideEffect)
    WorkflowRun.objects.filter(pk=run.pk).update(
        subject_type=content_type, subject_id=str(effect.pk)
    )
    subject = json.loads(export(str(run.pk)))["run"]["subject"]
    assert subject == {"model": "testapp.sideeffect", "id": str(effect.pk)}

    WorkflowRun.objects.filter(pk=run.pk).update(subject_type_id=content_type.pk + 10_000)
    assert json.loads(export(str(run.pk)))["run"]["subject"] is None  # its type is gone


@pytest.mark.django_db
def test_export_marks_superseded_and_given_attempts():
    run = started(replay_order)
    event = WorkflowRunEvent.objects.create(run=run, action="rerun")
    StepAttempt.objects.filter(workflow_run=run, step_name="charge").update(superseded_by=event)
    StepAttempt.objects.filter(workflow_run=run, step_name="ship").update(given_in=event)
    marks = [
        (a["step_name"], a["superseded"], a["given"])
        for a in json.loads(export(str(run.pk)))["attempts"]
    ]
    assert marks == [
        ("load", False, False),
        ("charge", True, False),
        ("ship", False, True),
        (f"end:{run.pk}", False, False),
    ]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("run_id", "message"),
    [
        ("42", "'42' is not a workflow run id (a UUID)"),
        (
            "0190aaaa-bbbb-7ccc-8ddd-eeeeffff0000",
            "no workflow run with id '0190aaaa-bbbb-7ccc-8ddd-eeeeffff0000'",
        ),
    ],
)
def test_export_names_a_bad_or_unknown_id(run_id, message):
    with pytest.raises(CommandError) as refused:
        export(run_id)
    assert str(refused.value) == message


@pytest.mark.django_db
def test_export_refuses_an_indent_below_1():
    run = replay_order.start()
    with pytest.raises(CommandError, match="argument --indent: must be at least 1, not 0"):
        export(str(run.pk), "--indent", "0")


# --- export, load, replay -------------------------------------------------------------------


@pytest.mark.django_db
def test_an_exported_run_loads_back_as_it_was(tmp_path):
    run = started(replay_resumed)
    WorkflowRun.objects.resume(run)
    run.refresh_from_db()
    loaded = load_run(exported_to(tmp_path, run))
    assert isinstance(loaded, LoadedRun)
    assert (loaded.id, loaded.pk, loaded.workflow_name, loaded.status) == (
        run.pk,
        run.pk,
        "replay-resumed",
        "pending",
    )
    assert (loaded.resume_generation, loaded.created_at) == (1, run.created_at)
    assert loaded.source == str(tmp_path / "run.json")
    first = StepAttempt.objects.filter(workflow_run=run).order_by("id").first()
    assert loaded.attempts[0] == LoadedAttempt(
        step_name="a",
        kind="run",
        atomic=False,
        status="completed",
        output=1,
        error=None,
        resume_generation=0,
        position=0,
        superseded=False,
        given=False,
        signal=None,
        child_workflow_run=None,
        started_at=first.started_at,
        finished_at=first.finished_at,
    )
    assert loaded.attempts[1].error["type"] == "ValueError"
    model, attempts = loaded.to_models()
    assert model._state.adding and all(a._state.adding for a in attempts)
    assert [(a.step_name, a.status, a.resume_generation) for a in attempts] == [
        ("a", "completed", 0),
        ("b", "failed", 0),
    ]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "workflow", [replay_order, replay_everything, replay_resumed], ids=lambda w: w.name
)
def test_export_load_and_assert_replays_round_trip(tmp_path, workflow):
    run = started(workflow)
    if run.status == "failed":
        WorkflowRun.objects.resume(run)
    path = exported_to(tmp_path, run)
    effects = SideEffect.objects.count()
    assert_replays(load_run(path))
    with path.open() as file:
        assert_replays(load_run(file))
    assert SideEffect.objects.count() == effects


@pytest.mark.django_db
def test_the_same_history_fails_once_the_code_changes(tmp_path):
    run = started(replay_order)
    loaded = load_run(exported_to(tmp_path, run))
    with deployed("replay-order", renamed_charge), pytest.raises(AssertionError) as failed:
        assert_replays(loaded)
    with deployed("replay-order", renamed_charge):
        assert str(failed.value) == replayed(run).message
    assert str(failed.value) == (
        f'run {run.pk} (replay-order): step call #2 asks for "charge-card", where the stored '
        'history has "charge": the history has no step "charge-card" (renamed)'
    )


@pytest.mark.django_db
def test_a_superseded_attempt_stays_superseded_when_loaded(tmp_path):
    """A rerun from "charge" supersedes it: replay no longer serves it, loaded or not."""
    run = started(replay_order)
    event = WorkflowRunEvent.objects.create(run=run, action="rerun")
    StepAttempt.objects.filter(workflow_run=run, step_name__in=["charge", "ship"]).update(
        superseded_by=event
    )
    StepAttempt.objects.filter(workflow_run=run, step_name=f"end:{run.pk}").delete()
    WorkflowRun.objects.filter(pk=run.pk).update(resume_generation=1)
    run.refresh_from_db()
    loaded = load_run(exported_to(tmp_path, run))
    attempts = loaded.to_models()[1]
    assert [a.superseded_by_id is not None for a in attempts] == [False, True, True]

    def load_only(ctx):
        ctx.step.run("load", never)

    with deployed("replay-order", load_only):
        assert replayed(run) is None
        assert_replays(loaded)  # "charge" is no stored step any more


@pytest.mark.django_db
def test_a_loaded_run_sees_the_context_the_worker_saw(tmp_path):
    """Input, run id, version, schedule tick, and the subject (looked up by model and id)."""
    effect = SideEffect.objects.create(run_id=uuid.uuid4(), step="subject")
    tick = WorkflowRun.objects.values_list("created_at", flat=True).first()
    run = started(
        replay_context,
        {"n": 2},
        version="7",
        scheduled_at=tick,
        subject_type=ContentType.objects.get_for_model(SideEffect),
        subject_id=str(effect.pk),
    )
    worker_saw = OBSERVED[-1]
    loaded = load_run(exported_to(tmp_path, run))
    OBSERVED.clear()
    assert_replays(loaded)
    assert [worker_saw] == OBSERVED


@pytest.mark.django_db
def test_a_loaded_subject_is_the_object_of_that_id_or_none():
    effect = SideEffect.objects.create(run_id=uuid.uuid4(), step="subject")

    def with_subject(model: str) -> WorkflowRun:
        loaded = LoadedRun(**{**LOADED, "subject": {"model": model, "id": str(effect.pk)}})
        return loaded.to_models()[0]

    assert with_subject("testapp.sideeffect").subject == effect
    assert with_subject("testapp.nothing").subject is None  # a model not installed
    assert LoadedRun(**LOADED).to_models()[0].subject is None


# --- load_run without a database -------------------------------------------------------------

RUN_ID = "0190aaaa-bbbb-7ccc-8ddd-eeeeffff0000"
LOADED = {
    "id": uuid.UUID(RUN_ID),
    "namespace": "default",
    "workflow_name": "replay-order",
    "version": None,
    "status": "pending",
    "input": None,
    "output": None,
    "error": None,
    "resume_generation": 0,
    "scheduled_at": None,
    "created_at": None,
    "subject": None,
    "attempts": (),
    "source": "<test>",
}


def document(**changes) -> dict:
    def attempt(name, position, status="completed", output=None, kind="run"):
        return {
            "step_name": name,
            "kind": kind,
            "atomic": False,
            "status": status,
            "output": output,
            "error": None,
            "resume_generation": 0,
            "position": position,
            "superseded": False,
            "given": False,
            "signal": None if kind == "run" else name,
            "child_workflow_run": None,
            "started_at": "2026-11-30T12:00:00+00:00",
            "finished_at": None if status == "running" else "2026-11-30T12:00:01+00:00",
        }

    doc = {
        "format": "django-openworkflow run",
        "format_version": 1,
        "run": {
            "id": RUN_ID,
            "namespace": "default",
            "workflow_name": "replay-order",
            "version": None,
            "status": "pending",
            "input": None,
            "output": None,
            "error": None,
            "resume_generation": 0,
            "scheduled_at": None,
            "created_at": "2026-11-30T12:00:00+00:00",
            "subject": None,
        },
        "attempts": [
            attempt("load", 0, output=1),
            attempt("charge", 1, output=2),
            attempt("ship", 2, output=3),
            attempt(f"end:{RUN_ID}", 3, status="running", kind="signal_wait"),
        ],
    }
    doc.update(changes)
    return doc


def written(tmp_path, doc) -> str:
    path = tmp_path / "order-42.json"
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return str(path)


def test_a_pinned_history_needs_no_database(tmp_path):
    loaded = load_run(written(tmp_path, document()))
    assert_replays(loaded)
    with deployed("replay-order", renamed_charge), pytest.raises(AssertionError) as failed:
        assert_replays(loaded)
    assert str(failed.value) == (
        f'run {RUN_ID} (replay-order): step call #2 asks for "charge-card", where the stored '
        'history has "charge": the history has no step "charge-card" (renamed)'
    )


def test_a_file_object_is_read_too():
    loaded = load_run(StringIO(json.dumps(document())))
    assert loaded.source == "<file>"
    assert [a.step_name for a in loaded.attempts] == ["load", "charge", "ship", f"end:{RUN_ID}"]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            document(format_version=2),
            "format_version 2 is not one this version of django-openworkflow reads (1); "
            "export the run again with manage.py export_run",
        ),
        (
            document(format="something else"),
            "format_version 1 is not one this version of django-openworkflow reads (1); "
            "export the run again with manage.py export_run",
        ),
        ({"run": {}}, "not a run exported by manage.py export_run (no format_version)"),
        ([1, 2], "not a run exported by manage.py export_run (no format_version)"),
        ("{not json", "not JSON (Expecting property name enclosed in double quotes: line 1 "),
        (document(run=None), "run must be an object, not None"),
        (document(attempts={}), "attempts must be a list, not {}"),
    ],
)
def test_a_file_that_is_not_an_exported_run_is_refused(tmp_path, doc, message):
    path = written(tmp_path, doc)
    with pytest.raises(ValueError) as refused:
        load_run(path)
    assert str(refused.value).startswith(f"{path}: {message}")


def changed(path: str, value):
    """The document with one field changed (``"run.id"``, ``"attempts.0.status"``), or
    removed when ``value`` is ``...``."""
    doc = document()
    *parents, last = [int(part) if part.isdigit() else part for part in path.split(".")]
    target = doc
    for part in parents:
        target = target[part]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("run.id", "42", "run.id must be a run id (a UUID), not '42'"),
        ("run.workflow_name", ..., "run.workflow_name is missing"),
        ("run.workflow_name", None, "run.workflow_name must be a string, not None"),
        ("run.version", 2, "run.version must be a string or null, not 2"),
        (
            "run.status",
            "done",
            "run.status must be one of pending, running, completed, failed, canceled, not 'done'",
        ),
        (
            "run.resume_generation",
            -1,
            "run.resume_generation must be a whole number of 0 or more, not -1",
        ),
        (
            "run.resume_generation",
            True,
            "run.resume_generation must be a whole number of 0 or more, not True",
        ),
        ("run.created_at", "yesterday", "run.created_at must be an ISO 8601 time, not 'yesterday'"),
        (
            "run.subject",
            {"model": "order", "id": "1"},
            "run.subject.model must be \"app_label.model\", not 'order'",
        ),
        ("attempts.0", "load", "attempts[0] must be an object, not 'load'"),
        (
            "attempts.1.kind",
            "shell",
            "attempts[1].kind must be one of run, sleep, workflow, "
            "signal_send, signal_wait, not 'shell'",
        ),
        ("attempts.1.atomic", "no", "attempts[1].atomic must be true or false, not 'no'"),
        (
            "attempts.2.position",
            "2",
            "attempts[2].position must be a whole number or null, not '2'",
        ),
        (
            "attempts.2.child_workflow_run",
            "x",
            "attempts[2].child_workflow_run must be a run id (a UUID), not 'x'",
        ),
    ],
)
def test_each_field_is_checked_with_its_name(tmp_path, path, value, message):
    source = written(tmp_path, changed(path, value))
    with pytest.raises(ValueError) as refused:
        load_run(source)
    assert str(refused.value) == f"{source}: {message}"
