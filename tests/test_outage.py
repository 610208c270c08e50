"""A worker that loses its database connections logs it, backs off and carries on."""

import os
import re
import shlex
import subprocess
import time

import pytest
from django.db import OperationalError, connection

from django_openworkflow.models import StepAttempt
from tests.testapp.workflows import echo, three_steps, waits_for_file

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]


def terminate_other_sessions():
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def test_a_worker_survives_its_connections_being_killed(worker_process, tmp_path):
    proc = worker_process("--concurrency", "3", "--poll-interval", "0.2", "--lease", "20")
    assert echo.start({"n": 1}).result(timeout=20) == {"n": 1}

    assert terminate_other_sessions() >= 2  # its main, slot and listener sessions
    time.sleep(0.5)
    runs = [three_steps.start({"i": i}) for i in range(5)]
    for run in runs:
        assert run.result(timeout=30) == {"total": 3}
    assert proc.proc.poll() is None  # still running
    output = proc.output()
    assert "database error" in output or "listen failed" in output

    # and again, while runs are in flight: they are released and replayed at
    # once, well before their 20 s lease would have run out
    flag = tmp_path / "go"
    blocked = [waits_for_file.start({"path": str(flag)}) for _ in range(3)]
    wait = time.monotonic() + 20
    while StepAttempt.objects.filter(step_name="block", status="running").count() < 3:
        assert time.monotonic() < wait, proc.output()[-3000:]
        time.sleep(0.05)
    terminate_other_sessions()
    flag.touch()
    began = time.monotonic()
    for run in blocked:
        assert run.result(timeout=15) == 3
    assert time.monotonic() - began < 15
    assert proc.proc.poll() is None
    assert "releasing the run" in proc.output()


PG_CTL = os.environ.get("OPENWORKFLOW_TEST_PG_CTL", "")


@pytest.mark.skipif(
    not PG_CTL,
    reason="stops the PostgreSQL server: set OPENWORKFLOW_TEST_PG_CTL "
    "(make test-postgres sets it to 'pg_ctlcluster ... main')",
)
def test_a_worker_waits_out_a_database_server_restart(worker_process):
    proc = worker_process("--concurrency", "2", "--poll-interval", "0.2", "--lease", "20")
    assert echo.start({"n": 1}).result(timeout=20) == {"n": 1}

    connection.close()
    subprocess.run([*shlex.split(PG_CTL), "stop"], check=True)
    try:
        time.sleep(4)  # down long enough for several failed polls
    finally:
        subprocess.run([*shlex.split(PG_CTL), "start"], check=True)
    for _ in range(100):  # until it accepts connections again
        try:
            connection.ensure_connection()
            break
        except OperationalError:
            time.sleep(0.1)

    runs = [three_steps.start({"i": i}) for i in range(4)]
    for run in runs:
        assert run.result(timeout=30) == {"total": 3}
    assert proc.proc.poll() is None  # it never exited
    # One line a failed poll (its full text follows at DEBUG, as "detail=").
    failed_polls = len(re.findall(r"database error worker=\S+ retry_in=", proc.output()))
    # It noticed, and backed off (0.4 s, 0.8 s, 1.6 s, ...) instead of retrying every 0.2 s.
    assert 1 <= failed_polls <= 6, proc.output()[-3000:]
