"""``soak_workflows``: a tiny clean soak passes, leaking workers fail it by name, and the
growth verdict (``loadtest/growth.py``) at the scale of the short soak of ``make test``.

``make soak`` is the long one (200,000 runs in about an hour); ``make test`` runs a
short one after this suite.
"""

import csv
import json
import os
import re
from datetime import timedelta
from io import StringIO

import psycopg
import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import override_settings
from django.utils import timezone

from django_openworkflow.loadtest import growth, soak
from django_openworkflow.models import StepAttempt, WorkflowRun

LEAKS = "tests.testapp.soak_leaks"


def run_soak(monkeypatch, *args):
    """A tiny soak on the test database (its workers are told which one); stdout's lines."""
    monkeypatch.setenv("OPENWORKFLOW_TEST_DB", str(connection.settings_dict["NAME"]))
    out = StringIO()
    try:
        call_command(
            "soak_workflows",
            "--runs=200",
            "--duration=4",
            "--sample-every=0.25",
            "--warmup=20",
            "--warmup-seconds=0",
            "--timeout=60",
            *args,
            stdout=out,
            stderr=StringIO(),
        )
    finally:
        run_soak.lines = out.getvalue().splitlines()
    return run_soak.lines


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_clean_soak_passes_and_reports_each_metric_of_each_worker(monkeypatch, tmp_path):
    samples_file = tmp_path / "samples.csv"
    lines = run_soak(monkeypatch, f"--samples-file={samples_file}")
    assert re.fullmatch(
        r"soak: runs completed 200/200, children completed 20, not completed 0, "
        r"wrong outputs 0, stuck 0, signals sent 20, planned step failures 40, "
        r"other failed attempts 0, worker exits 0, engine crashes 0, "
        r"growth beyond tolerance 0, samples \d+, [0-9.]+ s, [0-9.]+ runs/s",
        lines[0],
    )
    assert lines[1].split() == [
        "worker", "metric", "start", "end", "slope/h", "slope/10k", "runs", "allowed"
    ]  # fmt: skip
    expected = [(w, m) for w in (1, 2) for m in ("RSS", "threads", "open", "connections")]
    for line, (worker, metric) in zip(lines[2:10], expected, strict=True):
        assert line.startswith(f"{worker}       {metric} ")
    assert all(line.endswith(" ok") for line in lines[2:10])
    assert lines[10].startswith("database (not judged): django_openworkflow_workflowrun ")
    with samples_file.open() as f:
        samples = list(csv.DictReader(f))
    assert {s["worker"] for s in samples} == {"1", "2"}
    assert all(int(s["connections"]) >= 1 and int(s["threads"]) >= 1 for s in samples)
    assert int(samples[-1]["runs"]) == 200
    assert not WorkflowRun.objects.filter(namespace=soak.NAMESPACE).exists()  # cleaned up


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_workers_that_leak_fail_the_soak_naming_each_metric(monkeypatch):
    mix = "plain=6,leak-thread=1,leak-file=1,leak-connection=1,leak-memory=1"
    with pytest.raises(CommandError) as info:
        run_soak(monkeypatch, f"--mix={mix}", f"--workflows-module={LEAKS}")
    message = str(info.value)
    assert message.startswith("soak failed: worker ")
    # Each metric is caught. (On a busy machine one worker may take so few of the leaking
    # runs that its own growth stays within the allowance: at least one worker names each.)
    for metric in ("RSS (MB)", "threads", "open files", "connections"):
        assert any(f"worker {worker} {metric} grew from " in message for worker in (1, 2))
    # The runs themselves were fine: only the growth failed the soak.
    assert run_soak.lines[0].startswith(
        "soak: runs completed 200/200, children completed 0, not completed 0, wrong outputs 0, "
        "stuck 0, "
    )
    assert re.search(
        r"growth beyond tolerance [4-8] \(RSS \(MB\), connections, open files, threads\)",
        run_soak.lines[0],
    )
    assert not WorkflowRun.objects.filter(namespace=soak.NAMESPACE).exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_worker_that_exits_on_its_own_fails_the_soak(monkeypatch):
    with pytest.raises(CommandError, match=r"^1 worker\(s\) exited on their own$"):
        run_soak(monkeypatch, "--mix=exit-worker=1", f"--workflows-module={LEAKS}", "--workers=1")
    assert not WorkflowRun.objects.filter(namespace=soak.NAMESPACE).exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_an_unknown_kind_is_refused_by_name(monkeypatch):
    with pytest.raises(CommandError, match=r"^--mix: unknown kind 'nap' in the mix"):
        run_soak(monkeypatch, "--mix=plain=1,nap=1")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)  # pg_stat_activity is read once per transaction
def test_a_worker_s_sessions_are_told_apart_from_another_soak_s_by_the_command_s_pid():
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    names = [
        growth.app_name(1),
        growth.app_name(2),
        f"openworkflow-soak-{os.getpid() + 1}-worker-1",
    ]
    sessions = [psycopg.connect(**params, application_name=name, autocommit=True) for name in names]
    try:
        assert growth.sessions(2) == {1: 1, 2: 1}
        assert growth.sessions(2, listening=True) == {1: 0, 2: 0}
        sessions[1].execute("LISTEN django_openworkflow_test")
        assert growth.sessions(2, listening=True) == {1: 0, 2: 1}
    finally:
        for session in sessions:
            session.close()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_audit_counts_every_kind_of_damage():
    cycle = soak.parse_mix("plain=1,retry=1")
    with override_settings(OPENWORKFLOW={"NAMESPACE": soak.NAMESPACE}):
        started = soak.start_batch(cycle, 0, 4, timezone.now())
    assert sorted(i for _, i, _ in started) == [0, 1, 2, 3]
    ids = [run_id for run_id, _, _ in sorted(started, key=lambda run: run[1])]
    right, wrong, parked, failed = ids
    runs = WorkflowRun.objects.filter
    runs(pk=right).update(status="completed", output=soak.output("plain", 0, 3))
    runs(pk=wrong).update(status="completed", output=soak.output("retry", 1, None))
    runs(pk=parked).update(available_at=None)  # parked with nothing to wake it: stuck
    runs(pk=failed).update(status="failed")
    for error in ("Flake", "Flake", "ValueError"):
        StepAttempt.objects.create(
            workflow_run_id=wrong, step_name="flaky", status="failed", error={"type": error}
        )
    found = soak.audit(4, soak.expected_flakes(cycle, 4))
    assert (found.completed, found.not_completed, found.ok) == (2, 2, False)
    assert found.wrong_output_count == 1
    assert found.wrong_outputs == [
        "run 1 (retry): output {'i': 1, 'kind': 'retry', 'value': None}, "
        "expected {'i': 1, 'kind': 'retry', 'value': 1}"
    ]
    assert [(f.run_id, f.reason) for f in found.stuck] == [(str(parked), "parked-without-wake")]
    assert found.flakes == 2
    assert found.other_failures == {"ValueError": 1, "Flake (expected 4)": 2}
    soak.delete_runs()
    assert not WorkflowRun.objects.filter(namespace=soak.NAMESPACE).exists()


@pytest.mark.django_db
def test_only_the_deadline_kind_starts_with_a_deadline_ten_minutes_ahead():
    now = timezone.now()
    with override_settings(OPENWORKFLOW={"NAMESPACE": soak.NAMESPACE}):
        started = soak.start_batch(soak.parse_mix("plain=1,deadline=1"), 0, 2, now)
    deadlines = dict(WorkflowRun.objects.values_list("input__kind", "deadline_at"))
    assert deadlines == {"plain": None, "deadline": now + timedelta(minutes=10)}
    assert len(started) == 2


def test_the_samples_file_is_json_when_its_name_ends_in_json(tmp_path):
    taken = samples(60, 30, flat)
    growth.write_samples(taken, tmp_path / "samples.json")
    written = json.loads((tmp_path / "samples.json").read_text())
    assert written == growth.as_rows(taken)
    assert written[0] == {
        "worker": 1,
        "seconds": 0.0,
        "runs": 0,
        "rss_mb": 62.0,
        "threads": 7,
        "open_files": 10,
        "connections": 7,
    }


# --- the verdict, without workers ----------------------------------------------------------


def samples(runs, per_sample, metric_at):
    """Samples of worker 1 every ``per_sample`` runs up to ``runs``, one a second."""
    return [
        growth.Sample(
            worker=1,
            seconds=float(k),
            runs=k * per_sample,
            **{m: metric_at(m, k * per_sample) for m in growth.METRICS},
        )
        for k in range(runs // per_sample + 1)
    ]


def flat(metric, runs):
    base = {"rss_mb": 62.0, "threads": 7, "open_files": 10, "connections": 7}[metric]
    noise = [0, 1, -1, 0, 2][runs // 30 % 5] if metric == "rss_mb" else 0
    return base + noise


def verdict(found):
    return {t.metric: t.ok for t in found}


def test_flat_workers_pass_the_short_soak():
    found = growth.trends(samples(2000, 30, flat), warmup_runs=200, warmup_seconds=20)
    assert verdict(found) == dict.fromkeys(growth.METRICS, True)
    assert [t.growth for t in found] == [1, 0, 0, 0]  # RSS: its noise, -1 to +2 MB


@pytest.mark.parametrize("metric", ["threads", "open_files", "connections"])
def test_one_leak_per_100_runs_fails_the_short_soak(metric):
    """The short soak: 2,000 runs, measured after 20 s; a worker executes half of them."""

    def leaking(m, runs):
        return flat(m, runs) + (runs // 200 if m == metric else 0)

    found = growth.trends(samples(2000, 30, leaking), warmup_runs=200, warmup_seconds=20)
    assert verdict(found) == {m: m != metric for m in growth.METRICS}
    (trend,) = [t for t in found if not t.ok]
    assert trend.growth == 9 - 3  # the medians of the first and of the last three samples
    assert trend.runs == 1980 - 600
    assert trend.per_10k_runs == pytest.approx(50, rel=0.05)
    assert trend.problem().startswith(f"worker 1 {growth.LABELS[metric]} grew from ")


def test_memory_may_grow_by_its_floor_plus_its_allowance_per_10k_runs():
    tolerance = growth.TOLERANCES["rss_mb"]
    assert tolerance.allowed(180_000) == 16 + 2 * 18

    def growing(mb_per_10k):
        return lambda m, runs: flat(m, runs) + (mb_per_10k * runs / 10_000 if m == "rss_mb" else 0)

    within = growth.trends(samples(200_000, 2000, growing(2)), warmup_runs=20_000)
    beyond = growth.trends(samples(200_000, 2000, growing(4)), warmup_runs=20_000)
    assert verdict(within)["rss_mb"] is True
    assert verdict(beyond)["rss_mb"] is False
    (rss,) = [t for t in beyond if t.metric == "rss_mb"]
    assert rss.per_10k_runs == pytest.approx(4, rel=0.02)
    assert rss.per_hour == pytest.approx(4 * 2000 / 10_000 * 3600, rel=0.02)  # 2000 runs/s


def test_the_warm_up_lasts_its_runs_and_its_seconds():
    def heartbeat_connects_late(m, runs):  # at run 600, 20 s in (one sample a second)
        return flat(m, runs) + (3 if m == "connections" and runs >= 600 else 0)

    late = samples(3000, 30, heartbeat_connects_late)
    assert verdict(growth.trends(late, warmup_runs=300))["connections"] is False
    assert verdict(growth.trends(late, warmup_runs=300, warmup_seconds=20))["connections"] is True


def test_one_odd_sample_does_not_decide():
    def spike(m, runs):
        return flat(m, runs) + (5 if m == "threads" and runs == 3000 else 0)

    assert verdict(growth.trends(samples(3000, 30, spike), warmup_runs=300))["threads"] is True


def test_too_few_samples_after_the_warm_up_is_an_error_saying_what_to_do():
    with pytest.raises(ValueError) as info:
        growth.trends(samples(100, 30, flat), warmup_runs=60)
    assert str(info.value) == (
        "worker 1 has 2 samples after the warm-up, fewer than 3: sample more often "
        "(--sample-every) or run longer (--runs, --duration)"
    )


def test_the_least_squares_slope():
    assert growth.slope([0, 1, 2, 3], [1, 3, 5, 7]) == 2
    assert growth.slope([0, 1, 2], [5, 4, 6]) == 0.5
    assert growth.slope([1, 1], [1, 9]) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("plain=2,nap=1", "unknown kind 'nap' in the mix (known: "),
        ("plain=x", "the weight of 'plain' must be a whole number, not 'x'"),
        ("plain", "the weight of 'plain' must be a whole number, not ''"),
        ("plain=0", "the mix 'plain=0' names no run"),
    ],
)
def test_bad_mixes_are_refused_naming_the_part(text, message):
    with pytest.raises(ValueError) as info:
        soak.parse_mix(text)
    assert str(info.value).startswith(message)


def test_the_default_mix_and_its_planned_failures():
    cycle = soak.parse_mix(soak.DEFAULT_MIX)
    assert cycle == ["plain"] * 4 + ["sleep"] * 2 + ["retry", "child", "signal", "deadline"]
    assert [soak.kind_of(cycle, i) for i in (0, 6, 16, 19)] == [
        "plain",
        "retry",
        "retry",
        "deadline",
    ]
    assert soak.expected_flakes(cycle, 200) == 2 * 20


def test_runs_are_due_evenly_over_the_duration_after_a_first_burst():
    assert soak.due(200_000, 3600, elapsed=0, burst=32) == 32
    assert soak.due(200_000, 3600, elapsed=1800, burst=32) == 100_001
    assert soak.due(200_000, 3600, elapsed=4000, burst=32) == 200_000
    assert soak.due(20, 3600, elapsed=0, burst=32) == 20
    assert soak.due(500, 0, elapsed=0, burst=32) == 500


@pytest.mark.parametrize(
    ("value", "message"),
    [("100", "must be from 0 to below 100, not '100'"), ("x", "must be a percentage, not 'x'")],
)
def test_a_warm_up_that_is_not_a_percentage_below_100_is_refused(value, message):
    with pytest.raises(CommandError, match=rf"^Error: argument --warmup: {re.escape(message)}$"):
        call_command("soak_workflows", f"--warmup={value}")
