"""The in-flight replay check: replay every active run against the code now deployed.

``check_inflight(namespace)`` reads the active runs (pending or running) in
batches, each batch's step attempts in one query, and replays each run
(``replay.replay_run``). Its own statements are reads; the workflow
functions it calls run no step function and may send nothing but reads
(``replay.refusing_writes``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING

from .conf import app_settings
from .models import StepAttempt, WorkflowRun
from .replay import Finding, replay_run

if TYPE_CHECKING:
    from .managers import WorkflowRunQuerySet

BATCH_SIZE = 200


@dataclass
class InflightReport:
    """How many active runs were replayed, and the findings (in run id order)."""

    checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"checked": self.checked, "problems": [f.as_dict() for f in self.findings]}


def active_runs(namespace: str, workflows: Iterable[str] | None = None) -> WorkflowRunQuerySet:
    """The runs the check replays: the namespace's active runs (of ``workflows``), by id."""
    runs = WorkflowRun.objects.using(app_settings.DATABASE).in_namespace(namespace).active()
    if workflows is not None:
        runs = runs.filter(workflow_name__in=list(workflows))
    return runs.order_by("pk")


def check_inflight(
    namespace: str | None = None,
    workflows: Iterable[str] | None = None,
    *,
    batch_size: int = BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> InflightReport:
    """Replay every active run of ``namespace`` (default: the setting); ``progress(checked)``
    after each batch."""
    report = InflightReport()
    runs = active_runs(namespace or app_settings.NAMESPACE, workflows)
    for batch in batches(runs.iterator(chunk_size=batch_size), batch_size):
        history = attempts_of(batch)
        for run in batch:
            finding = replay_run(run, history.get(run.pk, []), using=app_settings.DATABASE)
            if finding is not None:
                report.findings.append(finding)
        report.checked += len(batch)
        if progress is not None:
            progress(report.checked)
    return report


def batches(runs: Iterator[WorkflowRun], size: int) -> Iterator[list[WorkflowRun]]:
    while batch := list(islice(runs, size)):
        yield batch


def attempts_of(runs: list[WorkflowRun]) -> dict[object, list[StepAttempt]]:
    """The step attempts of these runs, oldest first, by run id: one query."""
    by_run: dict[object, list[StepAttempt]] = {}
    attempts = StepAttempt.objects.using(app_settings.DATABASE).filter(
        workflow_run_id__in=[run.pk for run in runs]
    )
    for attempt in attempts.order_by("id"):
        by_run.setdefault(attempt.workflow_run_id, []).append(attempt)
    return by_run
