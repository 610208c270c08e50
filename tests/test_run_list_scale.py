"""The run list and the admin's run list with a long history: counts stop at COUNT_CAP, and
the filters' choices come from the project and the active runs, not from every stored run."""

from __future__ import annotations

import pytest
from django.urls import reverse

from django_openworkflow import views
from django_openworkflow.models import WorkflowRun, WorkflowSchedule
from tests.users import create_user, login_as

pytestmark = pytest.mark.django_db

LIST = reverse("django_openworkflow:run-list")
ADMIN_LIST = reverse("admin:django_openworkflow_workflowrun_changelist")


def runs(count: int, **fields) -> None:
    fields.setdefault("workflow_name", "echo")
    WorkflowRun.objects.bulk_create(WorkflowRun(**fields) for _ in range(count))


def test_the_status_tabs_and_the_pages_stop_at_the_cap(client, monkeypatch):
    monkeypatch.setattr(views, "COUNT_CAP", 3)
    monkeypatch.setattr(views, "RUNS_PER_PAGE", 2)
    login_as(client, "staff_view")
    runs(5, status="completed")
    runs(2, status="failed")
    html = client.get(LIST).content.decode()
    assert '<span class="owf-count">3+</span>' in html  # all, and completed
    assert html.count('<span class="owf-count">3+</span>') == 2
    assert '<span class="owf-count">2</span>' in html  # failed
    assert "page 1 of 2" in html
    assert "The list stops at the newest 3 runs" in html
    failed = client.get(LIST, {"status": "failed"}).content.decode()
    assert "The list stops" not in failed


def test_the_filters_offer_the_project_s_names_and_those_of_active_runs(client):
    login_as(client, "staff_view")
    runs(1, workflow_name="retired-workflow", status="completed", queue="retired-queue")
    runs(1, workflow_name="typo-workflow", status="pending", queue="typo-queue")
    html = client.get(LIST).content.decode()
    assert '<option value="echo">' in html  # registered
    assert '<option value="typo-workflow">' in html  # an active run's
    assert '<option value="retired-workflow"' not in html  # only finished runs name it
    assert '<option value="typo-queue">' in html
    assert '<option value="retired-queue"' not in html
    chosen = client.get(LIST, {"workflow": "retired-workflow"}).content.decode()
    assert '<option value="retired-workflow" selected>' in chosen
    assert "retired-workflow</td>" in chosen


def test_the_admin_filters_offer_the_same_names_and_filter(client):
    client.force_login(create_user("root", superuser=True))
    runs(1, workflow_name="retired-workflow", status="completed", queue="retired-queue")
    runs(1, workflow_name="typo-workflow", status="pending", queue="typo-queue")
    WorkflowSchedule.objects.create(name="nightly", workflow_name="tick", cron="0 3 * * *")
    html = client.get(ADMIN_LIST).content.decode()
    assert "?workflow_name=typo-workflow" in html
    assert "?workflow_name=echo" in html
    assert "?workflow_name=retired-workflow" not in html
    assert "?queue=typo-queue" in html and "?queue=retired-queue" not in html
    assert "?schedule_name=nightly" in html
    filtered = client.get(ADMIN_LIST, {"workflow_name": "retired-workflow"})
    assert filtered.context["cl"].result_count == 1
