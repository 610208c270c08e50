"""``manage.py check_workflow_runs``: list the runs nothing will ever wake (exit 1 if any)."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from ...conf import app_settings
from ...diagnostics import stuck_runs
from ..workers import seconds


class Command(BaseCommand):
    help = (
        "List stuck workflow runs: parked with nothing to wake them, not woken by a finished "
        "child or a delivered signal, leases expired long ago, unknown workflows. "
        "Exits 1 when it finds any."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--namespace", default=None, help="Only this namespace. Default: every namespace."
        )
        parser.add_argument(
            "--grace",
            type=seconds,
            default=None,
            metavar="SECONDS",
            help="How late a run may be before it counts as stuck. Default: "
            f"OPENWORKFLOW['LEASE_SECONDS'] ({app_settings.LEASE_SECONDS:g}).",
        )
        parser.add_argument("--json", action="store_true", help="Print a JSON list of findings.")

    def handle(self, *args: Any, **options: Any) -> None:
        found = stuck_runs(namespace=options["namespace"], grace=options["grace"])
        if options["json"]:
            self.stdout.write(json.dumps([finding.as_dict() for finding in found], indent=2))
        else:
            for finding in found:
                self.stdout.write(str(finding))
            if found:
                self.stdout.write(f"{len(found)} stuck run{'s' if len(found) != 1 else ''}")
            else:
                self.stdout.write("no stuck runs")
        if found:
            raise SystemExit(1)
