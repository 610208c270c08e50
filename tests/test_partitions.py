"""Network partitions: a worker whose link to PostgreSQL goes silent (``liveness.py``).

Worker A runs in-process, its connections through a ``PartitionProxy`` (an
alias of its own to the test database, ``OPENWORKFLOW["DATABASE"]``); the
test places the partition exactly, at a pause point. Worker B is a
``runworker`` process connected directly, started once A is cut off.
"""

from __future__ import annotations

import copy
import logging
import threading
import time

import psycopg
import pytest
from django.db import connection, connections
from django.test import override_settings

from django_openworkflow import liveness, pooler
from django_openworkflow.loadtest.proxy import PartitionProxy, upstream_of
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.testing import pause_at
from django_openworkflow.worker import Worker
from tests.conftest import make_due
from tests.testapp.models import Ledger
from tests.testapp.workflows import (
    connection_settings,
    partition_ledger,
    sleeper,
    slow_query,
)

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True, databases=["default", "partitioned"]),
]

ALIAS = "partitioned"
LEASE = 2.0


def wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def proxy(request):
    """A proxy to the test database; the alias ``partitioned`` (a mirror) goes through it.

    Parametrized ``"django-pool"`` (indirect): the alias's connections come from Django's
    connection pool (``OPTIONS["pool"]``, psycopg_pool), as a project's may.
    """
    settings_dict = connections.settings[ALIAS]
    saved = copy.deepcopy(settings_dict)
    pooled = getattr(request, "param", None) == "django-pool"
    with PartitionProxy(upstream_of(connection.settings_dict)) as p:
        settings_dict.update(HOST=p.address[0], PORT=str(p.port))
        if pooled:
            settings_dict["OPTIONS"] = {"pool": {"min_size": 1, "max_size": 8}}
        try:
            yield p
        finally:
            p.heal()
            connections[ALIAS].close()
            if pooled:
                connections[ALIAS].close_pool()
            settings_dict.clear()
            settings_dict.update(saved)


with_and_without_django_pool = pytest.mark.parametrize(
    "proxy", ["direct", "django-pool"], indirect=True
)


class InProcessWorker:
    def __init__(self, worker_id: str = "worker-a", **options) -> None:
        self.worker = Worker(worker_id=worker_id, lease_seconds=LEASE, **options)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run()
        finally:
            connections.close_all()

    def __enter__(self) -> Worker:
        self.thread.start()
        return self.worker

    def __exit__(self, *exc) -> None:
        self.worker.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "worker A did not stop"


def sessions_of(ports: list[int]) -> int:
    """Server sessions still open of these proxy-side ports."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE client_port = ANY(%s)", [ports])
        return int(cursor.fetchone()[0])


def through_proxy(**extra):
    """Worker A's settings: the engine on the proxied alias."""
    return override_settings(
        OPENWORKFLOW={
            "DATABASE": ALIAS,
            "POLL_INTERVAL": 0.2,
            "CONNECT_TIMEOUT": 2,
            **extra,
        }
    )


def start_direct(workflow, data=None) -> WorkflowRun:
    with override_settings(OPENWORKFLOW={"DATABASE": "default"}):
        return workflow.start(data or {})


def assert_once(run: WorkflowRun) -> None:
    """Completed with the right output; its step.atomic row written once."""
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED
    assert run.output == {"total": 3}
    assert Ledger.objects.filter(run_id=run.pk).count() == 1
    completed = StepAttempt.objects.filter(workflow_run=run, status="completed")
    assert sorted(completed.values_list("step_name", flat=True)) == ["first", "second"]


def assert_a_runs_again(worker: Worker) -> None:
    """After the heal, worker A (not restarted) executes a new run to the end."""
    run = start_direct(partition_ledger)
    wait_until(
        lambda: WorkflowRun.objects.get(pk=run.pk).status == WorkflowRun.Status.COMPLETED,
        "worker A to run a new run after the heal",
    )
    assert_once(run)
    workers = set(StepAttempt.objects.filter(workflow_run=run).values_list("worker_id", flat=True))
    assert workers == {"worker-a"}


def completed(run: WorkflowRun) -> bool:
    return WorkflowRun.objects.get(pk=run.pk).status == WorkflowRun.Status.COMPLETED


def cut_before_the_atomic_step(proxy, run: WorkflowRun) -> None:
    """Worker A stands before the fenced start of the step.atomic "second" of ``run``, its
    heartbeat before a renewal (so no transaction of A holds the run's row): cut the link,
    then let both go into the black hole."""
    with (
        pause_at(
            "step.before-fence", when=lambda c: c["run_id"] == run.pk and c["step"] == "second"
        ) as step,
        pause_at("heartbeat.before-renew") as heartbeat,
    ):
        step.wait()
        heartbeat.wait()
        proxy.partition()


@with_and_without_django_pool
def test_a_statement_without_an_answer_is_ended_and_the_run_taken_over(
    proxy, worker_process, caplog
):
    caplog.set_level(logging.WARNING, logger="django_openworkflow")
    run = start_direct(partition_ledger)
    with through_proxy(STATEMENT_TIMEOUT=1), InProcessWorker() as a:
        cut_before_the_atomic_step(proxy, run)
        # The step's start, the renewal and the next claim get no answer: the watchdog
        # ends their connections, and the engine goes its usual ways (release, backoff).
        wait_until(lambda: a.liveness.ended >= 2, "the watchdog to end A's connections")
        b = worker_process("--lease", str(LEASE))
        wait_until(lambda: completed(run), "worker B to take the run over")
        b.stop()
        cut_off = proxy.upstream_ports(client_gone=True)
        assert cut_off  # the connections the watchdog ended, held open by the partition
        proxy.heal()  # A's late bytes reach the server now; the fence refuses them
        # Once those sessions are gone, the server has read (and run) all they held.
        wait_until(lambda: sessions_of(cut_off) == 0, "the cut-off sessions to end")
        assert_a_runs_again(a)
    assert_once(run)
    ended = [r.getMessage() for r in caplog.records if "statement watchdog" in r.getMessage()]
    assert ended and all(
        m.startswith("connection ended by the statement watchdog: no answer for ")
        and "worker=worker-a" in m
        and "statement_timeout=1s" in m
        for m in ended
    ), ended
    # A's first attempt of "second" never started: the late START_STEP was fenced out.
    seconds = StepAttempt.objects.filter(workflow_run=run, step_name="second")
    assert "worker-a" not in set(seconds.values_list("worker_id", flat=True))


def test_a_late_write_after_a_short_partition_is_refused_by_the_fence(
    proxy, worker_process, caplog
):
    caplog.set_level(logging.INFO, logger="django_openworkflow")
    run = start_direct(partition_ledger)
    # Longer than the partition: the late statement is delivered, not ended.
    with through_proxy(STATEMENT_TIMEOUT=600), InProcessWorker() as a:
        cut_before_the_atomic_step(proxy, run)
        b = worker_process("--lease", str(LEASE))
        wait_until(lambda: completed(run), "worker B to take the run over")
        b.stop()
        proxy.heal()
        wait_until(
            lambda: any(
                r.getMessage().startswith(f"claim lost run={run.pk} ") for r in caplog.records
            ),
            "worker A's late step start to be refused by the fence",
        )
        assert a.liveness.ended == 0
        assert_a_runs_again(a)
    assert_once(run)
    seconds = StepAttempt.objects.filter(workflow_run=run, step_name="second")
    assert "worker-a" not in set(seconds.values_list("worker_id", flat=True))


def test_a_claim_cut_off_before_its_commit_is_taken_over_after_the_lease(proxy, worker_process):
    run = start_direct(partition_ledger)
    limited = {"QUEUES": {"default": {"concurrency": 50}}}  # the claim of statements, one by one
    with through_proxy(STATEMENT_TIMEOUT=1, **limited), InProcessWorker() as a:
        with pause_at("claim.before-commit", when=lambda c: run.pk in c["run_ids"]) as claim:
            claim.wait()
            proxy.partition()  # the COMMIT goes into the black hole
        wait_until(lambda: a.liveness.ended >= 1, "the watchdog to end A's claim")
        # A's claim still holds the run's row on the server (its session is alive behind the
        # proxy), until the heal: then the late COMMIT lands, or the session ends.
        proxy.heal()
        b = worker_process("--lease", str(LEASE))
        wait_until(lambda: completed(run), "worker B to take the run over")
        b.stop()
        assert_a_runs_again(a)
    assert_once(run)


@with_and_without_django_pool
def test_the_options_land_on_the_worker_connections(proxy, request):
    run = connection_settings.start()
    with (
        through_proxy(TCP_KEEPALIVE=9, TCP_USER_TIMEOUT=21, CONNECT_TIMEOUT=7),
        InProcessWorker(concurrency=1),
    ):
        wait_until(lambda: completed(run), "the run")
    run.refresh_from_db()
    assert run.output["server"] == {
        "tcp_keepalives_idle": "9",
        "tcp_keepalives_interval": "3",
        "tcp_keepalives_count": "3",
        "tcp_user_timeout": "21000",
    }
    libpq = run.output["libpq"]
    assert (libpq["connect_timeout"], libpq["keepalives"], libpq["keepalives_idle"]) == (
        "7",
        "1",
        "9",
    )
    assert (libpq["keepalives_interval"], libpq["keepalives_count"]) == ("3", "3")
    assert libpq["tcp_user_timeout"] == "21000"
    assert run.output["pooled"] == (request.node.callspec.params["proxy"] == "django-pool")
    assert "connect_timeout" not in connections.settings[ALIAS]["OPTIONS"]  # removed at the end


def test_the_projects_options_win_and_a_pooler_gets_no_session_settings(proxy):
    connections.settings[ALIAS]["OPTIONS"] = {"keepalives_idle": 42}
    with connection.cursor() as cursor:
        cursor.execute("SHOW tcp_keepalives_idle")
        server_default = cursor.fetchone()[0]
    run = connection_settings.start()
    with through_proxy(POOLER=True, TCP_KEEPALIVE=9), InProcessWorker(concurrency=1):
        wait_until(lambda: completed(run), "the run")
    run.refresh_from_db()
    assert run.output["libpq"]["keepalives_idle"] == "42"
    assert run.output["libpq"]["keepalives_interval"] == "3"
    assert run.output["server"]["tcp_keepalives_idle"] == server_default
    assert connections.settings[ALIAS]["OPTIONS"] == {"keepalives_idle": 42}


def test_the_listen_database_connection_gets_the_options_too(monkeypatch):
    """The listener's own connection, to ``LISTEN_DATABASE``, has the libpq options the
    worker's connections have, under the project's ``OPTIONS`` of that alias."""
    saved = copy.deepcopy(connections.settings[ALIAS]["OPTIONS"])
    connections.settings[ALIAS]["OPTIONS"] = {"keepalives_count": 5}
    opened: list[dict[str, str]] = []
    connect = psycopg.connect

    def recording_connect(*args, **kwargs):
        conn = connect(*args, **kwargs)
        if kwargs.get("autocommit"):  # the listener's
            opened.append(conn.info.get_parameters())
        return conn

    monkeypatch.setattr(psycopg, "connect", recording_connect)
    settings = {"DATABASE": "default", "LISTEN_DATABASE": ALIAS, "POOLER": False}
    try:
        with (
            override_settings(OPENWORKFLOW={**settings, "TCP_KEEPALIVE": 9, "CONNECT_TIMEOUT": 7}),
            InProcessWorker(concurrency=1),
        ):
            wait_until(lambda: opened, "the listener to connect")
    finally:
        connections.settings[ALIAS]["OPTIONS"] = saved
    params = opened[0]  # keepalives_count: the alias's own OPTIONS win
    assert (params["connect_timeout"], params["keepalives_idle"]) == ("7", "9")
    assert (params["keepalives_interval"], params["keepalives_count"]) == ("3", "5")


def test_a_steps_own_slow_query_is_left_alone(proxy):
    run = slow_query.start({"seconds": 1.5})
    with through_proxy(STATEMENT_TIMEOUT=0.3), InProcessWorker(concurrency=1) as worker:
        wait_until(lambda: completed(run), "the run")
    run.refresh_from_db()
    assert run.output == "done"
    assert worker.liveness.ended == 0


def test_the_watchdog_ends_only_a_connection_whose_statement_has_no_answer(proxy):
    """``sample()`` on its own: a busy engine statement is ended; idle ones are not."""
    watchdog = liveness.Liveness(ALIAS, "sampler")
    with through_proxy(STATEMENT_TIMEOUT=0.2):
        watchdog.start()
    watchdog._stopped.set()  # no sampler thread: the test samples by hand
    try:
        errors: list[BaseException] = []
        idle_ready = threading.Event()
        release_idle = threading.Event()

        def idle() -> None:
            with watchdog.thread():
                connections[ALIAS].ensure_connection()
                idle_ready.set()
                release_idle.wait(30)
                connections[ALIAS].close()

        def busy() -> None:
            with watchdog.thread():
                try:
                    with connections[ALIAS].cursor() as cursor:
                        cursor.execute("SELECT 1")  # connected, watched, answered
                        proxy.partition()
                        cursor.execute("SELECT 2")  # no answer
                except BaseException as exc:
                    errors.append(exc)
                finally:
                    connections[ALIAS].close()

        threads = [threading.Thread(target=idle), threading.Thread(target=busy)]
        threads[0].start()
        idle_ready.wait(30)
        threads[1].start()
        wait_until(lambda: watchdog.sample() == 1, "the watchdog to end the busy statement")
        threads[1].join(30)
        assert [type(e).__name__ for e in errors] == ["OperationalError"]
        proxy.heal()
        assert watchdog.sample() == 0
        release_idle.set()
        threads[0].join(30)
        assert watchdog.ended == 1
    finally:
        watchdog.stop()


def test_an_engine_statement_that_fails_inside_the_workflow_releases_the_run(proxy):
    """A lost connection under a ``ctx.step`` call is no failure of the workflow function:
    the run is released and replayed, not failed (its retry policy allows one attempt).

    Worker A replays a sleeping run woken early: its wait's settlement, a transaction
    inside ``ctx.step.sleep``, loses its session before parking the run again."""
    run = start_direct(sleeper, {"sleep": "4s"})
    with through_proxy(), InProcessWorker():
        wait_until(
            lambda: StepAttempt.objects.filter(workflow_run=run, step_name="nap").exists(),
            "the run to sleep",
        )
        with pause_at("wait.before-park", when=lambda c: c["run_id"] == run.pk) as park:
            make_due(run)  # woken early: the replay finds the sleep not over, will park
            park.wait()
            with connection.cursor() as cursor:  # end worker A's sessions under it
                cursor.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE client_port = ANY(%s)",
                    [proxy.upstream_ports()],
                )
                assert cursor.fetchone()[0] >= 1
        wait_until(lambda: completed(run), "the run to be replayed and completed")
    run.refresh_from_db()
    assert (run.status, run.output, run.attempts) == ("completed", 2, 0)


def test_a_worker_started_while_the_database_is_unreachable_waits_for_it(proxy, caplog):
    """The pooler detection at the start finds no database: the worker neither dies nor
    takes a guess for good; once the database answers, it runs runs, with the server's
    session settings (detected as not behind a pooler then)."""
    caplog.set_level(logging.WARNING, logger="django_openworkflow")
    pooler.forget()
    run = start_direct(connection_settings)
    proxy.partition()  # every connection attempt of A's hangs until connect_timeout
    with through_proxy(TCP_KEEPALIVE=9), InProcessWorker(concurrency=1) as a:
        wait_until(
            lambda: any("pooler" in r.getMessage() for r in caplog.records),
            "the worker to say it could not detect a pooler",
        )
        assert a.liveness.active
        proxy.heal()
        wait_until(lambda: completed(run), "the run, once the database answers")
    run.refresh_from_db()
    assert run.output["server"]["tcp_keepalives_idle"] == "9"
    assert "keepalives_idle" not in connections.settings[ALIAS]["OPTIONS"]


@pytest.mark.parametrize("lands", [True, False], ids=["commit-lands", "session-ends"])
def test_a_step_atomic_commit_ended_by_the_watchdog_is_stored_once(proxy, caplog, lands):
    """The watchdog ends the connection while a step.atomic's COMMIT is in flight. Held by
    the partition, the late COMMIT lands at the heal: the step's row and result count once,
    the step is not run again. Or the server ends the session first (its keepalives): the
    transaction rolls back, and the step runs again, once."""
    caplog.set_level(logging.WARNING, logger="django_openworkflow")
    run = start_direct(partition_ledger)
    with through_proxy(STATEMENT_TIMEOUT=1), InProcessWorker() as a:
        with pause_at(
            "step.atomic-stored", when=lambda c: c["run_id"] == run.pk and c["step"] == "second"
        ) as stored:
            stored.wait()
            proxy.partition()  # the COMMIT goes into the black hole
        wait_until(lambda: a.liveness.ended >= 1, "the watchdog to end the COMMIT's connection")
        if not lands:
            cut_off = proxy.upstream_ports(client_gone=True)
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE client_port = ANY(%s)",
                    [cut_off],
                )
            wait_until(lambda: sessions_of(cut_off) == 0, "the cut-off sessions to end")
        proxy.heal()
        wait_until(lambda: completed(run), "worker A to finish the run after the heal")
    assert_once(run)
    seconds = StepAttempt.objects.filter(workflow_run=run, step_name="second")
    assert seconds.filter(status="completed").count() == 1
    if lands:
        assert seconds.count() == 1
