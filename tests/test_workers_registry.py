"""The worker registry (workers.py): registration, heartbeats, clean stops, death, cleanup.

The clock is moved by writing ``last_seen_at`` (on the database clock), never by sleeping.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.test import override_settings

from django_openworkflow import workers
from django_openworkflow.clock import Now
from django_openworkflow.models import WorkflowWorker
from django_openworkflow.registry import workflow_names
from django_openworkflow.worker import Worker
from django_openworkflow.workers import Presence, live_window
from tests.conftest import WorkerThreads
from tests.testapp.workflows import echo, waits_for_file

pytestmark = pytest.mark.django_db

TABLE = WorkflowWorker._meta.db_table


def register(worker_id: str = "w1", **fields) -> WorkflowWorker:
    fields.setdefault("namespace", "default")
    fields.setdefault("concurrency", 4)
    fields.setdefault("workflows", ["echo"])
    WorkflowWorker.objects.register(worker_id, **fields)
    return WorkflowWorker.objects.with_state().get(pk=worker_id)


def seen_ago(worker_id: str, seconds: float) -> None:
    """Time travel: the worker was last seen ``seconds`` ago."""
    WorkflowWorker.objects.filter(pk=worker_id).update(
        last_seen_at=Now() - timedelta(seconds=seconds)
    )


def stopped_ago(worker_id: str, seconds: float) -> None:
    ago = Now() - timedelta(seconds=seconds)
    WorkflowWorker.objects.filter(pk=worker_id).update(last_seen_at=ago, stopped_at=ago)


def state(worker_id: str) -> str:
    return WorkflowWorker.objects.with_state().get(pk=worker_id).state


def wait_for(condition, timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"{what} not reached within {timeout}s"
        time.sleep(0.02)


# --- the manager and the queryset -------------------------------------------------


def test_register_creates_a_live_row_with_what_the_worker_runs():
    worker = register(queues=["emails", "default"], workflows=["echo", "alpha"])
    assert worker.host == socket.gethostname()
    assert worker.pid == os.getpid()
    assert worker.queues == ["emails", "default"]
    assert worker.workflows == ["alpha", "echo"]
    assert (worker.concurrency, worker.busy_slots, worker.stopped_at) == (4, 0, None)
    assert worker.state == "live"
    assert list(WorkflowWorker.objects.live()) == [worker]
    assert not WorkflowWorker.objects.recently_dead().exists()


def test_every_queue_is_null():
    assert register(queues=None).queues is None


def test_a_restarted_worker_replaces_its_row():
    register(pid=100, queues=["a"], workflows=["old"])
    WorkflowWorker.objects.seen("w1", busy_slots=3)
    stopped_ago("w1", 600)
    WorkflowWorker.objects.filter(pk="w1").update(started_at=Now() - timedelta(hours=1))
    first = WorkflowWorker.objects.get(pk="w1")

    again = register(pid=200, queues=None, workflows=["new"], concurrency=8)
    assert WorkflowWorker.objects.count() == 1
    assert (again.pid, again.queues, again.workflows, again.concurrency) == (200, None, ["new"], 8)
    assert (again.stopped_at, again.busy_slots, again.state) == (None, 0, "live")
    assert again.started_at > first.started_at
    assert again.last_seen_at > first.last_seen_at


def test_seen_refreshes_last_seen_and_busy_slots():
    register()
    seen_ago("w1", 3600)
    assert state("w1") == "dead"
    assert WorkflowWorker.objects.seen("w1", busy_slots=3) is True
    worker = WorkflowWorker.objects.with_state().get(pk="w1")
    assert (worker.state, worker.busy_slots) == ("live", 3)
    assert worker.seen_ago < timedelta(seconds=5)


def test_seen_neither_creates_a_row_nor_revives_a_stopped_worker():
    assert WorkflowWorker.objects.seen("nobody", busy_slots=0) is False
    assert not WorkflowWorker.objects.exists()
    register()
    WorkflowWorker.objects.stopped("w1")
    assert WorkflowWorker.objects.seen("w1", busy_slots=1) is False
    assert state("w1") == "stopped"


def test_a_clean_stop_is_stopped_not_live():
    register()
    WorkflowWorker.objects.seen("w1", busy_slots=2)
    assert WorkflowWorker.objects.stopped("w1") is True
    worker = WorkflowWorker.objects.with_state().get(pk="w1")
    assert (worker.state, worker.busy_slots) == ("stopped", 0)
    assert worker.stopped_at == worker.last_seen_at
    assert not WorkflowWorker.objects.live().exists()
    assert list(WorkflowWorker.objects.recently_dead()) == [worker]


@override_settings(OPENWORKFLOW={"LEASE_SECONDS": 30})
def test_a_worker_not_seen_for_the_live_window_is_dead():
    assert live_window() == 30
    register("fresh")
    register("late")
    seen_ago("late", 25)
    register("gone")
    seen_ago("gone", 35)
    assert {w.pk: w.state for w in WorkflowWorker.objects.with_state()} == {
        "fresh": "live",
        "late": "live",
        "gone": "dead",
    }
    assert set(WorkflowWorker.objects.live().values_list("pk", flat=True)) == {"fresh", "late"}
    assert list(WorkflowWorker.objects.recently_dead().values_list("pk", flat=True)) == ["gone"]


@pytest.mark.parametrize(
    ("config", "window"),
    [
        ({}, 30.0),  # the lease; the heartbeat is a third of it
        ({"LEASE_SECONDS": 90}, 90.0),
        ({"LEASE_SECONDS": 30, "HEARTBEAT_SECONDS": 20}, 60.0),  # three heartbeats
        ({"LEASE_SECONDS": 3}, 3.0),
    ],
)
def test_the_live_window_is_the_lease_or_three_heartbeats(config, window):
    with override_settings(OPENWORKFLOW=config):
        assert live_window() == window


@override_settings(OPENWORKFLOW={"LEASE_SECONDS": 30, "HEARTBEAT_SECONDS": 20})
def test_a_worker_with_the_longest_heartbeat_is_live_between_two_heartbeats():
    register()
    seen_ago("w1", 50)  # two heartbeats of 20 s missed
    assert state("w1") == "live"


def test_recent_workers_are_those_seen_in_the_last_day():
    register("live")
    register("dead")
    seen_ago("dead", 23 * 3600)
    register("stopped")
    stopped_ago("stopped", 3600)
    register("old")
    seen_ago("old", 25 * 3600)
    assert set(WorkflowWorker.objects.recent().values_list("pk", flat=True)) == {
        "live",
        "dead",
        "stopped",
    }
    assert set(WorkflowWorker.objects.recently_dead().values_list("pk", flat=True)) == {
        "dead",
        "stopped",
    }


def test_purge_dead_deletes_workers_gone_for_more_than_a_day():
    register("live")
    register("dead-recently")
    seen_ago("dead-recently", 23 * 3600)
    register("dead-long-ago")
    seen_ago("dead-long-ago", 25 * 3600)
    register("stopped-long-ago")
    stopped_ago("stopped-long-ago", 25 * 3600)
    assert WorkflowWorker.objects.purge_dead() == 2
    assert set(WorkflowWorker.objects.values_list("pk", flat=True)) == {"live", "dead-recently"}


def test_namespaces_are_apart():
    register("a", namespace="default")
    register("b", namespace="other")
    assert list(
        WorkflowWorker.objects.in_namespace("other").live().values_list("pk", flat=True)
    ) == ["b"]


# --- the worker keeps its row ---------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_worker_registers_and_marks_itself_stopped():
    Worker(burst=True, concurrency=3, worker_id="burst-1", queues=["default"]).run()
    worker = WorkflowWorker.objects.with_state().get(pk="burst-1")
    assert worker.state == "stopped"
    assert worker.workflows == sorted(workflow_names())
    assert (worker.queues, worker.concurrency, worker.pid) == (["default"], 3, os.getpid())


@pytest.mark.django_db(transaction=True)
def test_the_sweep_deletes_the_rows_of_long_gone_workers():
    register("dead-long-ago")
    seen_ago("dead-long-ago", 25 * 3600)
    register("dead-recently")
    seen_ago("dead-recently", 3600)
    Worker(burst=True, worker_id="sweeper").run()
    assert set(WorkflowWorker.objects.values_list("pk", flat=True)) == {"dead-recently", "sweeper"}


def test_a_worker_purges_at_most_once_an_hour(monkeypatch):
    presence = Presence("p", namespace="default", concurrency=1, queues=None, using="default")
    presence.purge()
    register("dead-long-ago")
    seen_ago("dead-long-ago", 25 * 3600)
    presence.purge()
    assert WorkflowWorker.objects.filter(pk="dead-long-ago").exists()
    monkeypatch.setattr(workers, "PURGE_EVERY", 0.0)
    presence.purge()
    assert not WorkflowWorker.objects.filter(pk="dead-long-ago").exists()


def test_a_heartbeat_registers_a_worker_whose_row_was_deleted():
    presence = Presence("p", namespace="default", concurrency=2, queues=None, using="default")
    presence.register(["echo"])
    WorkflowWorker.objects.all().delete()
    presence.beat(5)  # more than its slots: never shown above them
    worker = WorkflowWorker.objects.get(pk="p")
    assert (worker.workflows, worker.busy_slots) == (["echo"], 0)
    presence.beat(5)
    assert WorkflowWorker.objects.get(pk="p").busy_slots == 2
    presence.stop()
    presence.beat(1)  # a late heartbeat after the stop changes nothing
    assert state("p") == "stopped"


def test_a_registration_replacing_a_row_starts_after_it_even_on_the_same_clock_reading():
    # (SQLite's clock has milliseconds: two registrations may read the same time.)
    WorkflowWorker.objects.register("w1", namespace="default", concurrency=1, workflows=[])
    WorkflowWorker.objects.filter(pk="w1").update(started_at=Now() + timedelta(hours=1))
    first = WorkflowWorker.objects.get(pk="w1").started_at
    again = WorkflowWorker.objects.register("w1", namespace="default", concurrency=1, workflows=[])
    assert (
        again == WorkflowWorker.objects.get(pk="w1").started_at == first + timedelta(milliseconds=1)
    )
    assert WorkflowWorker.objects.stopped("w1", started_at=first) is False  # not that one's
    assert WorkflowWorker.objects.stopped("w1", started_at=again) is True


def test_the_old_process_of_a_restarted_worker_id_leaves_the_new_ones_row_alone():
    def presence() -> Presence:
        return Presence("same", namespace="default", concurrency=2, queues=None, using="default")

    old, new = presence(), presence()
    old.register(["old"])
    first = WorkflowWorker.objects.get(pk="same").started_at
    new.register(["new"])  # at once: a later start all the same, even on SQLite's milliseconds
    assert WorkflowWorker.objects.get(pk="same").started_at > first
    old.beat(1)  # neither seen nor registered again over the new process's row
    worker = WorkflowWorker.objects.get(pk="same")
    assert (worker.workflows, worker.busy_slots) == (["new"], 0)
    new.beat(2)
    assert WorkflowWorker.objects.get(pk="same").busy_slots == 2
    old.stop()
    assert state("same") == "live"
    new.stop()
    assert state("same") == "stopped"


@pytest.fixture
def worker_thread():
    """Run an in-process worker (short lease: a heartbeat every 0.1 s) until the test ends."""
    workers = WorkerThreads(poll_interval=0.05, lease_seconds=0.3)
    yield workers.start
    workers.stop_all()


@pytest.mark.django_db(transaction=True)
def test_the_heartbeat_keeps_an_idle_worker_live_and_counts_busy_slots(worker_thread, tmp_path):
    worker_thread(worker_id="beating", concurrency=2)
    wait_for(lambda: WorkflowWorker.objects.filter(pk="beating").exists(), what="registered")
    seen_ago("beating", 3600)
    wait_for(lambda: state("beating") == "live", what="seen again while idle")

    flag = tmp_path / "go"
    run = waits_for_file.start({"path": str(flag)})
    wait_for(lambda: WorkflowWorker.objects.get(pk="beating").busy_slots == 1, what="busy 1")
    flag.touch()
    assert run.result(timeout=20) == 3
    wait_for(lambda: WorkflowWorker.objects.get(pk="beating").busy_slots == 0, what="busy 0")


@pytest.mark.django_db(transaction=True)
def test_database_errors_in_the_registry_never_stop_the_worker(worker_thread, caplog):
    """The registry's table is away (renamed): the worker logs, runs workflows, and registers
    once the table is back."""
    caplog.set_level(logging.WARNING, logger="django_openworkflow")

    def table_away(away: bool) -> None:
        names = (TABLE, f"{TABLE}_away")
        with connection.schema_editor() as editor:
            editor.alter_db_table(WorkflowWorker, *(names if away else names[::-1]))

    def failed(action: str) -> bool:
        return f"worker registry write failed action={action} worker=survivor" in caplog.text

    table_away(True)
    try:
        worker_thread(worker_id="survivor")
        wait_for(lambda: failed("register"), what="the failed registration logged")
        assert echo.start({"n": 1}).result(timeout=20) == {"n": 1}
    finally:
        table_away(False)
    wait_for(lambda: WorkflowWorker.objects.filter(pk="survivor").exists(), what="registered")

    table_away(True)
    try:
        wait_for(lambda: failed("seen"), what="the failed heartbeat logged")
        assert echo.start({"n": 2}).result(timeout=20) == {"n": 2}
    finally:
        table_away(False)
    seen_ago("survivor", 3600)
    wait_for(lambda: state("survivor") == "live", what="seen again")


# --- real runworker processes -------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_runworker_process_is_live_then_stopped_after_sigterm(worker_process):
    proc = worker_process("--worker-id", "proc-term", "--lease", "3", "--queue", "default")
    wait_for(lambda: WorkflowWorker.objects.filter(pk="proc-term").exists(), what="registered")
    worker = WorkflowWorker.objects.with_state().get(pk="proc-term")
    assert (worker.state, worker.pid, worker.host) == ("live", proc.pid, socket.gethostname())
    assert worker.queues == ["default"]
    assert "echo" in worker.workflows
    seen_ago("proc-term", 3600)
    wait_for(lambda: state("proc-term") == "live", what="seen at its heartbeat")

    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0
    assert state("proc-term") == "stopped"


@pytest.mark.django_db(transaction=True)
def test_a_killed_runworker_process_is_dead_once_unseen_for_the_live_window(worker_process):
    proc = worker_process("--worker-id", "proc-kill", "--lease", "3")
    wait_for(lambda: WorkflowWorker.objects.filter(pk="proc-kill").exists(), what="registered")
    proc.signal(signal.SIGKILL)
    proc.wait()
    assert state("proc-kill") == "live"  # nobody can tell yet
    seen_ago("proc-kill", live_window() + 1)
    worker = WorkflowWorker.objects.with_state().get(pk="proc-kill")
    assert (worker.state, worker.stopped_at) == ("dead", None)
    assert list(WorkflowWorker.objects.recently_dead()) == [worker]
