"""Adversarial review of issue 17's engine changes (liveness, EngineDatabaseError, page lock
timeouts, pooler detection): faults tried for real."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from django.db import connection, connections, transaction
from django.test import override_settings

from django_openworkflow import liveness
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.testing import pause_at
from tests.testapp.workflows import partition_ledger

STEP = StepAttempt._meta.db_table


def seconds_until_due(run: WorkflowRun) -> float:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT EXTRACT(EPOCH FROM available_at - now()) FROM {WorkflowRun._meta.db_table}"
            " WHERE id = %s",
            [run.pk],
        )
        return float(cursor.fetchone()[0])


@pytest.fixture
def doomed_step():
    """A trigger that refuses the start of any step named "second": the engine's own
    statement inside ``ctx.step.atomic`` fails the same way at every replay."""
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION review_refuse_second() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN IF NEW.step_name = 'second' THEN"
            " RAISE EXCEPTION 'refused by the test' USING ERRCODE = 'data_exception';"
            " END IF; RETURN NEW; END $$"
        )
        cursor.execute(
            f"CREATE TRIGGER review_refuse_second BEFORE INSERT ON {STEP}"
            " FOR EACH ROW EXECUTE FUNCTION review_refuse_second()"
        )
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TRIGGER review_refuse_second ON {STEP}")
            cursor.execute("DROP FUNCTION review_refuse_second()")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_an_engine_statement_failing_at_every_replay_does_not_spin_the_worker(workers, doomed_step):
    run = partition_ledger.start({})
    after = lambda c: c["run_id"] == run.pk  # noqa: E731
    with pause_at("worker.after-execute", when=after) as first:
        workers.start()
        first.wait(30)
        assert seconds_until_due(run) <= 0.1  # a lost connection, maybe: replayed at once
    with pause_at("worker.after-execute", when=after) as again:
        again.wait(30)
        assert seconds_until_due(run) > 0.5  # the same again: not at once
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.RUNNING  # released, not failed
    assert not StepAttempt.objects.filter(workflow_run=run, step_name="second").exists()


def test_the_delays_grow_up_to_a_minute():
    from django_openworkflow.worker import db_error_delay

    assert [db_error_delay(n) for n in (1, 2, 3, 4)] == [0.0, 1.0, 2.0, 4.0]
    assert db_error_delay(8) == 60.0
    assert db_error_delay(10**6) == 60.0


def session_alive(pid: int) -> bool:
    """Asked on a connection of its own (pg_stat_activity is a snapshot per transaction)."""
    params = connection.get_connection_params()
    for option in ("cursor_factory", "context", "server_side_binding"):
        params.pop(option, None)
    with psycopg.connect(**params, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
        return row.fetchone()[0] == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_statement_ended_while_it_waits_for_a_lock_leaves_no_session_holding_on():
    """A false positive of the watchdog (a healthy statement waiting on a lock longer than
    STATEMENT_TIMEOUT): its connection is ended; the server session behind it must not
    go on waiting, and holding what its transaction locked, until the lock is free."""
    run = partition_ledger.start({})
    watchdog = liveness.Liveness("default", "sampler")
    with override_settings(OPENWORKFLOW={"STATEMENT_TIMEOUT": 0.3}):
        watchdog.start()
    pids: list[int] = []
    errors: list[BaseException] = []

    def wait_for_the_row() -> None:
        with watchdog.thread():
            try:
                with transaction.atomic():
                    pids.append(connections["default"].connection.info.backend_pid)
                    WorkflowRun.objects.select_for_update().get(pk=run.pk)
            except BaseException as exc:
                errors.append(exc)
            finally:
                connections["default"].close()

    try:
        with transaction.atomic():
            WorkflowRun.objects.select_for_update().get(pk=run.pk)  # held by the test
            waiter = threading.Thread(target=wait_for_the_row)
            waiter.start()
            waiter.join(30)
            assert [type(e).__name__ for e in errors] == ["OperationalError"]
            assert watchdog.ended == 1
            end = time.monotonic() + 20
            while session_alive(pids[0]):  # while the test still holds the row
                assert time.monotonic() < end, "the ended statement's session still waits"
                time.sleep(0.05)
    finally:
        watchdog.stop()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_workers_in_one_process_the_options_stay_until_the_last_stops():
    options = connections.settings["default"]["OPTIONS"]
    assert "tcp_user_timeout" not in options
    first, second = liveness.Liveness("default", "one"), liveness.Liveness("default", "two")
    with override_settings(OPENWORKFLOW={"TCP_USER_TIMEOUT": 7, "STATEMENT_TIMEOUT": None}):
        first.start()
        second.start()
        first.stop()
        assert options["tcp_user_timeout"] == 7000  # the second still runs
        second.stop()
    assert "tcp_user_timeout" not in options
