"""``manage.py soak_workflows``: many runs through long-lived workers; do the workers grow?

Against your own PostgreSQL database (runs use their own namespace,
``openworkflow-soak``, deleted before and after unless ``--keep``):

1. starts ``--workers`` ``runworker`` processes, each with ``PGAPPNAME`` set
   to ``openworkflow-soak-<pid>-worker-<N>`` so its database sessions can be
   counted;
2. feeds ``--runs`` runs of the mix (``loadtest/soak.py``: sleeps, retries,
   children, signals, deadlines) evenly over ``--duration`` seconds, in
   batches, never more than ``--max-active`` unfinished at once, and sends
   each signal run its signal once it waits;
3. samples every worker every ``--sample-every`` seconds: RSS, threads, open
   files, database sessions (``loadtest/growth.py``);
4. once every run finished: prints one summary line, then per worker and
   metric the start and end after the warm-up, the slopes and the verdict,
   and fails unless every run completed with its output, nothing is stuck,
   no worker exited or crashed, and no metric grew beyond its tolerance.
"""

from __future__ import annotations

import importlib
import time
import uuid
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection
from django.test.utils import override_settings
from django.utils import timezone

from ... import send_signal
from ...conf import app_settings
from ...loadtest import growth, soak
from ...models import StepAttempt, WorkflowRun
from ...progress import Progress
from ..workers import percent, positive_int, seconds, spawn_runworker, stop_process
from .chaos_workflows import ENGINE_CRASH

TICK = 0.2  # seconds between two looks at the queue


class SoakWorker:
    """One ``runworker`` process of the soak: its number names its database sessions."""

    def __init__(self, number: int, log_dir: Path, options: dict[str, Any]) -> None:
        self.number = number
        self.log = log_dir / f"worker-{number}.log"
        modules = [soak.__name__, *options["workflows_module"]]
        with self.log.open("wb") as log:
            self.process = spawn_runworker(
                "--concurrency",
                str(options["concurrency"]),
                "--namespace",
                soak.NAMESPACE,
                *(arg for module in modules for arg in ("--workflows-module", module)),
                "--verbosity",
                "0",
                stderr=log,
                env={"PGAPPNAME": growth.app_name(number)},
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def crashes(self) -> int:
        return self.log.read_text(errors="replace").count(ENGINE_CRASH)


class Command(BaseCommand):
    help = (
        "Soak test on PostgreSQL: push many runs (sleeps, retries, children, signals, deadlines) "
        "through long-lived runworker processes, sample each worker's RSS, threads, open files "
        "and database connections, and fail on growth beyond tolerance (from the start after "
        f"the warm-up to the end: {growth.tolerances_text()}) or on any run that did not "
        "complete with its output."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--runs", type=positive_int, default=200_000, help="Default: 200000.")
        parser.add_argument(
            "--duration",
            type=seconds,
            default=3600.0,
            help="Seconds over which the runs are fed, evenly (0: as fast as the workers "
            "go). Default: 3600.",
        )
        parser.add_argument(
            "--workers", type=positive_int, default=2, help="runworker processes. Default: 2."
        )
        parser.add_argument(
            "--concurrency", type=positive_int, default=4, help="Slots per worker. Default: 4."
        )
        parser.add_argument(
            "--mix",
            default=soak.DEFAULT_MIX,
            help="Kinds of run and their weights: run i takes the kind at i modulo the sum of "
            f"the weights. Default: {soak.DEFAULT_MIX} (plain: 3 steps; sleep: a 5-54 ms "
            "sleep between steps; retry: a step that fails twice, 10 ms backoff; child: a "
            "child run; signal: waits for a signal the command sends; deadline: started with "
            "a deadline 10 minutes ahead).",
        )
        parser.add_argument(
            "--workflows-module",
            action="append",
            default=[],
            metavar="MODULE",
            help="Import this module (here and in the workers) for kinds of its own, "
            "registered with loadtest.soak.kind (repeatable).",
        )
        parser.add_argument(
            "--max-active",
            type=positive_int,
            default=1000,
            help="Unfinished runs at most: feeding waits above it. Default: 1000.",
        )
        parser.add_argument(
            "--warmup",
            type=percent,
            default=10.0,
            metavar="PERCENT",
            help="Percent of the runs that finish before measuring starts. Default: 10.",
        )
        parser.add_argument(
            "--warmup-seconds",
            type=seconds,
            default=None,
            metavar="SECONDS",
            help="Seconds that pass before measuring starts, whatever --warmup says, so that "
            "each worker's heartbeat thread has beaten (and connected). Default: twice "
            f"OPENWORKFLOW['HEARTBEAT_SECONDS'] ({2 * app_settings.HEARTBEAT_SECONDS:g}).",
        )
        parser.add_argument(
            "--sample-every",
            type=seconds,
            default=None,
            metavar="SECONDS",
            help="Seconds between two samples. Default: 1 %% of --duration, at least 1.",
        )
        parser.add_argument(
            "--timeout",
            type=seconds,
            default=600.0,
            help="Seconds after --duration for the last runs to finish. Default: 600.",
        )
        parser.add_argument(
            "--samples-file",
            default=None,
            metavar="PATH",
            help="Write every sample there: CSV, or JSON when PATH ends in .json.",
        )
        parser.add_argument(
            "--keep", action="store_true", help="Keep the runs afterwards (default: delete them)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if connection.vendor != "postgresql":
            raise CommandError(
                f"soak_workflows needs PostgreSQL; the default database is {connection.vendor}"
            )
        for module in options["workflows_module"]:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise CommandError(f"--workflows-module {module!r}: {exc}") from None
        try:
            self.cycle = soak.parse_mix(options["mix"])
        except ValueError as exc:
            raise CommandError(f"--mix: {exc}") from None
        self.options = options
        self.sample_every = options["sample_every"] or max(1.0, options["duration"] / 100)
        self.warmup_runs = int(options["runs"] * options["warmup"] / 100)
        self.warmup_seconds = options["warmup_seconds"]
        if self.warmup_seconds is None:
            self.warmup_seconds = 2 * app_settings.HEARTBEAT_SECONDS
        self.samples: list[growth.Sample] = []
        self.sizes: list[dict[str, int]] = []
        self.exited: list[SoakWorker] = []
        self.fed = self.finished = self.signals = 0
        self.waiting_for_signal: dict[uuid.UUID, int] = {}
        soak.delete_runs()
        try:
            self.run_soak()
        finally:
            if not options["keep"]:
                soak.delete_runs()

    def run_soak(self) -> None:
        user = dict(getattr(settings, "OPENWORKFLOW", None) or {})
        started = time.monotonic()
        with (
            override_settings(OPENWORKFLOW={**user, "NAMESPACE": soak.NAMESPACE}),
            TemporaryDirectory(prefix="openworkflow-soak-") as log_dir,
        ):
            self.workers = [
                SoakWorker(n, Path(log_dir), self.options)
                for n in range(1, self.options["workers"] + 1)
            ]
            try:
                self.wait_until_ready()
                self.feed_until_done(started)
            finally:
                for worker in self.workers:
                    stop_process(worker.process)
            crashes = sum(worker.crashes() for worker in self.workers)
        self.report(started, crashes)

    # --- the soak ------------------------------------------------------------------------

    def wait_until_ready(self) -> None:
        """Each worker must show its ``LISTEN`` session, under its own name, within 60 s."""
        deadline = time.monotonic() + 60
        while not all((ready := growth.sessions(len(self.workers), listening=True)).values()):
            self.check_workers()
            if time.monotonic() > deadline:
                missing = min(n for n, count in ready.items() if not count)
                raise CommandError(
                    f"worker {missing} has no session named {growth.app_name(missing)!r} "
                    "waiting on LISTEN after 60 s: the soak counts a worker's connections by "
                    "the application_name it gets from PGAPPNAME (does DATABASES set "
                    "OPTIONS['application_name']?), and sees it ready when it listens"
                )
            time.sleep(0.1)

    def feed_until_done(self, started: float) -> None:
        runs = self.options["runs"]
        feeding_since = time.monotonic()  # the workers are ready: the clock of the feed starts
        deadline = feeding_since + self.options["duration"] + self.options["timeout"]
        next_sample = time.monotonic()
        progress = Progress(
            self.stderr,
            "soak",
            total=runs,
            unit="runs finished",
            verbosity=self.options["verbosity"],
        )
        with progress:
            while True:
                self.check_workers()
                self.finished = soak.finished_runs(self.fed)
                if self.finished >= runs:
                    break
                if time.monotonic() > deadline:  # measured all the same; the audit fails it
                    duration, timeout = self.options["duration"], self.options["timeout"]
                    self.stderr.write(
                        f"only {self.finished} of {runs} runs finished within --duration "
                        f"{duration:g} s and --timeout {timeout:g} s"
                    )
                    break
                self.feed(time.monotonic() - feeding_since)
                self.send_signals()
                if time.monotonic() >= next_sample:
                    self.take_sample(started)
                    next_sample = max(next_sample + self.sample_every, time.monotonic())
                progress.update(
                    self.finished, f"signals {self.signals}, samples {len(self.samples)}"
                )
                time.sleep(TICK)
            progress.update(self.finished, f"signals {self.signals}, samples {len(self.samples)}")
        self.take_sample(started, last=True)

    def feed(self, elapsed: float) -> None:
        """Start the runs due by now (evenly over --duration), within --max-active.

        The first batch is a burst of four runs a slot, so that every slot of
        every worker works (and opens its connection) during the warm-up.
        """
        options = self.options
        burst = 4 * options["workers"] * options["concurrency"]
        due = soak.due(options["runs"], options["duration"], elapsed, burst)
        room = options["max_active"] - (self.fed - self.finished)
        count = min(due - self.fed, room, 500)
        if count <= 0:
            return
        for run_id, i, kind in soak.start_batch(self.cycle, self.fed, count, timezone.now()):
            if soak.KINDS[kind].signalled:
                self.waiting_for_signal[run_id] = i
        self.fed += count

    def send_signals(self) -> None:
        """Send each signal run its signal, with its number, once it waits for it."""
        if not self.waiting_for_signal:
            return
        for run_id, signal in soak.signal_waits(self.waiting_for_signal):
            woken = send_signal(signal, {"i": self.waiting_for_signal[run_id]})
            if str(run_id) in woken:
                del self.waiting_for_signal[run_id]
                self.signals += 1

    def take_sample(self, started: float, *, last: bool = False) -> None:
        pids = {worker.number: worker.pid for worker in self.workers}
        self.samples += growth.sample(pids, time.monotonic() - started, self.finished)
        warm = self.finished >= self.warmup_runs and self.samples[-1].seconds >= self.warmup_seconds
        if not self.sizes and warm:
            self.sizes.append(self.table_sizes())  # after the warm-up ...
        if last:
            self.sizes[1:] = [self.table_sizes()]  # ... and at the end

    def table_sizes(self) -> dict[str, int]:
        return growth.table_sizes([WorkflowRun._meta.db_table, StepAttempt._meta.db_table])

    def check_workers(self) -> None:
        """A worker that exits on its own ends the soak: it cannot be measured any more."""
        for worker in self.workers:
            if worker.process.poll() is not None and worker not in self.exited:
                self.exited.append(worker)
                self.stderr.write(
                    f"worker {worker.number} exited with {worker.process.returncode} on its "
                    f"own; the end of its log:\n{worker.log_tail()}"
                )
        if self.exited:
            raise CommandError(f"{len(self.exited)} worker(s) exited on their own")

    # --- the verdict ---------------------------------------------------------------------

    def report(self, started: float, crashes: int) -> None:
        seconds_ = time.monotonic() - started
        result = soak.audit(self.options["runs"], soak.expected_flakes(self.cycle, self.fed))
        try:
            found = growth.trends(self.samples, self.warmup_runs, self.warmup_seconds)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        grown = [t for t in found if not t.ok]
        self.stdout.write(self.summary(result, crashes, grown, seconds_))
        for line in growth.table(found):
            self.stdout.write(line)
        if len(self.sizes) == 2:
            self.stdout.write(
                "database (not judged): "
                + ", ".join(
                    f"{table} {self.sizes[0][table] / 2**20:.1f} -> {size / 2**20:.1f} MB"
                    for table, size in self.sizes[1].items()
                )
            )
        for problem in result.wrong_outputs:
            self.stderr.write(f"wrong output: {problem}")
        for finding in result.stuck:
            self.stderr.write(f"stuck: {finding}")
        if self.options["samples_file"]:
            growth.write_samples(self.samples, Path(self.options["samples_file"]))
        problems = [t.problem() for t in grown]
        if not result.ok or result.other_failures or crashes:
            problems.insert(0, "runs that did not complete with their output (see above)")
        if problems:
            raise CommandError("soak failed: " + "; ".join(problems))

    def summary(
        self, result: soak.Audit, crashes: int, grown: list[growth.Trend], seconds_: float
    ) -> str:
        others = ", ".join(f"{k} {v}" for k, v in sorted(result.other_failures.items())) or "0"
        metrics = sorted({growth.LABELS[t.metric] for t in grown})
        return (
            f"soak: runs completed {result.completed}/{result.runs}, "
            f"children completed {result.children.get('completed', 0)}, "
            f"not completed {result.not_completed + result.children_not_completed}, "
            f"wrong outputs {result.wrong_output_count}, "
            f"stuck {len(result.stuck)}, "
            f"signals sent {self.signals}, "
            f"planned step failures {result.flakes}, "
            f"other failed attempts {others}, "
            f"worker exits {len(self.exited)}, "
            f"engine crashes {crashes}, "
            f"growth beyond tolerance {len(grown)}"
            f"{' (' + ', '.join(metrics) + ')' if metrics else ''}, "
            f"samples {len(self.samples)}, "
            f"{seconds_:.1f} s, {result.runs / seconds_:.1f} runs/s"
        )
