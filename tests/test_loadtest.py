"""``django_openworkflow.loadtest``: only the load-test commands import it, never the core;
the pure pieces of the benchmark's queue-limit variants (``loadtest/limits.py``)."""

import importlib
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from django_openworkflow.loadtest import limits

ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter: this test process imported the load tests already (test_chaos.py).
IMPORT_THE_CORE = """
import importlib
import json
import pkgutil
import sys

import django

django.setup()

import django_openworkflow
from django.core.management import call_command

LOAD_TESTS = {
    "django_openworkflow.loadtest",
    "django_openworkflow.management.commands.bench_workflows",
    "django_openworkflow.management.commands.chaos_workflows",
    "django_openworkflow.management.commands.soak_workflows",
}


def walk(package):
    # pkgutil.walk_packages would import the loadtest package to look inside it: skip it first.
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name in LOAD_TESTS:
            continue
        module = importlib.import_module(info.name)
        yield info.name
        if info.ispkg:
            yield from walk(module)


def loaded_load_tests():
    return sorted(name for name in sys.modules if name.startswith("django_openworkflow.loadtest"))


imported = list(walk(django_openworkflow))
call_command("check")
core = loaded_load_tests()
importlib.import_module("django_openworkflow.management.commands.chaos_workflows")
importlib.import_module("django_openworkflow.management.commands.bench_workflows")
importlib.import_module("django_openworkflow.management.commands.soak_workflows")
print(json.dumps({"imported": imported, "core": core, "commands": loaded_load_tests()}))
"""


def test_the_core_never_imports_the_load_tests():
    env = {k: v for k, v in os.environ.items() if k != "OPENWORKFLOW_TEST_DB"}
    env.update(DJANGO_SETTINGS_MODULE="tests.settings", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_THE_CORE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    # the walk reached the whole core: models, engine, worker, admin, migrations, other commands
    assert {
        "django_openworkflow.admin",
        "django_openworkflow.engine",
        "django_openworkflow.worker",
        "django_openworkflow.testing",
        "django_openworkflow.views",
        "django_openworkflow.migrations.0001_initial",
        "django_openworkflow.management.commands.runworker",
        "django_openworkflow.management.commands.check_workflow_runs",
    } <= set(found["imported"])
    assert not [name for name in found["imported"] if "loadtest" in name]
    assert found["core"] == []
    # ...and the check would see it: the load-test commands import the package.
    assert found["commands"] == [
        "django_openworkflow.loadtest",
        "django_openworkflow.loadtest.bench",
        "django_openworkflow.loadtest.chaos",
        "django_openworkflow.loadtest.growth",
        "django_openworkflow.loadtest.history",
        "django_openworkflow.loadtest.limits",
        "django_openworkflow.loadtest.proxy",
        "django_openworkflow.loadtest.soak",
    ]


# --- the queue-limit variants of bench_workflows ---------------------------------------------

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)


def at(*seconds):
    return [T0 + timedelta(seconds=s) for s in seconds]


@pytest.mark.parametrize(
    ("text", "variants"),
    [
        ("enqueue_first,worker_running", ["enqueue_first", "worker_running"]),
        ("worker_running", ["worker_running"]),
        ("", []),
        ("rate_limit", ["enqueue_first", "rate_limit"]),
        (
            "key_concurrency,worker_running,queue_concurrency",
            ["enqueue_first", "worker_running", "key_concurrency", "queue_concurrency"],
        ),
        ("queue_concurrency,enqueue_first,", ["enqueue_first", "queue_concurrency"]),
    ],
)
def test_limit_variants_come_after_the_unlimited_one_they_are_compared_with(text, variants):
    assert limits.parse_variants(text) == variants


def test_unknown_variants_are_refused_by_name():
    with pytest.raises(ValueError) as info:
        limits.parse_variants("rate_limit,fast,slow")
    assert str(info.value) == "unknown variants: fast, slow"


def test_the_rate_limit_option_is_a_queue_rate_limit():
    assert limits.check_rate_limit(" 200 / s") == "200/s"
    assert limits.rate_per_s("120/m") == 2.0
    with pytest.raises(ValueError) as info:
        limits.check_rate_limit("fast")
    assert (
        str(info.value) == 'a rate limit is "N/s", "N/m" or "N/h" with N at least 1, not \'fast\''
    )


def test_a_rate_limited_measurement_must_fit_in_the_timeout():
    limits.check_duration(1000, "200/s", 5.0)
    with pytest.raises(ValueError) as info:
        limits.check_duration(1000, "100/m", 300.0)
    assert str(info.value) == "--runs 1000 at 100/m take 600 s, more than --timeout 300 s"


def test_each_limit_variant_sets_one_limit_on_its_own_queue():
    queues = {"default": {}, "emails": {"rate_limit": "5/s"}}
    assert limits.overrides("enqueue_first", 10, "200/s", queues) == {}
    assert limits.overrides("queue_concurrency", 10, "200/s", queues) == {
        "QUEUES": {**queues, "bench-limited": {"concurrency": 10}}
    }
    assert limits.overrides("key_concurrency", 50, "200/s", {}) == {
        "QUEUES": {"bench-limited": {"key_concurrency": 1}}
    }
    assert limits.overrides("rate_limit", 50, "7/m", {}) == {
        "QUEUES": {"bench-limited": {"rate_limit": "7/m"}}
    }
    with pytest.raises(ValueError):
        limits.queue_options("worker_running", 10, "200/s")


def test_keys_go_round_robin_and_only_for_key_concurrency():
    assert [limits.concurrency_key("key_concurrency", i, 3) for i in range(5)] == [
        "key-0",
        "key-1",
        "key-2",
        "key-0",
        "key-1",
    ]
    assert limits.concurrency_key("queue_concurrency", 4, 3) is None
    assert limits.runs_by_key("key_concurrency", 5, 3) == {
        "key-0": [0, 3],
        "key-1": [1, 4],
        "key-2": [2],
    }
    assert limits.runs_by_key("rate_limit", 3, 100) == {None: [0, 1, 2]}


def test_the_worker_of_a_limit_variant_is_told_its_settings_by_environment():
    env = limits.worker_env("tests.settings", {"QUEUES": {"bench-limited": {"concurrency": 5}}})
    assert env == {
        "DJANGO_SETTINGS_MODULE": "django_openworkflow.loadtest.worker_settings",
        "OPENWORKFLOW_BENCH_PROJECT_SETTINGS": "tests.settings",
        "OPENWORKFLOW_BENCH_OVERRIDES": '{"QUEUES": {"bench-limited": {"concurrency": 5}}}',
    }


def test_the_worker_settings_are_the_projects_with_the_openworkflow_keys_replaced(monkeypatch):
    from tests import settings as project

    monkeypatch.setattr(project, "OPENWORKFLOW", {"NAMESPACE": "ours", "QUEUES": {"a": {}}})
    overrides = {"QUEUES": {"bench-limited": {"rate_limit": "9/s"}}}
    for name, value in limits.worker_env("tests.settings", overrides).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delitem(sys.modules, "django_openworkflow.loadtest.worker_settings", raising=False)
    try:
        module = importlib.import_module("django_openworkflow.loadtest.worker_settings")
    finally:
        sys.modules.pop("django_openworkflow.loadtest.worker_settings", None)
    assert module.DATABASES is project.DATABASES
    assert module.INSTALLED_APPS is project.INSTALLED_APPS
    assert module.OPENWORKFLOW == {
        "NAMESPACE": "ours",
        "QUEUES": {"bench-limited": {"rate_limit": "9/s"}},
    }


def test_the_steady_rate_leaves_out_the_first_window_and_the_tail():
    # 10/s: bursts of 10 starts at the top of each second, 45 runs, the last 5 at 4.0-4.4 s
    starts = at(
        *(k + i / 100 for k in range(4) for i in range(10)), *(4 + i / 10 for i in range(5))
    )
    steady = limits.steady_rate(reversed(starts), window=1.0)
    assert steady == limits.SteadyRate(30, T0 + timedelta(seconds=1), T0 + timedelta(seconds=4))
    assert (steady.seconds, steady.per_s) == (3.0, 10.0)


def test_the_steady_rate_keeps_the_first_window_when_there_is_no_other():
    steady = limits.steady_rate(at(0, 0.5, 0.9, 1.2, 1.9), window=1.0)
    assert steady == limits.SteadyRate(3, T0, T0 + timedelta(seconds=1))


@pytest.mark.parametrize("starts", [at(), at(0), at(0, 0.3, 0.99)])
def test_the_steady_rate_needs_a_whole_window(starts):
    assert limits.steady_rate(starts, window=1.0) is None


def test_a_limit_that_leaks_shows_above_the_limit():
    # 20 starts in each second against a limit of 10/s
    starts = at(*(k + i / 20 for k in range(4) for i in range(20)))
    assert limits.steady_rate(starts, window=1.0).per_s == 20.0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("variant", "runs_per_s", "verdict"),
    [
        ("queue_concurrency", 85.0, "pass"),
        ("queue_concurrency", 84.9, "fail"),
        ("key_concurrency", 70.0, "pass"),
        ("key_concurrency", 69.9, "fail"),
    ],
)
def test_the_ratio_to_the_unlimited_runs_per_s_decides(variant, runs_per_s, verdict):
    fields = limits.ratio_fields(variant, runs_per_s, 100.0)
    assert fields == {
        "unlimited_runs_per_s": 100.0,
        "ratio": round(runs_per_s / 100, 3),
        "min_ratio": limits.MIN_RATIO[variant],
        "verdict": verdict,
    }


def test_the_rate_limit_variant_reports_its_ratio_without_a_verdict_on_it():
    assert limits.ratio_fields("rate_limit", 50.0, 400.0) == {
        "unlimited_runs_per_s": 400.0,
        "ratio": 0.125,
    }


@pytest.mark.parametrize(
    ("runs", "error", "verdict"),
    [(600, 0.0, "pass"), (570, -5.0, "pass"), (569, -5.17, "fail"), (631, 5.17, "fail")],
)
def test_the_rate_of_first_starts_must_be_within_5_percent_of_the_limit(runs, error, verdict):
    steady = limits.SteadyRate(runs, T0, T0 + timedelta(seconds=3))
    assert limits.rate_fields("200/s", steady) == {
        "rate_limit": "200/s",
        "rate_limit_per_s": 200.0,
        "rate_tolerance_pct": 5.0,
        "started_per_s": round(runs / 3, 1),
        "rate_error_pct": error,
        "steady_s": 3.0,
        "steady_runs": runs,
        "verdict": verdict,
    }


def test_a_rate_limit_measurement_shorter_than_a_window_fails():
    fields = limits.rate_fields("200/h", None)
    assert fields["verdict"] == "fail"
    assert fields["started_per_s"] is None
    assert fields["rate_limit_per_s"] == 0.056


class Unread:
    def __iter__(self):
        raise AssertionError("the starts were read")


def test_a_limit_variant_is_judged_against_the_median_unlimited_run_at_its_concurrency():
    lines = [
        {"variant": "enqueue_first", "concurrency": 10, "runs_per_s": 100.0},
        {"variant": "enqueue_first", "concurrency": 10, "runs_per_s": 300.0},
        {"variant": "enqueue_first", "concurrency": 10, "runs_per_s": 200.0},
        {"variant": "enqueue_first", "concurrency": 50, "runs_per_s": 1000.0},
        {"variant": "worker_running", "concurrency": 10, "runs_per_s": 1000.0},
    ]
    line = {"variant": "queue_concurrency", "concurrency": 10, "runs_per_s": 180.0}
    assert limits.judge(line, lines, {"concurrency": 10}, Unread()) == {
        "queue": "bench-limited",
        "queue_limits": {"concurrency": 10},
        "unlimited_runs_per_s": 200.0,
        "ratio": 0.9,
        "min_ratio": 0.85,
        "verdict": "pass",
    }


def test_the_rate_limit_variant_is_judged_on_its_first_starts():
    lines = [{"variant": "enqueue_first", "concurrency": 10, "runs_per_s": 40.0}]
    line = {"variant": "rate_limit", "concurrency": 10, "runs_per_s": 8.0}
    starts = at(*(k + i / 100 for k in range(4) for i in range(10)))
    fields = limits.judge(line, lines, {"rate_limit": "10/s"}, starts)
    assert fields["ratio"] == 0.2
    assert "min_ratio" not in fields
    assert (fields["started_per_s"], fields["steady_runs"], fields["verdict"]) == (10.0, 20, "pass")


def test_the_summary_says_the_figures_and_the_verdict_in_words():
    line = {
        "variant": "key_concurrency",
        "concurrency": 10,
        "runs_per_s": 310.04,
        "queue_limits": {"key_concurrency": 1},
        "concurrency_keys": 100,
        **limits.ratio_fields("key_concurrency", 310.04, 400.0),
    }
    assert limits.summary(line) == (
        'key_concurrency C=10 {"key_concurrency": 1} over 100 keys: '
        "310.0 runs/s = 0.78 x unlimited 400.0; needs >= 0.70: pass"
    )
    rate = {
        "variant": "rate_limit",
        "concurrency": 50,
        "runs_per_s": 150.0,
        "queue_limits": {"rate_limit": "200/s"},
        **limits.ratio_fields("rate_limit", 150.0, 100.0),
        **limits.rate_fields("200/s", limits.SteadyRate(582, T0, T0 + timedelta(seconds=3))),
    }
    assert limits.summary(rate) == (
        'rate_limit C=50 {"rate_limit": "200/s"}: 150.0 runs/s = 1.50 x unlimited 100.0; '
        "first starts 194.0/s over 3.0 s (582 runs) against 200/s: -3.0 %, needs within 5 %: "
        "pass (the unlimited rate is below the limit: choose a lower --rate-limit)"
    )
    short = {**rate, **limits.rate_fields("200/s", None)}
    assert limits.summary(short) == (
        'rate_limit C=50 {"rate_limit": "200/s"}: 150.0 runs/s = 1.50 x unlimited 100.0; '
        "first starts span less than one window of 200/s, nothing to measure (more runs?): fail"
    )


def test_repeated_limit_variants_are_judged_on_the_ratio_of_their_medians():
    lines = [
        {"variant": variant, "concurrency": c, "runs_per_s": runs_per_s}
        for variant, c, runs_per_s in [
            ("enqueue_first", 10, 400.0),
            ("queue_concurrency", 10, 300.0),
            ("enqueue_first", 10, 200.0),  # a slow repeat of each: the medians leave it out
            ("queue_concurrency", 10, 100.0),
            ("enqueue_first", 10, 300.0),
            ("queue_concurrency", 10, 270.0),
            ("key_concurrency", 10, 250.0),  # once: no verdict on medians
            ("enqueue_first", 50, 1000.0),
            ("queue_concurrency", 50, 100.0),
        ]
    ]
    [line] = limits.medians(lines, 10)
    assert line == {
        "variant": "queue_concurrency",
        "concurrency": 10,
        "reps": 3,
        "runs_per_s": 270.0,
        "unlimited_runs_per_s": 300.0,
        "ratio": 0.9,
        "min_ratio": 0.85,
        "verdict": "pass",
    }
    assert limits.median_summary(line) == (
        "queue_concurrency C=10, medians of 3 repeats: 270.0 runs/s = 0.90 x unlimited 300.0;"
        " needs >= 0.85: pass"
    )
    assert limits.medians(lines, 50) == []
