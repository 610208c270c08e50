"""Schedules on the pages and in the admin: the Schedules page, the run list's filter, and
the schedule admin's form and actions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from django_openworkflow.cron import next_tick
from django_openworkflow.models import WorkflowRun, WorkflowSchedule
from tests.users import create_user, login_as

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:django_openworkflow_workflowschedule_changelist")
ADD = reverse("admin:django_openworkflow_workflowschedule_add")
XSS = "<script>alert('owf')</script>"


@pytest.fixture
def admin_client(client):
    client.force_login(create_user("root", superuser=True))
    return client


def make_schedule(name: str = "nightly", **fields) -> WorkflowSchedule:
    fields.setdefault("workflow_name", "tick")
    fields.setdefault("cron", "0 3 * * *")
    fields.setdefault("timezone", "UTC")
    fields.setdefault("next_run_at", datetime(2099, 1, 1, 3, tzinfo=UTC))
    return WorkflowSchedule.objects.create(name=name, **fields)


def messages_of(response) -> list[tuple[str, str]]:
    return [(m.level_tag, str(m)) for m in get_messages(response.wsgi_request)]


def act(client, action: str, schedules: list[WorkflowSchedule]):
    return client.post(
        CHANGELIST,
        {"action": action, "_selected_action": [str(s.pk) for s in schedules]},
        follow=True,
    )


# --- the Schedules page ----------------------------------------------------------------


def test_the_schedules_page_shows_next_run_last_run_with_its_status_and_pauses(client):
    login_as(client, "staff_view")
    nightly = make_schedule()
    make_schedule("paused", enabled=False)
    make_schedule(XSS, workflow_name="gone")
    [run] = WorkflowSchedule.objects.backfill(
        "nightly", datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 3, tzinfo=UTC)
    )
    WorkflowRun.objects.filter(pk=run.pk).update(status="failed")
    html = client.get(reverse("django_openworkflow:schedules")).content.decode()
    row = html[html.index(f'id="schedule-{nightly.pk}"') :].split("</tr>")[0]
    assert "2099-01-01 03:00:00" in row
    assert f'href="/workflows/{run.pk}/"' in row
    assert "2026-01-01 03:00:00" in row
    assert 'owf-status-failed">failed' in row
    assert '<a href="/workflows/?schedule=nightly">nightly</a>' in row
    paused = html[html.index('href="/workflows/?schedule=paused"') :].split("</tr>")[0]
    assert "owf-status-paused" in paused
    assert "&lt;script&gt;" in html and XSS not in html
    assert "no @workflow of this project has this name" in html


def test_the_schedules_page_needs_the_view_permission(client):
    response = client.get(reverse("django_openworkflow:schedules"))
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/") or "login" in response["Location"]


def test_the_run_list_filters_by_schedule(client):
    login_as(client, "staff_view")
    make_schedule()
    [scheduled] = WorkflowSchedule.objects.backfill(
        "nightly", datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, 3, tzinfo=UTC)
    )
    other = WorkflowRun.objects.create(workflow_name="tick")
    html = client.get(reverse("django_openworkflow:run-list"), {"schedule": "nightly"})
    html = html.content.decode()
    assert str(scheduled.pk) in html
    assert str(other.pk) not in html
    assert '<option value="nightly" selected>nightly</option>' in html


# --- the admin ---------------------------------------------------------------------------


def test_adding_a_schedule_in_the_admin_plans_its_first_tick(admin_client):
    before = timezone.now()
    response = admin_client.post(
        ADD,
        {
            "name": "hourly",
            "workflow_name": "tick",
            "cron": "0 * * * *",
            "timezone": "Europe/Berlin",
            "input": '{"a": 1}',
            "enabled": "on",
        },
    )
    assert response.status_code == 302, response.content.decode()
    s = WorkflowSchedule.objects.get(name="hourly")
    assert (s.namespace, s.input, s.declared_in_code) == ("default", {"a": 1}, False)
    assert s.next_run_at == next_tick("0 * * * *", "Europe/Berlin", before)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("cron", "0 3 * *", "bad cron expression &#x27;0 3 * *&#x27;: Wrong number of fields"),
        ("timezone", "Mars/Olympus", "unknown time zone &#x27;Mars/Olympus&#x27;"),
        ("workflow_name", "no-such", "Select a valid choice. no-such is not one of the"),
        ("name", "nightly", "Workflow schedule with this Namespace and Name already exists."),
        (
            "input",
            '"' + "x" * 1_048_577 + '"',
            "the input is too large: it is 1,048,579 bytes of JSON",
        ),
    ],
)
def test_the_admin_form_refuses_bad_values_by_name(admin_client, field, value, error):
    make_schedule()
    data = {"name": "new", "workflow_name": "tick", "cron": "0 3 * * *", "timezone": "UTC"}
    response = admin_client.post(ADD, {**data, field: value})
    assert response.status_code == 200
    assert error in response.content.decode()
    assert WorkflowSchedule.objects.count() == 1


def test_editing_the_cron_plans_the_next_tick_again(admin_client):
    s = make_schedule()
    before = timezone.now()
    url = reverse("admin:django_openworkflow_workflowschedule_change", args=[s.pk])
    data = {"name": "nightly", "workflow_name": "tick", "cron": "*/5 * * * *", "timezone": "UTC"}
    response = admin_client.post(url, {**data, "input": "null", "enabled": "on"})
    assert response.status_code == 302
    s.refresh_from_db()
    assert s.next_run_at == next_tick("*/5 * * * *", "UTC", before)


def test_a_schedule_declared_in_code_keeps_its_code_fields_read_only(admin_client):
    s = make_schedule(declared_in_code=True)
    url = reverse("admin:django_openworkflow_workflowschedule_change", args=[s.pk])
    html = admin_client.get(url).content.decode()
    assert 'name="cron"' not in html
    assert 'name="enabled"' in html


def test_pause_resume_and_run_now_actions_count_and_log(admin_client):
    a, b = make_schedule("a"), make_schedule("b", enabled=False)
    response = act(admin_client, "pause_schedules", [a, b])
    assert messages_of(response) == [
        ("success", "1 schedule paused."),
        ("warning", "1 schedule skipped: it is paused already."),
    ]
    response = act(admin_client, "resume_schedules", [a, b])
    assert messages_of(response) == [("success", "2 schedules resumed.")]
    assert WorkflowSchedule.objects.filter(enabled=True).count() == 2
    gone = make_schedule("gone", workflow_name="no-such")
    response = act(admin_client, "run_schedules_now", [a, gone])
    assert messages_of(response) == [
        ("success", "1 schedule started a run."),
        ("warning", "1 schedule skipped: its workflow is not registered in this project."),
    ]
    [run] = WorkflowRun.objects.filter(schedule_name="a")
    assert abs(run.scheduled_at - timezone.now()) < timedelta(minutes=1)
    assert list(LogEntry.objects.order_by("id").values_list("change_message", flat=True)) == [
        "Paused",
        "Resumed",
        "Resumed",
        "Started a run now",
    ]


def test_the_actions_need_the_change_permission(client):
    login_as(client, "staff_view")
    s = make_schedule()
    response = client.post(
        CHANGELIST, {"action": "pause_schedules", "_selected_action": [str(s.pk)]}
    )
    assert response.status_code == 403
    s.refresh_from_db()
    assert s.enabled
