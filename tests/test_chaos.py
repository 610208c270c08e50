"""``chaos_workflows``: a short chaos run, the audit it ends with, and its refusals.

The full chaos (2,000 runs, a PostgreSQL restart) is ``make chaos``; ``make
test`` runs a 200-run version with the restart after this suite.
"""

import re
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import override_settings

from django_openworkflow.loadtest.chaos import (
    LEDGER,
    NAMESPACE,
    audit,
    create_ledger,
    drop_ledger,
    expected_total,
    ledger_steps,
)
from django_openworkflow.models import StepAttempt, WorkflowRun


def summary_numbers(line):
    """``{"lost": 0, "worker kills": 7, ...}`` from the summary line."""
    fields = line.removeprefix("chaos: ").split(", ")
    return {m[1]: int(m[2]) for m in map(re.compile(r"(.+) (\d+)(/\d+)?$").match, fields) if m}


@pytest.fixture
def worker_env(monkeypatch):
    """The command's workers must use the test database."""
    monkeypatch.setenv("OPENWORKFLOW_TEST_DB", str(connection.settings_dict["NAME"]))


class TTY(StringIO):
    def isatty(self):
        return True


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_killing_workers_loses_and_doubles_nothing(worker_env, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out, err = StringIO(), TTY()
    call_command(
        "chaos_workflows",
        "--runs=60",
        "--steps=6",
        "--workers=2",
        "--concurrency=3",
        "--duration=6",
        "--kill-every=0.4",
        "--lease=1",
        "--pause-ms=5",
        "--seed=7",
        "--timeout=60",
        "--partitions=1",
        stdout=out,
        stderr=err,
    )
    line = out.getvalue().strip()
    # on a terminal: the runs finished and the kills so far, on one line rewritten in place
    progress = err.getvalue().split("\n")[0].split("\r")
    assert progress[1].startswith("chaos: ")
    numbers = summary_numbers(line)
    # a run queued for the partitioned worker alone, if the others had finished every run
    runs = 60 + int(re.search(r"runs queued for them alone (\d+)\)", line)[1])
    assert re.fullmatch(
        rf"chaos: {runs}/{runs} runs finished \(100%\), worker kills {numbers['worker kills']}, "
        r"database restarts 0, partitions 1; [0-9.]+/s, took \d:\d\d *",
        progress[-1],
    )
    assert line.startswith(
        f"chaos: runs completed {runs}/{runs}, lost 0, duplicated ledger rows 0, stuck 0, "
        "partitions 1, "
    )
    assert "partitioned workers running again 1/1 " in line
    assert numbers["missing ledger rows"] == 0
    assert numbers["wrong outputs"] == 0
    assert numbers["worker kills"] >= 1
    assert numbers["worker exits not caused by the chaos"] == 0
    assert numbers["engine crashes"] == 0
    # Without --keep the command cleans up after itself.
    assert not WorkflowRun.objects.filter(namespace=NAMESPACE).exists()
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s)", [LEDGER])
        assert cursor.fetchone()[0] is None


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_failing_restart_command_stops_the_chaos(worker_env):
    err = StringIO()
    with pytest.raises(CommandError, match=r"'false' exited with 1"):
        call_command(
            "chaos_workflows",
            "--runs=8",
            "--steps=2",
            "--workers=1",
            "--kill-every=0",
            "--restart-db-command=false",
            stdout=StringIO(),
            stderr=err,
        )
    drop_ledger()
    assert err.getvalue() == ""  # no progress: not a terminal


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_audit_counts_every_kind_of_damage():
    create_ledger()
    with override_settings(OPENWORKFLOW={"NAMESPACE": NAMESPACE}):
        runs = ledger_steps.start_many({"i": i, "steps": 2, "pause_ms": 0} for i in range(4))
    good, doubled, wrong, parked = runs
    # A run parked with nothing to wake it: stuck.
    WorkflowRun.objects.filter(pk=parked.pk).update(available_at=None)
    WorkflowRun.objects.filter(pk__in=[good.pk, doubled.pk]).update(
        status="completed", output={"total": expected_total(2)}
    )
    WorkflowRun.objects.filter(pk=wrong.pk).update(status="completed", output={"total": 99})
    rows = [
        (good, 0, "atomic"),
        (good, 1, "run"),
        (good, 1, "run"),  # a step.run repeated after a crash: allowed, counted
        (good, 2, "atomic"),  # its child's row
        (doubled, 0, "atomic"),
        (doubled, 0, "atomic"),  # an atomic step twice: must never happen
        (doubled, 0, "atomic"),
        (doubled, 1, "run"),
        (doubled, 2, "atomic"),
        (wrong, 0, "atomic"),  # its step 1 and its child left no row
    ]
    with connection.cursor() as cursor:
        for run, step, kind in rows:
            cursor.execute(
                f"INSERT INTO {LEDGER} (run_id, step, kind) VALUES (%s, %s, %s)",
                [run.pk, step, kind],
            )

    result = audit(runs=5, steps=2)
    drop_ledger()

    assert result.statuses == {"completed": 3, "pending": 1}
    assert result.lost == 2  # one stuck, one never created
    assert result.duplicated_ledger_rows == 2
    assert [(f.run_id, f.reason) for f in result.stuck] == [(str(parked.pk), "parked-without-wake")]
    assert result.reexecutions == 1
    assert result.missing_ledger_rows == 2
    assert result.wrong_outputs == 1
    assert not result.ok


@pytest.mark.django_db
def test_chaos_needs_postgresql():
    if connection.vendor == "postgresql":
        pytest.skip("the refusal is for other databases")
    with pytest.raises(CommandError, match="chaos_workflows needs PostgreSQL; the default"):
        call_command("chaos_workflows", stdout=StringIO())


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--runs=0", "must be at least 1, not 0"),
        ("--duration=-1", "must be zero or more seconds, not '-1'"),
        ("--kill-every=soon", "must be a number of seconds, not 'soon'"),
    ],
)
def test_bad_options_are_refused(option, message):
    with pytest.raises(CommandError, match=message):
        call_command("chaos_workflows", option, stdout=StringIO())


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_stuck_run_alone_fails_the_audit():
    create_ledger()
    with override_settings(OPENWORKFLOW={"NAMESPACE": NAMESPACE}):
        run = ledger_steps.start({"i": 0, "steps": 1, "pause_ms": 0})
    WorkflowRun.objects.filter(pk=run.pk).update(
        status="completed", output={"total": expected_total(1)}, available_at=None
    )
    with connection.cursor() as cursor:
        for step in (0, 1):
            cursor.execute(
                f"INSERT INTO {LEDGER} (run_id, step, kind) VALUES (%s, %s, 'atomic')",
                [run.pk, step],
            )
    clean = audit(runs=1, steps=1)
    StepAttempt.objects.create(workflow_run=run, step_name="step-0", status="running")

    result = audit(runs=1, steps=1)
    drop_ledger()

    assert clean.ok
    assert (result.completed, result.lost, result.missing_ledger_rows) == (1, 0, 0)
    assert [(f.run_id, f.reason) for f in result.stuck] == [
        (str(run.pk), "step-running-on-finished-run")
    ]
    assert not result.ok
