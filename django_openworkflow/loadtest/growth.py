"""Measure worker processes over a soak, and judge their growth against stated tolerances.

A ``Sample`` is one look at one worker process: its resident memory
(``VmRSS``) and thread count (``Threads``) from ``/proc/<pid>/status``, its
open files (the entries of ``/proc/<pid>/fd``) and its database sessions
(``pg_stat_activity`` rows whose ``application_name`` is the worker's own,
``openworkflow-soak-<command's pid>-worker-<N>``: the command starts each
worker with ``PGAPPNAME`` set, which libpq, and so Django's PostgreSQL
backend, uses for every connection the worker opens).

``trends`` turns the samples taken after the warm-up into, per worker and
metric: the start (the median of the first three samples), the end (the
median of the last three), the least-squares slope per hour and per 10,000
runs, and a verdict. A metric fails when its growth, end minus start, is
more than its ``Tolerance``: a floor for noise plus an allowance per 10,000
runs measured. Threads, open files and connections must stay flat (an
allowance of 0 per 10,000 runs); memory may grow a little (allocator
fragmentation, caches that fill slowly). The medians keep one odd sample
from deciding; the floors are small enough that a leak of one thread, file
or connection per 100 runs fails a soak of a few thousand runs.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from django.db import connection

METRICS = ("rss_mb", "threads", "open_files", "connections")
LABELS = {
    "rss_mb": "RSS (MB)",
    "threads": "threads",
    "open_files": "open files",
    "connections": "connections",
}


@dataclass(frozen=True)
class Tolerance:
    """Growth allowed over a soak: ``floor`` plus ``per_10k`` for each 10,000 runs measured."""

    floor: float
    per_10k: float
    unit: str = ""

    def allowed(self, runs: float) -> float:
        return self.floor + self.per_10k * runs / 10_000

    def __str__(self) -> str:
        text = f"+{self.floor:g}{self.unit}"
        if self.per_10k:
            text += f" + {self.per_10k:g}{self.unit} per 10,000 runs"
        return text


TOLERANCES: dict[str, Tolerance] = {
    "rss_mb": Tolerance(floor=16, per_10k=2, unit=" MB"),
    "threads": Tolerance(floor=2, per_10k=0),
    "open_files": Tolerance(floor=4, per_10k=0),
    "connections": Tolerance(floor=2, per_10k=0),
}


def tolerances_text() -> str:
    """The tolerances in words, for ``--help`` and the docs."""
    names = {**LABELS, "rss_mb": "RSS"}
    return ", ".join(f"{names[m]} {TOLERANCES[m]}" for m in METRICS)


def app_name(worker: int) -> str:
    """The ``application_name`` of worker number ``worker``'s database sessions.

    With the soak command's pid in it: two soaks at once (on two databases of
    one server) count only their own workers.
    """
    return f"openworkflow-soak-{os.getpid()}-worker-{worker}"


@dataclass(frozen=True)
class Sample:
    """One look at one worker: ``seconds`` since the soak began, ``runs`` finished by then."""

    worker: int
    seconds: float
    runs: int
    rss_mb: float
    threads: int
    open_files: int
    connections: int


def read_process(pid: int) -> dict[str, float]:
    """RSS (MB), threads and open files of a live process, from ``/proc``."""
    status: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return {
        "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
        "threads": int(status["Threads"]),
        "open_files": len(os.listdir(f"/proc/{pid}/fd")),
    }


def sessions(workers: int, *, listening: bool = False) -> dict[int, int]:
    """Database sessions of each worker, by its ``application_name`` (PostgreSQL).

    ``listening``: only the session that waits on ``LISTEN`` (a worker has one
    once its threads are up).
    """
    names = {app_name(n): n for n in range(1, workers + 1)}
    listen = " AND query LIKE 'LISTEN %%'" if listening else ""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity "
            f"WHERE application_name = ANY(%s){listen} GROUP BY application_name",
            [list(names)],
        )
        counts = dict(cursor.fetchall())
    return {n: int(counts.get(name, 0)) for name, n in names.items()}


def sample(pids: Mapping[int, int], seconds: float, runs: int) -> list[Sample]:
    """One sample of each worker (``pids``: worker number -> pid)."""
    counts = sessions(max(pids, default=0))
    return [
        Sample(
            worker=n,
            seconds=seconds,
            runs=runs,
            connections=counts[n],
            **read_process(pid),  # type: ignore[arg-type]
        )
        for n, pid in sorted(pids.items())
    ]


def table_sizes(tables: Iterable[str]) -> dict[str, int]:
    """Bytes of each table with its indexes and TOAST (PostgreSQL)."""
    with connection.cursor() as cursor:
        return {
            table: _one(cursor, "SELECT pg_total_relation_size(%s::regclass)", [table])
            for table in tables
        }


def _one(cursor: Any, sql: str, params: list[Any]) -> int:
    cursor.execute(sql, params)
    return int(cursor.fetchone()[0])


# --- trends and the verdict ----------------------------------------------------------------


def slope(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of ``ys`` over ``xs`` (0 when ``xs`` do not vary)."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if not spread:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


@dataclass(frozen=True)
class Trend:
    """One metric of one worker over the measured part of the soak."""

    worker: int
    metric: str
    start: float
    end: float
    per_hour: float
    per_10k_runs: float
    runs: int  # runs finished between the first and the last sample measured
    allowed: float

    @property
    def growth(self) -> float:
        return self.end - self.start

    @property
    def ok(self) -> bool:
        return self.growth <= self.allowed

    def problem(self) -> str:
        return (
            f"worker {self.worker} {LABELS[self.metric]} grew from {self.start:g} to "
            f"{self.end:g} (+{self.growth:g}, allowed +{self.allowed:g} over "
            f"{self.runs} runs; slope {self.per_10k_runs:+.3g} per 10,000 runs)"
        )


def trends(samples: list[Sample], warmup_runs: int, warmup_seconds: float = 0.0) -> list[Trend]:
    """Per worker and metric, from the samples taken once ``warmup_runs`` runs finished
    and ``warmup_seconds`` passed.

    ``ValueError`` when a worker has fewer than three samples after the warm-up.
    """
    measured = [s for s in samples if s.runs >= warmup_runs and s.seconds >= warmup_seconds]
    result = []
    for worker in sorted({s.worker for s in samples}):
        mine = [s for s in measured if s.worker == worker]
        if len(mine) < 3:
            raise ValueError(
                f"worker {worker} has {len(mine)} samples after the warm-up, fewer than 3: "
                "sample more often (--sample-every) or run longer (--runs, --duration)"
            )
        runs = mine[-1].runs - mine[0].runs
        for metric in METRICS:
            ys = [float(getattr(s, metric)) for s in mine]
            result.append(
                Trend(
                    worker=worker,
                    metric=metric,
                    start=round(statistics.median(ys[:3]), 1),
                    end=round(statistics.median(ys[-3:]), 1),
                    per_hour=slope([s.seconds / 3600 for s in mine], ys),
                    per_10k_runs=slope([s.runs / 10_000 for s in mine], ys),
                    runs=runs,
                    allowed=round(TOLERANCES[metric].allowed(runs), 1),
                )
            )
    return result


def table(found: list[Trend]) -> list[str]:
    """The trends as aligned text lines, a header first."""
    rows = [("worker", "metric", "start", "end", "slope/h", "slope/10k runs", "allowed", "")]
    for t in found:
        rows.append(
            (
                str(t.worker),
                LABELS[t.metric],
                f"{t.start:g}",
                f"{t.end:g}",
                f"{t.per_hour:+.3g}",
                f"{t.per_10k_runs:+.3g}",
                f"+{t.allowed:g}",
                "ok" if t.ok else "GROWTH",
            )
        )
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def as_rows(samples: list[Sample]) -> list[dict[str, Any]]:
    return [asdict(s) for s in samples]


def write_samples(samples: list[Sample], path: Path) -> None:
    """Every sample to ``path``: CSV, or JSON when its name ends in ``.json``."""
    rows = as_rows(samples)
    with path.open("w", newline="") as f:
        if path.suffix == ".json":
            json.dump(rows, f, indent=1)
            return
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(Sample)])
        writer.writeheader()
        writer.writerows(rows)
