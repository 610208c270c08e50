"""Cron expressions, their time zones and their ticks, through cronsim.

cronsim follows Debian's cron, DST quirks included, and this module keeps
its semantics (docs/schedules.md states them):

- a time that does not exist on the spring-forward day (02:30 in
  Europe/Berlin) fires once, at the first minute after the jump (03:00);
- a time that happens twice on the fall-back day fires once, at its first
  occurrence, unless the hour field is ``*``: then it fires in both.

Ticks are aware datetimes; the database stores them in UTC.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from django.core.exceptions import ValidationError

from .names import check_name
from .serialization import ensure_json

MAX_CRON_LENGTH = 100  # WorkflowSchedule.cron
MAX_SCHEDULE_NAME_LENGTH = 255  # WorkflowSchedule.name and WorkflowRun.schedule_name

# The nicknames of Vixie cron that cronsim leaves to its callers.
NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_A_START = datetime(2000, 1, 1)  # any moment: parsing only


def _expression(cron: str) -> str:
    return NICKNAMES.get(cron.strip().lower(), cron)


def check_cron(cron: Any, of: str = "") -> str:
    """``cron`` if cronsim reads it, else a ``ValueError`` that names it."""
    if not isinstance(cron, str):
        raise TypeError(f"cron expression{of} must be a string, not {cron!r}")
    if len(cron) > MAX_CRON_LENGTH:
        raise ValueError(
            f"cron expression{of} is {len(cron)} characters; at most {MAX_CRON_LENGTH}"
        )
    try:
        CronSim(_expression(cron), _A_START)
    except CronSimError as exc:
        raise ValueError(f"bad cron expression {cron!r}{of}: {exc}") from None
    return cron


def check_timezone(name: Any, of: str = "") -> str:
    """``name`` if it names an IANA time zone ("Europe/Berlin"), else a ``ValueError``."""
    if not isinstance(name, str):
        raise TypeError(f"time zone{of} must be a string, not {name!r}")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}{of}") from None
    return name


def validate_cron(value: Any) -> None:
    """The form validator of ``WorkflowSchedule.cron``."""
    try:
        check_cron(value)
    except (TypeError, ValueError) as exc:
        raise ValidationError(str(exc), code="invalid") from None


def validate_timezone(value: Any) -> None:
    """The form validator of ``WorkflowSchedule.timezone``."""
    try:
        check_timezone(value)
    except (TypeError, ValueError) as exc:
        raise ValidationError(str(exc), code="invalid") from None


def next_tick(cron: str, zone: str, after: datetime) -> datetime:
    """The first tick strictly after ``after`` (seconds are ignored)."""
    return next(CronSim(_expression(cron), after.astimezone(ZoneInfo(zone))))


def latest_tick(cron: str, zone: str, at: datetime) -> datetime:
    """The last tick at or before ``at``: the last one ``ticks_between`` would give.

    cronsim's reverse iteration reads a time of the repeated hour (when the
    clocks go back) as its first occurrence, so its answer can be an hour or
    a day early there; the forward iteration, which knows both occurrences,
    walks on from it.
    """
    start = at.astimezone(ZoneInfo(zone)) + timedelta(microseconds=1)
    tick = next(CronSim(_expression(cron), start, reverse=True))
    for later in CronSim(_expression(cron), tick):
        if later.astimezone(timezone.utc) > at:
            return tick
        tick = later
    raise AssertionError("unreachable: cron ticks never end")  # pragma: no cover


def ticks_between(cron: str, zone: str, start: datetime, end: datetime) -> Iterator[datetime]:
    """Every tick from ``start`` to ``end``, both included, oldest first."""
    first = start.astimezone(ZoneInfo(zone)) - timedelta(microseconds=1)
    for tick in CronSim(_expression(cron), first):
        if tick > end:
            return
        yield tick


@dataclass(frozen=True)
class Schedule:
    """A schedule of a workflow: ``@workflow(schedule=Schedule("*/15 * * * *", ...))``.

    ``input`` is each run's input; ``name`` defaults to the workflow's name
    and must be unique in the namespace; ``timezone`` (an IANA name) defaults
    to ``settings.TIME_ZONE``.
    """

    cron: str
    input: Any = None
    name: str | None = None
    timezone: str | None = None

    def __post_init__(self) -> None:
        of = "" if self.name is None else f' of schedule "{self.name}"'
        check_cron(self.cron, of)
        if self.name is not None:
            check_name(self.name, "schedule name", blank=False, max_length=MAX_SCHEDULE_NAME_LENGTH)
        if self.timezone is not None:
            check_timezone(self.timezone, of)
        ensure_json(self.input, f"input{of or ' of a schedule'}")


def schedules_of(workflow_name: str, value: Any) -> tuple[Schedule, ...]:
    """The schedules ``@workflow(schedule=value)`` declares, each with its name.

    A cron string or a ``Schedule``, or a list of them; one without a name is
    named after the workflow, so at most one of a list may go without.
    """
    if value is None:
        return ()
    items = value if isinstance(value, list | tuple) else [value]
    schedules: list[Schedule] = []
    of = f' of workflow "{workflow_name}"'
    for item in items:
        if isinstance(item, str):
            item = Schedule(check_cron(item, of))
        elif not isinstance(item, Schedule):
            raise TypeError(
                f"schedule{of} must be a cron string, a Schedule or a list of them, not {item!r}"
            )
        if item.name is None:
            item = Schedule(item.cron, input=item.input, name=workflow_name, timezone=item.timezone)
        schedules.append(item)
    names = [schedule.name for schedule in schedules]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(
                f'two schedules{of} are named "{name}": give each schedule of the list its own '
                "name (Schedule(cron, name=...))"
            )
    return tuple(schedules)
