"""``manage.py backfill_schedule NAME --start ISO --end ISO``: start the runs of past ticks.

A thin wrapper of ``WorkflowSchedule.objects.backfill()``: one run per tick
from ``--start`` to ``--end``, both included, skipping the ticks that have a
run already. A time without a UTC offset is read in the schedule's own time
zone, as its cron expression is; one the clocks skip or repeat there is
refused (it would name two instants, or none).
"""

from __future__ import annotations

import argparse
from datetime import datetime
from datetime import timezone as dt_timezone
from typing import Any
from zoneinfo import ZoneInfo

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from ...conf import app_settings
from ...cron import check_cron, check_timezone
from ...models import WorkflowSchedule
from ...progress import Progress, plural


def iso_datetime(value: str) -> datetime:
    """argparse type: an ISO 8601 date or date and time, with or without a UTC offset."""
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an ISO 8601 date or time (2026-11-01, 2026-11-01T02:00, "
            "2026-11-01T02:00+01:00)"
        ) from None


def in_zone(value: datetime, zone: str, option: str) -> datetime:
    """``value`` as is if it has a UTC offset, else read in ``zone``: once, or refused."""
    if timezone.is_aware(value):
        return value
    tz = ZoneInfo(zone)
    first, second = value.replace(tzinfo=tz), value.replace(tzinfo=tz, fold=1)
    if first.utcoffset() == second.utcoffset():
        return first
    shown = value.isoformat()
    if first.astimezone(dt_timezone.utc).astimezone(tz).replace(tzinfo=None) != value:
        raise CommandError(
            f"{option} {shown} does not exist in {zone} (the clocks skip it): "
            "give a UTC offset, e.g. " + second.astimezone(dt_timezone.utc).isoformat()
        )
    raise CommandError(
        f"{option} {shown} happens twice in {zone} (the clocks go back): give a UTC offset, "
        f"{first.isoformat()} for the first or {second.isoformat()} for the second"
    )


class Command(BaseCommand):
    help = (
        "Start one run per tick of a schedule from --start to --end (both included), skipping "
        "the ticks that have a run already. Times without a UTC offset are read in the "
        "schedule's time zone."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The schedule's name.")
        parser.add_argument(
            "--start",
            type=iso_datetime,
            required=True,
            metavar="ISO",
            help="First instant, e.g. 2026-11-01 or 2026-11-01T02:00+01:00.",
        )
        parser.add_argument(
            "--end",
            type=iso_datetime,
            required=True,
            metavar="ISO",
            help="Last instant (a date alone is its midnight).",
        )
        parser.add_argument(
            "--namespace",
            default=None,
            help="The schedule's namespace. Default: OPENWORKFLOW['NAMESPACE'] "
            f"({app_settings.NAMESPACE!r}).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["name"]
        namespace = options["namespace"] or app_settings.NAMESPACE
        schedules = WorkflowSchedule.objects.db_manager(app_settings.DATABASE)
        stored = (
            schedules.filter(namespace=namespace, name=name).values_list("cron", "timezone").first()
        )
        if stored is None:
            raise CommandError(f"no workflow schedule is named {name!r} in namespace {namespace!r}")
        cron, zone = stored
        try:  # stored by hand: check E016 reports it too
            check_cron(cron)
            check_timezone(zone)
        except (TypeError, ValueError) as exc:
            raise CommandError(
                f"schedule {name!r} cannot be backfilled: {exc}; correct it in the admin"
            ) from None
        start = in_zone(options["start"], zone, "--start")
        end = in_zone(options["end"], zone, "--end")
        ticks = 0
        progress = Progress(
            self.stderr, f"backfill {name}", unit="ticks", verbosity=options["verbosity"]
        )

        def tell(done: int, total: int) -> None:
            nonlocal ticks
            ticks = total
            progress.update(done, total=total)

        with progress:
            try:
                runs = schedules.backfill(name, start, end, namespace=namespace, progress=tell)
            except (ValueError, LookupError, WorkflowSchedule.DoesNotExist) as exc:
                raise CommandError(str(exc)) from None
        self.stdout.write(
            f"{plural(ticks, 'tick')} of schedule {name!r} from {start.isoformat()} to "
            f"{end.isoformat()}: {plural(len(runs), 'run')} started, "
            f"{ticks - len(runs)} already had one."
        )
