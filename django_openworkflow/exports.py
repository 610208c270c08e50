"""An exported run: the JSON document ``manage.py export_run`` writes and ``load_run`` reads.

```json
{"format": "django-openworkflow run", "format_version": 1,
 "run": {"id": "…", "namespace": "default", "workflow_name": "charge-order", "version": "2",
         "status": "running", "input": {…}, "output": null, "error": null,
         "resume_generation": 0, "scheduled_at": null, "created_at": "2026-…",
         "subject": {"model": "shop.order", "id": "42"}},
 "attempts": [{"step_name": "load-order", "kind": "run", "atomic": false,
               "status": "completed", "output": {…}, "error": null, "resume_generation": 0,
               "position": 0, "superseded": false, "given": false, "signal": null,
               "child_workflow_run": null, "started_at": "…", "finished_at": "…"}]}
```

Attempts are in the order they were stored (their ids, which are not
exported). Times are ISO 8601. ``load_run`` needs no database: it returns a
``LoadedRun``, which ``to_models()`` turns into unsaved ``WorkflowRun`` and
``StepAttempt`` instances, as the replay check takes them.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from django.apps import apps
from django.contrib.contenttypes.models import ContentType
from django.utils.dateparse import parse_datetime

from .conf import app_settings
from .models import StepAttempt, WorkflowRun

FORMAT = "django-openworkflow run"
FORMAT_VERSION = 1

RUN_FIELDS = ("namespace", "workflow_name", "version", "status", "input", "output", "error")
ATTEMPT_FIELDS = (
    "step_name",
    "kind",
    "atomic",
    "status",
    "output",
    "error",
    "resume_generation",
    "position",
)


# --- export ---------------------------------------------------------------------------


def export_run(run: WorkflowRun, *, using: str | None = None) -> dict[str, Any]:
    """The exported document of ``run`` and its step attempts (a JSON value)."""
    using = using or run._state.db or app_settings.DATABASE
    attempts = StepAttempt.objects.using(using).filter(workflow_run_id=run.pk).order_by("id")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "run": {
            "id": str(run.pk),
            **{field: getattr(run, field) for field in RUN_FIELDS},
            "resume_generation": run.resume_generation,
            "scheduled_at": _time(run.scheduled_at),
            "created_at": _time(run.created_at),
            "subject": _subject(run),
        },
        "attempts": [_attempt(a) for a in attempts],
    }


def _attempt(a: StepAttempt) -> dict[str, Any]:
    child = a.child_workflow_run_id
    return {
        **{field: getattr(a, field) for field in ATTEMPT_FIELDS},
        "superseded": a.superseded_by_id is not None,
        "given": a.given_in_id is not None,
        "signal": a.signal,
        "child_workflow_run": None if child is None else str(child),
        "started_at": _time(a.started_at),
        "finished_at": _time(a.finished_at),
    }


def _subject(run: WorkflowRun) -> dict[str, str] | None:
    """``{"model": "app_label.model", "id": "…"}``; None without one (or its content type)."""
    if run.subject_type_id is None or run.subject_id is None:
        return None
    try:
        content_type = ContentType.objects.get_for_id(run.subject_type_id)
    except ContentType.DoesNotExist:
        return None
    return {"model": f"{content_type.app_label}.{content_type.model}", "id": run.subject_id}


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# --- load -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedAttempt:
    """One step attempt of a ``LoadedRun``, as exported."""

    step_name: str
    kind: str
    atomic: bool
    status: str
    output: Any
    error: Any
    resume_generation: int
    position: int | None
    superseded: bool
    given: bool
    signal: str | None
    child_workflow_run: uuid.UUID | None
    started_at: datetime | None
    finished_at: datetime | None

    def to_model(self, run_id: uuid.UUID) -> StepAttempt:
        """An unsaved ``StepAttempt``. The events behind the superseded and given marks are
        not exported: the id 0 stands for them (``is_served`` asks only whether one is set)."""
        return StepAttempt(
            workflow_run_id=run_id,
            step_name=self.step_name,
            kind=self.kind,
            atomic=self.atomic,
            status=self.status,
            output=self.output,
            error=self.error,
            resume_generation=self.resume_generation,
            position=self.position,
            superseded_by_id=0 if self.superseded else None,
            given_in_id=0 if self.given else None,
            signal=self.signal,
            child_workflow_run_id=self.child_workflow_run,
            finished_at=self.finished_at,
            **_given_times(started_at=self.started_at),
        )


@dataclass(frozen=True)
class LoadedRun:
    """A run read from an exported file (``load_run``); ``source`` names the file."""

    id: uuid.UUID
    namespace: str
    workflow_name: str
    version: str | None
    status: str
    input: Any
    output: Any
    error: Any
    resume_generation: int
    scheduled_at: datetime | None
    created_at: datetime | None
    subject: dict[str, str] | None
    attempts: tuple[LoadedAttempt, ...]
    source: str

    @property
    def pk(self) -> uuid.UUID:
        return self.id

    def __str__(self) -> str:
        return f"{self.workflow_name} {self.id} ({self.status}, from {self.source})"

    def to_models(self) -> tuple[WorkflowRun, list[StepAttempt]]:
        """Unsaved model instances of the run and its attempts (oldest first).

        The subject is looked up by its model and id in the database (the
        test's): ``run.subject`` is that object, or None when its model is
        not installed or its content type is not there. Without a subject
        nothing touches the database.
        """
        run = WorkflowRun(
            id=self.id,
            namespace=self.namespace,
            workflow_name=self.workflow_name,
            version=self.version,
            status=self.status,
            input=self.input,
            output=self.output,
            error=self.error,
            resume_generation=self.resume_generation,
            scheduled_at=self.scheduled_at,
            **_given_times(created_at=self.created_at),
            **_subject_fields(self.subject),
        )
        return run, [a.to_model(self.id) for a in self.attempts]


def _given_times(**times: datetime | None) -> dict[str, datetime]:
    """The times a column with a database default takes only when the file has one."""
    return {name: at for name, at in times.items() if at is not None}


def _subject_fields(subject: dict[str, str] | None) -> dict[str, Any]:
    if subject is None:
        return {}
    app_label, _, model = subject["model"].partition(".")
    try:
        apps.get_model(app_label, model)
        content_type = ContentType.objects.get_by_natural_key(app_label, model)
    except (LookupError, ContentType.DoesNotExist):
        return {}
    return {"subject_type_id": content_type.pk, "subject_id": subject["id"]}


def load_run(path_or_file: str | os.PathLike[str] | IO[str]) -> LoadedRun:
    """Read a run exported by ``manage.py export_run``; ``ValueError`` naming the file and
    the field for anything else."""
    if hasattr(path_or_file, "read"):
        source = str(getattr(path_or_file, "name", "<file>"))
        text = path_or_file.read()
    else:
        source = os.fspath(path_or_file)
        with open(source, encoding="utf-8") as file:
            text = file.read()
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{source}: not JSON ({exc})") from None
    return _Reader(source).run(document)


class _Reader:
    """Checks an exported document field by field; every error names the file and field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, message: str) -> ValueError:
        return ValueError(f"{self.source}: {message}")

    def run(self, document: Any) -> LoadedRun:
        if not isinstance(document, dict) or "format_version" not in document:
            raise self.fail("not a run exported by manage.py export_run (no format_version)")
        version = document["format_version"]
        if version != FORMAT_VERSION or document.get("format") != FORMAT:
            raise self.fail(
                f"format_version {version!r} is not one this version of django-openworkflow "
                f"reads ({FORMAT_VERSION}); export the run again with manage.py export_run"
            )
        run = self.mapping(document.get("run"), "run")
        attempts = document.get("attempts")
        if not isinstance(attempts, list):
            raise self.fail(f"attempts must be a list, not {attempts!r}")
        run_id = self.uuid(run, "id", "run")
        assert run_id is not None  # required
        return LoadedRun(
            id=run_id,
            namespace=self.text(run, "namespace", "run"),
            workflow_name=self.text(run, "workflow_name", "run"),
            version=self.text(run, "version", "run", null=True),
            status=self.choice(run, "status", "run", WorkflowRun.Status.values),
            input=run.get("input"),
            output=run.get("output"),
            error=run.get("error"),
            resume_generation=self.number(run, "resume_generation", "run"),
            scheduled_at=self.time(run, "scheduled_at", "run"),
            created_at=self.time(run, "created_at", "run"),
            subject=self.subject(run.get("subject")),
            attempts=tuple(self.attempt(a, f"attempts[{i}]") for i, a in enumerate(attempts)),
            source=self.source,
        )

    def attempt(self, value: Any, where: str) -> LoadedAttempt:
        a = self.mapping(value, where)
        return LoadedAttempt(
            step_name=self.text(a, "step_name", where),
            kind=self.choice(a, "kind", where, StepAttempt.Kind.values),
            atomic=self.flag(a, "atomic", where),
            status=self.choice(a, "status", where, StepAttempt.Status.values),
            output=a.get("output"),
            error=a.get("error"),
            resume_generation=self.number(a, "resume_generation", where),
            position=self.number(a, "position", where, null=True),
            superseded=self.flag(a, "superseded", where),
            given=self.flag(a, "given", where),
            signal=self.text(a, "signal", where, null=True),
            child_workflow_run=self.uuid(a, "child_workflow_run", where, null=True),
            started_at=self.time(a, "started_at", where),
            finished_at=self.time(a, "finished_at", where),
        )

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"{where} must be an object, not {value!r}")
        return value

    def get(self, data: dict[str, Any], key: str, where: str, kinds: Any, null: bool) -> Any:
        if key not in data:
            raise self.fail(f"{where}.{key} is missing")
        value = data[key]
        if (value is None and not null) or not isinstance(value, kinds):
            raise self.fail(f"{where}.{key} must be {kinds_text(kinds, null)}, not {value!r}")
        return value

    def text(self, data: dict[str, Any], key: str, where: str, *, null: bool = False) -> Any:
        return self.get(data, key, where, (str, type(None)), null)

    def flag(self, data: dict[str, Any], key: str, where: str) -> bool:
        return bool(self.get(data, key, where, bool, False))

    def number(self, data: dict[str, Any], key: str, where: str, *, null: bool = False) -> Any:
        value = self.get(data, key, where, (int, type(None)), null)
        if isinstance(value, bool) or (value is not None and value < 0):
            raise self.fail(f"{where}.{key} must be a whole number of 0 or more, not {value!r}")
        return value

    def choice(self, data: dict[str, Any], key: str, where: str, values: list[str]) -> str:
        value = self.text(data, key, where)
        if value not in values:
            raise self.fail(f"{where}.{key} must be one of {', '.join(values)}, not {value!r}")
        return str(value)

    def uuid(
        self, data: dict[str, Any], key: str, where: str, *, null: bool = False
    ) -> uuid.UUID | None:
        value = self.text(data, key, where, null=null)
        if value is None:
            return None
        try:
            return uuid.UUID(value)
        except ValueError:
            raise self.fail(f"{where}.{key} must be a run id (a UUID), not {value!r}") from None

    def time(self, data: dict[str, Any], key: str, where: str) -> datetime | None:
        value = self.text(data, key, where, null=True)
        if value is None:
            return None
        try:
            parsed = parse_datetime(value)
        except ValueError:
            parsed = None
        if parsed is None:
            raise self.fail(f"{where}.{key} must be an ISO 8601 time, not {value!r}")
        return parsed

    def subject(self, value: Any) -> dict[str, str] | None:
        if value is None:
            return None
        subject = self.mapping(value, "run.subject")
        model = self.text(subject, "model", "run.subject")
        if model.count(".") != 1:
            raise self.fail(f'run.subject.model must be "app_label.model", not {model!r}')
        return {"model": model, "id": self.text(subject, "id", "run.subject")}


def kinds_text(kinds: Any, null: bool) -> str:
    names = {str: "a string", int: "a whole number", bool: "true or false"}
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    text = " or ".join(names[k] for k in kinds if k is not type(None))
    return text + (" or null" if null else "")
