"""Pages that never hang: Resume, Cancel and Rerun pressed while a step holds the run.

On PostgreSQL and MariaDB a real worker thread is held at ``step.atomic-stored``
(its step.atomic stored its result under the fence: the run's row stays locked
until it commits); on SQLite another connection holds the database's write lock
(``BEGIN IMMEDIATE``). The pages and the admin wait ``PAGE_LOCK_TIMEOUT`` at
most, then answer "busy in a step"; nothing changes; the same press works once
the lock is gone. The library's own calls still wait (no ``lock_timeout=``).
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager

import pytest
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.contrib.messages import get_messages
from django.db import connection, transaction
from django.test import Client
from django.urls import reverse

from django_openworkflow import InvalidTransition, RunBusy
from django_openworkflow.checks import check_settings
from django_openworkflow.conf import app_settings
from django_openworkflow.exceptions import Refusal
from django_openworkflow.models import WorkflowRun, WorkflowRunEvent
from django_openworkflow.signals import run_resumed
from django_openworkflow.testing import pause_at
from tests.conftest import Backend, blocked_on_a_lock
from tests.testapp.models import Invoice
from tests.testapp.workflows import atomic_then
from tests.users import create_user

ON_SQLITE = settings.DATABASES["default"]["ENGINE"].endswith("sqlite3")
BUSY = "This run is busy in a step; try again in a moment."
CHANGELIST = reverse("admin:django_openworkflow_workflowrun_changelist")
INVOICES = reverse("admin:testapp_invoice_changelist")

sqlite_only = pytest.mark.skipif(not ON_SQLITE, reason="SQLite's database write lock")


@pytest.fixture(autouse=True)
def short_page_lock_wait(settings):
    """A short wait: the holders below hold until released, so any wait is too short."""
    settings.OPENWORKFLOW = {"POLL_INTERVAL": 0.2, "PAGE_LOCK_TIMEOUT": 0.2}


def page_url(name: str, run: WorkflowRun) -> str:
    return reverse(f"django_openworkflow:run-{name}", args=[run.pk])


def messages_of(response) -> list[str]:
    """The response's messages; taken off the client (as a page showing them would), so the
    next press reports its own only."""
    response.client.cookies.pop("messages", None)
    return [str(message) for message in get_messages(response.wsgi_request)]


def admin_messages(response) -> list[tuple[str, str]]:
    response.client.cookies.pop("messages", None)
    return [(m.level_tag, str(m)) for m in get_messages(response.wsgi_request)]


def superuser_client() -> Client:
    client = Client()
    client.force_login(create_user("root", superuser=True))
    return client


def snapshot(run: WorkflowRun) -> tuple:
    """What a press must not change: the run's row and its history."""
    row = WorkflowRun.objects.values_list(
        "status", "resume_generation", "claim_token", "updated_at"
    ).get(pk=run.pk)
    return row, list(run.events.values_list("action", flat=True)), LogEntry.objects.count()


def wait_for_status(run: WorkflowRun, status: str, timeout: float = 30.0) -> None:
    """The worker thread carries the run on once released; wait (bounded) for it."""
    end = time.monotonic() + timeout
    while WorkflowRun.objects.get(pk=run.pk).status != status:
        assert time.monotonic() < end, f"run {run.pk} never became {status}"
        time.sleep(0.02)


@contextmanager
def held_in_step(workers, run: WorkflowRun):
    """A real worker thread executes ``run`` and stands in its step.atomic, the result
    stored under the fence: the run's row is locked until the block ends."""
    with pause_at("step.atomic-stored", when=lambda c: c["run_id"] == run.pk) as pause:
        workers.start()
        pause.wait(30)
        yield pause


# --- PostgreSQL and MariaDB: a worker's step holds the run's row ------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.row_locks
@pytest.mark.parametrize("action", ["resume", "cancel", "rerun"])
def test_a_press_while_a_step_holds_the_row_answers_busy_and_changes_nothing(workers, action):
    client = superuser_client()
    run = atomic_then.start({"then": "sleep"})
    with held_in_step(workers, run):
        before = snapshot(run)

        response = client.post(page_url(action, run))

        assert response.status_code == 302
        assert response["Location"] == page_url("detail", run)
        assert messages_of(response) == [BUSY]
        assert snapshot(run) == before
        assert before[0][0] == "running"


@pytest.mark.django_db(transaction=True)
@pytest.mark.row_locks
def test_cancel_works_once_the_step_has_committed(workers):
    client = superuser_client()
    run = atomic_then.start({"then": "sleep"})
    with held_in_step(workers, run):
        assert messages_of(client.post(page_url("cancel", run))) == [BUSY]
    wait_for_status(run, "pending")  # the step committed, the run sleeps

    response = client.post(page_url("cancel", run))

    assert messages_of(response) == [f"Run {run.pk} canceled."]
    run.refresh_from_db()
    assert run.status == "canceled"
    assert list(run.events.values_list("action", flat=True)) == ["cancel"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.row_locks
def test_resume_works_once_the_step_has_committed_and_the_run_failed(workers):
    client = superuser_client()
    run = atomic_then.start({"then": "fail"})
    with held_in_step(workers, run):
        assert messages_of(client.post(page_url("resume", run))) == [BUSY]
    wait_for_status(run, "failed")

    response = client.post(page_url("resume", run))

    assert messages_of(response) == [f"Run {run.pk} resumed."]
    assert list(run.events.values_list("action", flat=True)) == ["resume"]
    assert WorkflowRun.objects.get(pk=run.pk).resume_generation == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.row_locks
def test_the_manager_without_lock_timeout_still_waits_for_the_step(workers):
    """Library callers are unchanged: no ``lock_timeout=``, no ``RunBusy``; the cancel
    waits for the step's commit, then cancels. (On MariaDB the waiting cancel is sometimes
    chosen as a deadlock victim (1213) against the worker's next write once the step
    commits: it then runs again, ``test_races``.)"""
    run = atomic_then.start({"then": "sleep"})
    with held_in_step(workers, run):
        cancel = Backend(lambda: WorkflowRun.objects.cancel(run))
        cancel.start()
        assert blocked_on_a_lock(cancel)
    cancel.finish()
    assert WorkflowRun.objects.get(pk=run.pk).status == "canceled"


@pytest.mark.django_db(transaction=True)
@pytest.mark.row_locks
def test_the_manager_with_lock_timeout_raises_run_busy_naming_the_run(workers):
    run = atomic_then.start({"then": "sleep"})
    with held_in_step(workers, run), pytest.raises(RunBusy) as caught:
        WorkflowRun.objects.cancel(run, lock_timeout=0.1)
    assert str(caught.value) == (
        f"cannot cancel run {run.pk} now: it is busy in a step (a row the cancel must lock, "
        "the run's or a parent or child run's, stayed locked for 0.1s); try again in a moment"
    )
    assert isinstance(caught.value, InvalidTransition)
    assert (caught.value.run_id, caught.value.reason, caught.value.status) == (
        run.pk,
        Refusal.BUSY,
        None,
    )
    assert (caught.value.action, caught.value.lock_timeout) == ("cancel", 0.1)


@pytest.mark.django_db(transaction=True)
@pytest.mark.row_locks
def test_after_a_busy_answer_the_connection_waits_for_locks_as_before(workers):
    run = atomic_then.start({"then": "sleep"})
    before = lock_wait_setting()
    with held_in_step(workers, run):
        with pytest.raises(RunBusy):
            WorkflowRun.objects.cancel(run, lock_timeout=0)
        assert lock_wait_setting() == before
        with transaction.atomic(), pytest.raises(RunBusy):  # in a caller's transaction
            WorkflowRun.objects.cancel(run, lock_timeout=0)
        assert lock_wait_setting() == before


@pytest.mark.django_db(transaction=True)
def test_the_lock_timeout_is_the_transitions_only_in_a_callers_transaction():
    """Inside the caller's transaction too: its later statements wait as they did."""
    run = failed_run()
    before = lock_wait_setting()
    with transaction.atomic():
        WorkflowRun.objects.resume(run, lock_timeout=0.5)
        assert lock_wait_setting() == before
    assert lock_wait_setting() == before
    assert WorkflowRun.objects.get(pk=run.pk).status == "pending"


def lock_wait_setting() -> str:
    """How long this connection waits for a lock, as the database says it."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SHOW lock_timeout")
        elif connection.vendor == "mysql":
            cursor.execute("SELECT @@SESSION.innodb_lock_wait_timeout")
        else:
            cursor.execute("PRAGMA busy_timeout")
        return str(cursor.fetchone()[0])


@pytest.mark.django_db(transaction=True)
@pytest.mark.row_locks
def test_the_admin_action_resumes_the_free_run_and_skips_the_busy_one(workers):
    client = superuser_client()
    busy = atomic_then.start({"then": "sleep"})
    free = WorkflowRun.objects.create(workflow_name="charge-order", status="failed")
    with held_in_step(workers, busy):
        before = snapshot(busy)

        response = client.post(
            CHANGELIST, {"action": "resume_runs", "_selected_action": [busy.pk, free.pk]}
        )

        assert admin_messages(response) == [
            ("success", "1 run resumed."),
            ("warning", "1 run skipped: it is busy in a step."),
        ]
        assert snapshot(busy)[:2] == before[:2]
    assert WorkflowRun.objects.get(pk=free.pk).status == "pending"
    assert list(free.events.values_list("action", flat=True)) == ["resume"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.row_locks
def test_the_subject_admin_action_cancels_the_free_run_and_skips_the_busy_one(workers):
    client = superuser_client()
    first, second = Invoice.objects.create(number="B-1"), Invoice.objects.create(number="B-2")
    busy = atomic_then.start({"then": "sleep"}, subject=first)
    free = WorkflowRun.objects.create(  # no worker knows the workflow: it stays pending
        workflow_name="charge-order", status="pending", subject=second
    )
    with held_in_step(workers, busy):
        response = client.post(
            INVOICES,
            {"action": "cancel_workflow_runs", "_selected_action": [first.pk, second.pk]},
        )

        assert admin_messages(response) == [
            ("success", "1 run canceled."),
            ("warning", "1 run skipped: it is busy in a step."),
        ]
        assert WorkflowRun.objects.get(pk=busy.pk).status == "running"
    assert WorkflowRun.objects.get(pk=free.pk).status == "canceled"


# --- SQLite: another connection holds the database's write lock --------------------------


@contextmanager
def database_write_locked():
    """Another connection holds SQLite's write lock (``BEGIN IMMEDIATE``) in the block."""
    other = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield other
        other.execute("ROLLBACK")
    finally:
        other.close()


def failed_run(**fields) -> WorkflowRun:
    return WorkflowRun.objects.create(
        workflow_name="charge-order",
        status="failed",
        error={"type": "ValueError", "message": "card declined"},
        **fields,
    )


@pytest.mark.django_db(transaction=True)
@sqlite_only
@pytest.mark.parametrize(("action", "done"), [("resume", "resumed"), ("rerun", "rerun")])
def test_sqlite_a_locked_database_answers_busy_then_the_press_works(action, done):
    client = superuser_client()
    run = failed_run()
    with database_write_locked():
        before = snapshot(run)

        response = client.post(page_url(action, run))

        assert response.status_code == 302
        assert messages_of(response) == [BUSY]
        assert snapshot(run) == before

    response = client.post(page_url(action, run))

    assert messages_of(response)[0].startswith(f"Run {run.pk} {done}")
    assert WorkflowRun.objects.get(pk=run.pk).status == "pending"


@pytest.mark.django_db(transaction=True)
@sqlite_only
def test_sqlite_cancel_answers_busy():
    client = superuser_client()
    run = WorkflowRun.objects.create(workflow_name="charge-order", status="pending")
    with database_write_locked():
        assert messages_of(client.post(page_url("cancel", run))) == [BUSY]
        assert WorkflowRun.objects.get(pk=run.pk).status == "pending"
    assert messages_of(client.post(page_url("cancel", run))) == [f"Run {run.pk} canceled."]


@pytest.mark.django_db(transaction=True)
@sqlite_only
def test_sqlite_the_admin_action_reports_the_runs_skipped_as_busy():
    client = superuser_client()
    runs = [failed_run(), failed_run()]
    with database_write_locked():
        response = client.post(
            CHANGELIST, {"action": "resume_runs", "_selected_action": [r.pk for r in runs]}
        )
    assert admin_messages(response) == [
        ("warning", "0 runs resumed."),
        ("warning", "2 runs skipped: it is busy in a step."),
    ]
    assert set(WorkflowRun.objects.values_list("status", flat=True)) == {"failed"}


@pytest.mark.django_db(transaction=True)
@sqlite_only
def test_sqlite_resume_with_changes_keeps_the_form_when_busy():
    user = create_user("corrector", "change_workflowrun", "correct_workflowrun")
    client = Client()
    client.force_login(user)
    run = failed_run(input={"amount": 1})
    confirm = {
        "input": '{"amount": 2}',
        "generation": "0",
        "step-TOTAL_FORMS": "0",
        "step-INITIAL_FORMS": "0",
        "confirm": "1",
    }
    with database_write_locked():
        response = client.post(page_url("correct", run), confirm)

        assert response.status_code == 200
        assert BUSY in response.context["form"].non_field_errors()
        assert b"Resume with these changes" in response.content
        assert WorkflowRun.objects.get(pk=run.pk).input == {"amount": 1}

    response = client.post(page_url("correct", run), confirm)

    assert messages_of(response) == [f"Run {run.pk} resumed with changes."]
    assert WorkflowRun.objects.get(pk=run.pk).input == {"amount": 2}


@contextmanager
def locked_once_resumed():
    """SQLite: another connection takes the database's write lock as soon as a resume
    commits (before the admin history entry is written); this connection waits 100 ms."""
    holders = []

    def take_the_lock(sender, run, **kwargs):  # sent once the resume committed
        other = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        holders.append(other)

    run_resumed.connect(take_the_lock)
    connection.ensure_connection()
    raw = connection.connection
    (before,) = raw.execute("PRAGMA busy_timeout").fetchone()
    raw.execute("PRAGMA busy_timeout = 100")  # the connection's own wait, short
    try:
        yield
    finally:
        run_resumed.disconnect(take_the_lock)
        raw.execute(f"PRAGMA busy_timeout = {before}")
        for other in holders:
            other.close()


@pytest.mark.django_db(transaction=True)
@sqlite_only
def test_sqlite_a_history_write_that_meets_a_locked_database_is_no_500():
    """The resume committed; the admin history entry written after it finds the database
    locked: the entry is lost (logged), the page reports the resume."""
    client = superuser_client()
    run = failed_run()
    with locked_once_resumed():
        response = client.post(page_url("resume", run))

    assert response.status_code == 302
    assert messages_of(response) == [f"Run {run.pk} resumed."]
    assert WorkflowRun.objects.get(pk=run.pk).status == "pending"
    assert LogEntry.objects.count() == 0


# --- on every database ------------------------------------------------------------------


@pytest.mark.django_db
def test_page_lock_timeout_defaults_to_two_seconds(settings):
    settings.OPENWORKFLOW = {}
    assert app_settings.PAGE_LOCK_TIMEOUT == 2.0


@pytest.mark.parametrize("value", [0, -1, "2", True])
def test_a_bad_page_lock_timeout_is_reported(settings, value):
    settings.OPENWORKFLOW = {"PAGE_LOCK_TIMEOUT": value}
    assert [(m.id, m.msg) for m in check_settings()] == [
        (
            "django_openworkflow.E003",
            f"OPENWORKFLOW['PAGE_LOCK_TIMEOUT'] must be a positive number, not {value!r}.",
        )
    ]


@pytest.mark.django_db
@pytest.mark.parametrize("value", [-1, "2s", True, float("nan")])
def test_a_bad_lock_timeout_is_a_value_error_and_changes_nothing(value):
    run = failed_run()
    with pytest.raises(ValueError, match="lock_timeout must be None or a number of seconds"):
        WorkflowRun.objects.resume(run, lock_timeout=value)
    assert WorkflowRun.objects.get(pk=run.pk).status == "failed"


@pytest.mark.django_db
def test_a_free_run_is_resumed_with_a_lock_timeout():
    run = failed_run()
    WorkflowRun.objects.resume(run, lock_timeout=0.5)
    assert WorkflowRun.objects.get(pk=run.pk).status == "pending"
    assert WorkflowRunEvent.objects.filter(run=run, action="resume").count() == 1


@pytest.mark.django_db(transaction=True)
@sqlite_only
def test_sqlite_deleting_runs_while_the_database_is_locked_deletes_nothing_and_says_so():
    client = superuser_client()
    run = WorkflowRun.objects.create(workflow_name="charge-order", status="completed")
    delete = {"action": "delete_selected", "_selected_action": [run.pk], "post": "yes"}
    with database_write_locked():
        response = client.post(CHANGELIST, delete)

        assert response.status_code == 302
        assert admin_messages(response) == [
            ("warning", "No run deleted: a run they lock is busy in a step; try again in a moment.")
        ]
        assert WorkflowRun.objects.filter(pk=run.pk).exists()

    response = client.post(CHANGELIST, delete)

    assert admin_messages(response) == [("success", "Successfully deleted 1 workflow run.")]
    assert not WorkflowRun.objects.filter(pk=run.pk).exists()


@pytest.mark.django_db(transaction=True)
@sqlite_only
def test_sqlite_the_admin_action_waits_once_not_once_per_busy_run(monkeypatch):
    """After the first busy run the action does not wait again: 50 busy runs must not keep
    the person waiting 50 times PAGE_LOCK_TIMEOUT."""
    manager = type(WorkflowRun.objects)
    waits = []
    resume = manager.resume

    def recorded(self, run, **kwargs):
        waits.append(kwargs["lock_timeout"])
        return resume(self, run, **kwargs)

    monkeypatch.setattr(manager, "resume", recorded)
    client = superuser_client()
    runs = [failed_run(), failed_run(), failed_run()]
    with database_write_locked():
        response = client.post(
            CHANGELIST, {"action": "resume_runs", "_selected_action": [r.pk for r in runs]}
        )
    assert admin_messages(response)[-1] == ("warning", "3 runs skipped: it is busy in a step.")
    assert waits == [0.2, 0.0, 0.0]


@pytest.mark.django_db(transaction=True)
@sqlite_only
def test_sqlite_the_admin_actions_history_write_that_meets_a_locked_database_is_no_500():
    """As the pages': the resume committed, the admin history entry after it finds the
    database locked; the entry is lost (logged), the action reports the resume."""
    client = superuser_client()
    run = failed_run()
    with locked_once_resumed():
        response = client.post(CHANGELIST, {"action": "resume_runs", "_selected_action": [run.pk]})

    assert response.status_code == 302
    assert admin_messages(response) == [("success", "1 run resumed.")]
    assert WorkflowRun.objects.get(pk=run.pk).status == "pending"
    assert LogEntry.objects.count() == 0
