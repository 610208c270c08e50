"""``manage.py purge_workflow_runs``: delete finished runs older than their retention."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...conf import app_settings
from ...progress import Progress, plural
from ...retention import BATCH_SIZE, FINISHED, Purge, Purged
from ..workers import duration, positive_int


class Command(BaseCommand):
    help = (
        "Delete finished workflow runs older than their retention, with their step attempts, "
        "events and the signals they received. A family (a run and its child runs) goes whole "
        "or not at all."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            type=duration,
            default=None,
            metavar="DURATION",
            help='Delete runs that finished longer ago than this ("30d", "12h", seconds), '
            "whatever their status. Default: OPENWORKFLOW['RETENTION'], per status.",
        )
        parser.add_argument(
            "--status",
            action="append",
            choices=FINISHED,
            default=None,
            help="Only families whose runs all have one of these statuses (repeat it for "
            "several). Default: every status the retention names.",
        )
        parser.add_argument(
            "--namespace",
            default=None,
            help="Purge the runs of this namespace. Default: OPENWORKFLOW['NAMESPACE'] "
            f"({app_settings.NAMESPACE!r}).",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would be deleted; delete nothing."
        )
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            default=BATCH_SIZE,
            help=f"Families deleted in one transaction. Default: {BATCH_SIZE}.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        limits = self.limits(options["older_than"], options["status"])
        dry_run = options["dry_run"]
        progress = Progress(self.stderr, "purge", unit="families", verbosity=options["verbosity"])

        def show(looked_at: int, purged: Purged) -> None:
            verb = "would delete" if dry_run else "deleted"
            counts = f"{plural(purged.runs, 'run')}, {plural(purged.attempts, 'step attempt')}"
            progress.update(looked_at, f"{verb} {counts}")

        pass_ = Purge(
            limits,
            namespace=options["namespace"],
            batch_size=options["batch_size"],
            dry_run=dry_run,
            progress=show if progress.enabled else None,
        )
        with progress:
            if progress.enabled:
                progress.total = pass_.candidates()
            purged = pass_.run()
        self.stdout.write(f"{'would delete' if options['dry_run'] else 'deleted'} {purged}")

    def limits(self, older_than: timedelta | None, statuses: list[str] | None) -> dict[str, Any]:
        """Status -> age: the options win over ``OPENWORKFLOW["RETENTION"]``."""
        if older_than is not None:
            return {status: older_than for status in statuses or FINISHED}
        try:
            retention = app_settings.RETENTION
        except ValueError as exc:
            raise CommandError(f"{exc} (check E014); or pass --older-than") from None
        if retention is None:
            raise CommandError(
                "Nothing to purge by: OPENWORKFLOW['RETENTION'] is not set. Pass --older-than "
                '(e.g. --older-than 30d) or set OPENWORKFLOW["RETENTION"].'
            )
        missing = [status for status in statuses or () if status not in retention]
        if missing:
            raise CommandError(
                f"OPENWORKFLOW['RETENTION'] names no retention for {', '.join(missing)} runs: "
                "pass --older-than or add them to it."
            )
        return {s: age for s, age in retention.items() if statuses is None or s in statuses}
