"""``manage.py export_run RUN_ID > run.json``: a run and its step attempts, as JSON.

The file keeps a real history: ``django_openworkflow.testing.load_run`` reads
it back and ``assert_replays`` checks that the code still replays it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...conf import app_settings
from ...exports import export_run
from ...models import WorkflowRun
from ..workers import positive_int


class Command(BaseCommand):
    help = (
        "Print a workflow run and its step attempts as JSON (the format load_run reads), to pin "
        "a real history as a regression test with django_openworkflow.testing.assert_replays."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("run_id", metavar="RUN_ID", help="The run's id.")
        parser.add_argument(
            "--indent",
            type=positive_int,
            default=None,
            metavar="N",
            help="Indent the JSON by N spaces. Default: one line.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        run_id = options["run_id"]
        try:
            pk = uuid.UUID(run_id)
        except ValueError:
            raise CommandError(f"{run_id!r} is not a workflow run id (a UUID)") from None
        run = WorkflowRun.objects.using(app_settings.DATABASE).filter(pk=pk).first()
        if run is None:
            raise CommandError(f"no workflow run with id {run_id!r}")
        self.stdout.write(json.dumps(export_run(run), indent=options["indent"]))
