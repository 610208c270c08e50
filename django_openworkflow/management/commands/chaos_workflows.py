"""``manage.py chaos_workflows``: kill and cut off workers, restart the database, count losses.

Against your own PostgreSQL database (runs use their own namespace and a
ledger table of their own, ``openworkflow_chaos_ledger``):

1. queues ``--runs`` runs of a workflow of ``--steps`` steps that alternate
   ``step.atomic`` and ``step.run``, each writing a row to the ledger, with a
   short sleep halfway and a child run at the end;
2. starts ``--workers`` ``runworker`` processes of ``--concurrency`` slots,
   each connected to PostgreSQL through a partition proxy of its own
   (``loadtest/proxy.py``);
3. for ``--duration`` seconds (or until every run finished), SIGKILLs a random
   worker about every ``--kill-every`` seconds and starts a new one; once,
   early on, runs ``--restart-db-command`` (e.g. ``pg_ctlcluster 15 main
   restart``); ``--partitions`` times, one after another, black-holes a random
   worker's link for longer than the lease, then heals it: the short ones end
   before the workers' statement timeout (their late writes reach the server
   after the heal), the long ones after it (the worker's watchdog ends the
   connections);
4. lets the workers drain the queue, then prints one summary line and fails
   unless every run completed, no ``step.atomic`` ledger row is missing or
   duplicated, every output is right, no run is stuck (``check_workflow_runs``
   finds nothing), no worker exited on its own, and every partitioned worker
   claimed runs again after its heal, without a restart.
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

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connection
from django.test.utils import override_settings

from ...loadtest import chaos
from ...loadtest.chaos import NAMESPACE, Audit, audit, create_ledger, drop_ledger, ledger_steps
from ...loadtest.limits import worker_env
from ...loadtest.proxy import PROXY_ENV, PartitionProxy, upstream_of
from ...models import WorkflowRun
from ...progress import Progress
from ..workers import positive_int as _positive_int
from ..workers import seconds, spawn_runworker, stop_process

ENGINE_CRASH = "crashed the engine"
WATCHDOG_ENDED = "connection ended by the statement watchdog"
CLAIM_LOST = "claim lost run="
RUN_CLAIMED = "run claimed run="
# How long a partitioned worker may take, after its heal, to claim a run again.
RECOVERY_TIMEOUT = 90.0


def worker_settings(lease: float) -> dict[str, Any]:
    """The chaos workers' connection liveness settings, for a lease of ``lease`` seconds.

    The statement timeout is twice the lease: a partition shorter than that (and longer
    than the lease) ends before the watchdog, so its late writes reach the server after
    the heal; a longer one is ended by the watchdog.
    """
    return {"STATEMENT_TIMEOUT": 2 * lease, "CONNECT_TIMEOUT": 2}


class Worker:
    """One ``runworker`` process of the chaos, with its log file and its partition proxy."""

    def __init__(self, number: int, log_dir: Path, options: dict[str, Any]) -> None:
        self.number = number
        self.log = log_dir / f"worker-{number}.log"
        self.proxy = PartitionProxy(upstream_of(connection.settings_dict)).start()
        env = worker_env(settings.SETTINGS_MODULE, worker_settings(options["lease"]))
        env[PROXY_ENV] = f"{self.proxy.address[0]}:{self.proxy.port}"
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
                env=env,
            )
        self.killed = False
        self.partitioned_at: int | None = None  # log offset when its partition began
        self.healed_at: int | None = None  # log offset at its heal, until it claims again
        self.recovery_deadline = 0.0

    def kill(self) -> None:
        self.killed = True
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.proxy.stop()

    def log_size(self) -> int:
        return self.log.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def claimed_since_heal(self) -> bool:
        return self.healed_at is not None and RUN_CLAIMED in self.log_since(self.healed_at)

    def exited_by_itself(self) -> bool:
        return not self.killed and self.process.poll() is not None

    def stop(self) -> None:
        stop_process(self.process)
        self.proxy.stop()


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
            "--partitions",
            type=int,
            default=3,
            help="How many times a random worker's link to PostgreSQL is black-holed for longer "
            "than the lease, then healed (one after another; 0: none). Default: 3.",
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
        self.partitions = 0
        self.partitioned: Worker | None = None  # the worker cut off now
        self.heal_at = 0.0
        self.recovering: list[Worker] = []  # healed, not yet seen claiming a run
        self.recovered: list[Worker] = []
        self.not_recovered: list[Worker] = []
        self.probes = 0  # runs queued for a healed worker alone, once the others had none left
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
            watchdog_ended, fenced = self.count_logs()
            for worker in self.not_recovered:
                self.stderr.write(
                    f"worker {worker.number} claimed no run within {RECOVERY_TIMEOUT:g} s of its "
                    "partition's heal; the end of its log:\n"
                    + "\n".join(worker.log.read_text(errors="replace").splitlines()[-20:])
                )
        runs = options["runs"] + self.probes
        result = self.query(lambda: audit(runs, options["steps"]))
        seconds = time.monotonic() - started
        self.stdout.write(self.summary(result, crashes, seconds, watchdog_ended, fenced))
        for finding in result.stuck:
            self.stderr.write(f"stuck: {finding}")
        if not options["keep"]:
            WorkflowRun.objects.filter(namespace=NAMESPACE).delete()
            drop_ledger()
        if not drained:
            self.stderr.write(f"the queue did not drain within {options['timeout']:g} s")
        if self.partitions < options["partitions"]:
            self.stderr.write(
                f"only {self.partitions} of {options['partitions']} partitions happened: the "
                "runs finished first (queue more --runs)"
            )
        if (
            not result.ok
            or crashes
            or self.other_exits
            or self.not_recovered
            or self.partitions < options["partitions"]
        ):
            raise CommandError(
                "chaos found lost, doubled, stuck or wrong work, or a worker that did not "
                "recover from a partition (see the lines above)"
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
            self.partition_step(finished or 0)
            if finished is not None and finished >= options["runs"] and self.partitions_over():
                return
            if options["kill_every"] and time.monotonic() >= next_kill:
                index = self.random.randrange(len(self.workers))
                victim = self.workers[index]
                if victim is self.partitioned or victim in self.recovering:
                    continue  # cut off, or to be seen working again: not killed meanwhile
                self.workers[index].kill()
                self.kills += 1
                self.retired.append(self.workers[index])
                self.workers[index] = self.spawn()
                next_kill = time.monotonic() + self.pause()
        if restart_due:  # the runs were slower than expected: restart the database now
            self.restart_database()

    def partition_step(self, finished: int) -> None:
        """Begin, heal and follow the partitions: the k-th of N begins once k/(N+1) of half
        the runs finished and no other is on; it lasts 1.2-1.8 leases (short, under the
        workers' statement timeout of 2 leases) or 2.5-3.5 (long), alternately."""
        options = self.options
        now = time.monotonic()
        if self.partitioned is not None and now >= self.heal_at:
            worker, self.partitioned = self.partitioned, None
            worker.proxy.heal()
            worker.healed_at = worker.log_size()
            worker.recovery_deadline = now + RECOVERY_TIMEOUT
            self.recovering.append(worker)
        for worker in list(self.recovering):
            if worker.claimed_since_heal():
                self.recovering.remove(worker)
                self.recovered.append(worker)
            elif now >= worker.recovery_deadline or worker.process.poll() is not None:
                self.recovering.remove(worker)
                self.not_recovered.append(worker)
        total = options["partitions"]
        due = options["runs"] * (self.partitions + 1) // (2 * (total + 1))
        if self.partitioned is None and self.partitions < total and finished >= due:
            candidates = [w for w in self.workers if w not in self.recovering]
            if not candidates:
                return
            worker = self.random.choice(candidates)
            leases = (
                self.random.uniform(1.2, 1.8)
                if self.partitions % 2 == 0
                else self.random.uniform(2.5, 3.5)
            )
            self.partitions += 1
            self.partitioned = worker
            worker.partitioned_at = worker.log_size()
            worker.proxy.partition()
            self.heal_at = now + leases * options["lease"]

    def probe(self, worker: Worker) -> None:
        """Every run finished before ``worker``, healed, claimed one: queue one run for it
        alone (the other workers are stopped with SIGSTOP meanwhile; they hold no run) and
        wait until it claims it, or its recovery time is up."""
        others = [w for w in self.workers if w is not worker and w.process.poll() is None]
        for other in others:
            other.process.send_signal(signal.SIGSTOP)
        try:
            with override_settings(OPENWORKFLOW={"NAMESPACE": NAMESPACE}):
                ledger_steps.start_many(
                    [
                        {
                            "i": self.options["runs"] + self.probes,
                            "steps": self.options["steps"],
                            "pause_ms": self.options["pause_ms"],
                        }
                    ]
                )
            self.probes += 1
            self.progress.total = self.options["runs"] + self.probes
            while worker in self.recovering:
                time.sleep(0.2)
                self.partition_step(0)
        finally:
            for other in others:
                other.process.send_signal(signal.SIGCONT)

    def partitions_over(self) -> bool:
        """No partition is on and every healed worker was seen claiming again (or gave up)."""
        return self.partitioned is None and not self.recovering

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
            self.partition_step(finished or 0)
            if finished is not None and finished >= self.options["runs"] + self.probes:
                if self.recovering and self.partitioned is None:
                    self.probe(self.recovering[0])
                    continue
                if self.partitions_over():
                    return True
            time.sleep(0.2)
        return False

    def show(self, finished: int | None) -> None:
        if finished is not None:  # (None: the database is away)
            self.progress.update(
                finished,
                f"worker kills {self.kills}, database restarts {self.restarts}, "
                f"partitions {self.partitions}",
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

    def count_logs(self) -> tuple[int, int]:
        """Connections ended by the workers' watchdogs (every worker's log), and fenced late
        writes: ``claim lost`` lines a partitioned worker logged after its partition began
        (a step's write or finish that reached the server after the run was taken over)."""
        ended = fenced = 0
        for worker in [*self.workers, *self.retired]:
            text = worker.log.read_text(errors="replace")
            ended += text.count(WATCHDOG_ENDED)
            if worker.partitioned_at is not None:
                fenced += worker.log_since(worker.partitioned_at).count(CLAIM_LOST)
        return ended, fenced

    def summary(
        self, result: Audit, crashes: int, seconds: float, watchdog_ended: int, fenced: int
    ) -> str:
        others = ", ".join(f"{k} {v}" for k, v in sorted(result.failed_attempts.items())) or "0"
        return (
            f"chaos: runs completed {result.completed}/{result.runs}, "
            f"lost {result.lost}, "
            f"duplicated ledger rows {result.duplicated_ledger_rows}, "
            f"stuck {len(result.stuck)}, "
            f"partitions {self.partitions}, "
            f"missing ledger rows {result.missing_ledger_rows}, "
            f"wrong outputs {result.wrong_outputs}, "
            f"step.run re-executions {result.reexecutions}, "
            f"steps interrupted (WorkerLost) {result.lost_attempts}, "
            f"other failed attempts {others}, "
            f"worker kills {self.kills}, database restarts {self.restarts}, "
            f"connections ended by the watchdog {watchdog_ended}, "
            f"late writes refused by the fence {fenced}, "
            f"partitioned workers running again {len(self.recovered)}/{self.partitions} "
            f"(runs queued for them alone {self.probes}), "
            f"worker exits not caused by the chaos {len(self.other_exits)}, "
            f"engine crashes {crashes}, "
            f"{seconds:.1f} s"
        )
