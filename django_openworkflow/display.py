"""How runs are shown: errors, durations, step statuses, timelines and refusals.

One home for the admin and the pages (and the template filters), so a stored
error or an interrupted attempt reads the same wherever it appears. Plain
strings and dicts only: templates and ``format_html`` escape them.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.utils.translation import gettext as _

from .exceptions import Refusal

if TYPE_CHECKING:
    from .models import StepAttempt, WorkflowRun

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
    run: WorkflowRun, attempts: list[StepAttempt], *, now: datetime
) -> list[dict[str, Any]]:
    """Lay the step attempts out on the run's span, grouped by resume generation.

    Each attempt gets ``bar_left`` and ``bar_width``: percentages of the span
    from the run's creation to its end (now, while it is active); ``number``
    counts the attempts at the same step within a generation; ``elapsed``,
    ``error_parts``, ``status_key`` and ``status_label`` are what the page shows.
    """
    active = not run.is_finished

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
        group = generations.setdefault(
            attempt.resume_generation,
            {"number": attempt.resume_generation, "attempts": []},
        )
        group["attempts"].append(attempt)
    for group in generations.values():
        group["current"] = group["number"] == run.resume_generation
    return [generations[number] for number in sorted(generations)]


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
    if status is None:
        return _("it no longer exists")
    return _("it is %(status)s") % {"status": WorkflowRun.Status(status).label}
