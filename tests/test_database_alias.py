"""OPENWORKFLOW["DATABASE"]: the engine's tables on a database of their own, end to end.

The test settings have a second database, "workflows" (a second SQLite file,
or a second database on the same server). Here the engine lives there, with
``WorkflowRouter`` routing the app's models to it; the users (and the test
app's ``SideEffect``) stay on "default", and ``Ledger``, written by a
``step.atomic``, is routed to the engine's database too. Each test looks on
both databases, so it fails if anything ignores the setting.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import override_settings
from django.urls import reverse

from django_openworkflow import send_signal
from django_openworkflow.conf import app_settings
from django_openworkflow.diagnostics import stuck_runs
from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowRunEvent
from django_openworkflow.testing import drain, travel
from tests.testapp.models import Ledger
from tests.testapp.workflows import atomic_writer, fails_at_once, sleeper, three_steps, waiter

pytestmark = pytest.mark.django_db(databases=["default", "workflows"])
DATABASES = ("default", "workflows")


class LedgerRouter:
    """The test app's Ledger lives beside the engine's tables (what step.atomic writes)."""

    def db_for_read(self, model, **hints):
        return app_settings.DATABASE if model is Ledger else None

    db_for_write = db_for_read


@pytest.fixture(autouse=True)
def engine_on_workflows():
    with override_settings(
        OPENWORKFLOW={**settings.OPENWORKFLOW, "DATABASE": "workflows"},
        DATABASE_ROUTERS=[f"{__name__}.LedgerRouter", "django_openworkflow.routers.WorkflowRouter"],
    ):
        yield


def where(model, **filters):
    """The databases that hold rows of ``model`` matching ``filters``."""
    return [db for db in DATABASES if model._base_manager.using(db).filter(**filters).exists()]


def test_start_puts_the_run_on_the_engine_database():
    run = three_steps.start({"i": 1})
    assert run._state.db == "workflows"
    assert where(WorkflowRun, pk=run.pk) == ["workflows"]


def test_drain_executes_the_run_there():
    run = three_steps.start({"i": 1})
    drain()
    run = WorkflowRun.objects.get(pk=run.pk)
    assert (run.status, run.output) == ("completed", {"total": 3})
    assert where(StepAttempt, workflow_run_id=run.pk, status="completed") == ["workflows"]
    assert StepAttempt.objects.using("workflows").filter(workflow_run_id=run.pk).count() == 3


def test_a_step_atomic_commits_its_writes_on_that_database_with_the_step():
    kept = atomic_writer.start({})
    undone = atomic_writer.start({"fail": True})
    drain()
    kept.refresh_from_db()
    undone.refresh_from_db()
    assert (kept.status, kept.output) == ("completed", 1)
    assert where(Ledger, run_id=kept.pk) == ["workflows"]
    # the failed step's write was rolled back with the step: one transaction on "workflows"
    assert undone.status == "failed"
    assert where(Ledger, run_id=undone.pk) == []


def test_resume_and_cancel_through_the_manager_record_the_user():
    user = get_user_model().objects.create_user("ops")
    run = fails_at_once.start()
    drain()
    run = WorkflowRun.objects.resume(run.pk, by=user)
    assert run.status == "pending"
    run = WorkflowRun.objects.cancel(run.pk, by=user)
    assert run.status == "canceled"
    assert where(WorkflowRun, pk=run.pk, status="canceled") == ["workflows"]
    events = WorkflowRunEvent.objects.using("workflows").filter(run_id=run.pk).order_by("id")
    assert [(e.action, e.by_id) for e in events] == [("resume", user.pk), ("cancel", user.pk)]
    assert [e.by for e in events] == [user, user]  # read from the users' database
    assert where(get_user_model(), pk=user.pk) == ["default"]


def test_send_signal_wakes_a_run_waiting_there():
    run = waiter.start({"signal": "go"})
    drain()
    run.refresh_from_db()
    assert run.status == "pending"
    assert send_signal("go", {"colour": "green"}) == [str(run.pk)]
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"data": {"colour": "green"}})


def test_the_run_page_and_the_admin_show_the_run_and_who_resumed_it(admin_client, admin_user):
    run = fails_at_once.start()
    drain()
    WorkflowRun.objects.resume(run.pk, by=admin_user)
    page = admin_client.get(reverse("django_openworkflow:run-detail", args=[run.pk]))
    assert page.status_code == 200
    assert f"<td>{admin_user.username}</td>" in page.content.decode()
    changelist = admin_client.get(reverse("admin:django_openworkflow_workflowrun_changelist"))
    assert str(run.pk) in changelist.content.decode()
    change = admin_client.get(
        reverse("admin:django_openworkflow_workflowrun_change", args=[run.pk])
    )
    assert change.status_code == 200
    [by] = re.findall(r'<td class="field-by">\s*<p>(.*?)</p>', change.content.decode())
    assert by == f'<a href="/admin/auth/user/{admin_user.pk}/change/">{admin_user.username}</a>'


def test_deleting_a_user_clears_their_events_on_the_engine_database():
    user = get_user_model().objects.create_user("leaver")
    run = fails_at_once.start()
    drain()
    WorkflowRun.objects.resume(run.pk, by=user)
    user.delete()
    event = WorkflowRunEvent.objects.get(run_id=run.pk)
    assert (event.action, event.by_id) == ("resume", None)


@pytest.fixture
def without_routers():
    """The engine alone: it uses OPENWORKFLOW["DATABASE"] whatever the routers say (E013)."""
    with override_settings(DATABASE_ROUTERS=[]):
        yield WorkflowRun.objects.using("workflows")


def test_drain_skips_sleeps_there(without_routers):
    run = sleeper.start({"sleep": "1h"})
    drain(time_travel="sleeps")
    assert without_routers.get(pk=run.pk).output == 2


def test_time_travel_moves_the_timers_there(without_routers):
    run = sleeper.start({"sleep": "1h"})
    drain(time_travel=False)
    before = without_routers.get(pk=run.pk).available_at
    travel(timedelta(minutes=10))
    assert without_routers.get(pk=run.pk).available_at == before - timedelta(minutes=10)


def test_stuck_runs_are_found_there(without_routers):
    run = waiter.start({"signal": "go"})
    drain()
    without_routers.filter(pk=run.pk).update(resume_generation=1)
    assert [(f.run_id, f.reason) for f in stuck_runs()] == [(str(run.pk), "parked-without-wake")]
