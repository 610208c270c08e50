"""How runs are shown: errors, durations, step statuses, timelines and refusals.

One home for the admin and the pages (and the template filters), so a stored
error or an interrupted attempt reads the same wherever it appears. Plain
strings and dicts only: templates and ``format_html`` escape them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.utils import dateformat, timezone
from django.utils.translation import gettext as _

from .exceptions import Refusal

if TYPE_CHECKING:
    from .models import StepAttempt, WorkflowRun, WorkflowRunEvent

INTERRUPTED = "interrupted"  # the status shown for an attempt left running on a finished run


# --- stored errors -------------------------------------------------------------


def error_parts(error: Any) -> dict[str, str] | None:
    """Split a stored error into type, message and traceback (each a string), or None."""
    if error is None:
        return None
    if not isinstance(error, dict):
        return {"type": "", "message": str(error), "traceback": ""}
    traceback = error.get("traceback") or ""
    if isinstance(traceback, list):
        traceback = "".join(str(line) for line in traceback)
    return {
        "type": str(error.get("type") or ""),
        "message": str(error.get("message") or ""),
        "traceback": str(traceback),
    }


def error_summary(error: Any) -> str:
    """A stored error on one line: ``"Type: message"``, or whichever of the two it has."""
    parts = error_parts(error) if error else None
    if parts is None:
        return ""
    kind, message = parts["type"], parts["message"]
    return f"{kind}: {message}" if kind and message else kind or message


# --- values and durations ------------------------------------------------------


def pretty_json(value: Any) -> str:
    """Stored JSON indented for a ``<pre>`` block."""
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)
    except (TypeError, ValueError):
        return repr(value)


def short_duration(value: timedelta | None) -> str:
    """``timedelta`` as ``"850 ms"``, ``"12.3 s"``, ``"4 min 5 s"`` or ``"2 h 3 min"``."""
    if value is None:
        return ""
    seconds = value.total_seconds()
    if seconds < 1:
        return f"{round(seconds * 1000)} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def duration_of(run: WorkflowRun, *, now: datetime) -> timedelta | None:
    """How long the run's last execution took, or has taken so far."""
    if run.started_at is None:
        return None
    return (run.finished_at or now) - run.started_at


# --- step attempts -------------------------------------------------------------


def attempt_status(attempt: StepAttempt, run: WorkflowRun | None = None) -> tuple[str, str]:
    """The status an attempt is shown with: ``(key, label)``; "interrupted" when it never ended.

    ``key`` names the CSS class (``owf-status-<key>``). Only a running
    attempt reads its run (``attempt.workflow_run`` unless ``run`` is given),
    so a list of attempts costs no query per finished one.
    """
    if attempt.status == attempt.Status.RUNNING and attempt.is_interrupted(
        attempt.workflow_run if run is None else run
    ):
        return INTERRUPTED, _("interrupted")
    return attempt.status, attempt.get_status_display()


def timeline(
    run: WorkflowRun,
    attempts: list[StepAttempt],
    *,
    now: datetime,
    events: Iterable[WorkflowRunEvent] = (),
) -> list[dict[str, Any]]:
    """Lay the step attempts out on the run's span, grouped by resume generation.

    Each attempt gets ``bar_left`` and ``bar_width``: percentages of the span
    from the run's creation to its end (now, while it is active); ``number``
    counts the attempts at the same step within a generation; ``elapsed``,
    ``error_parts``, ``status_key``, ``status_label`` and ``note`` (who gave its
    output, or the rerun that superseded it: ``attempt_note``, from ``events``,
    the run's events) are what the page shows.
    """
    active = not run.is_finished
    events_by_id = {event.pk: event for event in events}

    def end_of(attempt: StepAttempt) -> datetime:
        if attempt.finished_at is not None:
            return attempt.finished_at
        return now if active else max(run.finished_at or now, attempt.started_at)

    start = min([run.created_at, *(a.started_at for a in attempts)])
    ends = [end_of(a) for a in attempts]
    if active:
        ends.append(now)
    elif run.finished_at is not None:
        ends.append(run.finished_at)
    end = max([start, *ends])
    span = max((end - start).total_seconds(), 0.001)

    generations: dict[int, dict[str, Any]] = {}
    numbers: dict[tuple[int, str], int] = {}
    for attempt in attempts:
        key = (attempt.resume_generation, attempt.step_name)
        numbers[key] = numbers.get(key, 0) + 1
        attempt.number = numbers[key]  # type: ignore[attr-defined]
        attempt_end = end_of(attempt)
        left = (attempt.started_at - start).total_seconds() / span * 100
        width = (attempt_end - attempt.started_at).total_seconds() / span * 100
        left = min(max(left, 0.0), 99.5)
        width = min(max(width, 0.5), 100.0 - left)
        attempt.bar_left = left  # type: ignore[attr-defined]
        attempt.bar_width = width  # type: ignore[attr-defined]
        attempt.elapsed = attempt_end - attempt.started_at  # type: ignore[attr-defined]
        attempt.error_parts = error_parts(attempt.error)  # type: ignore[attr-defined]
        status_key, status_label = attempt_status(attempt, run)
        attempt.status_key = status_key  # type: ignore[attr-defined]
        attempt.status_label = status_label  # type: ignore[attr-defined]
        attempt.note = attempt_note(attempt, events_by_id)  # type: ignore[attr-defined]
        group = generations.setdefault(
            attempt.resume_generation,
            {"number": attempt.resume_generation, "attempts": []},
        )
        group["attempts"].append(attempt)
    started_by = generation_starts(events_by_id.values())
    for group in generations.values():
        group["current"] = group["number"] == run.resume_generation
        group["after"] = started_by.get(group["number"], "resume")
    return [generations[number] for number in sorted(generations)]


def generation_starts(events: Iterable[WorkflowRunEvent]) -> dict[int, str]:
    """Which action began each generation after the first: ``{1: "resume", 2: "rerun"}``.

    Each resume and rerun raises the generation by one and is recorded as an
    event, so the k-th of them (in time order) began generation k; a rerun's
    ``details`` also name its generation.
    """
    started: dict[int, str] = {}
    number = 0
    for event in sorted(events, key=lambda e: (e.at, e.pk)):
        if event.action not in ("resume", "rerun"):
            continue
        number += 1
        stated = event.details.get("generation") if isinstance(event.details, dict) else None
        number = stated if isinstance(stated, int) and not isinstance(stated, bool) else number
        started[number] = event.action
    return started


def shown_time(value: datetime) -> str:
    """A moment as the pages show it: ``2026-11-03 14:05:09 UTC`` (the current time zone)."""
    return dateformat.format(timezone.localtime(value), "Y-m-d H:i:s T")


def attempt_note(attempt: StepAttempt, events: Mapping[Any, WorkflowRunEvent] | None = None) -> str:
    """What people did to this attempt, or "": "output given by bob at …" (a resume with
    changes gave its output), "superseded by the rerun at …" (replay no longer serves
    it), or both, joined by "; ".

    The events are looked up in ``events`` (the run's, by id) when given, else
    read through the attempt's foreign keys (select them with the attempts).
    """

    def event_of(event_id: Any, relation: str) -> WorkflowRunEvent | None:
        if events is not None:
            return events.get(event_id)
        return getattr(attempt, relation)  # type: ignore[no-any-return]

    notes = []
    if attempt.given_in_id is not None:
        given = event_of(attempt.given_in_id, "given_in")
        if given is None:
            notes.append(_("output given in a resume with changes"))
        elif given.by_id is None:
            notes.append(_("output given in the shell at %(at)s") % {"at": shown_time(given.at)})
        else:
            notes.append(
                _("output given by %(user)s at %(at)s")
                % {"user": given.by, "at": shown_time(given.at)}
            )
    if attempt.superseded_by_id is not None:
        rerun = event_of(attempt.superseded_by_id, "superseded_by")
        if rerun is None:
            notes.append(_("superseded by a rerun"))
        else:
            notes.append(_("superseded by the rerun at %(at)s") % {"at": shown_time(rerun.at)})
    return "; ".join(notes)


# --- what events changed -------------------------------------------------------

DETAIL_LENGTH = 120  # characters of a value shown in the history


def one_line(value: Any, limit: int = DETAIL_LENGTH) -> str:
    """A JSON value on one line, cut at ``limit`` characters ("…" says it was cut)."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cut(text: str, limit: int = DETAIL_LENGTH) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Change:
    """One value a resume with changes replaced: the input, or a step's error by an output."""

    what: str
    old: str
    new: str


@dataclass(frozen=True)
class EventDetails:
    """An event's ``details`` as the history shows them (plain strings, escaped where shown)."""

    rerun: bool = False
    from_step: str | None = None  # a rerun's step; None: from the start
    generation: int | None = None
    rerun_steps: list[str] = field(default_factory=list)
    canceled_children: list[str] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)

    @property
    def rerun_from(self) -> str:
        if self.from_step is None:
            return _("from the start")
        return _("from step “%(step)s”") % {"step": self.from_step}


def event_details(event: WorkflowRunEvent) -> EventDetails | None:
    """What a rerun or a resume with changes did, read from ``event.details``; None for the
    others. Values are cut to one short line; an unexpected shape is shown as far as it
    goes, never raised."""
    details = event.details if isinstance(event.details, dict) else {}
    if event.action == "rerun":
        from_step = details.get("from_step")
        generation = details.get("generation")
        return EventDetails(
            rerun=True,
            from_step=str(from_step) if from_step is not None else None,
            generation=generation if isinstance(generation, int) else None,
            rerun_steps=[str(name) for name in _list(details.get("rerun_steps"))],
            canceled_children=[
                pk for pk in map(_uuid_text, _list(details.get("canceled_children"))) if pk
            ],
        )
    changes = []
    given_input = details.get("input")
    if isinstance(given_input, dict):
        changes.append(
            Change(_("input"), one_line(given_input.get("old")), one_line(given_input.get("new")))
        )
    outputs = details.get("step_outputs")
    for name, change in outputs.items() if isinstance(outputs, dict) else ():
        change = change if isinstance(change, dict) else {}
        changes.append(
            Change(
                _("step “%(name)s”") % {"name": name},
                _cut(error_summary(change.get("old"))) or "—",
                one_line(change.get("new")),
            )
        )
    return EventDetails(changes=changes) if changes else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _uuid_text(value: Any) -> str | None:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        return None


def history(events: Iterable[WorkflowRunEvent]) -> list[WorkflowRunEvent]:
    """The run's events, each with ``shown``: its ``event_details`` (or None)."""
    shown = list(events)
    for event in shown:
        event.shown = event_details(event)  # type: ignore[attr-defined]
    return shown


# --- refused transitions -------------------------------------------------------


def refusal_text(reason: Refusal | None, status: str | None) -> str:
    """Why a run was not resumed, rerun or canceled, as a clause: "it is completed".

    From ``InvalidTransition.reason`` and ``.status`` (or a run's
    ``resume_refusal()`` / ``rerun_refusal()``), never from the exception's message.
    """
    from .models import WorkflowRun

    if reason is Refusal.DEADLINE:
        return _("its deadline has passed")
    if reason is Refusal.NEW_DEADLINE:
        return _("the new deadline is not in the future")
    if reason is Refusal.STALE:
        return _("it was resumed or rerun since it was shown")
    if reason is Refusal.BUSY:
        return _("it is busy in a step")
    if status is None:
        return _("it no longer exists")
    return _("it is %(status)s") % {"status": WorkflowRun.Status(status).label}
