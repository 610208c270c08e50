"""The chaos test's workflow and its audit (used by ``manage.py chaos_workflows``).

Not autodiscovered: the command and its workers import this module. The
workflow's steps alternate between ``step.atomic`` and ``step.run``; each
records itself in a ledger table:

- an ``atomic`` step inserts its row inside the step's transaction, so the row
  commits together with the step's result: exactly one row per run and step,
  whatever is killed when;
- a ``run`` step inserts its row in autocommit, as any side effect outside the
  database transaction would happen: a step whose result was not stored
  before a crash runs again, and the ledger shows the repeat.

Halfway through, a run sleeps briefly (it parks and is claimed again), and its
last step is a child run whose one ``atomic`` step writes the parent's last
ledger row: parking, waking and child completion are killed too.

PostgreSQL only: the ledger is created with plain SQL, and the chaos is about
row locks and killed sessions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from django.db import connection
from django.db.models import Count

from ..diagnostics import StuckRun, stuck_runs
from ..durations import RetryPolicy
from ..models import StepAttempt, WorkflowRun
from ..registry import workflow

NAMESPACE = "openworkflow-chaos"
LEDGER = "openworkflow_chaos_ledger"

# Kills fail a step with WorkerLost; a budget this large is never spent by them.
STEP_RETRY_POLICY = RetryPolicy(
    initial_interval="100ms", backoff_coefficient=2, maximum_interval="1s", maximum_attempts=100
)


def step_kind(k: int) -> str:
    return "atomic" if k % 2 == 0 else "run"


def expected_total(steps: int) -> int:
    """The output of a run of ``steps`` steps: step k returns k + 1, the child steps + 1."""
    return (steps + 1) * (steps + 2) // 2


def ledger_rows(steps: int) -> int:
    """Ledger rows of one completed run: one a step, one for its child."""
    return steps + 1


def _effect(run_id: Any, k: int, kind: str, pause: float) -> int:
    """Write the step's ledger row, then work a little: a kill may land before, during or after."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {LEDGER} (run_id, step, kind) VALUES (%s, %s, %s)",
            [run_id, k, kind],
        )
    if pause:
        time.sleep(pause)
    return k + 1


@workflow(name="django_openworkflow.chaos.ledger-steps")
def ledger_steps(ctx: Any) -> dict[str, int]:
    steps = ctx.input["steps"]
    pause = ctx.input["pause_ms"] / 1000
    total = 0
    for k in range(steps):
        if k == steps // 2:
            ctx.step.sleep("nap", "20ms")
        kind = step_kind(k)
        run = ctx.step.atomic if kind == "atomic" else ctx.step.run
        fn = partial(_effect, str(ctx.run_id), k, kind, pause)
        total += run(f"step-{k}", fn, retry_policy=STEP_RETRY_POLICY)
    child_input = {"parent": str(ctx.run_id), "step": steps, "pause_ms": ctx.input["pause_ms"]}
    total += ctx.step.run_workflow(ledger_child, child_input, name="child")
    return {"total": total}


@workflow(name="django_openworkflow.chaos.ledger-child")
def ledger_child(ctx: Any) -> int:
    k = ctx.input["step"]
    fn = partial(_effect, ctx.input["parent"], k, "atomic", ctx.input["pause_ms"] / 1000)
    return ctx.step.atomic("write", fn, retry_policy=STEP_RETRY_POLICY)  # type: ignore[no-any-return]


def create_ledger() -> None:
    """Create the ledger table if needed and empty it; delete earlier chaos runs."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {LEDGER} ("
            "id bigserial PRIMARY KEY, run_id uuid NOT NULL, step integer NOT NULL, "
            "kind text NOT NULL, at timestamptz NOT NULL DEFAULT now())"
        )
        cursor.execute(f"TRUNCATE {LEDGER}")
    WorkflowRun.objects.filter(namespace=NAMESPACE).delete()


def drop_ledger() -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {LEDGER}")


@dataclass
class Audit:
    """What the database holds after a chaos run, checked against what must hold."""

    runs: int
    steps: int
    statuses: dict[str, int] = field(default_factory=dict)
    duplicated_ledger_rows: int = 0  # extra rows of atomic steps: must be 0
    stuck: list[StuckRun] = field(default_factory=list)  # runs nothing will wake: must be none
    missing_ledger_rows: int = 0  # steps of completed runs without a row: must be 0
    wrong_outputs: int = 0  # completed runs whose output is not the expected total
    reexecutions: int = 0  # extra rows of run steps: allowed for steps in flight at a kill
    lost_attempts: int = 0  # attempts failed as WorkerLost
    failed_attempts: dict[str, int] = field(default_factory=dict)  # other failures by type

    @property
    def completed(self) -> int:
        return self.statuses.get(WorkflowRun.Status.COMPLETED, 0)

    @property
    def lost(self) -> int:
        """Runs that did not complete (still queued or running, failed, canceled, or gone)."""
        return self.runs - self.completed

    @property
    def ok(self) -> bool:
        problems = (
            self.duplicated_ledger_rows,
            len(self.stuck),
            self.missing_ledger_rows,
            self.wrong_outputs,
        )
        return not (self.lost or any(problems))


def audit(runs: int, steps: int) -> Audit:
    """Check the chaos runs of ``NAMESPACE`` against the ledger and the stuck-run detector."""
    result = Audit(runs=runs, steps=steps)
    result.stuck = stuck_runs(namespace=NAMESPACE)
    chaos_runs = WorkflowRun.objects.filter(namespace=NAMESPACE, workflow_name=ledger_steps.name)
    result.statuses = {
        row["status"]: row["n"] for row in chaos_runs.values("status").annotate(n=Count("pk"))
    }
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT kind, coalesce(sum(n - 1), 0) FROM ("
            f"SELECT kind, count(*) AS n FROM {LEDGER} GROUP BY run_id, step, kind"
            ") AS per_step GROUP BY kind"
        )
        extra = dict(cursor.fetchall())
        result.duplicated_ledger_rows = int(extra.get("atomic", 0))
        result.reexecutions = int(extra.get("run", 0))
        cursor.execute(
            f"SELECT count(DISTINCT (l.run_id, l.step)) FROM {LEDGER} AS l "
            f"JOIN {WorkflowRun._meta.db_table} AS r ON r.id = l.run_id "
            "WHERE r.namespace = %s AND r.workflow_name = %s AND r.status = %s",
            [NAMESPACE, ledger_steps.name, WorkflowRun.Status.COMPLETED],
        )
        recorded = cursor.fetchone()[0]
    result.missing_ledger_rows = result.completed * ledger_rows(steps) - recorded
    result.wrong_outputs = (
        chaos_runs.filter(status=WorkflowRun.Status.COMPLETED)
        .exclude(output={"total": expected_total(steps)})
        .count()
    )
    failed = (
        StepAttempt.objects.filter(
            workflow_run__namespace=NAMESPACE, status=StepAttempt.Status.FAILED
        )
        .values_list("error__type")
        .annotate(n=Count("pk"))
    )
    for error_type, n in failed:
        if error_type == "WorkerLost":
            result.lost_attempts += n
        else:
            result.failed_attempts[str(error_type)] = n
    return result
