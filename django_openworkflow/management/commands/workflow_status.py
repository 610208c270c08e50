"""``manage.py workflow_status``: the queues, the live workers, and the runs nobody takes.

Read-only, a handful of queries. Exit status 1 when runs are due that no live
worker would take (no worker is live, or none that registered their workflow
serves their queue), else 0, so a monitor can run it as a probe.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from ...clock import database_now
from ...conf import app_settings
from ...display import short_duration
from ...models import WorkflowWorker
from ...queue_status import queue_overview
from ...workers import (
    DEAD,
    LIVE,
    NO_WORKER,
    NOT_REGISTERED,
    QUEUE_NOT_SERVED,
    STOPPED,
    LiveWorker,
    unserved_runs,
)

REASONS = {
    NO_WORKER: "no live worker in the namespace",
    NOT_REGISTERED: "no live worker registered the workflow",
    QUEUE_NOT_SERVED: "no live worker that registered it serves the queue",
}


class Command(BaseCommand):
    help = (
        "Show what the workflow engine is doing: per queue the pending, due and in-progress "
        "runs and how long the oldest due run has waited; the live workers; the workflows "
        "with active runs that no live worker runs. Exits 1 when runs are due that no live "
        "worker would take."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--namespace",
            default=None,
            help=f"The namespace to report on. Default: OPENWORKFLOW['NAMESPACE'] "
            f"({app_settings.NAMESPACE!r}).",
        )
        parser.add_argument(
            "--json", action="store_true", help="Print one JSON object (see docs/operations.md)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        namespace = options["namespace"]
        if namespace is not None and not namespace:
            raise CommandError("--namespace must not be empty")
        report = status_report(namespace or app_settings.NAMESPACE)
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2))
        else:
            self.stdout.write(render_text(report))
        if report["summary"]["unserved_due"]:
            raise SystemExit(1)


def _utc(at: datetime) -> datetime:
    return at.astimezone(dt_timezone.utc) if timezone.is_aware(at) else at


def status_report(namespace: str) -> dict[str, Any]:
    """The report, as the JSON shape ``--json`` prints (documented in docs/operations.md)."""
    at = database_now(app_settings.DATABASE)  # the clock every age of the report is read on
    queues = queue_overview(namespace)
    workers = list(
        WorkflowWorker.objects.using(app_settings.DATABASE)
        .in_namespace(namespace)
        .recent()
        .with_state()
        .order_by("worker_id")
    )
    live = [w for w in workers if w.state == LIVE]
    unserved = unserved_runs(namespace, [LiveWorker.of(w) for w in live])
    return {
        "namespace": namespace,
        "at": _utc(at).replace(microsecond=0).isoformat(),
        "queues": [
            {
                "queue": q.name,
                "pending": q.pending,
                "due": q.due,
                "in_progress": q.in_progress,
                "running": q.running,
                "oldest_due_age_seconds": _seconds(q.oldest_due_age),
            }
            for q in queues
        ],
        "workers": [
            {
                "worker_id": w.worker_id,
                "host": w.host,
                "pid": w.pid,
                "queues": w.queues,
                "workflows": w.workflows,
                "busy_slots": w.busy_slots,
                "slots": w.concurrency,
                "started_at": w.started_at.isoformat(),
                "last_seen_at": w.last_seen_at.isoformat(),
                "last_seen_seconds_ago": _seconds(w.seen_ago),
            }
            for w in live
        ],
        "gone_workers": {
            "stopped": sum(w.state == STOPPED for w in workers),
            "dead": sum(w.state == DEAD for w in workers),
        },
        "unserved": [
            {
                "workflow": u.workflow,
                "queue": u.queue,
                "active": u.active,
                "due": u.due,
                "reason": u.reason,
            }
            for u in unserved
        ],
        "summary": {
            "pending": sum(q.pending for q in queues),
            "due": sum(q.due for q in queues),
            "in_progress": sum(q.in_progress for q in queues),
            "live_workers": len(live),
            "busy_slots": sum(w.busy_slots for w in live),
            "slots": sum(w.concurrency for w in live),
            "unserved_due": sum(u.due for u in unserved),
        },
    }


def _seconds(value: Any) -> float | None:
    return None if value is None else round(max(value.total_seconds(), 0.0), 3)


# --- text -------------------------------------------------------------------------


def render_text(report: dict[str, Any]) -> str:
    lines = [f"Namespace {report['namespace']!r} at {report['at']}"]
    lines += ["", "Queues"]
    lines += table(
        ["QUEUE", "PENDING", "DUE", "IN PROGRESS", "OLDEST DUE"],
        [
            [
                q["queue"],
                q["pending"],
                q["due"],
                q["in_progress"],
                _age(q["oldest_due_age_seconds"]),
            ]
            for q in report["queues"]
        ],
    )
    lines += ["", "Live workers"]
    if report["workers"]:
        lines += table(
            ["WORKER", "HOST", "PID", "QUEUES", "SLOTS BUSY", "LAST SEEN"],
            [
                [
                    w["worker_id"],
                    w["host"],
                    w["pid"],
                    "all" if w["queues"] is None else ",".join(w["queues"]),
                    f"{w['busy_slots']}/{w['slots']}",
                    _age(w["last_seen_seconds_ago"]) + " ago",
                ]
                for w in report["workers"]
            ],
        )
    else:
        lines.append("  none (start one with: manage.py runworker)")
    if report["unserved"]:
        lines += ["", "Active runs no live worker takes"]
        lines += table(
            ["WORKFLOW", "QUEUE", "ACTIVE", "DUE", "WHY"],
            [
                [u["workflow"], u["queue"], u["active"], u["due"], REASONS[u["reason"]]]
                for u in report["unserved"]
            ],
        )
    lines += ["", summary_line(report)]
    return "\n".join(lines)


def summary_line(report: dict[str, Any]) -> str:
    s = report["summary"]
    gone = report["gone_workers"]
    parts = [
        f"{s['due']} due, {s['in_progress']} in progress, {s['pending']} pending",
        f"{_count(s['live_workers'], 'live worker')}"
        + (f" ({s['busy_slots']} of {s['slots']} slots busy)" if s["live_workers"] else ""),
    ]
    if gone["stopped"] or gone["dead"]:
        parts.append(f"{gone['stopped']} stopped and {gone['dead']} dead in the last day")
    if s["unserved_due"]:
        parts.append(f"PROBLEM: {_count(s['unserved_due'], 'due run')} no live worker takes")
    elif report["unserved"]:
        parts.append(
            f"{_count(len(report['unserved']), 'workflow')} with active runs no live worker takes"
        )
    return "; ".join(parts) + "."


def table(headers: list[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Aligned columns, two spaces apart and indented by two; numbers to the right."""
    cells = [[str(cell) for cell in row] for row in rows]
    columns = range(len(headers))
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(isinstance(row[i], int) for row in rows) for i in columns]

    def line(row: list[str]) -> str:
        padded = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(row, widths, numeric, strict=True)
        ]
        return ("  " + "  ".join(padded)).rstrip()

    return [line(headers), *(line(row) for row in cells)]


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else short_duration(timedelta(seconds=seconds))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
