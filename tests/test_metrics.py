"""Prometheus metrics (metrics.py): the instrument, the queue gauges read from the database
with their time limit, and ``runworker --metrics-port`` scraped over HTTP."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, connection, transaction
from django.test import override_settings
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from django_openworkflow.clock import Now
from django_openworkflow.instruments import install, uninstall
from django_openworkflow.metrics import BUCKETS, MAX_STEP_SERIES, WorkerMetrics, step_label
from django_openworkflow.models import WorkflowRun
from django_openworkflow.queue_status import queue_load, time_limit
from django_openworkflow.registry import Workflow, get_workflow
from tests.conftest import ROOT, ROW_LOCKS, claim_and_execute, make_due
from tests.testapp.workflows import (
    atomic_writer,
    flaky,
    interrupted_once,
    repeated_names,
    three_steps,
    waits_for_file,
)

DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"


@pytest.fixture
def metrics():
    """A WorkerMetrics installed as an instrument for the test."""
    metrics = WorkerMetrics()
    install(metrics)
    yield metrics
    uninstall(metrics)


def sample(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def db_now():
    """The database clock (a fresh reading on every database but PostgreSQL in a transaction)."""
    return WorkflowRun.objects.annotate(now=Now()).values_list("now", flat=True)[:1].get()


# --- the instrument ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("fetch", "fetch"),
        ("fetch:1", "fetch"),
        ("fetch:12", "fetch"),
        ("a:b", "a:b"),
        (":1", ":1"),
        ("x:2:1", "x:2"),
        ("x:", "x:"),
        ("x:²", "x:²"),
    ],
)
def test_a_step_is_labelled_without_the_number_of_its_repeated_call(name, label):
    assert step_label(name) == label


@pytest.mark.django_db
def test_a_completed_run_counts_its_run_its_steps_and_times_them(metrics):
    three_steps.start({"i": 1})
    assert claim_and_execute().status == "completed"
    assert (
        sample(
            metrics, "openworkflow_runs_finished_total", workflow="three-steps", status="completed"
        )
        == 1
    )
    for step in ("s0", "s1", "s2"):
        labels = {"workflow": "three-steps", "step": step}
        assert (
            sample(metrics, "openworkflow_step_attempts_total", **labels, status="completed") == 1
        )
        assert sample(metrics, "openworkflow_step_duration_seconds_count", **labels) == 1
        assert (
            sample(metrics, "openworkflow_step_duration_seconds_bucket", **labels, le="+Inf") == 1
        )
    assert (
        sample(
            metrics, "openworkflow_executions_total", workflow="three-steps", outcome="completed"
        )
        == 1
    )
    assert (
        sample(metrics, "openworkflow_runs_finished_total", workflow="three-steps", status="failed")
        is None
    )


@pytest.mark.django_db
def test_a_retried_step_counts_its_failed_attempt_and_the_run_finishes_once(metrics):
    run = flaky.start({"failures": 1})
    assert claim_and_execute().status == "pending"  # parked for the retry
    labels = {"workflow": "flaky", "step": "flaky"}
    assert sample(metrics, "openworkflow_step_attempts_total", **labels, status="failed") == 1
    assert sample(metrics, "openworkflow_executions_total", workflow="flaky", outcome="parked") == 1
    assert (
        sample(metrics, "openworkflow_runs_finished_total", workflow="flaky", status="completed")
        is None
    )
    make_due(run)
    assert claim_and_execute().status == "completed"
    assert sample(metrics, "openworkflow_step_attempts_total", **labels, status="failed") == 1
    assert sample(metrics, "openworkflow_step_attempts_total", **labels, status="completed") == 1
    assert sample(metrics, "openworkflow_step_duration_seconds_count", **labels) == 2
    assert (
        sample(metrics, "openworkflow_runs_finished_total", workflow="flaky", status="completed")
        == 1
    )


@pytest.mark.django_db
def test_a_pass_whose_workflow_function_raised_and_is_retried_counts_as_retrying(metrics):
    get_workflow("workflow-retries").start()
    assert claim_and_execute().status == "pending"  # parked for the workflow's retry
    passes = {"workflow": "workflow-retries"}
    assert sample(metrics, "openworkflow_executions_total", **passes, outcome="retrying") == 1
    assert sample(metrics, "openworkflow_executions_total", **passes, outcome="parked") is None


@pytest.mark.django_db
def test_a_failed_run_is_counted_failed(metrics):
    atomic_writer.start({"fail": True})
    assert claim_and_execute().status == "failed"
    assert (
        sample(
            metrics, "openworkflow_runs_finished_total", workflow="atomic-writer", status="failed"
        )
        == 1
    )
    assert (
        sample(
            metrics,
            "openworkflow_step_attempts_total",
            workflow="atomic-writer",
            step="write",
            status="failed",
        )
        == 1
    )
    assert (
        sample(metrics, "openworkflow_executions_total", workflow="atomic-writer", outcome="failed")
        == 1
    )


@pytest.mark.django_db
def test_a_step_the_engine_unwinds_through_is_interrupted(metrics):
    interrupted_once.start()
    with pytest.raises(KeyboardInterrupt):
        claim_and_execute()
    assert (
        sample(
            metrics,
            "openworkflow_step_attempts_total",
            workflow="interrupted-once",
            step="step",
            status="interrupted",
        )
        == 1
    )
    assert (
        sample(
            metrics, "openworkflow_executions_total", workflow="interrupted-once", outcome="crashed"
        )
        == 1
    )


@pytest.mark.django_db
def test_steps_of_a_loop_share_one_series(metrics):
    repeated_names.start()
    assert claim_and_execute().status == "completed"
    # x:1 (given), x, x:2, x:3 (numbered) and "x:2" given again, stored as x:2:1
    assert (
        sample(
            metrics,
            "openworkflow_step_attempts_total",
            workflow="repeated-names",
            step="x",
            status="completed",
        )
        == 4
    )
    assert (
        sample(
            metrics,
            "openworkflow_step_attempts_total",
            workflow="repeated-names",
            step="x:2",
            status="completed",
        )
        == 1
    )


def test_step_names_past_the_cap_are_counted_as_other(caplog):
    metrics = WorkerMetrics()
    caplog.set_level(logging.WARNING, logger="django_openworkflow.metrics")
    labels = [metrics.step("w", f"step-{i}") for i in range(MAX_STEP_SERIES + 2)]
    assert labels[MAX_STEP_SERIES - 1] == f"step-{MAX_STEP_SERIES - 1}"
    assert labels[MAX_STEP_SERIES:] == ["(other)", "(other)"]
    assert metrics.step("w", "step-0") == "step-0"  # known names keep their label
    assert [r.getMessage() for r in caplog.records] == [
        f"metrics: more than {MAX_STEP_SERIES} workflow/step names; later ones are counted as "
        f"step=(other) (step names built from data?) workflow=w step=step-{MAX_STEP_SERIES}"
    ]


def test_the_buckets_reach_from_milliseconds_to_an_hour():
    assert BUCKETS[0] == 0.005
    assert BUCKETS[-1] == 3600
    assert list(BUCKETS) == sorted(set(BUCKETS))


@pytest.mark.django_db
def test_busy_slots_and_slots_are_read_at_scrape_time():
    busy = [0]
    metrics = WorkerMetrics(busy_slots=lambda: busy[0], slots=4)
    assert sample(metrics, "openworkflow_worker_slots_busy") == 0
    busy[0] = 3
    assert sample(metrics, "openworkflow_worker_slots_busy") == 3
    assert sample(metrics, "openworkflow_worker_slots") == 4


@pytest.mark.django_db
def test_two_workers_metrics_live_side_by_side(metrics):
    other = WorkerMetrics()
    three_steps.start()
    claim_and_execute()
    assert (
        sample(
            metrics, "openworkflow_runs_finished_total", workflow="three-steps", status="completed"
        )
        == 1
    )
    assert (
        sample(
            other, "openworkflow_runs_finished_total", workflow="three-steps", status="completed"
        )
        is None
    )
    assert sample(other, "process_cpu_seconds_total") is not None


# --- the queue gauges -----------------------------------------------------------------


def set_run(run: WorkflowRun, **fields) -> WorkflowRun:
    WorkflowRun.objects.filter(pk=run.pk).update(**fields)
    run.refresh_from_db()
    return run


@pytest.mark.django_db
@override_settings(OPENWORKFLOW={"QUEUES": {"default": {}, "quiet": {}}})
def test_the_queue_gauges_count_due_and_in_progress_runs_and_the_oldest_due_age():
    ago = lambda s: Now() - timedelta(seconds=s)  # noqa: E731
    later = Now() + timedelta(hours=1)
    oldest = set_run(three_steps.start(), available_at=ago(100))  # due, never started
    set_run(three_steps.start(), available_at=ago(10))  # due
    set_run(three_steps.start(), available_at=later)  # not due yet
    set_run(three_steps.start(), available_at=later, started_at=ago(50))  # parked: in progress
    set_run(three_steps.start(), available_at=ago(5), started_at=ago(50))  # woken: both
    set_run(three_steps.start(), available_at=ago(5), status="running", started_at=ago(9))  # lease
    set_run(three_steps.start(), available_at=ago(500), status="completed")  # finished
    set_run(three_steps.start(), available_at=ago(500), deadline_at=ago(1))  # past its deadline
    set_run(three_steps.start(), available_at=ago(500), namespace="elsewhere")
    other = set_run(three_steps.start(), queue="unlisted", available_at=ago(30))  # no longer listed

    metrics = WorkerMetrics()
    before = db_now()
    text = generate_latest(metrics.registry).decode()
    after = db_now()
    values = scraped(text)

    assert values[key("openworkflow_runs_due", queue="default")] == 4
    assert values[key("openworkflow_runs_in_progress", queue="default")] == 3
    assert values[key("openworkflow_runs_due", queue="quiet")] == 0  # configured, idle
    assert values[key("openworkflow_oldest_due_age_seconds", queue="quiet")] == 0
    assert values[key("openworkflow_runs_due", queue="unlisted")] == 1
    assert values[key("openworkflow_runs_in_progress", queue="unlisted")] == 0
    # The age on the database clock, read between the two readings around the scrape.
    for run, queue in ((oldest, "default"), (other, "unlisted")):
        age = timedelta(seconds=values[key("openworkflow_oldest_due_age_seconds", queue=queue)])
        assert before <= run.available_at + age <= after
    assert values[key("openworkflow_metrics_scrape_errors_total")] == 0


@pytest.mark.django_db
def test_a_scrape_while_another_reads_answers_with_the_last_reading_without_a_query():
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    metrics = WorkerMetrics()
    due = key("openworkflow_runs_due", queue="default")
    first = scraped(generate_latest(metrics.registry).decode())[due]
    three_steps.start()
    metrics.queues._reading.acquire()  # another scrape is reading
    try:
        with CaptureQueriesContext(connection) as queries:
            busy = scraped(generate_latest(metrics.registry).decode())
    finally:
        metrics.queues._reading.release()
    assert (busy[due], len(queries)) == (first, 0)
    assert scraped(generate_latest(metrics.registry).decode())[due] == first + 1


@pytest.mark.django_db
def test_queue_load_reads_one_namespace():
    set_run(three_steps.start(), namespace="elsewhere")
    assert [(q.queue, q.due) for q in queue_load("elsewhere")] == [("default", 1)]
    assert [(q.queue, q.due, q.oldest_due_age) for q in queue_load("nothing-here")] == [
        ("default", 0, None)
    ]


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def scraped(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, of a /metrics text."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# --- the time limit -----------------------------------------------------------------------

COUNT_FOREVER = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
    "SELECT COUNT(*) FROM c"
)


@pytest.mark.skipif(connection.vendor != "sqlite", reason="the SQLite progress handler")
@pytest.mark.django_db
def test_sqlite_stops_the_queries_of_a_time_limit_and_only_those():
    with (
        pytest.raises(DatabaseError, match="interrupted"),
        time_limit("default", 0.01),
        connection.cursor() as cursor,
    ):
        cursor.execute(COUNT_FOREVER)
    # The deadline has passed: a handler left behind would interrupt this too.
    with connection.cursor() as cursor:
        cursor.execute(COUNT_FOREVER.replace("1000000000", "100000"))
        assert cursor.fetchone() == (100000,)


@pytest.mark.skipif(connection.vendor == "sqlite", reason="a server's variable")
@pytest.mark.django_db(transaction=True)
def test_a_time_limit_ends_with_its_block():
    variable = {"postgresql": "statement_timeout"}.get(connection.vendor)
    if variable is None:
        variable = "max_statement_time" if connection.mysql_is_mariadb else "max_execution_time"

    def current():
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute(f"SHOW {variable}")
            else:
                cursor.execute(f"SELECT @@SESSION.{variable}")
            return str(cursor.fetchone()[0])

    before = current()
    with time_limit("default", 0.25):
        assert current() in ("250ms", "0.25", "250")  # PostgreSQL, MariaDB, MySQL
    assert current() == before


@pytest.mark.skipif(not ROW_LOCKS, reason="a table lock of another connection")
@pytest.mark.django_db(transaction=True)
def test_a_scrape_whose_queries_time_out_answers_with_the_rest_and_counts_the_error(caplog):
    caplog.set_level(logging.INFO, logger="django_openworkflow.metrics")
    three_steps.start()
    locked, release = threading.Event(), threading.Event()
    table = WorkflowRun._meta.db_table

    def hold_the_table():
        try:
            if connection.vendor == "postgresql":
                with transaction.atomic(), connection.cursor() as cursor:
                    cursor.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
                    locked.set()
                    release.wait(30)
            else:
                with connection.cursor() as cursor:
                    cursor.execute(f"LOCK TABLES `{table}` WRITE")
                    locked.set()
                    release.wait(30)
                    cursor.execute("UNLOCK TABLES")
        finally:
            locked.set()
            connection.close()

    holder = threading.Thread(target=hold_the_table, daemon=True)
    holder.start()
    assert locked.wait(10)
    metrics = WorkerMetrics(query_timeout=0.05, busy_slots=lambda: 2)
    try:
        first = scraped(generate_latest(metrics.registry).decode())
        second = scraped(generate_latest(metrics.registry).decode())
    finally:
        release.set()
        holder.join(10)
    for values in (first, second):
        assert key("process_cpu_seconds_total") in values
        assert values[key("openworkflow_worker_slots_busy")] == 2
        assert not [name for name, _ in values if name.startswith("openworkflow_runs_")]
    assert first[key("openworkflow_metrics_scrape_errors_total")] == 1
    assert second[key("openworkflow_metrics_scrape_errors_total")] == 2
    logged = [r.getMessage() for r in caplog.records if r.name == "django_openworkflow.metrics"]
    [warning] = logged  # logged once
    assert warning.startswith(
        "metrics: queue gauges not read namespace=default error=OperationalError: "
    )
    assert "(logged once until they are read again)" in warning

    third = scraped(generate_latest(metrics.registry).decode())  # the lock is gone
    assert third[key("openworkflow_runs_due", queue="default")] == 1
    assert third[key("openworkflow_metrics_scrape_errors_total")] == 2
    assert caplog.records[-1].getMessage() == "metrics: queue gauges read again namespace=default"


@pytest.mark.skipif(connection.vendor != "sqlite", reason="the SQLite progress handler")
@pytest.mark.django_db
def test_a_sqlite_scrape_past_its_time_limit_answers_with_the_rest():
    typo = Workflow(lambda ctx: None, name="nobody-runs-it")
    for _ in range(300):  # enough rows that the count passes the progress handler
        typo.start()
    metrics = WorkerMetrics(query_timeout=0)  # the deadline is already past
    values = scraped(generate_latest(metrics.registry).decode())
    assert values[key("openworkflow_metrics_scrape_errors_total")] == 1
    assert key("openworkflow_runs_due", queue="default") not in values
    assert key("process_cpu_seconds_total") in values


# --- the dashboard --------------------------------------------------------------------


@pytest.mark.django_db
def test_the_grafana_dashboard_queries_only_metrics_that_exist():
    dashboard = json.loads(DASHBOARD.read_text())
    queried = set(re.findall(r"\bopenworkflow_\w+", json.dumps(dashboard)))  # queries, variables
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    exported = {
        family.name + suffix
        for family in WorkerMetrics(busy_slots=lambda: 0, slots=1).registry.collect()
        for suffix in suffixes.get(family.type, [""])
    }
    assert queried, "the dashboard queries no openworkflow_ metric"
    assert queried <= exported, sorted(queried - exported)
    titles = [panel["title"] for panel in dashboard["panels"]]
    for title in (
        "Runs finished by status",
        "Step failure rate",
        "Step duration p50 / p95",
        "Due runs per queue",
        "Oldest due run per queue",
        "Busy slots",
    ):
        assert title in titles


# --- runworker --metrics-port ------------------------------------------------------------


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return scraped(response.read().decode())


def wait_for_value(url, key, value, timeout=20.0):
    end = time.monotonic() + timeout
    while (got := scrape(url).get(key)) != value:
        assert time.monotonic() < end, f"{key} is {got}, not {value}"
        time.sleep(0.05)


@pytest.mark.django_db(transaction=True)
def test_a_real_worker_serves_metrics_that_move_as_runs_finish(worker_process, tmp_path):
    stranded = Workflow(lambda ctx: None, name="no-worker-knows-it").start()  # due forever
    flag = tmp_path / "go"
    proc = worker_process("--metrics-port", "0", "--concurrency", "2", "--poll-interval", "0.1")
    proc.wait_for("metrics served url=")
    [url] = re.findall(r"metrics served url=(\S+)", proc.output())
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url)

    finished = key("openworkflow_runs_finished_total", workflow="three-steps", status="completed")
    busy = key("openworkflow_worker_slots_busy")
    assert scrape(url).get(finished) is None
    blocked = waits_for_file.start({"path": str(flag)})
    wait_for_value(url, busy, 1)
    values = scrape(url)
    assert values[key("openworkflow_worker_slots")] == 2
    assert values[key("openworkflow_runs_in_progress", queue="default")] == 1

    runs = [three_steps.start({"i": i}) for i in range(3)]
    for run in runs:
        assert run.result(timeout=20) == {"total": 3}
    values = scrape(url)
    assert values[finished] == 3
    s1 = {"workflow": "three-steps", "step": "s1"}
    assert values[key("openworkflow_step_attempts_total", **s1, status="completed")] == 3
    assert values[key("openworkflow_step_duration_seconds_count", **s1)] == 3
    assert values[key("openworkflow_runs_due", queue="default")] == 1  # the stranded run
    before = db_now()
    age = scrape(url)[key("openworkflow_oldest_due_age_seconds", queue="default")]
    after = db_now()
    stranded.refresh_from_db()
    assert before <= stranded.available_at + timedelta(seconds=age) <= after

    flag.touch()
    assert blocked.result(timeout=20) == 3
    wait_for_value(url, busy, 0)
    done = key("openworkflow_runs_finished_total", workflow="waits-for-file", status="completed")
    assert scrape(url)[done] == 1
    WorkflowRun.objects.cancel(stranded)
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
    with pytest.raises(OSError):  # the endpoint stopped with the worker
        urllib.request.urlopen(url, timeout=5)


@pytest.mark.django_db
def test_runworker_refuses_a_metrics_port_that_is_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CommandError) as info:
            call_command("runworker", "--metrics-port", str(port), verbosity=0)
    assert str(info.value) == (
        f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--metrics-port", "70000"],
            "Error: argument --metrics-port: must be a port number from 0 to 65535, not 70000",
        ),
        (
            ["--metrics-port", "http"],
            "Error: argument --metrics-port: must be a port number, not 'http'",
        ),
        (["--metrics-addr", "0.0.0.0"], "--metrics-addr needs --metrics-port"),
    ],
)
def test_runworker_refuses_bad_metrics_options(args, message):
    with pytest.raises(CommandError) as info:
        call_command("runworker", *args)
    assert str(info.value) == message


WITHOUT_PROMETHEUS = """
import sys
sys.modules["prometheus_client"] = None  # not installed
import django
django.setup()
from django.core.management import call_command
from django.core.management.base import CommandError
try:
    call_command("runworker", "--metrics-port", "0")
except CommandError as exc:
    print("refused:", exc)
from tests.testapp.workflows import three_steps
run = three_steps.start({"i": 1})
call_command("runworker", "--burst", verbosity=0)
run.refresh_from_db()
print("status:", run.status)
"""


@pytest.mark.django_db(transaction=True)
def test_without_prometheus_client_the_worker_works_and_metrics_are_refused():
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PROMETHEUS],
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "OPENWORKFLOW_TEST_DB": str(connection.settings_dict["NAME"]),
            "PYTHONPATH": str(ROOT),
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "refused: --metrics-port needs prometheus_client: pip install django-openworkflow[metrics]",
        "status: completed",
    ]
