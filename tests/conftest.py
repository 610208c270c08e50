"""Shared fixtures: run workflows in-process or in real ``runworker`` processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.db.models.functions import Now
from hypothesis import settings as hypothesis_settings

from django_openworkflow.diagnostics import stuck_runs
from django_openworkflow.engine import Execution
from django_openworkflow.engine.loops import close_thread_loop
from django_openworkflow.models import WorkflowRun
from django_openworkflow.pooler import behind_pooler
from django_openworkflow.registry import get_workflow, workflow_names
from django_openworkflow.store import Claim, get_store
from django_openworkflow.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
ON_POSTGRES = settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
# Tests of what a session keeps between transactions (SQL PREPARE, a session's SET): not
# through a pooler in transaction mode (tests.settings_pgbouncer), where sessions are shared.
NOT_BEHIND_A_POOLER = pytest.mark.skipif(
    getattr(settings, "OPENWORKFLOW_TEST_POOLER", False),
    reason="a session's state between transactions: not behind a pooler in transaction mode",
)
# Row locks, SKIP LOCKED and real concurrency between connections: PostgreSQL or MariaDB/MySQL.
ROW_LOCKS = ON_POSTGRES or settings.DATABASES["default"]["ENGINE"].endswith("mysql")

# Property-based tests (hypothesis). "ci", the default, is stable: the same
# examples on every run (derandomize, no example database), no deadline, as
# many examples as fit a few seconds. HYPOTHESIS_PROFILE=explore searches
# further with fresh random examples each run.
hypothesis_settings.register_profile(
    "ci", max_examples=100, deadline=None, derandomize=True, database=None, print_blob=True
)
hypothesis_settings.register_profile("explore", max_examples=2000, deadline=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs PostgreSQL (run with DATABASE_URL=postgres://...)")
    skip_row_locks = pytest.mark.skip(
        reason="needs row locks: PostgreSQL or MariaDB (DATABASE_URL=postgres://... or mysql://...)"
    )
    for item in items:
        if "postgres" in item.keywords and not ON_POSTGRES:
            item.add_marker(skip)
        elif "row_locks" in item.keywords and not ROW_LOCKS:
            item.add_marker(skip_row_locks)


class WorkerThreads:
    """In-process workers on threads of their own, each closing its connection at the end;
    ``stop_all()`` stops them and checks that they ended."""

    def __init__(self, **defaults) -> None:
        self.defaults = defaults
        self.started: list[tuple[Worker, threading.Thread]] = []

    def start(self, **options) -> Worker:
        worker = Worker(**{**self.defaults, **options})

        def run():
            try:
                worker.run()
            finally:
                connection.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.started.append((worker, thread))
        return worker

    def stop_all(self) -> None:
        for worker, thread in self.started:
            worker.stop()
            thread.join(20)
            assert not thread.is_alive()


@pytest.fixture
def workers():
    """``WorkerThreads`` polling every 50 ms, stopped (and checked) after the test."""
    started = WorkerThreads(poll_interval=0.05)
    yield started
    started.stop_all()


@pytest.fixture
def close_this_threads_loop():
    """For tests that execute runs with async steps on their own thread: that thread's
    StepLoop is closed afterwards, so its companion thread's connection never outlives
    the test (``pytestmark = pytest.mark.usefixtures("close_this_threads_loop")``)."""
    yield
    close_thread_loop()


def claim_and_execute(*, worker_id: str = "test-worker", lease: float = 30.0) -> WorkflowRun | None:
    """Claim one due run and execute one pass of it, as a worker would; None if nothing is due."""
    claimed = get_store().claim(
        worker_id=worker_id,
        workflow_names=workflow_names(),
        limit=1,
        lease_seconds=lease,
        namespace="default",
    )
    if not claimed:
        return None
    [claimed_run] = claimed
    run = claimed_run.run
    Execution(claimed_run, get_workflow(run.workflow_name)).execute()
    run.refresh_from_db()
    return run


def backend_pid() -> int | None:
    """The server process (PostgreSQL) or connection id (MariaDB) of this thread's
    connection, opened if need be; None on SQLite."""
    connection.ensure_connection()
    if connection.vendor == "postgresql":
        return int(connection.connection.info.backend_pid)
    if connection.vendor == "mysql":
        return int(connection.connection.thread_id())
    return None


def lock_holders(pid: int) -> list[int] | None:
    """The backends whose locks backend ``pid`` waits for; None when it waits for no lock.

    Asked on this thread's connection (autocommit: a fresh snapshot each time):
    ``pg_stat_activity`` on PostgreSQL, InnoDB's engine status on MariaDB/MySQL; behind a
    pooler, [] when any backend of the database waits for a lock.
    """
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql" and behind_pooler(connection.alias):
            # A client of a pooler in transaction mode has no server process of its own (its
            # pid is made up): any backend of this database waiting for a lock, holder unknown.
            cursor.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            )
            return [] if cursor.fetchone() else None
        if connection.vendor == "postgresql":
            cursor.execute(
                "SELECT wait_event_type, pg_blocking_pids(pid) FROM pg_stat_activity"
                " WHERE pid = %s",
                [pid],
            )
            row = cursor.fetchone()
            return list(row[1]) if row is not None and row[0] == "Lock" else None
        # MariaDB: information_schema.INNODB_TRX misses transactions whose first statement
        # waits in a locking read; the engine status lists every one ("LOCK WAIT"), without
        # naming who holds the lock (so [] for "waits, holder not known").
        cursor.execute("SHOW ENGINE INNODB STATUS")
        status = cursor.fetchone()[2]
    for block in status.split("\n---TRANSACTION ")[1:]:
        if re.search(rf"\b(MariaDB|MySQL) thread id {pid},", block) and "\nLOCK WAIT " in block:
            return []
    return None


def wait_until_blocked(pid: int, *, by: int, timeout: float = 10.0) -> None:
    """Wait until backend ``pid`` waits for a lock that backend ``by`` holds; fails after
    ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        holders = lock_holders(pid)
        if holders is not None and (by in holders or holders == []):  # []: MariaDB, a pooler
            return
        assert time.monotonic() < end, f"backend {pid} is not waiting for {by}: {holders}"
        time.sleep(0.01)


class Backend(threading.Thread):
    """A thread with its own connection; ``pid`` is its server process, ``error`` what it raised."""

    def __init__(self, target):
        super().__init__(daemon=True)
        self._target_fn = target
        self.pid = None
        self.error = None
        self.connected = threading.Event()

    def run(self):
        try:
            self.pid = backend_pid()
            self.connected.set()
            self._target_fn()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.connected.set()
            connection.close()

    def finish(self):
        self.join(15)
        assert not self.is_alive()
        assert self.error is None, repr(self.error)


def blocked_on_a_lock(thread: Backend) -> bool:
    """Wait (bounded) until ``thread`` has ended or waits for a row lock; True for the lock."""
    assert thread.connected.wait(10)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        if not thread.is_alive():
            return False
        if lock_holders(thread.pid) is not None:
            return True
        time.sleep(0.01)
    raise AssertionError("the thread neither ended nor waited for a lock")


def claim(workflow_name: str, *, worker_id: str = "worker-a") -> list[Claim]:
    """Claim the due run of one workflow as ``worker_id``, without executing it; [] if none."""
    return get_store().claim(
        worker_id=worker_id,
        workflow_names=[workflow_name],
        limit=1,
        lease_seconds=30,
        namespace="default",
    )


def expire_lease(run: WorkflowRun) -> None:
    """Time travel: the run's lease ends now, as if its worker had died."""
    WorkflowRun.objects.filter(pk=run.pk).update(available_at=Now() - timedelta(seconds=1))


def make_due(run: WorkflowRun) -> None:
    """Time travel: make a parked run due now."""
    WorkflowRun.objects.filter(pk=run.pk).update(available_at=Now())


def drain(timeout: float = 20.0, concurrency: int = 4) -> None:
    """Run burst workers in-process until no run is active (waiting out sleeps and retries)."""
    end = time.monotonic() + timeout
    while WorkflowRun.objects.active().exists():
        if time.monotonic() > end:
            active = list(WorkflowRun.objects.active().values_list("workflow_name", "status"))
            raise AssertionError(f"runs still active after {timeout}s: {active}")
        Worker(concurrency=concurrency, burst=True, poll_interval=0.02).run()
        time.sleep(0.02)
    assert_no_stuck_runs()


def assert_no_stuck_runs() -> None:
    """The stuck-run detector finds nothing: checked after every test that ran workers."""
    stuck = stuck_runs()
    assert stuck == [], "stuck runs:\n" + "\n".join(map(str, stuck))


class WorkerProcess:
    """A real ``manage.py runworker`` process on the test database."""

    def __init__(self, *args: str, log: Path, env_extra: dict[str, str] | None = None) -> None:
        env = dict(os.environ, **(env_extra or {}))
        # tests.settings, or tests.settings_pgbouncer (pytest-django sets it from --ds)
        env["DJANGO_SETTINGS_MODULE"] = os.environ.get("DJANGO_SETTINGS_MODULE", "tests.settings")
        env["OPENWORKFLOW_TEST_DB"] = str(connection.settings_dict["NAME"])
        env["PYTHONPATH"] = str(ROOT)
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115  (closed in wait())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "django", "runworker", "-v", "2", *args],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, *texts: str, timeout: float = 20.0) -> None:
        """Until each of ``texts`` is in the log (the process logs at ``-v 2``)."""
        end = time.monotonic() + timeout
        while not all(text in self.output() for text in texts):
            assert time.monotonic() < end, f"{texts} not in the log:\n{self.output()[-3000:]}"
            time.sleep(0.05)

    def wait_until_idle(self) -> None:
        """Until it listens (PostgreSQL) and waits: with a long ``--poll-interval``, only a
        NOTIFY (or a timer of its own) wakes it now."""
        self.wait_for("listening channel=", "worker idle worker=")


@pytest.fixture
def worker_process(tmp_path):
    """Start ``runworker`` processes; all are killed at the end of the test."""
    started: list[WorkerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        proc = WorkerProcess(*args, log=tmp_path / f"worker-{len(started)}.log", env_extra=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
    if started:
        assert_no_stuck_runs()
