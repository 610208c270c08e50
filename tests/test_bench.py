"""bench_workflows prints peer-format JSON lines; start_many enqueues in one statement."""

import json
import re
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.db.models import Count
from django.utils import timezone

from django_openworkflow.loadtest import history
from django_openworkflow.models import QueueStart, StepAttempt, WorkflowRun
from tests.testapp.workflows import echo

pytestmark = pytest.mark.django_db(transaction=True)

FIELDS = {
    "system",
    "variant",
    "runs",
    "concurrency",
    "seconds",
    "runs_per_s",
    "steps_per_s",
    "p50_ms",
    "p95_ms",
    "db_commits_per_run",
}


@pytest.mark.postgres
def test_bench_prints_one_json_line_per_measurement(capsys, monkeypatch):
    monkeypatch.setenv("OPENWORKFLOW_TEST_DB", str(connection.settings_dict["NAME"]))
    call_command(
        "bench_workflows",
        "--runs=20",
        "--concurrency=2",
        "--variants=enqueue_first,worker_running",
        "--latency-runs=3",
        "--idle=0.2",
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["variant"], r["concurrency"]) for r in lines] == [
        ("enqueue_first", 2),
        ("worker_running", 2),
        ("latency_idle_worker", 10),
    ]
    for line in lines:
        assert set(line) >= FIELDS
        assert line["system"] == "django-openworkflow"
    throughput = lines[0]
    assert throughput["steps_completed"] == 60
    assert throughput["runs_per_s"] == pytest.approx(20 / throughput["seconds"], rel=0.01)
    assert throughput["db_commits_per_run"] > 0
    assert 0 < lines[2]["p50_ms"] <= lines[2]["p95_ms"]
    # the benchmark keeps to its own namespaces and cleans up before each measurement
    assert not WorkflowRun.objects.filter(namespace="default").exists()


@pytest.mark.postgres
def test_a_limit_variant_reaches_the_worker_and_is_judged(capsys, monkeypatch):
    monkeypatch.setenv("OPENWORKFLOW_TEST_DB", str(connection.settings_dict["NAME"]))
    call_command(
        "bench_workflows",
        "--runs=20",
        "--concurrency=2",
        "--variants=rate_limit",
        "--rate-limit=1000/h",
        "--skip-latency",
    )
    out = capsys.readouterr()
    unlimited, limited = (json.loads(line) for line in out.out.splitlines())
    assert (unlimited["variant"], limited["variant"]) == ("enqueue_first", "rate_limit")
    assert "verdict" not in unlimited
    assert limited["queue_limits"] == {"rate_limit": "1000/h"}
    assert limited["unlimited_runs_per_s"] == unlimited["runs_per_s"]
    assert limited["steps_completed"] == 60
    # 20 runs never span an hour: nothing to measure the rate over
    assert (limited["started_per_s"], limited["verdict"]) == (None, "fail")
    assert "nothing to measure (more runs?): fail" in out.err
    # the worker knew the queue's rate limit: it counted each first start against it
    rows = list(
        QueueStart.objects.filter(namespace="openworkflow-bench").values_list(
            "queue", "run_id", "started_at"
        )
    )
    runs = list(
        WorkflowRun.objects.filter(namespace="openworkflow-bench").values_list(
            "id", "started_at", "finished_at", "queue", "attempts"
        )
    )
    assert len(rows) == 20, (rows, runs)
    assert set(WorkflowRun.objects.values_list("queue", flat=True)) == {"bench-limited"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concurrency=0"], "expected positive whole numbers, not '0'"),
        (["--concurrency=ten"], "expected whole numbers separated by commas, not 'ten'"),
        (["--variants=fast"], "unknown variants: fast"),
        (["--runs=0"], "--runs, --reps and --latency-runs must be at least 1"),
        (
            ["--rate-limit=fast"],
            'a rate limit is "N/s", "N/m" or "N/h" with N at least 1, not \'fast\'',
        ),
        (["--keys=0"], "--keys must be at least 1"),
        (["--history=-1"], "--history must be at least 0"),
        (
            ["--variants=rate_limit", "--rate-limit=1/s"],
            "--runs 1000 at 1/s take 1000 s, more than --timeout 300 s",
        ),
    ],
)
def test_bench_refuses_bad_options(args, message):
    with pytest.raises(CommandError) as info:
        call_command("bench_workflows", *args)
    assert str(info.value) == message


def test_the_history_is_finished_runs_of_three_attempts_in_a_namespace_of_its_own():
    assert history.fill(250, connection.alias) == 250
    runs = WorkflowRun.objects.filter(namespace=history.NAMESPACE)
    assert dict(runs.values_list("status").annotate(n=Count("pk"))) == {
        "completed": 226,
        "failed": 17,
        "canceled": 7,
    }
    assert runs.values("workflow_name").distinct().count() == 20
    assert not runs.filter(finished_at__isnull=True).exists()
    attempts = StepAttempt.objects.filter(workflow_run__namespace=history.NAMESPACE)
    assert attempts.filter(status="completed").count() == 750
    oldest = runs.order_by("created_at").first().created_at
    assert timezone.now() - oldest > timedelta(days=89)
    # topped up, never doubled
    assert history.fill(250, connection.alias) == 250
    assert history.fill(260, connection.alias) == 260
    assert WorkflowRun.objects.count() == 260


@pytest.mark.postgres
def test_bench_with_a_history_reports_it_and_keeps_it(capsys, monkeypatch):
    monkeypatch.setenv("OPENWORKFLOW_TEST_DB", str(connection.settings_dict["NAME"]))
    call_command(
        "bench_workflows",
        "--runs=10",
        "--concurrency=2",
        "--variants=enqueue_first",
        "--skip-latency",
        "--history=40",
    )
    out = capsys.readouterr()
    [line] = [json.loads(line) for line in out.out.splitlines()]
    assert (line["runs"], line["history_runs"]) == (10, 40)
    assert out.err == "history: 40 finished runs in the tables\n"  # no progress: not a terminal
    assert WorkflowRun.objects.filter(namespace=history.NAMESPACE).count() == 40


class TTY(StringIO):
    def isatty(self):
        return True


@pytest.mark.postgres
def test_bench_shows_the_runs_finished_on_a_terminal(monkeypatch):
    monkeypatch.setenv("OPENWORKFLOW_TEST_DB", str(connection.settings_dict["NAME"]))
    monkeypatch.setenv("COLUMNS", "200")
    out, err = StringIO(), TTY()
    call_command(
        "bench_workflows",
        "--runs=10",
        "--concurrency=2",
        "--variants=enqueue_first",
        "--latency-runs=3",
        "--idle=0.2",
        stdout=out,
        stderr=err,
    )
    assert [json.loads(line)["variant"] for line in out.getvalue().splitlines()] == [
        "enqueue_first",
        "latency_idle_worker",
    ]
    # one line each measurement, rewritten in place, then ended
    throughput, latency, end = err.getvalue().split("\n")
    assert throughput.startswith("\renqueue_first C=2: ")
    assert re.fullmatch(
        r"enqueue_first C=2: 10/10 runs \(100%\); [0-9.]+/s, took 0:\d\d *",
        throughput.split("\r")[-1],
    )
    assert latency.split("\r")[1].startswith("latency C=10: 0/3 runs (0%); 0.0/s, ETA ?")
    assert re.fullmatch(
        r"latency C=10: 3/3 runs \(100%\); [0-9.]+/s, took 0:\d\d *", latency.split("\r")[-1]
    )
    assert end == ""


def test_start_many_enqueues_every_input_in_one_go():
    runs = echo.start_many([{"n": i} for i in range(5)])
    assert [r.input for r in runs] == [{"n": i} for i in range(5)]
    assert WorkflowRun.objects.filter(workflow_name="echo", status="pending").count() == 5


def test_start_many_refuses_a_non_json_input_naming_its_index():
    with pytest.raises(TypeError) as info:
        echo.start_many([{"n": 1}, {"n": {2}}])
    assert str(info.value).startswith(
        "input 1 of workflow \"echo\" is not a JSON value: $['n'] is a builtins.set"
    )
    assert not WorkflowRun.objects.exists()


def test_runworker_workflows_module_must_import():
    with pytest.raises(CommandError) as info:
        call_command("runworker", "--burst", "--workflows-module", "no.such.module")
    assert str(info.value).startswith("--workflows-module 'no.such.module' cannot be imported")


def test_runworker_namespace_picks_the_runs_it_claims():
    from django.test import override_settings

    with override_settings(OPENWORKFLOW={"NAMESPACE": "other"}):
        other = echo.start(1)
    mine = echo.start(2)
    call_command("runworker", "--burst", "--namespace", "other", verbosity=0)
    assert WorkflowRun.objects.get(pk=other.pk).status == "completed"
    assert WorkflowRun.objects.get(pk=mine.pk).status == "pending"
