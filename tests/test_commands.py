import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from django_openworkflow.models import WorkflowRun
from django_openworkflow.worker import Worker
from tests.conftest import ROOT
from tests.testapp.workflows import three_steps


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concurrency", "0"], "argument --concurrency: must be at least 1, not 0"),
        (["--concurrency", "many"], "argument --concurrency: must be a whole number, not 'many'"),
        (["--lease", "-3"], "argument --lease: must be a positive number of seconds, not '-3'"),
        (["--lease", "soon"], "argument --lease: must be a number of seconds, not 'soon'"),
        (["--poll-interval", "0"], "argument --poll-interval: must be a positive number"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_runworker_refuses_bad_options(args, message):
    with pytest.raises(CommandError) as info:
        call_command("runworker", *args)
    assert str(info.value).startswith(f"Error: {message}")


def test_runworker_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        call_command("runworker", "--help")
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "Default: OPENWORKFLOW['CONCURRENCY'] (10)" in out
    assert "OPENWORKFLOW['LEASE_SECONDS'] (30)" in out
    assert "--burst" in out


@pytest.mark.django_db(transaction=True)
def test_runworker_burst_executes_due_runs_and_returns():
    run = three_steps.start({"i": 1})
    call_command("runworker", "--burst", "--concurrency", "2", verbosity=0)
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED


@pytest.mark.parametrize(
    ("worker_id", "message"),
    [
        ("w" * 256, f"--worker-id {'w' * 40!r}… is 256 characters; at most 255"),
        (
            "a\x00b",
            "--worker-id 'a\\x00b' contains the character U+0000 (NUL), which PostgreSQL "
            "cannot store",
        ),
    ],
)
def test_runworker_refuses_a_worker_id_its_column_cannot_hold(worker_id, message):
    with pytest.raises(CommandError) as info:
        call_command("runworker", "--worker-id", worker_id)
    assert str(info.value) == message
    with pytest.raises(ValueError) as info:
        Worker(worker_id=worker_id)
    assert str(info.value) == message.replace("--worker-id", "worker id")


def test_a_worker_id_of_255_characters_fits():
    assert Worker(worker_id="w" * 255).worker_id == "w" * 255


def runworker_on(database: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``manage.py`` with a SQLite database file of its own (``database``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "OPENWORKFLOW_TEST_DB")}
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        OPENWORKFLOW_SQLITE=str(database),
        PYTHONPATH=str(ROOT),
    )
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_runworker_before_migrate_names_the_missing_migrations_and_exits_1(tmp_path):
    database = tmp_path / "fresh.sqlite3"
    names = sorted(p.stem for p in (ROOT / "django_openworkflow" / "migrations").glob("0*.py"))
    assert names[:2] == ["0001_initial", "0002_signals_children_positions"]

    done = runworker_on(database, "runworker", "--burst")
    assert done.returncode == 1
    assert done.stderr == (
        f"CommandError: the database 'default' lacks {len(names)} migrations of "
        f"django_openworkflow ({', '.join(names)}): run 'manage.py migrate' first\n"
    )

    assert runworker_on(database, "migrate", "django_openworkflow", "0001").returncode == 0
    done = runworker_on(database, "runworker", "--burst")
    assert done.returncode == 1
    later = names[1:]
    assert f"lacks {len(later)} migration" in done.stderr
    assert f"of django_openworkflow ({', '.join(later)}): run" in done.stderr

    assert runworker_on(database, "migrate").returncode == 0
    done = runworker_on(database, "runworker", "--burst", "-v", "1")
    assert done.returncode == 0, done.stderr
    assert "no runs due, burst worker exits" in done.stderr
