"""``bench_workflows --history N``: finished runs beside the benchmark, as a long-lived
project has them.

The history lives in a namespace of its own, so the benchmark's workers never
claim it, but it shares every table and index with the measured runs: the
claim, the step writes and the run list pay for it as they would in
production. Each run has three completed attempts; the workflow names and
statuses are spread the way a project's are (mostly completed, some failed,
a few canceled), over the last 90 days.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db import connections, transaction
from django.utils import timezone

from ..models import StepAttempt, WorkflowRun

NAMESPACE = "openworkflow-bench-history"
WORKFLOW_NAMES = [
    f"{area}.{verb}"
    for area in ("orders", "billing", "emails", "reports", "sync")
    for verb in ("process", "charge", "send", "refresh")
]
# Out of 100 runs: 90 completed, 7 failed, 3 canceled.
STATUSES = ["completed"] * 90 + ["failed"] * 7 + ["canceled"] * 3
DAYS = 90
BATCH = 50_000


def history_size(using: str) -> int:
    return WorkflowRun.objects.using(using).filter(namespace=NAMESPACE).count()


def fill(runs: int, using: str) -> int:
    """Add finished runs until the history has ``runs`` of them; return how many it has."""
    have = history_size(using)
    while have < runs:
        batch = min(BATCH, runs - have)
        if connections[using].vendor == "postgresql":
            _insert_postgresql(batch, have, runs, using)
        else:
            _insert_orm(batch, have, runs, using)
        have += batch
    return have


def _insert_postgresql(batch: int, offset: int, total: int, using: str) -> None:
    """One statement per batch: the runs, then their attempts from the runs it returned."""
    runs = WorkflowRun._meta.db_table
    attempts = StepAttempt._meta.db_table
    names = "ARRAY[" + ", ".join(f"'{name}'" for name in WORKFLOW_NAMES) + "]"
    statuses = "ARRAY[" + ", ".join(f"'{status}'" for status in STATUSES) + "]"
    sql = f"""
        WITH spread AS (
            SELECT i, now() - make_interval(secs => {DAYS * 86400}.0 * (%(total)s - i) / %(total)s)
                   AS created_at
            FROM generate_series(%(first)s, %(last)s) AS i
        ), inserted AS (
            INSERT INTO {runs} (
                id, namespace, workflow_name, status, input, output, error, attempts,
                available_at, started_at, finished_at, created_at, updated_at,
                resume_generation, queue, priority
            )
            SELECT gen_random_uuid(), %(namespace)s, ({names})[1 + i %% {len(WORKFLOW_NAMES)}],
                   ({statuses})[1 + (i * 7) %% 100],
                   jsonb_build_object('i', i),
                   CASE WHEN ({statuses})[1 + (i * 7) %% 100] = 'completed'
                        THEN jsonb_build_object('i', i) END,
                   CASE WHEN ({statuses})[1 + (i * 7) %% 100] = 'failed'
                        THEN jsonb_build_object('type', 'TimeoutError', 'message',
                                                'the upstream did not answer') END,
                   0, NULL, created_at, created_at + interval '2 seconds',
                   created_at, created_at + interval '2 seconds', 0, 'default', 0
            FROM spread
            RETURNING id, created_at
        )
        INSERT INTO {attempts} (
            workflow_run_id, step_name, kind, atomic, status, output, resume_generation,
            position, started_at, finished_at, created_at
        )
        SELECT inserted.id, 'step-' || k, 'run', false, 'completed',
               jsonb_build_object('step', k), 0, k,
               inserted.created_at + k * interval '500 milliseconds',
               inserted.created_at + k * interval '500 milliseconds' + interval '100 milliseconds',
               inserted.created_at + k * interval '500 milliseconds'
        FROM inserted CROSS JOIN generate_series(0, 2) AS k
    """
    params: dict[str, Any] = {
        "total": total,
        "first": offset,
        "last": offset + batch - 1,
        "namespace": NAMESPACE,
    }
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute(sql, params)


def _insert_orm(batch: int, offset: int, total: int, using: str) -> None:
    now = timezone.now()
    runs = []
    for i in range(offset, offset + batch):
        created = now - timedelta(seconds=DAYS * 86400 * (total - i) / total)
        status = STATUSES[(i * 7) % 100]
        runs.append(
            WorkflowRun(
                namespace=NAMESPACE,
                workflow_name=WORKFLOW_NAMES[i % len(WORKFLOW_NAMES)],
                status=status,
                input={"i": i},
                output={"i": i} if status == "completed" else None,
                available_at=None,
                started_at=created,
                finished_at=created + timedelta(seconds=2),
                created_at=created,
                updated_at=created,
            )
        )
    with transaction.atomic(using=using):
        created_runs = WorkflowRun.objects.using(using).bulk_create(runs, batch_size=500)
        StepAttempt.objects.using(using).bulk_create(
            (
                StepAttempt(
                    workflow_run=run,
                    step_name=f"step-{k}",
                    status="completed",
                    output={"step": k},
                    position=k,
                    finished_at=run.created_at,
                )
                for run in created_runs
                for k in range(3)
            ),
            batch_size=500,
        )
