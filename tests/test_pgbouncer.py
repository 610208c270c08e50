"""Through PgBouncer in transaction mode: ``make test-pgbouncer`` (``--ds
tests.settings_pgbouncer``; ``scripts/pgbouncer.py up`` starts the pooler).

The default database goes through the pooler, ``direct`` reaches the same test
database without it and is ``OPENWORKFLOW["LISTEN_DATABASE"]``. ``POOLER`` is left to
detection. Skipped under the other settings.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from django.conf import settings
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext

from django_openworkflow import WorkflowFailed, send_signal
from django_openworkflow.engine import Execution
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.pooler import behind_pooler, forget, prepared_statements, sql_prepare
from django_openworkflow.registry import get_workflow
from django_openworkflow.store import get_store, postgres
from tests.conftest import assert_no_stuck_runs
from tests.testapp.models import SideEffect
from tests.testapp.workflows import echo, flaky, parent, three_steps, waiter

pytestmark = [
    pytest.mark.skipif(
        not getattr(settings, "OPENWORKFLOW_TEST_POOLER", False),
        reason="needs PgBouncer: make test-pgbouncer (pytest --ds tests.settings_pgbouncer)",
    ),
    pytest.mark.django_db(transaction=True, databases=["default", "direct"]),
]


def pooled(dbname: str | None = None) -> psycopg.Connection:
    """A connection of our own through the pooler, to the test database (or ``dbname``)."""
    params = connections["default"].get_connection_params()
    for option in ("cursor_factory", "context", "server_side_binding", "prepare_threshold"):
        params.pop(option, None)
    if dbname is not None:
        params["dbname"] = dbname
    return psycopg.connect(**params)


def server_pid() -> int:
    """The server process serving this thread's connection: its transaction's, behind a
    pooler (call it inside ``transaction.atomic()``)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


@contextlib.contextmanager
def server_held(pid: int) -> Iterator[None]:
    """Keep the server process ``pid`` busy in another client's transaction, so that this
    thread's next transactions are served by other server processes."""
    held: list[psycopg.Connection] = []
    try:
        for _ in range(50):  # more than the pool's servers
            conn = pooled()
            held.append(conn)
            if conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid:  # BEGIN: held
                break
        else:
            raise AssertionError(f"no client of the pooler got the server process {pid}")
        yield
    finally:
        for conn in held:
            conn.close()


def test_the_default_database_goes_through_pgbouncer_in_transaction_mode():
    with pooled(dbname="pgbouncer") as admin:
        admin.autocommit = True  # the admin console has no transactions
        config = {row[0]: row[1] for row in admin.execute("SHOW CONFIG").fetchall()}
        [(version,)] = admin.execute("SHOW VERSION").fetchall()
    assert config["pool_mode"] == "transaction"
    assert version.startswith("PgBouncer ")


def test_the_pooler_is_detected_once_per_process_and_alias(settings):
    forget()
    with CaptureQueriesContext(connection) as first:
        assert behind_pooler("default") is True
    with CaptureQueriesContext(connection) as again:
        assert behind_pooler("default") is True
    assert [q["sql"] for q in first] == ["SELECT pg_backend_pid()"]
    assert again.captured_queries == []
    assert behind_pooler("direct") is False
    settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "POOLER": False}
    assert behind_pooler("default") is False  # the setting wins
    settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "POOLER": True}
    assert behind_pooler("direct") is True


def test_behind_the_pooler_statements_are_not_prepared_unless_said(settings):
    assert (prepared_statements("default"), sql_prepare("default")) == (False, False)
    assert (prepared_statements("direct"), sql_prepare("direct")) == (True, True)
    settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "PREPARED_STATEMENTS": True}
    # the protocol's named statements (PgBouncer 1.21+), never SQL PREPARE
    assert (prepared_statements("default"), sql_prepare("default")) == (True, False)
    settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "PREPARED_STATEMENTS": False}
    assert (prepared_statements("direct"), sql_prepare("direct")) == (False, False)


def test_the_fast_path_works_when_the_next_transaction_gets_another_server():
    store = get_store()

    def take(name):
        [claim] = store.claim(
            worker_id="w", workflow_names=[name], limit=1, lease_seconds=30, namespace="default"
        )
        return claim

    with transaction.atomic():  # one server process serves it all
        pid = server_pid()
        echo.start({"n": 1})
        first = take("echo")
    with server_held(pid):
        # The same statements again, on another server process: a statement prepared by
        # name on the first would not exist there ('prepared statement "_pg3_0" does not
        # exist'), and a third client of that first one would find its names taken.
        echo.start({"n": 2})
        second = take("echo")
        for claim in (first, second):
            Execution(claim, get_workflow("echo")).execute()
    outputs = sorted(run.output["n"] for run in WorkflowRun.objects.all())
    assert outputs == [1, 2]
    assert set(WorkflowRun.objects.values_list("status", flat=True)) == {"completed"}


def test_the_claim_of_a_limited_queue_sends_no_sql_prepare(settings, caplog):
    settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "QUEUES": {"narrow": {"concurrency": 2}}}
    store = get_store()
    for n in range(3):
        echo.start({"n": n}, queue="narrow")
    claimed = []
    for _ in range(3):
        claimed += store.claim(
            worker_id="w",
            workflow_names=["echo"],
            limit=3,
            lease_seconds=30,
            namespace="default",
            queues=["narrow"],
        )
    assert len(claimed) == 2  # the queue's concurrency
    assert postgres._SERVER_PREPARED.get(connection.connection) is None
    assert postgres._ONE_ROUND_TRIP["usable"] is True
    assert "SQL PREPARE" not in caplog.text


def test_the_worker_listens_on_the_listen_database(settings):
    store = get_store()
    assert store.listen_alias("w") == "direct"
    settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "LISTEN_DATABASE": None, "POOLER": False}
    assert store.listen_alias("w") == "default"


def test_without_a_listen_database_the_worker_polls_and_says_so_once(settings, caplog, monkeypatch):
    settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "LISTEN_DATABASE": None}
    monkeypatch.setitem(postgres._POLLING_SAID, "said", False)
    store = get_store()
    wakeup, stopping = threading.Event(), threading.Event()
    with caplog.at_level(logging.WARNING, logger="django_openworkflow"):
        assert store.listen("default", wakeup, stopping, "w-1") is False
        assert store.listen("default", wakeup, stopping, "w-2") is False
    assert [r.getMessage() for r in caplog.records] == [
        "no LISTEN behind a pooler in transaction mode, the worker polls every POLL_INTERVAL:"
        ' set OPENWORKFLOW["LISTEN_DATABASE"] to an alias that reaches the same database'
        " directly worker=w-1 database=default"
    ]


@pytest.mark.django_db(transaction=True, databases=["default", "direct", "workflows"])  # created
def test_a_listen_database_that_reaches_another_database_is_refused(settings, caplog, monkeypatch):
    settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "LISTEN_DATABASE": "workflows"}
    monkeypatch.setitem(postgres._POLLING_SAID, "said", False)
    with caplog.at_level(logging.WARNING, logger="django_openworkflow"):
        assert get_store().listen("default", threading.Event(), threading.Event(), "w-1") is False
    name = connections["default"].settings_dict["NAME"]
    assert [r.getMessage() for r in caplog.records] == [
        "LISTEN_DATABASE reaches another database than DATABASE, the worker polls every"
        " POLL_INTERVAL worker=w-1 database=default listen_database=workflows"
        f" reaches={name}_workflows expected={name}"
    ]
    params = connections["direct"].get_connection_params()
    for option in ("cursor_factory", "context", "server_side_binding", "prepare_threshold"):
        params.pop(option, None)
    with psycopg.connect(**params) as direct:
        assert get_store().same_database(direct, "direct", "w-1") is True


def test_without_a_listen_database_a_worker_thread_still_runs_what_is_started(settings, workers):
    settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "LISTEN_DATABASE": None}
    workers.start(concurrency=2)
    runs = [three_steps.start({"i": i}) for i in range(4)]
    assert [run.result(timeout=20) for run in runs] == [{"total": 3}] * 4


def wait_for_step(run: WorkflowRun, name: str, proc) -> None:
    end = time.monotonic() + 20
    while not StepAttempt.objects.filter(workflow_run=run, step_name=name).exists():
        assert time.monotonic() < end, proc.output()[-3000:]
        time.sleep(0.05)


def test_a_start_through_the_pooler_wakes_a_worker_listening_directly(worker_process):
    proc = worker_process("--poll-interval", "60")
    proc.wait_until_idle()
    assert "listening channel=django_openworkflow database=direct" in proc.output()
    assert "behind_pooler=True" in proc.output()
    # Only the NOTIFY of start() (sent through the pooler, in its transaction) wakes the
    # worker before its next poll, a minute away.
    run = echo.start({"hello": "pooler"})
    assert run.result(timeout=20) == {"hello": "pooler"}
    assert "prepared statement" not in proc.output()


def test_signals_children_and_resume_through_the_pooler(worker_process):
    procs = [worker_process("--poll-interval", "60", "--concurrency", "4") for _ in range(2)]
    for proc in procs:
        proc.wait_until_idle()
    waiting = waiter.start({"signal": "bell"})
    wait_for_step(waiting, "bell", procs[0])
    assert send_signal("bell", "ding") == [str(waiting.pk)]  # its NOTIFY wakes a worker
    family = parent.start({"child": "echo", "child_input": {"x": 1}})
    failing = flaky.start({"failures": 1, "attempts": 1})
    assert waiting.result(timeout=20) == {"data": "ding"}
    assert family.result(timeout=20) == {"child": {"x": 1}}
    with pytest.raises(WorkflowFailed, match="boom 1"):
        failing.result(timeout=20)
    WorkflowRun.objects.resume(failing.pk)  # through the pooler; NOTIFY at its commit
    assert failing.result(timeout=20) == 2
    # Each step's effect once, whichever worker ran it.
    effects = list(SideEffect.objects.values_list("run_id", "step"))
    assert len(effects) == len(set(effects)) + 1  # flaky's step ran twice, by design
    assert_no_stuck_runs()
    for proc in procs:
        assert "prepared statement" not in proc.output()
