"""Find stuck runs: active runs that nothing will ever wake, and leftovers of finished ones.

A run moves only when a worker claims it, and a worker claims only *due*
runs (``available_at`` in the past). So a run is stuck when its state says
it waits for something that will not come:

``parked-without-wake``
    pending with no ``available_at`` and no open wait. A run parks with
    ``available_at`` NULL only while it waits for a child run or a signal
    without a timeout: a ``running`` attempt of kind ``workflow`` or
    ``signal_wait`` of its current resume generation, with no ``wake_at``.
``child-finished``
    the run waits for a child run (its ``workflow`` attempt is ``running``)
    that has finished or was deleted, but the run is not due within the
    grace: the child's end did not wake it.
``signal-delivered``
    the run's last step is a wait whose signal was delivered (the attempt is
    ``completed``), but the run still sleeps: without a timer, or until the
    wait's timeout later than the grace.
``lease-expired``
    running, and its lease ended more than the grace ago: the worker that
    claimed it is gone and no worker of its namespace took it over (the next
    claim normally does, within a poll interval).
``unknown-workflow``
    a run due (or with an expired lease) for more than the grace whose
    workflow is not registered in this process: no worker knows it.
``step-running-on-finished-run``
    a finished run with a ``running`` step attempt: nothing will finish it.
    (A wait in flight when a run failed stays open on purpose: a resume
    carries it on, so it is not reported.)

The grace (by default ``OPENWORKFLOW["LEASE_SECONDS"]``) keeps runs that
are merely late out of the report: a lease that expired a moment ago, a run
woken a moment ago. A backlog (known runs due a while ago, not yet claimed)
is not reported: any worker of the namespace takes them. One finding per
run, the most specific first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from django.db.models import Exists, F, OuterRef, Q, Subquery

from .conf import app_settings
from .managers import WAIT_KINDS, now_plus
from .models import StepAttempt, WorkflowRun
from .registry import workflow_names

PARKED_WITHOUT_WAKE = "parked-without-wake"
CHILD_FINISHED = "child-finished"
SIGNAL_DELIVERED = "signal-delivered"
LEASE_EXPIRED = "lease-expired"
UNKNOWN_WORKFLOW = "unknown-workflow"
STEP_RUNNING_ON_FINISHED_RUN = "step-running-on-finished-run"

# Most specific first: a run found by an earlier query is not reported again.
REASONS = (
    CHILD_FINISHED,
    SIGNAL_DELIVERED,
    PARKED_WITHOUT_WAKE,
    UNKNOWN_WORKFLOW,
    LEASE_EXPIRED,
    STEP_RUNNING_ON_FINISHED_RUN,
)

WAKE_IT = (
    "make it due (set available_at to now) so a worker replays it, "
    "or cancel it (WorkflowRun.objects.cancel)"
)


@dataclass(frozen=True)
class StuckRun:
    """One finding: which run, why it is stuck (``reason`` is a code), and what to do."""

    run_id: str
    workflow_name: str
    namespace: str
    reason: str
    message: str
    action: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"run {self.run_id} ({self.workflow_name}, namespace {self.namespace}): "
            f"{self.reason}: {self.message}; to do: {self.action}"
        )


def stuck_runs(namespace: str | None = None, grace: float | None = None) -> list[StuckRun]:
    """Every stuck run (of ``namespace``, or of all namespaces), most specific reason first.

    ``grace`` (seconds, default ``LEASE_SECONDS``): how late a run may be
    before it counts as stuck.
    """
    grace = app_settings.LEASE_SECONDS if grace is None else grace
    runs = WorkflowRun.objects.using(app_settings.DATABASE)
    if namespace is not None:
        runs = runs.in_namespace(namespace)
    found: dict[str, StuckRun] = {}
    for finding in [
        *_child_finished(runs, grace),
        *_signal_delivered(runs, grace),
        *_parked_without_wake(runs),
        *_expired_or_unknown(runs, grace),
        *_step_running_on_finished_run(runs),
    ]:
        found.setdefault(finding.run_id, finding)
    return list(found.values())


def _finding(row: dict[str, Any], reason: str, message: str, action: str) -> StuckRun:
    return StuckRun(
        run_id=str(row["run_pk"]),
        workflow_name=row["workflow_name"],
        namespace=row["namespace"],
        reason=reason,
        message=message,
        action=action,
    )


def _current_attempts() -> Any:
    """Attempts of the outer run's current resume generation."""
    return StepAttempt.objects.filter(
        workflow_run=OuterRef("pk"), resume_generation=OuterRef("resume_generation")
    )


def _rows(runs: Any, *extra: str) -> Any:
    return runs.order_by("created_at", "id").values(
        "workflow_name", "namespace", "available_at", *extra, run_pk=F("id")
    )


def _parked_without_wake(runs: Any) -> list[StuckRun]:
    open_wait = _current_attempts().open_waits().filter(wake_at__isnull=True)
    parked = runs.filter(status=WorkflowRun.Status.PENDING, available_at__isnull=True)
    return [
        _finding(
            row,
            PARKED_WITHOUT_WAKE,
            "pending with no available_at and no open wait for a child run or a signal "
            "without timeout: nothing will make it due",
            WAKE_IT,
        )
        for row in _rows(parked.exclude(Exists(open_wait)))
    ]


def _child_finished(runs: Any, grace: float) -> list[StuckRun]:
    waits = (
        StepAttempt.objects.using(runs.db)
        .running()
        .filter(kind=StepAttempt.Kind.WORKFLOW)
        .filter(resume_generation=F("workflow_run__resume_generation"))
        .filter(
            Q(child_workflow_run__isnull=True)
            | Q(child_workflow_run__status__in=WorkflowRun.FINISHED_STATUSES)
        )
        .filter(workflow_run__in=runs.asleep_beyond(grace))
        .order_by("workflow_run__created_at", "id")
        .values(
            "step_name",
            "child_workflow_run_id",
            "child_workflow_run__status",
            run_pk=F("workflow_run_id"),
            workflow_name=F("workflow_run__workflow_name"),
            namespace=F("workflow_run__namespace"),
        )
    )
    findings = []
    for row in waits:
        if row["child_workflow_run_id"] is None:
            child = "was deleted"
        else:
            child = f"{row['child_workflow_run_id']} is {row['child_workflow_run__status']}"
        findings.append(
            _finding(
                row,
                CHILD_FINISHED,
                f'step "{row["step_name"]}" waits for a child run that has ended (child run '
                f"{child}), but the run was not woken",
                "make it due (set available_at to now): its next pass reads the child's end",
            )
        )
    return findings


def _signal_delivered(runs: Any, grace: float) -> list[StuckRun]:
    last = StepAttempt.objects.filter(workflow_run=OuterRef("pk")).order_by("-id")
    candidates = (
        runs.asleep_beyond(grace)
        .annotate(
            last_kind=Subquery(last.values("kind")[:1]),
            last_status=Subquery(last.values("status")[:1]),
            last_generation=Subquery(last.values("resume_generation")[:1]),
            last_wake_at=Subquery(last.values("wake_at")[:1]),
            last_step=Subquery(last.values("step_name")[:1]),
            last_signal=Subquery(last.values("signal")[:1]),
        )
        .filter(
            last_kind=StepAttempt.Kind.SIGNAL_WAIT,
            last_status=StepAttempt.Status.COMPLETED,
            last_generation=F("resume_generation"),
        )
        # Parked until the wait's own timeout (or without a timer): not for a later retry.
        .filter(Q(available_at__isnull=True) | Q(available_at=F("last_wake_at")))
    )
    return [
        _finding(
            row,
            SIGNAL_DELIVERED,
            f'signal "{row["last_signal"]}" was delivered to step "{row["last_step"]}", '
            "but the run was not woken",
            "make it due (set available_at to now): its next pass reads the signal's data",
        )
        for row in _rows(candidates, "last_step", "last_signal")
    ]


def _expired_or_unknown(runs: Any, grace: float) -> list[StuckRun]:
    known = set(workflow_names())
    late = runs.lease_expired_for(grace) | runs.filter(
        status=WorkflowRun.Status.PENDING, available_at__lt=now_plus(-grace)
    )
    findings = []
    for row in _rows(late, "status", "worker_id"):
        if row["workflow_name"] not in known:
            findings.append(
                _finding(
                    row,
                    UNKNOWN_WORKFLOW,
                    f'no worker knows workflow "{row["workflow_name"]}": it is not registered '
                    f"(the run is {row['status']} and due since {row['available_at'].isoformat()})",
                    "deploy the code that defines the workflow (a workflows.py module, or "
                    "runworker --workflows-module), or cancel the run",
                )
            )
        elif row["status"] == WorkflowRun.Status.RUNNING:
            findings.append(
                _finding(
                    row,
                    LEASE_EXPIRED,
                    f"running, but the lease of worker {row['worker_id']} ended at "
                    f"{row['available_at'].isoformat()} and no worker took the run over",
                    f"start a worker for its namespace (manage.py runworker --namespace "
                    f"{row['namespace']}); it takes the run over",
                )
            )
    return findings


def _step_running_on_finished_run(runs: Any) -> list[StuckRun]:
    attempts = (
        StepAttempt.objects.using(runs.db)
        .running()
        .filter(workflow_run__in=runs.finished())
        # a wait in flight when the run failed is kept for a resume to carry on
        .exclude(kind__in=WAIT_KINDS, workflow_run__status=WorkflowRun.Status.FAILED)
        .order_by("workflow_run__created_at", "id")
        .values(
            "step_name",
            "workflow_run__status",
            run_pk=F("workflow_run_id"),
            workflow_name=F("workflow_run__workflow_name"),
            namespace=F("workflow_run__namespace"),
        )
    )
    return [
        _finding(
            row,
            STEP_RUNNING_ON_FINISHED_RUN,
            f'the run is {row["workflow_run__status"]} but its step "{row["step_name"]}" is '
            "still running: nothing will finish the step",
            "report it as a bug of django-openworkflow; the step is bookkeeping only "
            "(nothing executes it), so the run's result stands",
        )
        for row in attempts
    ]
