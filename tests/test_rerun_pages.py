"""The Rerun form on the run page, its endpoint, and what a rerun leaves on the page."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowRunEvent
from django_openworkflow.testing import drain, run_to_completion
from tests.testapp.models import SideEffect
from tests.testapp.workflows import parent, three_steps
from tests.users import CSRF_SECRET, ROLES, login_as, role_client

pytestmark = pytest.mark.django_db

XSS = "<script>alert('owf')</script>"
ESCAPED_XSS = "&lt;script&gt;alert(&#x27;owf&#x27;)&lt;/script&gt;"
MAY_CHANGE = ("staff_change", "superuser")
FINISHED = ["completed", "failed", "canceled"]


def rerun_url(run_or_id) -> str:
    return reverse("django_openworkflow:run-rerun", args=[getattr(run_or_id, "pk", run_or_id)])


def detail_url(run_or_id) -> str:
    return reverse("django_openworkflow:run-detail", args=[getattr(run_or_id, "pk", run_or_id)])


def completed_three_steps() -> WorkflowRun:
    run = run_to_completion(three_steps, {"i": 1})
    assert (run.status, run.output) == ("completed", {"total": 3})
    return run


def messages_of(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def state_of(run: WorkflowRun) -> tuple:
    return (
        WorkflowRun.objects.values_list("status", "resume_generation", "output").get(pk=run.pk),
        sorted(StepAttempt.objects.values_list("id", "status", "superseded_by")),
        WorkflowRunEvent.objects.count(),
        LogEntry.objects.count(),
    )


@pytest.fixture
def staff_client(client):
    login_as(client, "staff_change")
    return client


# --- who may: the role matrix, CSRF, methods ---------------------------------------------

ANSWERS = {
    "anonymous": 302,
    "non_staff": 403,
    "staff_without_perm": 403,
    "staff_view": 403,
    "staff_change": 302,
    "superuser": 302,
}


@pytest.mark.parametrize("kind", list(ROLES))
def test_rerun_by_role(kind):
    run = completed_three_steps()
    client = role_client(kind)
    before = state_of(run)

    response = client.post(rerun_url(run), {"from_step": "s1"})

    assert response.status_code == ANSWERS[kind]
    if kind in MAY_CHANGE:
        assert response["Location"] == detail_url(run)
        run.refresh_from_db()
        assert (run.status, run.resume_generation) == ("pending", 1)
        event = run.events.get()
        assert (event.action, event.by.username) == ("rerun", kind)
    else:
        assert state_of(run) == before
    if kind == "anonymous":  # after logging in, the run's page (not the POST-only URL)
        assert response["Location"] == f"/accounts/login/?next={detail_url(run)}"


@pytest.mark.parametrize("kind", list(ROLES))
@pytest.mark.parametrize("token", [None, "", "wrong-token"])
def test_a_rerun_without_a_valid_csrf_token_is_403(kind, token):
    run = completed_three_steps()
    client = role_client(kind, enforce_csrf=True)
    before = state_of(run)
    data = {"from_step": ""} if token is None else {"from_step": "", "csrfmiddlewaretoken": token}

    response = client.post(rerun_url(run), data)

    assert response.status_code == 403
    assert b"CSRF verification failed" in response.content
    assert state_of(run) == before


@pytest.mark.parametrize("kind", list(ROLES))
def test_a_valid_csrf_token_leaves_only_the_permission_check(kind):
    run = completed_three_steps()
    client = role_client(kind, enforce_csrf=True)

    response = client.post(rerun_url(run), {"csrfmiddlewaretoken": CSRF_SECRET})

    assert response.status_code == ANSWERS[kind]
    run.refresh_from_db()
    assert run.status == ("pending" if kind in MAY_CHANGE else "completed")


@pytest.mark.parametrize("kind", list(ROLES))
@pytest.mark.parametrize("method", ["get", "head", "put", "patch", "delete", "options"])
def test_only_post_reruns(kind, method):
    run = completed_three_steps()
    client = role_client(kind)
    before = state_of(run)

    response = getattr(client, method)(rerun_url(run))

    assert response.status_code == 405
    assert response["Allow"] == "POST"
    assert state_of(run) == before


def test_an_unknown_run_is_404(staff_client):
    assert staff_client.post(rerun_url(uuid.uuid4())).status_code == 404


# --- reruns and refusals: Post/Redirect/Get with a message ---------------------------------


def test_rerun_from_a_step_reruns_it_and_what_follows(staff_client):
    run = completed_three_steps()

    response = staff_client.post(rerun_url(run), {"from_step": "s1"}, follow=True)

    assert response.redirect_chain == [(detail_url(run), 302)]
    assert (
        f'<li class="owf-message owf-message-success">Run {run.pk} rerun from step '
        "&quot;s1&quot;.</li>" in response.content.decode()
    )
    drain()
    run.refresh_from_db()
    assert (run.status, run.output, run.resume_generation) == ("completed", {"total": 3}, 1)
    ran = SideEffect.objects.filter(run_id=run.pk)
    assert [ran.filter(step=f"s{i}").count() for i in range(3)] == [1, 2, 2]
    # Written once to the admin history, by the manager.
    [entry] = LogEntry.objects.filter(object_id=str(run.pk))
    assert entry.user.username == "staff_change"


def test_rerun_from_the_start(staff_client):
    run = completed_three_steps()

    response = staff_client.post(rerun_url(run), {"from_step": ""})

    assert messages_of(response) == [f"Run {run.pk} rerun from the start."]
    drain()
    assert [SideEffect.objects.filter(run_id=run.pk, step=f"s{i}").count() for i in range(3)] == [
        2,
        2,
        2,
    ]


def test_rerun_goes_back_to_a_safe_next(staff_client):
    run = completed_three_steps()
    admin_url = reverse("admin:django_openworkflow_workflowrun_change", args=[run.pk])

    assert staff_client.post(rerun_url(run), {"next": admin_url})["Location"] == admin_url
    assert staff_client.post(rerun_url(run), {"next": "https://evil.example/"})[
        "Location"
    ] == detail_url(run)


@pytest.mark.parametrize("status", ["pending", "running"])
def test_an_active_run_is_refused_with_a_message(staff_client, status):
    run = WorkflowRun.objects.create(workflow_name="three-steps", status=status)
    before = state_of(run)

    response = staff_client.post(rerun_url(run), follow=True)

    assert response.status_code == 200
    assert response.redirect_chain == [(detail_url(run), 302)]
    message = (
        f"cannot rerun run {run.pk}: it is {status}; only completed, failed or canceled runs "
        "can be rerun"
    )
    assert [str(m) for m in response.context["messages"]] == [message]
    assert f'<li class="owf-message owf-message-error">{message}</li>' in response.content.decode()
    assert state_of(run) == before


def test_a_run_past_its_deadline_is_refused_with_a_message(staff_client):
    run = completed_three_steps()
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=timezone.now() - timedelta(hours=1))
    run.refresh_from_db()
    before = state_of(run)

    response = staff_client.post(rerun_url(run))

    assert messages_of(response) == [
        f"cannot rerun run {run.pk}: its deadline_at {run.deadline_at.isoformat()} has passed; "
        "pass a future deadline_at= to rerun it"
    ]
    assert state_of(run) == before


@pytest.mark.parametrize("step", ["no-such-step", XSS, "x" * 300])
def test_an_unknown_step_is_refused_with_a_message(staff_client, step):
    run = completed_three_steps()
    before = state_of(run)

    response = staff_client.post(rerun_url(run), {"from_step": step}, follow=True)

    assert response.status_code == 200
    [message] = [str(m) for m in response.context["messages"]]
    assert str(run.pk) in message
    assert "<script>alert" not in response.content.decode()
    assert state_of(run) == before


def test_a_nul_in_the_step_is_refused_with_a_message(staff_client):
    run = completed_three_steps()
    before = state_of(run)

    response = staff_client.post(rerun_url(run), {"from_step": "s1\x00"})

    assert response.status_code == 302
    assert len(messages_of(response)) == 1
    assert state_of(run) == before


# --- the form on the run page ------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ROLES))
@pytest.mark.parametrize("status", ["pending", "running", *FINISHED])
def test_the_run_page_offers_rerun_for_finished_runs_to_those_who_may(kind, status):
    run = WorkflowRun.objects.create(workflow_name="three-steps", status=status)
    client = role_client(kind)

    response = client.get(detail_url(run))

    offered = f'action="{rerun_url(run)}"' in response.content.decode()
    assert offered is (kind in MAY_CHANGE and status in FINISHED)


def test_the_step_chooser_lists_the_start_and_the_stored_path(staff_client):
    run = completed_three_steps()

    html = staff_client.get(detail_url(run)).content.decode()

    assert (
        f'<form method="post" action="{rerun_url(run)}" class="owf-rerun" data-confirm="Rerun '
        "this run? The chosen step and every step after it run again; the steps before it keep "
        'their results.">' in html
    )
    assert (
        '<select name="from_step" id="owf-from-step"><option value="">the start</option>'
        '<option value="s0">step “s0”</option><option value="s1">step “s1”</option>'
        '<option value="s2">step “s2”</option></select>' in html
    )
    assert '<button type="submit" class="owf-button owf-button-rerun">Rerun</button>' in html


def test_a_finished_run_past_its_deadline_says_why_it_has_no_rerun(staff_client):
    run = completed_three_steps()
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=timezone.now() - timedelta(hours=1))

    html = staff_client.get(detail_url(run)).content.decode()

    assert f'action="{rerun_url(run)}"' not in html
    assert (
        '<p class="owf-message owf-message-warning owf-rerun-refused">This run cannot be rerun '
        "here: its deadline has passed. WorkflowRun.objects.rerun(run, deadline_at=...) with a "
        "future deadline reruns it.</p>" in html
    )


def test_hostile_step_names_are_escaped_in_the_chooser(staff_client):
    run = WorkflowRun.objects.create(workflow_name="three-steps", status="completed")
    StepAttempt.objects.create(
        workflow_run=run, step_name=XSS, status="completed", output=1, position=0
    )

    html = staff_client.get(detail_url(run)).content.decode()

    assert "<script>alert" not in html
    assert f'<option value="{ESCAPED_XSS}">step “{ESCAPED_XSS}”</option>' in html


# --- what the page shows after a rerun -----------------------------------------------------


def test_superseded_attempts_are_muted_and_say_by_which_rerun(staff_client):
    run = completed_three_steps()
    staff_client.post(rerun_url(run), {"from_step": "s1"})
    event = run.events.get()
    at = f"{event.at:%Y-%m-%d %H:%M:%S} UTC"
    drain()

    response = staff_client.get(detail_url(run))

    html = response.content.decode()
    first = response.context["generations"][0]["attempts"]
    assert [(a.step_name, a.note) for a in first] == [
        ("s0", ""),
        ("s1", f"superseded by the rerun at {at}"),
        ("s2", f"superseded by the rerun at {at}"),
    ]
    assert html.count('<tr class="owf-attempt owf-attempt-completed owf-attempt-superseded">') == 2
    assert html.count(f'<div class="owf-attempt-note">superseded by the rerun at {at}</div>') == 2
    assert "After rerun 1" in html


def test_the_history_shows_the_rerun(staff_client):
    run = completed_three_steps()
    staff_client.post(rerun_url(run), {"from_step": "s1"})

    html = staff_client.get(detail_url(run)).content.decode()

    assert "<td>rerun</td>\n        <td>staff_change</td>" in html
    assert (
        '<td class="owf-event-details"><div>from step “s1” <span class="owf-muted">(generation '
        "1)</span></div>" in html
    )
    assert "<div>steps run again: s1, s2</div>" in html


def test_the_history_links_the_child_runs_a_rerun_canceled(staff_client):
    run = run_to_completion(parent, {"child": "waiter", "child_input": {"signal": "never"}})
    child = WorkflowRun.objects.get(parent_step_attempt__workflow_run=run)
    WorkflowRun.objects.cancel(run)
    WorkflowRun.objects.filter(pk=child.pk).update(status="pending")  # left running somehow
    run.refresh_from_db()

    staff_client.post(rerun_url(run))
    html = staff_client.get(detail_url(run)).content.decode()

    child.refresh_from_db()
    assert child.status == "canceled"
    assert (
        f'<div>child runs canceled: <a href="{detail_url(child)}" class="owf-id">{child.pk}</a>'
        "</div>" in html
    )


def test_history_details_of_unexpected_shapes_do_not_break_the_page(staff_client):
    run = WorkflowRun.objects.create(workflow_name="three-steps", status="completed")
    for details in (
        None,
        [],
        {"from_step": XSS, "canceled_children": ["not-a-uuid", 7], "rerun_steps": "s1"},
    ):
        WorkflowRunEvent.objects.create(run=run, action="rerun", details=details)
    WorkflowRunEvent.objects.create(
        run=run, action="resume", details={"input": "x", "step_outputs": {XSS: 5}}
    )

    response = staff_client.get(detail_url(run))

    html = response.content.decode()
    assert response.status_code == 200
    assert "<script>alert" not in html
    assert f"from step “{ESCAPED_XSS}”" in html
    assert (
        f'<span class="owf-muted">step “{ESCAPED_XSS}”:</span> <code class="owf-old">—</code>'
        in (html)
    )
