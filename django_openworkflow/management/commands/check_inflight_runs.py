"""``manage.py check_inflight_runs``: would the code now deployed replay every active run?

Replays each active run's stored history, running no step function and
writing nothing, and lists each run whose code no longer reaches its stored
steps in the stored order. Exit status 1 when there is any (a gate for CI and
for the deploy pipeline, like ``makemigrations --check``).
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...conf import app_settings
from ...inflight import active_runs, check_inflight
from ...progress import Progress, plural


class Command(BaseCommand):
    help = (
        "Replay every active workflow run's stored history against the code now deployed, "
        "running no step function and writing nothing, and list each run whose code no longer "
        "reaches its stored steps in the stored order (renamed, removed or reordered steps). "
        "Exits 1 when it finds any: run it in CI and before new workers start."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--namespace",
            default=None,
            help=f"The namespace whose runs to check. Default: OPENWORKFLOW['NAMESPACE'] "
            f"({app_settings.NAMESPACE!r}).",
        )
        parser.add_argument(
            "--workflow",
            action="append",
            dest="workflows",
            metavar="NAME",
            help="Only the runs of this workflow (repeatable). Default: every workflow.",
        )
        parser.add_argument(
            "--json", action="store_true", help="Print one JSON object (see docs/deploying.md)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        namespace = options["namespace"]
        if namespace is not None and not namespace:
            raise CommandError("--namespace must not be empty")
        namespace = namespace or app_settings.NAMESPACE
        workflows = options["workflows"]
        progress = Progress(self.stderr, "replay", unit="runs", verbosity=options["verbosity"])
        if progress.enabled:
            progress.update(0, total=active_runs(namespace, workflows).count())
        with progress:
            report = check_inflight(
                namespace, workflows, progress=progress.update if progress.enabled else None
            )
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict(), indent=2))
        else:
            for finding in report.findings:
                self.stdout.write(finding.message)
            checked = f"checked {plural(report.checked, 'active run')}"
            if report.findings:
                self.stdout.write(f"{checked}: {len(report.findings)} would not replay")
            else:
                self.stdout.write(f"{checked}: all replay")
        if report.findings:
            raise SystemExit(1)
