"""``manage.py chaos_workflows``: kill workers and restart the database, then count what was lost.

Against your own PostgreSQL database (runs use their own namespace and a
ledger table of their own, ``openworkflow_chaos_ledger``):

1. queues ``--runs`` runs of a workflow of ``--steps`` steps that alternate
   ``step.atomic`` and ``step.run``, each writing a row to the ledger, with a
   short sleep halfway and a child run at the end;
2. starts ``--workers`` ``runworker`` processes of ``--concurrency`` slots;
3. for ``--duration`` seconds (or until every run finished), SIGKILLs a random
   worker about every ``--kill-every`` seconds and starts a new one; once,
   early on, runs ``--restart-db-command`` (e.g. ``pg_ctlcluster 15 main
   restart``);
4. lets the workers drain the queue, then prints one summary line and fails
   unless every run completed, no ``step.atomic`` ledger row is missing or
   duplicated, every output is right, no run is stuck (``check_workflow_runs``
   finds nothing) and no worker exited on its own.
"""

from __future__ import annotations

import random
import shlex
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connection
from django.test.utils import override_settings

from ...loadtest import chaos
from ...loadtest.chaos import NAMESPACE, Audit, audit, create_ledger, drop_ledger, ledger_steps
from ...models import WorkflowRun
from ...progress import Progress
from ..workers import positive_int as _positive_int
from ..workers import seconds, spawn_runworker, stop_process

ENGINE_CRASH = "crashed the engine"


class Worker:
    """One ``runworker`` process of the chaos, with its log file."""

    def __init__(self, number: int, log_dir: Path, options: dict[str, Any]) -> None:
        self.log = log_dir / f"worker-{number}.log"
        with self.log.open("wb") as log:
            self.process = spawn_runworker(
                "--concurrency",
                str(options["concurrency"]),
                "--lease",
                str(options["lease"]),
                "--poll-interval",
                "0.5",
                "--namespace",
                NAMESPACE,
                "--workflows-module",
                chaos.__name__,
                "--verbosity",
                "1",
                stderr=log,
            )
        self.killed = False

    def kill(self) -> None:
        self.killed = True
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def exited_by_itself(self) -> bool:
        return not self.killed and self.process.poll() is not None

    def stop(self) -> None:
        stop_process(self.process)


class Command(BaseCommand):
    help = (
        "Chaos test on PostgreSQL: run workflows while killing workers (and restarting the "
        "database once), then check that no run and no step.atomic write was lost or doubled."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--runs", type=_positive_int, default=2000, help="Default: 2000.")
        parser.add_argument(
            "--steps", type=_positive_int, default=10, help="Steps per run. Default: 10."
        )
        parser.add_argument(
            "--workers", type=_positive_int, default=3, help="runworker processes. Default: 3."
        )
        parser.add_argument(
            "--concurrency", type=_positive_int, default=4, help="Slots per worker. Default: 4."
        )
        parser.add_argument(
            "--duration",
            type=seconds,
            default=60.0,
            help="Seconds of chaos at most (it stops when every run finished). Default: 60.",
        )
        parser.add_argument(
            "--kill-every",
            type=seconds,
            default=0.5,
            help="Mean seconds between two SIGKILLs; 0 kills nothing. Default: 0.5.",
        )
        parser.add_argument(
            "--restart-db-command",
            default="",
            metavar="COMMAND",
            help="Shell command that restarts the database server, run once during the chaos, "
            "e.g. 'pg_ctlcluster 15 main restart'. Default: none.",
        )
        parser.add_argument(
            "--lease",
            type=seconds,
            default=3.0,
            help="Workers' lease: how soon a killed worker's runs are taken over. Default: 3.",
        )
        parser.add_argument(
            "--pause-ms",
            type=seconds,
            default=2.0,
            help="Milliseconds each step sleeps, so kills land inside steps. Default: 2.",
        )
        parser.add_argument(
            "--timeout",
            type=seconds,
            default=300.0,
            help="Seconds to wait for the queue to drain after the chaos. Default: 300.",
        )
        parser.add_argument(
            "--seed", type=int, default=None, help="Random seed for which worker is killed when."
        )
        parser.add_argument(
            "--keep",
            action="store_true",
            help="Keep the runs and the ledger table afterwards (default: delete them).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if connection.vendor != "postgresql":
            raise CommandError(
                f"chaos_workflows needs PostgreSQL; the default database is {connection.vendor}"
            )
        self.options = options
        self.random = random.Random(options["seed"])
        self.kills = 0
        self.restarts = 0
        self.other_exits: list[Worker] = []
        self.retired: list[Worker] = []
        started = time.monotonic()
        create_ledger()
        with override_settings(OPENWORKFLOW={"NAMESPACE": NAMESPACE}):
            ledger_steps.start_many(
                {"i": i, "steps": options["steps"], "pause_ms": options["pause_ms"]}
                for i in range(options["runs"])
            )
        with tempfile.TemporaryDirectory(prefix="openworkflow-chaos-") as log_dir:
            self.log_dir = Path(log_dir)
            self.spawned = 0
            self.workers = [self.spawn() for _ in range(options["workers"])]
            self.progress = Progress(
                self.stderr,
                "chaos",
                total=options["runs"],
                unit="runs finished",
                verbosity=options["verbosity"],
            )
            try:
                with self.progress:
                    self.chaos()
                    drained = self.drain()
            finally:
                for worker in self.workers:
                    worker.stop()
            crashes = self.report_crashes()
        result = self.query(lambda: audit(options["runs"], options["steps"]))
        seconds = time.monotonic() - started
        self.stdout.write(self.summary(result, crashes, seconds))
        for finding in result.stuck:
            self.stderr.write(f"stuck: {finding}")
        if not options["keep"]:
            WorkflowRun.objects.filter(namespace=NAMESPACE).delete()
            drop_ledger()
        if not drained:
            self.stderr.write(f"the queue did not drain within {options['timeout']:g} s")
        if not result.ok or crashes or self.other_exits:
            raise CommandError(
                "chaos found lost, doubled, stuck or wrong work (see the line above)"
            )

    def spawn(self) -> Worker:
        self.spawned += 1
        return Worker(self.spawned, self.log_dir, self.options)

    def chaos(self) -> None:
        """Kill and restart workers until the time is up or every run finished."""
        options = self.options
        end = time.monotonic() + options["duration"]
        restart_due = bool(options["restart_db_command"])
        next_kill = time.monotonic() + self.pause()
        while time.monotonic() < end:
            time.sleep(0.05)
            self.replace_exited()
            finished = self.finished()
            self.show(finished)
            if restart_due and (finished or 0) >= options["runs"] // 4:
                restart_due = False
                self.restart_database()
            if finished is not None and finished >= options["runs"]:
                return
            if options["kill_every"] and time.monotonic() >= next_kill:
                index = self.random.randrange(len(self.workers))
                self.workers[index].kill()
                self.kills += 1
                self.retired.append(self.workers[index])
                self.workers[index] = self.spawn()
                next_kill = time.monotonic() + self.pause()
        if restart_due:  # the runs were slower than expected: restart the database now
            self.restart_database()

    def pause(self) -> float:
        return float(self.random.uniform(0.5, 1.5) * self.options["kill_every"])

    def restart_database(self) -> None:
        command = self.options["restart_db_command"]
        done = subprocess.run(shlex.split(command), capture_output=True, text=True, check=False)
        if done.returncode:
            raise CommandError(f"{command!r} exited with {done.returncode}: {done.stderr.strip()}")
        self.restarts += 1

    def drain(self) -> bool:
        deadline = time.monotonic() + self.options["timeout"]
        while time.monotonic() < deadline:
            self.replace_exited()
            finished = self.finished()
            self.show(finished)
            if finished is not None and finished >= self.options["runs"]:
                return True
            time.sleep(0.2)
        return False

    def show(self, finished: int | None) -> None:
        if finished is not None:  # (None: the database is away)
            self.progress.update(
                finished, f"worker kills {self.kills}, database restarts {self.restarts}"
            )

    def replace_exited(self) -> None:
        """A worker that exited without being killed is a failure: note it, start another."""
        for index, worker in enumerate(self.workers):
            if worker.exited_by_itself():
                self.other_exits.append(worker)
                self.retired.append(worker)
                self.workers[index] = self.spawn()

    def finished(self) -> int | None:
        """How many runs have finished; None while the database is away."""
        try:
            return WorkflowRun.objects.filter(
                namespace=NAMESPACE,
                workflow_name=ledger_steps.name,
                status__in=WorkflowRun.FINISHED_STATUSES,
            ).count()
        except DatabaseError:
            connection.close()
            return None

    def query(self, fn: Any) -> Any:
        """Call ``fn``, retrying while the database comes back."""
        for _ in range(100):
            try:
                return fn()
            except DatabaseError:
                connection.close()
                time.sleep(0.2)
        return fn()

    def report_crashes(self) -> int:
        """Print the logs of workers that exited or crashed on their own; count the crashes."""
        for worker in self.other_exits:
            tail = worker.log.read_text(errors="replace").splitlines()[-20:]
            self.stderr.write(
                f"worker exited with {worker.process.returncode} without being killed; "
                "the end of its log:\n" + "\n".join(tail)
            )
        crashes = 0
        for worker in [*self.workers, *self.retired]:
            text = worker.log.read_text(errors="replace")
            crashes += text.count(ENGINE_CRASH)
            if ENGINE_CRASH in text:
                start = text.index(ENGINE_CRASH)
                self.stderr.write(f"a worker logged an engine crash:\n{text[start : start + 3000]}")
        return crashes

    def summary(self, result: Audit, crashes: int, seconds: float) -> str:
        others = ", ".join(f"{k} {v}" for k, v in sorted(result.failed_attempts.items())) or "0"
        return (
            f"chaos: runs completed {result.completed}/{result.runs}, "
            f"lost {result.lost}, "
            f"duplicated ledger rows {result.duplicated_ledger_rows}, "
            f"stuck {len(result.stuck)}, "
            f"missing ledger rows {result.missing_ledger_rows}, "
            f"wrong outputs {result.wrong_outputs}, "
            f"step.run re-executions {result.reexecutions}, "
            f"steps interrupted (WorkerLost) {result.lost_attempts}, "
            f"other failed attempts {others}, "
            f"worker kills {self.kills}, database restarts {self.restarts}, "
            f"worker exits not caused by the chaos {len(self.other_exits)}, "
            f"engine crashes {crashes}, "
            f"{seconds:.1f} s"
        )
