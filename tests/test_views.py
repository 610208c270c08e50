"""The run list and run-detail pages, and the Resume / Cancel endpoints."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from django_openworkflow.display import pretty_json, short_duration, timeline
from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowRunEvent
from django_openworkflow.testing import run_to_completion
from tests.testapp.workflows import atomic_writer, echo, flaky, parent, sleeper, waiter
from tests.users import CSRF_SECRET, ROLES, create_user, login_as, role_client

pytestmark = pytest.mark.django_db

STATUSES = [choice.value for choice in WorkflowRun.Status]
ACTIVE = ["pending", "running"]
XSS = "<script>alert('owf')</script>"
ESCAPED_XSS = "&lt;script&gt;alert(&#x27;owf&#x27;)&lt;/script&gt;"


def list_url() -> str:
    return reverse("django_openworkflow:run-list")


def detail_url(run_or_id) -> str:
    return reverse("django_openworkflow:run-detail", args=[getattr(run_or_id, "pk", run_or_id)])


def resume_url(run_or_id) -> str:
    return reverse("django_openworkflow:run-resume", args=[getattr(run_or_id, "pk", run_or_id)])


def cancel_url(run_or_id) -> str:
    return reverse("django_openworkflow:run-cancel", args=[getattr(run_or_id, "pk", run_or_id)])


def make_run(status: str = "completed", **fields) -> WorkflowRun:
    if status == "failed":
        fields.setdefault(
            "error",
            {"type": "ValueError", "message": "card declined", "traceback": "Traceback ...\n"},
        )
    fields.setdefault("workflow_name", "charge-order")
    run = WorkflowRun.objects.create(status=status, **fields)
    run.refresh_from_db()
    return run


def messages_of(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


# --- users and the permission matrix -------------------------------------------


@pytest.fixture
def login(client):
    """Log ``client`` in as one of ``ROLES``; returns the user (None for anonymous)."""
    return lambda kind: login_as(client, kind)


@pytest.fixture
def staff_client(client, login):
    login("staff_change")
    return client


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("anonymous", 302),
        ("non_staff", 403),
        ("staff_without_perm", 403),
        ("staff_view", 200),
        ("staff_change", 200),
        ("superuser", 200),
    ],
)
@pytest.mark.parametrize("page", ["list", "detail"])
def test_page_permissions(client, login, kind, expected, page):
    run = make_run("failed")
    login(kind)
    url = list_url() if page == "list" else detail_url(run)

    response = client.get(url)

    assert response.status_code == expected
    if kind == "anonymous":
        assert response["Location"] == f"/accounts/login/?next={url}"


# What a POST to resume or cancel answers each kind of user: 302 is done (or to the login).
POST_ANSWER_BY_ROLE = [
    ("anonymous", 302),
    ("non_staff", 403),
    ("staff_without_perm", 403),
    ("staff_view", 403),
    ("staff_change", 302),
    ("superuser", 302),
]
TRANSITIONS = [("resume", "failed", "pending"), ("cancel", "running", "canceled")]


@pytest.mark.parametrize(("kind", "expected"), POST_ANSWER_BY_ROLE)
@pytest.mark.parametrize(("action", "status", "changed_status"), TRANSITIONS)
def test_post_permissions(client, login, kind, expected, action, status, changed_status):
    run = make_run(status)
    login(kind)
    url = resume_url(run) if action == "resume" else cancel_url(run)

    response = client.post(url)

    assert response.status_code == expected
    run.refresh_from_db()
    if kind in ("staff_change", "superuser"):
        assert response["Location"] == detail_url(run)
        assert run.status == changed_status
        assert run.events.get().action == action
    else:
        assert run.status == status
        assert not WorkflowRunEvent.objects.exists()
    if kind == "anonymous":
        # After logging in the user lands on the run's page, not on a POST-only URL.
        assert response["Location"] == f"/accounts/login/?next={detail_url(run)}"


def test_inactive_staff_user_is_refused(client):
    user = create_user("gone", "change_workflowrun")
    client.force_login(user)
    user.is_active = False
    user.save()

    assert client.get(list_url()).status_code == 302  # logged out by the auth backend


# One answer per endpoint and method (for a staff user with the change permission):
# the pages are GET/HEAD only, the transitions POST only.
METHOD_ANSWERS = [
    *[("list", method, 200, None) for method in ("get", "head")],
    *[("detail", method, 200, None) for method in ("get", "head")],
    *[("resume", "post", 302, None), ("cancel", "post", 302, None)],
    *[
        (page, method, 405, "GET, HEAD")
        for page in ("list", "detail")
        for method in ("post", "put", "patch", "delete", "options")
    ],
    *[
        (action, method, 405, "POST")
        for action in ("resume", "cancel")
        for method in ("get", "head", "put", "patch", "delete", "options")
    ],
]
# the status each endpoint's run starts in, and ends in after a POST
STATUS_BEFORE = {"list": "failed", "detail": "failed", "resume": "failed", "cancel": "running"}
STATUS_AFTER_POST = {"resume": "pending", "cancel": "canceled"}


@pytest.mark.parametrize(("endpoint", "method", "expected", "allow"), METHOD_ANSWERS)
def test_each_endpoint_answers_each_method_exactly(staff_client, endpoint, method, expected, allow):
    run = make_run(STATUS_BEFORE[endpoint])
    url = {
        "list": list_url(),
        "detail": detail_url(run),
        "resume": resume_url(run),
        "cancel": cancel_url(run),
    }[endpoint]

    response = getattr(staff_client, method)(url)

    assert response.status_code == expected
    assert response.get("Allow") == allow
    run.refresh_from_db()
    changed = expected == 302
    assert run.status == (STATUS_AFTER_POST[endpoint] if changed else STATUS_BEFORE[endpoint])
    assert WorkflowRunEvent.objects.count() == (1 if changed else 0)


def test_transitions_need_the_csrf_token():
    run = make_run("failed")
    client = Client(enforce_csrf_checks=True)
    client.force_login(create_user("alice", "change_workflowrun"))

    response = client.post(resume_url(run))

    assert response.status_code == 403
    run.refresh_from_db()
    assert run.status == "failed"


# --- unknown ids -----------------------------------------------------------------


@pytest.mark.parametrize("url", [detail_url, resume_url, cancel_url])
def test_unknown_run_is_404(staff_client, url):
    unknown = uuid.uuid4()

    response = (
        staff_client.get(url(unknown)) if url is detail_url else staff_client.post(url(unknown))
    )

    assert response.status_code == 404


def test_malformed_run_id_is_404(staff_client):
    assert staff_client.get("/workflows/not-a-uuid/").status_code == 404


# --- run list --------------------------------------------------------------------


@pytest.mark.parametrize("status", STATUSES)
def test_run_list_shows_a_run_in_each_status(staff_client, status):
    run = make_run(status, workflow_name=f"wf-{status}")
    StepAttempt.objects.create(workflow_run=run, step_name="load-order", status="completed")
    StepAttempt.objects.create(workflow_run=run, step_name="charge", status="running")

    response = staff_client.get(list_url())

    assert response.status_code == 200
    html = response.content.decode()
    assert f'<a href="{detail_url(run)}">{run.pk}</a>' in html
    assert f"wf-{status}" in html
    assert f'<span class="owf-status owf-status-{status}">{status}</span>' in html
    assert [r.current_step for r in response.context["page"]] == ["charge"]


def test_run_list_counts_runs_per_status(staff_client):
    for status in ["failed", "failed", "completed", "running"]:
        make_run(status)

    response = staff_client.get(list_url())

    counts = {tab["value"]: tab["count"] for tab in response.context["status_tabs"]}
    assert counts == {
        None: 4,
        "pending": 0,
        "running": 1,
        "completed": 1,
        "failed": 2,
        "canceled": 0,
    }


def test_run_list_filters_by_status_and_workflow(staff_client):
    a_failed = make_run("failed", workflow_name="a")
    make_run("completed", workflow_name="a")
    make_run("failed", workflow_name="b")

    response = staff_client.get(list_url(), {"status": "failed", "workflow": "a"})

    assert [run.pk for run in response.context["page"]] == [a_failed.pk]
    # The counts follow the workflow filter, not the status filter.
    counts = {tab["value"]: tab["count"] for tab in response.context["status_tabs"]}
    assert counts[None] == 2
    assert counts["completed"] == 1
    # The filter offers the project's workflows, those of active runs and the chosen one:
    # not "b", which only a finished run names (a DISTINCT over a long history is slow).
    names = response.context["workflow_names"]
    assert "a" in names and "echo" in names and "b" not in names


def test_run_list_ignores_an_unknown_status_but_keeps_the_other_filters(staff_client):
    wanted = make_run("failed", workflow_name="a")
    make_run("failed", workflow_name="b")

    response = staff_client.get(list_url(), {"status": "bogus", "workflow": "a"})

    assert response.status_code == 200
    assert [run.pk for run in response.context["page"]] == [wanted.pk]


def test_pages_answer_head(staff_client):
    run = make_run("failed")

    assert staff_client.head(list_url()).status_code == 200
    assert staff_client.head(detail_url(run)).status_code == 200


FIRST = uuid.UUID("12345678-9abc-4ef0-9234-56789abcdef0")  # RFC 4122: MariaDB's uuid type
SECOND = uuid.UUID("12345678-0000-4000-8000-000000000000")


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("12345678", {FIRST, SECOND}),  # the first 8 hex digits of a run id
        ("12345678-9abc", {FIRST}),
        ("123456789ABC", {FIRST}),  # without dashes, any case
        (str(FIRST), {FIRST}),
        (" order-4 ", {FIRST}),  # part of an idempotency key
        ("ORDER", {FIRST}),
        ("invoice-7", {SECOND}),
        ("bil", {SECOND}),  # part of a workflow name
        ("123", set()),  # too short for an id prefix
        ("no-such-thing", set()),
    ],
)
@pytest.mark.parametrize("page", ["run-list", "admin"])
def test_the_run_list_and_the_admin_search_alike(staff_client, page, term, expected):
    make_run("completed", id=FIRST, idempotency_key="order-42", workflow_name="ship")
    make_run("completed", id=SECOND, idempotency_key="invoice-7", workflow_name="bill")

    if page == "run-list":
        response = staff_client.get(list_url(), {"q": term})
        found = {run.pk for run in response.context["page"]}
    else:
        changelist = reverse("admin:django_openworkflow_workflowrun_changelist")
        response = staff_client.get(changelist, {"q": term})
        found = {run.pk for run in response.context["cl"].result_list}

    assert response.status_code == 200
    assert found == expected
    if page == "run-list" and not expected:
        assert "No runs match." in response.content.decode()


def test_run_list_paginates_by_50(staff_client):
    WorkflowRun.objects.bulk_create(
        WorkflowRun(workflow_name="bulk", status="completed") for _ in range(51)
    )

    first = staff_client.get(list_url(), {"workflow": "bulk"})
    second = staff_client.get(list_url(), {"workflow": "bulk", "page": 2})

    assert len(first.context["page"]) == 50
    assert len(second.context["page"]) == 1
    assert '<a href="?workflow=bulk&amp;page=2" rel="next">next</a>' in first.content.decode()


@pytest.mark.parametrize("status", STATUSES)
def test_run_list_refreshes_while_a_run_in_view_is_active(staff_client, status):
    make_run("completed")
    make_run(status)

    response = staff_client.get(list_url())

    refresh = '<meta http-equiv="refresh" content="3">'
    assert (refresh in response.content.decode()) is (status in ACTIVE)


def test_run_list_does_not_refresh_for_active_runs_filtered_out(staff_client):
    make_run("running")
    make_run("failed")

    response = staff_client.get(list_url(), {"status": "failed"})

    assert response.context["refresh_seconds"] is None


# --- run detail ------------------------------------------------------------------


@pytest.mark.parametrize("status", STATUSES)
def test_run_detail_in_each_status(staff_client, status):
    run = make_run(status, input={"order_id": 7}, output={"receipt": "r-1"}, version="v2")

    response = staff_client.get(detail_url(run))

    assert response.status_code == 200
    html = response.content.decode()
    assert f'<span class="owf-status owf-status-{status}">{status}</span>' in html
    assert "<dt>Version</dt><dd>v2</dd>" in html
    assert '<pre class="owf-json owf-input">{\n  &quot;order_id&quot;: 7\n}</pre>' in html
    assert (
        '<pre class="owf-json owf-output">{\n  &quot;receipt&quot;: &quot;r-1&quot;\n}</pre>'
        in (html)
    )
    assert (f'action="{resume_url(run)}"' in html) is (status == "failed")
    assert (f'action="{cancel_url(run)}"' in html) is (status in ACTIVE)
    assert ('<meta http-equiv="refresh" content="3">' in html) is (status in ACTIVE)


def test_run_detail_buttons_are_csrf_post_forms_with_a_confirm(staff_client):
    run = make_run("failed")

    html = staff_client.get(detail_url(run)).content.decode()

    assert (
        f'<form method="post" action="{resume_url(run)}" data-confirm="Resume this run? '
        'Completed steps keep their results; the failed step runs again.">' in html
    )
    assert 'name="csrfmiddlewaretoken"' in html
    assert "django_openworkflow/openworkflow.js" in html


def test_run_detail_offers_resume_only_when_resume_would_succeed(staff_client):
    # The button follows WorkflowRun.can_resume(), the rule resume() applies: a failed
    # run past its deadline is refused there, so the page says why instead of offering it.
    late = make_run("failed", deadline_at=timezone.now() - timedelta(minutes=5))
    ahead = make_run("failed", deadline_at=timezone.now() + timedelta(hours=1))

    late_html = staff_client.get(detail_url(late)).content.decode()
    ahead_html = staff_client.get(detail_url(ahead)).content.decode()

    assert f'action="{resume_url(late)}"' not in late_html
    assert (
        '<p class="owf-message owf-message-warning owf-resume-refused">This run cannot be '
        "resumed here: its deadline has passed. WorkflowRun.objects.resume(run, "
        "deadline_at=...) with a future deadline resumes it.</p>"
    ) in late_html
    assert f'action="{resume_url(ahead)}"' in ahead_html
    assert "owf-resume-refused" not in ahead_html


@pytest.mark.parametrize("status", STATUSES)
def test_run_detail_has_no_buttons_for_view_only_users(client, login, status):
    run = make_run(status)
    login("staff_view")

    html = client.get(detail_url(run)).content.decode()

    assert resume_url(run) not in html
    assert cancel_url(run) not in html


def test_run_detail_shows_the_error_with_its_traceback(staff_client):
    run = make_run(
        "failed",
        error={
            "type": "StepFailed",
            "message": 'step "charge" failed after 3 attempts: ValueError: card declined',
            "traceback": 'Traceback (most recent call last):\n  File "x.py", line 1\n',
        },
    )

    html = staff_client.get(detail_url(run)).content.decode()

    assert '<strong class="owf-error-type">StepFailed</strong>' in html
    assert (
        '<span class="owf-error-message">step &quot;charge&quot; failed after 3 attempts: '
        "ValueError: card declined</span>" in html
    )
    assert (
        '<pre class="owf-traceback">Traceback (most recent call last):\n'
        "  File &quot;x.py&quot;, line 1\n</pre>" in html
    )


def test_run_detail_shows_the_summary(staff_client):
    parent = make_run("running", workflow_name="parent")
    step = StepAttempt.objects.create(
        workflow_run=parent, step_name="child-step", kind="workflow", status="running"
    )
    deadline = timezone.now() + timedelta(days=1)
    run = make_run(
        "running",
        parent_step_attempt=step,
        worker_id="host:123",
        attempts=2,
        resume_generation=3,
        deadline_at=deadline,
        idempotency_key="key-1",
    )
    step.child_workflow_run = run
    step.save()

    child_html = staff_client.get(detail_url(run)).content.decode()
    parent_html = staff_client.get(detail_url(parent)).content.decode()

    assert (
        '<dt>Worker</dt><dd class="owf-holder"><a href="/workflows/workers/#worker-host%3A123">'
        "<code>host:123</code></a>" in child_html
    )  # the worker holding the running run (tests/test_workers_page.py: its state)
    assert ">Workflow failures</dt><dd>2</dd>" in child_html
    assert "<dt>Resume generation</dt><dd>3</dd>" in child_html
    assert "<dt>Idempotency key</dt><dd>key-1</dd>" in child_html
    assert f"<dt>Deadline</dt><dd>{deadline:%Y-%m-%d %H:%M:%S} UTC</dd>" in child_html
    assert (
        f'<a href="{detail_url(parent)}" class="owf-parent">{parent.pk}</a> (step child-step)'
        in child_html
    )
    assert f'<a href="{detail_url(run)}">child run</a>' in parent_html


def test_run_detail_timeline_groups_attempts_by_resume_generation(staff_client):
    run = make_run("failed", resume_generation=1)
    start = run.created_at
    for generation, name, status, offset in [
        (0, "load", "completed", 0),
        (0, "charge", "failed", 2),
        (0, "charge", "failed", 4),
        (1, "charge", "failed", 6),
    ]:
        StepAttempt.objects.create(
            workflow_run=run,
            step_name=name,
            status=status,
            resume_generation=generation,
            started_at=start + timedelta(seconds=offset),
            finished_at=start + timedelta(seconds=offset + 1),
            error={"type": "ValueError", "message": "declined"} if status == "failed" else None,
            output={"ok": True} if status == "completed" else None,
        )
    WorkflowRun.objects.filter(pk=run.pk).update(finished_at=start + timedelta(seconds=10))

    response = staff_client.get(detail_url(run))

    generations = response.context["generations"]
    assert [g["number"] for g in generations] == [0, 1]
    assert [g["current"] for g in generations] == [False, True]
    assert [(a.step_name, a.number) for a in generations[0]["attempts"]] == [
        ("load", 1),
        ("charge", 1),
        ("charge", 2),
    ]
    assert [(a.bar_left, a.bar_width) for a in generations[0]["attempts"]] == [
        (0.0, 10.0),
        (20.0, 10.0),
        (40.0, 10.0),
    ]
    html = response.content.decode()
    assert "First execution" in html
    assert "After resume 1" in html
    assert html.count('<tr class="owf-attempt owf-attempt-failed">') == 3
    assert (
        '<div class="owf-bar owf-bar-failed" style="margin-left: 60.000%; width: 10.000%"' in html
    )
    assert 'charge <span class="owf-muted">#2</span>' in html


def test_timeline_of_an_active_run_ends_now():
    created = timezone.now() - timedelta(seconds=100)
    run = WorkflowRun(status="running", created_at=created, resume_generation=0)
    attempts = [
        StepAttempt(
            step_name="a",
            status="completed",
            started_at=created,
            finished_at=created + timedelta(seconds=25),
        ),
        StepAttempt(step_name="b", status="running", started_at=created + timedelta(seconds=50)),
    ]

    [generation] = timeline(run, attempts, now=created + timedelta(seconds=100))

    assert [(a.bar_left, a.bar_width) for a in generation["attempts"]] == [
        (0.0, 25.0),
        (50.0, 50.0),
    ]


def test_timeline_gives_instant_attempts_a_visible_bar():
    created = timezone.now()
    run = WorkflowRun(status="completed", created_at=created, finished_at=created)
    attempts = [
        StepAttempt(step_name="a", status="completed", started_at=created, finished_at=created)
    ]

    [generation] = timeline(run, attempts, now=created)

    assert (generation["attempts"][0].bar_left, generation["attempts"][0].bar_width) == (0.0, 0.5)


def test_run_detail_without_steps(staff_client):
    run = make_run("pending")

    html = staff_client.get(detail_url(run)).content.decode()

    assert "No steps yet." in html
    assert "Never resumed, rerun or canceled." in html


def test_run_detail_shows_the_resume_and_cancel_history(staff_client):
    run = make_run(
        "failed", error={"type": "ValueError", "message": "card declined", "traceback": ""}
    )
    bob = create_user("bob", "change_workflowrun")
    WorkflowRun.objects.resume(run, by=bob)
    WorkflowRun.objects.cancel(run)

    response = staff_client.get(detail_url(run))

    html = response.content.decode()
    assert [e.action for e in response.context["events"]] == ["resume", "cancel"]
    assert "<td>resume</td>\n        <td>bob</td>" in html
    assert "<td>ValueError: card declined</td>" in html
    assert "<td>cancel</td>\n        <td>—</td>" in html


# --- resume and cancel -----------------------------------------------------------


def test_resume_resumes_and_redirects_to_the_run(staff_client):
    run = make_run("failed")

    response = staff_client.post(resume_url(run), follow=True)

    assert response.redirect_chain == [(detail_url(run), 302)]
    run.refresh_from_db()
    assert run.status == "pending"
    assert run.error is None
    event = run.events.get()
    assert (event.action, event.by.username) == ("resume", "staff_change")
    assert f'<li class="owf-message owf-message-success">Run {run.pk} resumed.</li>' in (
        response.content.decode()
    )
    [entry] = LogEntry.objects.filter(object_id=str(run.pk))
    assert (entry.change_message, entry.user.username) == ("Resumed", "staff_change")


def test_cancel_cancels_and_redirects_to_the_run(staff_client):
    run = make_run("pending")

    response = staff_client.post(cancel_url(run))

    assert response["Location"] == detail_url(run)
    assert messages_of(response) == [f"Run {run.pk} canceled."]
    run.refresh_from_db()
    assert run.status == "canceled"
    assert LogEntry.objects.get(object_id=str(run.pk)).change_message == "Canceled"


@pytest.mark.parametrize("status", ["pending", "running", "completed", "canceled"])
def test_refused_resume_shows_the_status_on_the_page(staff_client, status):
    run = make_run(status)

    response = staff_client.post(resume_url(run), follow=True)

    assert response.status_code == 200
    assert response.redirect_chain == [(detail_url(run), 302)]
    message = f"cannot resume run {run.pk}: it is {status}; only failed runs can be resumed"
    assert [str(m) for m in response.context["messages"]] == [message]
    assert f'<li class="owf-message owf-message-error">{message}</li>' in (
        response.content.decode()
    )
    run.refresh_from_db()
    assert run.status == status


def test_refused_resume_past_the_deadline_explains_why(staff_client):
    deadline = timezone.now() - timedelta(hours=1)
    run = make_run("failed", deadline_at=deadline)

    response = staff_client.post(resume_url(run))

    run.refresh_from_db()
    assert messages_of(response) == [
        f"cannot resume run {run.pk}: its deadline_at {run.deadline_at.isoformat()} has passed; "
        "pass a future deadline_at= to resume it"
    ]
    assert run.status == "failed"


@pytest.mark.parametrize("status", ["completed", "failed", "canceled"])
def test_refused_cancel_shows_the_status_on_the_page(staff_client, status):
    run = make_run(status)

    response = staff_client.post(cancel_url(run), follow=True)

    assert response.status_code == 200
    assert [str(m) for m in response.context["messages"]] == [
        f"cannot cancel run {run.pk}: it is {status}; only pending or running runs can be canceled"
    ]
    run.refresh_from_db()
    assert run.status == status


def test_transition_redirects_to_a_safe_next(staff_client):
    run = make_run("failed")
    admin_url = reverse("admin:django_openworkflow_workflowrun_change", args=[run.pk])

    response = staff_client.post(resume_url(run), {"next": admin_url})

    assert response["Location"] == admin_url


def test_transition_ignores_an_unsafe_next(staff_client):
    run = make_run("running")

    response = staff_client.post(cancel_url(run), {"next": "https://evil.example/"})

    assert response["Location"] == detail_url(run)


# --- escaping --------------------------------------------------------------------


def test_stored_data_is_rendered_escaped(staff_client):
    run = make_run(
        "failed",
        workflow_name=f"wf{XSS}",
        idempotency_key=f"key{XSS}",
        version=XSS,
        worker_id=XSS,
        input={"html": XSS},
        output=XSS,
        error={"type": XSS, "message": XSS, "traceback": XSS},
    )
    StepAttempt.objects.create(
        workflow_run=run,
        step_name=XSS,
        status="failed",
        error={"type": XSS, "message": XSS, "traceback": XSS},
    )
    StepAttempt.objects.create(
        workflow_run=run, step_name="ok", status="completed", output={"x": XSS}
    )
    WorkflowRunEvent.objects.create(
        run=run, action="resume", cleared_error={"type": XSS, "message": XSS}
    )

    detail = staff_client.get(detail_url(run)).content.decode()
    listing = staff_client.get(list_url()).content.decode()

    for html in (detail, listing):
        assert "<script>alert" not in html
        assert ESCAPED_XSS in html
    assert detail.count(ESCAPED_XSS) >= 12


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "250 ms"),
        (12.34, "12.3 s"),
        (245, "4 min 5 s"),
        (7380, "2 h 3 min"),
        (266400, "3 d 2 h"),
    ],
)
def test_short_duration(seconds, text):
    assert short_duration(timedelta(seconds=seconds)) == text


def test_pretty_json_returns_plain_text_for_the_template_to_escape():
    assert pretty_json({"a": [1, "<b>"]}) == '{\n  "a": [\n    1,\n    "<b>"\n  ]\n}'
    assert pretty_json(None) == "null"
    assert not hasattr(pretty_json({"a": 1}), "__html__")


# --- the rest of the security matrix: GET never changes state, CSRF on every POST ----------


def state_of(*runs) -> tuple:
    return (
        [WorkflowRun.objects.values_list("status", "error").get(pk=run.pk) for run in runs],
        WorkflowRunEvent.objects.count(),
        LogEntry.objects.count(),
    )


@pytest.mark.parametrize("kind", list(ROLES))
@pytest.mark.parametrize("method", ["get", "head"])
@pytest.mark.parametrize(
    ("action", "status"), [("resume", "failed"), ("cancel", "running"), ("cancel", "pending")]
)
def test_get_on_transition_endpoints_changes_nothing_for_any_role(
    client, login, kind, method, action, status
):
    run = make_run(status)
    login(kind)
    url = resume_url(run) if action == "resume" else cancel_url(run)
    before = state_of(run)

    response = getattr(client, method)(url, {"next": "/", "csrfmiddlewaretoken": "x"})

    assert response.status_code == 405
    assert state_of(run) == before


@pytest.mark.parametrize("kind", list(ROLES))
@pytest.mark.parametrize("page", ["list", "detail"])
def test_pages_change_nothing_for_any_role(client, login, kind, page):
    run = make_run("failed")
    login(kind)
    before = state_of(run)

    client.get(list_url() if page == "list" else detail_url(run), {"action": "resume"})

    assert state_of(run) == before


@pytest.mark.parametrize("kind", list(ROLES))
@pytest.mark.parametrize(
    ("action", "status"), [("resume", "failed"), ("cancel", "running"), ("cancel", "pending")]
)
@pytest.mark.parametrize("token", [None, "", "wrong-token", "x" * 64])
def test_every_post_without_a_valid_csrf_token_is_403_for_any_role(kind, action, status, token):
    run = make_run(status)
    client = role_client(kind, enforce_csrf=True)
    url = resume_url(run) if action == "resume" else cancel_url(run)
    before = state_of(run)

    data = {} if token is None else {"csrfmiddlewaretoken": token}
    response = client.post(url, data)

    assert response.status_code == 403
    assert b"CSRF verification failed" in response.content
    assert state_of(run) == before


@pytest.mark.parametrize(("kind", "expected"), POST_ANSWER_BY_ROLE)
@pytest.mark.parametrize(("action", "status", "changed_status"), TRANSITIONS)
def test_a_valid_csrf_token_leaves_only_the_permission_check(
    kind, expected, action, status, changed_status
):
    run = make_run(status)
    client = role_client(kind, enforce_csrf=True)
    url = resume_url(run) if action == "resume" else cancel_url(run)

    response = client.post(url, {"csrfmiddlewaretoken": CSRF_SECRET})

    assert response.status_code == expected
    run.refresh_from_db()
    may_change = kind in ("staff_change", "superuser")
    assert run.status == (changed_status if may_change else status)
    assert WorkflowRunEvent.objects.count() == (1 if may_change else 0)


# --- what the run page says about attempts, kinds and waits ----------------------


def test_a_run_that_failed_in_a_step_shows_its_step_attempts(staff_client):
    run = run_to_completion(flaky, {"failures": 5, "attempts": 3})
    assert run.status == "failed"

    html = staff_client.get(detail_url(run)).content.decode()

    assert '<dt>Step attempts</dt><dd>3 <span class="owf-muted">(3 failed)</span></dd>' in html
    assert ">Workflow failures</dt><dd>0</dd>" in html
    assert "<dt>Attempts</dt>" not in html


def test_an_atomic_step_is_shown_as_atomic(staff_client):
    run = run_to_completion(atomic_writer, {"fail": False})
    attempt = run.step_attempts.get()
    assert (attempt.kind, attempt.atomic) == ("run", True)
    assert run_to_completion(echo, {"n": 1}).step_attempts.get().atomic is False

    html = staff_client.get(detail_url(run)).content.decode()

    assert "<td>atomic</td>" in html
    assert "<td>run</td>" not in html


def test_attempts_left_running_on_a_finished_run_are_shown_as_interrupted(staff_client):
    run = make_run("failed")
    StepAttempt.objects.create(workflow_run=run, step_name="charge", status="running")
    active = make_run("running")
    StepAttempt.objects.create(workflow_run=active, step_name="charge", status="running")

    html = staff_client.get(detail_url(run)).content.decode()
    active_html = staff_client.get(detail_url(active)).content.decode()
    admin_html = staff_client.get(
        reverse("admin:django_openworkflow_workflowrun_change", args=[run.pk])
    ).content.decode()

    assert '<span class="owf-status owf-status-interrupted"' in html
    assert '<span class="owf-status owf-status-running">running</span>' not in html
    assert '<div class="owf-bar owf-bar-interrupted"' in html
    assert '<span class="owf-status owf-status-running">running</span>' in active_html
    assert "<p>interrupted</p>" in admin_html


def test_the_run_page_says_what_the_run_waits_for(staff_client):
    waiting = run_to_completion(waiter, {"signal": "approved"})
    parent_run = run_to_completion(parent, {"child": "waiter", "child_input": {"signal": "x"}})
    child = WorkflowRun.objects.get(parent_step_attempt__workflow_run=parent_run)
    napping = run_to_completion(sleeper, {"sleep": "1h"}, time_travel=False)  # the last drain
    wake_at = napping.step_attempts.get(step_name="nap").wake_at

    pages = {
        run: staff_client.get(detail_url(run)).content.decode()
        for run in (napping, waiting, parent_run)
    }

    assert (
        '<dt>Waiting for</dt><dd class="owf-waiting">sleep "nap" until '
        f"{wake_at:%Y-%m-%d %H:%M:%S} UTC</dd>" in pages[napping]
    )
    assert (
        '<dt>Waiting for</dt><dd class="owf-waiting">signal "approved", no timeout</dd>'
        in pages[waiting]
    )
    assert (
        f'<dt>Waiting for</dt><dd class="owf-waiting">child run <a href="{detail_url(child)}">'
        f'{child.pk}</a> (step "waiter")</dd>' in pages[parent_run]
    )
    assert "Waiting for" not in staff_client.get(detail_url(make_run("failed"))).content.decode()


def test_the_run_page_says_when_no_workflow_of_that_name_is_registered(staff_client):
    typo = WorkflowRun.objects.create(workflow_name="send-reciept")
    known = echo.start({"n": 1})
    notice = (
        "No workflow named “send-reciept” is registered in this project, so no worker will "
        "run this run."
    )
    assert notice in staff_client.get(detail_url(typo)).content.decode()
    assert (
        "is registered in this project" not in staff_client.get(detail_url(known)).content.decode()
    )
    WorkflowRun.objects.cancel(typo)  # a finished run of an unknown name needs no warning
    assert notice not in staff_client.get(detail_url(typo)).content.decode()


def test_the_timeline_names_the_worker_of_each_attempt(staff_client):
    run = make_run("failed")
    StepAttempt.objects.create(
        workflow_run=run, step_name="charge", status="failed", worker_id="host-1:42:ab12cd34"
    )
    StepAttempt.objects.create(workflow_run=run, step_name="charge", status="completed")
    html = staff_client.get(detail_url(run)).content.decode()
    assert html.count(" · host-1:42:ab12cd34") == 1  # the second attempt names no worker
