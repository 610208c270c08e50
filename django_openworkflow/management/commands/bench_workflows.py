"""``manage.py bench_workflows``: throughput and latency on your own database.

Prints one JSON line per measurement in the format of the peer benchmark
(``../shared/bench-peers``), so the lines can be put side by side. Runs use
their own namespace and are deleted before each measurement.

- Throughput: W runs of a three-step workflow, executed by ONE ``runworker``
  process with concurrency C. ``enqueue_first`` enqueues all runs (with the
  worker process already up, into a holding namespace) and then releases them
  with one UPDATE; ``worker_running`` enqueues while the worker is idle and
  running. ``seconds`` = latest ``finished_at`` stored in the database minus
  the client clock just before the first enqueue.
- Latency: with an idle running worker, runs of a one-step workflow started
  one after another, each awaited; start -> ``finished_at``, p50 and p95.
- ``--history N`` first fills the tables with N finished runs (3 attempts
  each) in a namespace of their own, so that cost can be measured against
  a long-lived project's tables; see ``loadtest/history.py``.
- Queue limits (``queue_concurrency``, ``key_concurrency``, ``rate_limit``):
  like ``enqueue_first``, on a queue with one limit, each judged against the
  unlimited ``enqueue_first`` runs/s of the same invocation; see
  ``loadtest/limits.py``. A line of words per measurement goes to stderr,
  and with ``--reps`` above 1, the verdict on the medians of the repeats,
  which run interleaved.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connection
from django.db.models import Count, Max, Q
from django.test.utils import override_settings
from django.utils import timezone

from ... import __version__
from ...loadtest import bench, history, limits
from ...loadtest.bench import HOLD_NAMESPACE, NAMESPACE, one_step, three_steps
from ...models import QueueStart, StepAttempt, WorkflowRun
from ...progress import Progress
from ...store import get_store
from ..workers import spawn_runworker, stop_process

SYSTEM = "django-openworkflow"


def _int_list(value: str) -> list[int]:
    try:
        numbers = [int(part) for part in value.split(",") if part]
    except ValueError:
        raise CommandError(f"expected whole numbers separated by commas, not {value!r}") from None
    if not numbers or min(numbers) < 1:
        raise CommandError(f"expected positive whole numbers, not {value!r}")
    return numbers


def _machine_cpu() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def _process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_fields(
    cpu0: tuple[int, int], cpu1: tuple[int, int], wcpu0: float, wcpu1: float
) -> dict[str, Any]:
    total = cpu1[1] - cpu0[1]
    busy = total - (cpu1[0] - cpu0[0])
    return {
        "cpu_busy_pct": round(100 * busy / total, 1) if total else None,
        "worker_cpu_s": round(wcpu1 - wcpu0, 2),
    }


def _nearest_rank(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, int(-(-pct * len(ordered) // 100)) - 1))
    return ordered[index]


class Command(BaseCommand):
    help = "Measure workflow throughput and latency on this database (JSON lines on stdout)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--runs", type=int, default=1000, help="Runs per measurement (1000).")
        parser.add_argument(
            "--concurrency", default="50,10,1", help="Worker concurrencies (50,10,1)."
        )
        parser.add_argument(
            "--variants",
            default="enqueue_first,worker_running",
            help="Throughput variants (enqueue_first,worker_running); with queue limits: "
            "queue_concurrency, key_concurrency, rate_limit (enqueue_first is added for them).",
        )
        parser.add_argument(
            "--rate-limit",
            default=limits.DEFAULT_RATE_LIMIT,
            help=f"The limit of the rate_limit variant, well below the unlimited runs/s "
            f"({limits.DEFAULT_RATE_LIMIT}).",
        )
        parser.add_argument(
            "--keys",
            type=int,
            default=limits.DEFAULT_KEYS,
            help=f"Concurrency keys of the key_concurrency variant ({limits.DEFAULT_KEYS}).",
        )
        parser.add_argument(
            "--reps", type=int, default=1, help="Repeats of each measurement, interleaved (1)."
        )
        parser.add_argument("--latency-runs", type=int, default=50, help="Latency samples (50).")
        parser.add_argument(
            "--latency-concurrency", type=int, default=10, help="Worker concurrency (10)."
        )
        parser.add_argument(
            "--enqueue",
            choices=["threads", "bulk"],
            default="threads",
            help="threads: start() from 10 threads, as the peers' drivers enqueue (default); "
            "bulk: one start_many().",
        )
        parser.add_argument(
            "--system-label", default=SYSTEM, help=f"The 'system' of each line ({SYSTEM!r})."
        )
        parser.add_argument("--skip-throughput", action="store_true")
        parser.add_argument("--skip-latency", action="store_true")
        parser.add_argument(
            "--timeout", type=float, default=300.0, help="Seconds a measurement may take (300)."
        )
        parser.add_argument(
            "--idle", type=float, default=2.0, help="Seconds the worker idles first (2)."
        )
        parser.add_argument(
            "--history",
            type=int,
            default=0,
            help="First fill the tables with this many finished runs of 3 attempts each, in a "
            f"namespace of their own ({history.NAMESPACE!r}), kept for the next invocation "
            "(0: leave the tables as they are).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["runs"] < 1 or options["reps"] < 1 or options["latency_runs"] < 1:
            raise CommandError("--runs, --reps and --latency-runs must be at least 1")
        concurrencies = _int_list(options["concurrency"])
        try:
            variants = limits.parse_variants(options["variants"])
            options["rate_limit"] = limits.check_rate_limit(options["rate_limit"])
            if "rate_limit" in variants:
                limits.check_duration(options["runs"], options["rate_limit"], options["timeout"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if options["keys"] < 1:
            raise CommandError("--keys must be at least 1")
        if options["history"] < 0:
            raise CommandError("--history must be at least 0")
        self.history_runs = history.fill(options["history"], connection.alias)
        if self.history_runs:
            self.stderr.write(f"history: {self.history_runs:,} finished runs in the tables")
        self.options = options
        self.vendor = connection.vendor
        self.lines: list[dict[str, Any]] = []
        if not options["skip_throughput"]:
            for concurrency in concurrencies:
                # repeats interleaved (A, B, A, B, ...): drifting load hits every variant alike
                for _ in range(options["reps"]):
                    for variant in variants:
                        self.emit(self.throughput(variant, concurrency, options["runs"]))
                for line in limits.medians(self.lines, concurrency):
                    style = self.style.SUCCESS if line["verdict"] == "pass" else self.style.WARNING
                    self.stderr.write(limits.median_summary(line), style)
        if not options["skip_latency"]:
            for _ in range(options["reps"]):
                self.emit(self.latency(options["latency_concurrency"], options["latency_runs"]))

    # --- measurements -----------------------------------------------------------------

    def throughput(self, variant: str, concurrency: int, runs: int) -> dict[str, Any]:
        self.reset()
        queues = self.user_settings().get("QUEUES") or {}
        overrides = limits.overrides(variant, concurrency, self.options["rate_limit"], queues)
        worker = self.start_worker(concurrency, overrides)
        try:
            if variant == "worker_running":
                time.sleep(self.options["idle"])
            counters0, cpu0, wcpu0 = self.counters(), _machine_cpu(), _process_cpu_s(worker.pid)
            t0 = timezone.now()
            namespace = NAMESPACE if variant == "worker_running" else HOLD_NAMESPACE
            self.enqueue(namespace, runs, variant, overrides)
            enqueue_s = (timezone.now() - t0).total_seconds()
            if namespace == HOLD_NAMESPACE:  # the "start" of the worker: release the runs
                WorkflowRun.objects.filter(namespace=HOLD_NAMESPACE).update(namespace=NAMESPACE)
                get_store(connection.alias).notify(NAMESPACE)
            progress = Progress(
                self.stderr,
                f"{variant} C={concurrency}",
                total=runs,
                unit="runs",
                verbosity=self.options["verbosity"],
                interval=0.5,
            )
            with progress:
                end = self.wait_for(runs, worker, progress)
            cpu1, wcpu1 = _machine_cpu(), _process_cpu_s(worker.pid)
        finally:
            stop_process(worker)  # its sessions end, so their statistics are flushed
        cost = self.cost_fields(counters0, runs)
        seconds = (end - t0).total_seconds()
        steps = WorkflowRun.objects.filter(namespace=NAMESPACE, status="completed").count() * 3
        line = {
            "system": self.options["system_label"],
            "variant": variant,
            "runs": runs,
            "concurrency": concurrency,
            "seconds": round(seconds, 3),
            "runs_per_s": round(runs / seconds, 1),
            "steps_per_s": round(runs * 3 / seconds, 1),
            "p50_ms": None,
            "p95_ms": None,
            "enqueue_s": round(enqueue_s, 3),
            "steps_completed": steps,
            **_cpu_fields(cpu0, cpu1, wcpu0, wcpu1),
            **cost,
            "enqueue": self.options["enqueue"],
            "version": __version__,
        }
        if variant == "key_concurrency":
            line["concurrency_keys"] = self.options["keys"]
        if variant in limits.LIMIT_VARIANTS:  # (the first starts are read for rate_limit only)
            starts = WorkflowRun.objects.filter(namespace=NAMESPACE).values_list(
                "started_at", flat=True
            )
            line.update(limits.judge(line, self.lines, overrides["QUEUES"][limits.QUEUE], starts))
        return line

    def latency(self, concurrency: int, samples: int) -> dict[str, Any]:
        self.reset()
        worker = self.start_worker(concurrency)
        latencies: list[float] = []
        progress = Progress(
            self.stderr,
            f"latency C={concurrency}",
            total=samples,
            unit="runs",
            verbosity=self.options["verbosity"],
        )
        try:
            time.sleep(self.options["idle"])
            with (
                override_settings(OPENWORKFLOW={**self.user_settings(), "NAMESPACE": NAMESPACE}),
                progress,
            ):
                for i in range(samples):
                    progress.update(i)
                    began = timezone.now()
                    run = one_step.start({"i": i})
                    deadline = time.monotonic() + 30
                    while True:
                        row = (
                            WorkflowRun.objects.filter(pk=run.pk)
                            .values_list("status", "finished_at")
                            .get()
                        )
                        if row[0] == "completed":
                            break
                        if row[0] == "failed" or time.monotonic() > deadline:
                            raise CommandError(f"latency run {run.pk} did not complete: {row[0]}")
                        time.sleep(0.002)
                    latencies.append((row[1] - began).total_seconds() * 1000)
                progress.update(samples)
        finally:
            stop_process(worker)
        return {
            "system": self.options["system_label"],
            "variant": "latency_idle_worker",
            "runs": samples,
            "concurrency": concurrency,
            "seconds": round(sum(latencies) / 1000, 3),
            "runs_per_s": None,
            "steps_per_s": None,
            "p50_ms": round(_nearest_rank(latencies, 50), 2),
            "p95_ms": round(_nearest_rank(latencies, 95), 2),
            "max_ms": round(max(latencies), 2),
            "db_commits_per_run": None,
            "version": __version__,
        }

    # --- helpers --------------------------------------------------------------------------

    def emit(self, line: dict[str, Any]) -> None:
        line["history_runs"] = self.history_runs
        self.lines.append(line)
        self.stdout.write(json.dumps(line))
        self.stdout.flush()
        if "verdict" in line:
            style = self.style.SUCCESS if line["verdict"] == "pass" else self.style.WARNING
            self.stderr.write(limits.summary(line), style)

    def user_settings(self) -> dict[str, Any]:
        return dict(getattr(settings, "OPENWORKFLOW", None) or {})

    def reset(self) -> None:
        WorkflowRun.objects.filter(namespace__in=[NAMESPACE, HOLD_NAMESPACE]).delete()
        QueueStart.objects.filter(namespace=NAMESPACE).delete()  # a rate window of its own
        if self.vendor == "postgresql":
            with connection.cursor() as cursor:
                # Every measurement starts from the same tables: without this, the dead rows
                # of the earlier ones pile up in the indexes the claim reads wherever
                # autovacuum is off or behind (it is off on the CI machine).
                tables = [model._meta.db_table for model in (WorkflowRun, StepAttempt, QueueStart)]
                cursor.execute(f"VACUUM (ANALYZE) {', '.join(tables)}")
                with contextlib.suppress(DatabaseError):
                    cursor.execute("CHECKPOINT")  # needs a superuser; else measure without it

    def enqueue(self, namespace: str, runs: int, variant: str, overrides: dict[str, Any]) -> None:
        settings_ = {**self.user_settings(), **overrides, "NAMESPACE": namespace}
        queue, keys = (limits.QUEUE if overrides else None), self.options["keys"]
        if self.options["enqueue"] == "bulk":  # one statement per concurrency key
            with override_settings(OPENWORKFLOW=settings_):
                for key, indexes in limits.runs_by_key(variant, runs, keys).items():
                    three_steps.start_many(
                        ({"i": i} for i in indexes), queue=queue, concurrency_key=key
                    )
            return

        def start(indexes: range) -> None:
            try:
                for i in indexes:
                    key = limits.concurrency_key(variant, i, keys)
                    three_steps.start({"i": i}, queue=queue, concurrency_key=key)
            finally:
                connection.close()  # this thread's own connection

        with override_settings(OPENWORKFLOW=settings_), ThreadPoolExecutor(10) as pool:
            list(pool.map(start, [range(k, runs, 10) for k in range(10)]))

    def counters(self) -> tuple[str, int] | None:
        """(WAL position, committed transactions) of this database, on PostgreSQL."""
        if self.vendor != "postgresql":
            return None
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_stat_force_next_flush()")
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(
                "SELECT pg_current_wal_lsn()::text, xact_commit FROM pg_stat_database "
                "WHERE datname = current_database()"
            )
            wal, commits = cursor.fetchone()
        return wal, int(commits)

    def cost_fields(self, before: tuple[str, int] | None, runs: int) -> dict[str, Any]:
        after = self.counters()
        if before is None or after is None:
            return {"db_commits_per_run": None, "wal_bytes_per_run": None}
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)", [after[0], before[0]])
            wal = float(cursor.fetchone()[0])
        return {
            "db_commits_per_run": round((after[1] - before[1]) / runs, 2),
            "wal_bytes_per_run": round(wal / runs),
        }

    def start_worker(
        self, concurrency: int, overrides: dict[str, Any] | None = None
    ) -> subprocess.Popen[bytes]:
        """A ``runworker`` process; ``overrides`` replace keys of its ``OPENWORKFLOW``."""
        listeners = self.listeners()
        env = None
        if overrides:
            env = limits.worker_env(settings.SETTINGS_MODULE, overrides)
        worker = spawn_runworker(
            "--concurrency",
            str(concurrency),
            "--namespace",
            NAMESPACE,
            "--workflows-module",
            bench.__name__,
            "--verbosity",
            "0",
            env=env,
        )
        if listeners is None:
            time.sleep(2.0)  # no LISTEN to watch for: give it time to start
            return worker
        deadline = time.monotonic() + 60
        while (self.listeners() or 0) <= listeners:
            if worker.poll() is not None or time.monotonic() > deadline:
                worker.kill()
                raise CommandError("the benchmark worker did not start")
            time.sleep(0.05)
        return worker

    def listeners(self) -> int | None:
        """Sessions listening for wake-ups (PostgreSQL), to see the worker become ready."""
        if self.vendor != "postgresql":
            return None
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN django_openworkflow%%'"
            )
            return int(cursor.fetchone()[0])

    def wait_for(
        self, runs: int, worker: subprocess.Popen[bytes], progress: Progress | None = None
    ) -> datetime:
        deadline = time.monotonic() + self.options["timeout"]
        bench_runs = WorkflowRun.objects.filter(namespace=NAMESPACE)
        while True:
            # The poll reads only the active runs (a partial index), so it costs the same with
            # a long history in the tables (--history): counting every run of the namespace
            # every 50 ms read the whole table, and took a core from the worker. Progress
            # counts them (the same index) twice a second, on a terminal only.
            if progress is not None and progress.due():
                progress.update(runs - bench_runs.active().count())
            if bench_runs.active().exists() and time.monotonic() < deadline:
                if worker.poll() is not None:
                    raise CommandError(f"the benchmark worker exited with {worker.returncode}")
                time.sleep(0.05)
                continue
            row = bench_runs.aggregate(
                done=Count("pk", filter=Q(status="completed")),
                failed=Count("pk", filter=Q(status="failed")),
                end=Max("finished_at"),
            )
            if row["failed"]:
                raise CommandError(f"{row['failed']} benchmark runs failed")
            if row["done"] >= runs:
                if progress is not None:
                    progress.update(row["done"])
                return row["end"]  # type: ignore[no-any-return]
            if worker.poll() is not None:
                raise CommandError(f"the benchmark worker exited with {worker.returncode}")
            if time.monotonic() > deadline:
                raise CommandError(
                    f"only {row['done']} of {runs} runs completed in {self.options['timeout']} s"
                )
            time.sleep(0.05)
