"""The WorkflowRun admin: changelist, Resume / Cancel actions, the read-only change page."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib import admin
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.messages import get_messages
from django.test import RequestFactory, override_settings
from django.urls import reverse
from django.utils import timezone

from django_openworkflow.admin import WorkflowRunAdmin
from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowRunEvent
from tests.users import CSRF_SECRET, ROLES, create_user, role_client

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:django_openworkflow_workflowrun_changelist")


def change_url(run: WorkflowRun) -> str:
    return reverse("admin:django_openworkflow_workflowrun_change", args=[run.pk])


def make_run(status: str, **fields) -> WorkflowRun:
    if status == "failed":
        fields.setdefault("error", {"type": "ValueError", "message": "card declined"})
    fields.setdefault("workflow_name", "charge-order")
    return WorkflowRun.objects.create(status=status, **fields)


@pytest.fixture
def superuser():
    return create_user("root", superuser=True)


@pytest.fixture
def admin_client(client, superuser):
    client.force_login(superuser)
    return client


def run_action(client, action: str, runs: list[WorkflowRun]):
    return client.post(
        CHANGELIST,
        {"action": action, "_selected_action": [str(run.pk) for run in runs]},
    )


def messages_of(response) -> list[tuple[str, str]]:
    return [(m.level_tag, str(m)) for m in get_messages(response.wsgi_request)]


# --- changelist ------------------------------------------------------------------


def test_changelist_loads_with_the_current_step(admin_client):
    run = make_run("failed")
    StepAttempt.objects.create(workflow_run=run, step_name="load", status="completed")
    StepAttempt.objects.create(workflow_run=run, step_name="charge", status="failed")
    make_run("pending", workflow_name="fresh")

    response = admin_client.get(CHANGELIST)

    assert response.status_code == 200
    html = response.content.decode()
    assert '<td class="field-step">charge</td>' in html
    assert '<td class="field-step">-</td>' in html
    assert '<td class="field-status">failed</td>' in html


def test_changelist_has_no_n_plus_1(admin_client, django_assert_max_num_queries):
    for i in range(3):
        run = make_run("failed", workflow_name=f"wf-{i}")
        StepAttempt.objects.create(workflow_run=run, step_name="charge", status="failed")
    admin_client.get(CHANGELIST)  # warm caches (content types, sessions)
    with django_assert_max_num_queries(20) as few:
        admin_client.get(CHANGELIST)
    for i in range(3, 13):
        run = make_run("failed", workflow_name=f"wf-{i}")
        StepAttempt.objects.create(workflow_run=run, step_name="charge", status="failed")

    with django_assert_max_num_queries(len(few.captured_queries)):
        admin_client.get(CHANGELIST)


@pytest.mark.parametrize("field", ["status", "workflow_name"])
def test_changelist_filters(admin_client, field):
    wanted = make_run("failed", workflow_name="wanted")
    make_run("completed", workflow_name="other")

    value = wanted.status if field == "status" else wanted.workflow_name
    response = admin_client.get(CHANGELIST, {field: value})

    assert [run.pk for run in response.context["cl"].result_list] == [wanted.pk]


def test_changelist_filters_failed_runs_by_failed_step(admin_client):
    on_charge = make_run("failed")
    StepAttempt.objects.create(workflow_run=on_charge, step_name="load", status="completed")
    StepAttempt.objects.create(workflow_run=on_charge, step_name="charge", status="failed")
    on_ship = make_run("failed")
    StepAttempt.objects.create(workflow_run=on_ship, step_name="ship", status="failed")
    running = make_run("running")
    StepAttempt.objects.create(workflow_run=running, step_name="charge", status="running")

    response = admin_client.get(CHANGELIST)
    filter_choices = [
        choice["display"]
        for spec in response.context["cl"].filter_specs
        if getattr(spec, "parameter_name", None) == "failed_step"
        for choice in spec.choices(response.context["cl"])
    ]
    assert filter_choices == ["All", "charge", "ship"]

    response = admin_client.get(CHANGELIST, {"failed_step": "charge"})
    assert [run.pk for run in response.context["cl"].result_list] == [on_charge.pk]


def test_changelist_search_by_id_key_and_workflow(admin_client):
    by_key = make_run("completed", idempotency_key="order-42")
    by_name = make_run("completed", workflow_name="ship-parcel")

    def found(term: str) -> list:
        response = admin_client.get(CHANGELIST, {"q": term})
        assert response.status_code == 200
        return [run.pk for run in response.context["cl"].result_list]

    assert found(str(by_name.pk)) == [by_name.pk]
    # A run id's first characters. (Ids are UUIDs of version 7: the first twelve hex digits
    # are the millisecond the run was made, so a short prefix finds that moment's runs.)
    assert found(str(by_name.pk)[:23]) == [by_name.pk]
    assert by_name.pk in found(str(by_name.pk)[:8])
    assert found("order-42") == [by_key.pk]
    assert found("parcel") == [by_name.pk]
    assert found("no-such-thing") == []


def test_no_add_permission(admin_client, superuser):
    model_admin = admin.site._registry[WorkflowRun]
    request = RequestFactory().get("/")
    request.user = superuser

    assert isinstance(model_admin, WorkflowRunAdmin)
    assert model_admin.has_add_permission(request) is False
    add_url = reverse("admin:django_openworkflow_workflowrun_add")
    assert admin_client.get(add_url).status_code == 403
    assert add_url not in admin_client.get(CHANGELIST).content.decode()


# --- actions ---------------------------------------------------------------------


def test_resume_action_with_a_mixed_selection(admin_client, superuser):
    failed = [make_run("failed"), make_run("failed")]
    completed = make_run("completed")
    running = make_run("running")

    response = run_action(admin_client, "resume_runs", [*failed, completed, running])

    assert response.status_code == 302
    assert messages_of(response) == [
        ("success", "2 runs resumed."),
        ("warning", "1 run skipped: it is completed."),
        ("warning", "1 run skipped: it is running."),
    ]
    statuses = dict(WorkflowRun.objects.values_list("pk", "status"))
    assert [statuses[run.pk] for run in failed] == ["pending", "pending"]
    assert statuses[completed.pk] == "completed"
    assert statuses[running.pk] == "running"
    assert sorted(
        WorkflowRunEvent.objects.filter(by=superuser).values_list("run_id", "action")
    ) == sorted((run.pk, "resume") for run in failed)
    entries = LogEntry.objects.filter(action_flag=CHANGE)
    assert sorted(entries.values_list("object_id", "change_message")) == sorted(
        (str(run.pk), "Resumed") for run in failed
    )


def test_resume_action_groups_skips_by_status(admin_client):
    runs = [make_run("completed"), make_run("completed"), make_run("canceled"), make_run("failed")]

    response = run_action(admin_client, "resume_runs", runs)

    assert messages_of(response) == [
        ("success", "1 run resumed."),
        ("warning", "1 run skipped: it is canceled."),
        ("warning", "2 runs skipped: it is completed."),
    ]


def test_resume_action_skips_runs_past_their_deadline(admin_client):
    late = make_run("failed", deadline_at=timezone.now() - timedelta(minutes=5))

    response = run_action(admin_client, "resume_runs", [late])

    assert messages_of(response) == [
        ("warning", "0 runs resumed."),
        ("warning", "1 run skipped: its deadline has passed."),
    ]
    late.refresh_from_db()
    assert late.status == "failed"
    assert not LogEntry.objects.exists()


def test_cancel_action_with_a_mixed_selection(admin_client):
    active = [make_run("pending"), make_run("running")]
    finished = [make_run("completed"), make_run("completed"), make_run("failed")]

    response = run_action(admin_client, "cancel_runs", [*active, *finished])

    assert messages_of(response) == [
        ("success", "2 runs canceled."),
        ("warning", "2 runs skipped: it is completed."),
        ("warning", "1 run skipped: it is failed."),
    ]
    statuses = dict(WorkflowRun.objects.values_list("pk", "status"))
    assert [statuses[run.pk] for run in active] == ["canceled", "canceled"]
    assert [statuses[run.pk] for run in finished] == ["completed", "completed", "failed"]
    assert sorted(LogEntry.objects.values_list("object_id", "change_message")) == sorted(
        (str(run.pk), "Canceled") for run in active
    )


def test_cancel_action_single_run(admin_client):
    response = run_action(admin_client, "cancel_runs", [make_run("running")])

    assert messages_of(response) == [("success", "1 run canceled.")]


def test_actions_need_change_permission(client):
    client.force_login(create_user("viewer", "view_workflowrun"))
    run = make_run("failed")

    page = client.get(CHANGELIST)
    response = run_action(client, "resume_runs", [run])

    assert page.status_code == 200
    assert page.context["action_form"] is None  # no action is offered
    assert response.status_code == 200  # the POST just shows the list again
    run.refresh_from_db()
    assert run.status == "failed"


def test_actions_are_offered_to_change_users(client):
    client.force_login(create_user("operator", "change_workflowrun"))

    page = client.get(CHANGELIST)

    choices = [value for value, _label in page.context["action_form"].fields["action"].choices]
    assert choices == ["", "resume_runs", "cancel_runs", "rerun_runs"]
    labels = dict(page.context["action_form"].fields["action"].choices)
    assert labels["resume_runs"] == "Resume selected failed runs"
    assert labels["cancel_runs"] == "Cancel selected runs"
    assert labels["rerun_runs"] == "Rerun selected runs from the start"


# --- change page -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "resume", "cancel"),
    [
        ("pending", False, True),
        ("running", False, True),
        ("completed", False, False),
        ("failed", True, False),
        ("canceled", False, False),
    ],
)
def test_change_page_shows_the_buttons_that_apply(admin_client, status, resume, cancel):
    run = make_run(status)

    response = admin_client.get(change_url(run))

    assert response.status_code == 200
    html = response.content.decode()
    resume_url = reverse("django_openworkflow:run-resume", args=[run.pk])
    cancel_url = reverse("django_openworkflow:run-cancel", args=[run.pk])
    assert (f'<form method="post" action="{resume_url}"' in html) is resume
    assert (f'<form method="post" action="{cancel_url}"' in html) is cancel
    assert f'<a href="{run.get_absolute_url()}" class="owf-run-page">Run page</a>' in html
    next_field = f'<input type="hidden" name="next" value="{change_url(run)}">'
    assert html.count(next_field) == resume + cancel
    assert 'name="_save"' not in html
    assert 'name="_continue"' not in html


def test_change_page_offers_no_resume_for_a_run_past_its_deadline(admin_client):
    # The same rule as resume() and the action (WorkflowRun.can_resume): the button
    # would only lead to "its deadline_at ... has passed".
    late = make_run("failed", deadline_at=timezone.now() - timedelta(minutes=5))

    html = admin_client.get(change_url(late)).content.decode()

    assert reverse("django_openworkflow:run-resume", args=[late.pk]) not in html


@override_settings(ROOT_URLCONF="tests.urls_admin_only")
@pytest.mark.parametrize("status", ["failed", "running"])
def test_change_page_works_without_the_run_pages(admin_client, status):
    # docs/pages.md presents include("django_openworkflow.urls") as optional.
    run = make_run(status)

    response = admin_client.get(change_url(run))

    assert response.status_code == 200
    html = response.content.decode()
    assert "Run page" not in html
    assert "owf-admin-action" not in html  # the buttons need the pages' endpoints
    assert f"<title>{run} | Change workflow run | Django site admin</title>" in html


@override_settings(ROOT_URLCONF="tests.urls_admin_only")
def test_the_actions_work_without_the_run_pages(admin_client):
    run = make_run("failed")

    response = run_action(admin_client, "resume_runs", [run])

    assert response.status_code == 302
    assert messages_of(response) == [("success", "1 run resumed.")]


def test_change_page_buttons_post_back_to_the_admin(admin_client):
    run = make_run("failed")

    response = admin_client.post(
        reverse("django_openworkflow:run-resume", args=[run.pk]),
        {"next": change_url(run)},
        follow=True,
    )

    assert response.redirect_chain == [(change_url(run), 302)]
    assert [str(m) for m in response.context["messages"]] == [f"Run {run.pk} resumed."]
    run.refresh_from_db()
    assert run.status == "pending"


def test_change_page_has_no_buttons_for_view_only_users(client):
    client.force_login(create_user("viewer", "view_workflowrun"))
    run = make_run("failed")

    html = client.get(change_url(run)).content.decode()

    assert reverse("django_openworkflow:run-resume", args=[run.pk]) not in html
    assert "Run page" in html


def test_change_page_shows_step_attempts_and_history(client):
    # A user with only the run permission still sees the run's attempts and events.
    client.force_login(create_user("viewer", "view_workflowrun"))
    run = make_run(
        "failed",
        error={"type": "ValueError", "message": "card declined", "traceback": "Traceback <x>\n"},
    )
    StepAttempt.objects.create(workflow_run=run, step_name="load-order", status="completed")
    StepAttempt.objects.create(
        workflow_run=run,
        step_name="charge-card",
        status="failed",
        error={"type": "ValueError", "message": "card declined"},
    )
    WorkflowRunEvent.objects.create(
        run=run, action="cancel", cleared_error={"type": "KeyError", "message": "gone"}
    )

    response = client.get(change_url(run))

    html = response.content.decode()
    assert "load-order" in html
    assert "charge-card" in html
    assert "ValueError: card declined" in html
    assert "KeyError: gone" in html
    assert '<pre class="owf-admin-traceback">Traceback &lt;x&gt;\n</pre>' in html
    formsets = {f.opts.model for f in response.context["inline_admin_formsets"]}
    assert formsets == {StepAttempt, WorkflowRunEvent}


def test_change_page_refuses_post(admin_client):
    run = make_run("running", input={"a": 1})

    response = admin_client.post(change_url(run), {"status": "completed"})

    assert response.status_code == 405
    run.refresh_from_db()
    assert run.status == "running"
    assert run.input == {"a": 1}


def test_every_field_is_read_only(admin_client, superuser):
    run = make_run("failed")
    model_admin = admin.site._registry[WorkflowRun]
    request = RequestFactory().get("/")
    request.user = superuser

    readonly = set(model_admin.get_readonly_fields(request, run))

    editable = {f.name for f in WorkflowRun._meta.fields if f.editable}
    assert editable - {"parent_step_attempt"} <= readonly
    form = admin_client.get(change_url(run)).context["adminform"].form
    assert list(form.fields) == []


def test_step_attempt_admin_is_read_only(admin_client):
    run = make_run("failed")
    attempt = StepAttempt.objects.create(workflow_run=run, step_name="charge", status="failed")
    url = reverse("admin:django_openworkflow_stepattempt_change", args=[attempt.pk])

    changelist = admin_client.get(reverse("admin:django_openworkflow_stepattempt_changelist"))
    change = admin_client.get(url)

    assert changelist.status_code == 200
    assert change_url(run) in changelist.content.decode()
    assert change.status_code == 200
    assert 'name="_save"' not in change.content.decode()
    assert admin_client.get(reverse("admin:django_openworkflow_stepattempt_add")).status_code == (
        403
    )


def test_admin_pages_escape_stored_data(admin_client):
    xss = "<script>alert('owf')</script>"
    run = make_run(
        "failed",
        workflow_name=xss,
        idempotency_key=xss,
        input={"x": xss},
        error={"type": xss, "message": xss, "traceback": xss},
    )
    StepAttempt.objects.create(
        workflow_run=run, step_name=xss, status="failed", error={"type": xss, "message": xss}
    )

    for url in (CHANGELIST, change_url(run)):
        html = admin_client.get(url).content.decode()
        assert "<script>alert" not in html
        assert "&lt;script&gt;alert(&#x27;owf&#x27;)&lt;/script&gt;" in html


# --- the security matrix: every page and POST, every role; GET changes nothing; CSRF --------


def admin_state() -> tuple:
    return (
        sorted(WorkflowRun.objects.values_list("pk", "status", "error")),
        StepAttempt.objects.count(),
        WorkflowRunEvent.objects.count(),
        LogEntry.objects.count(),
    )


def admin_login_url(url: str) -> str:
    return f"{reverse('admin:login')}?next={url}"


# What each role gets on each admin page: the view permission opens the pages,
# nobody but a superuser (delete_workflowrun) reaches the delete page.
PAGE_MATRIX = {
    "anonymous": {"changelist": 302, "change": 302, "history": 302, "delete": 302},
    "non_staff": {"changelist": 302, "change": 302, "history": 302, "delete": 302},
    "staff_without_perm": {"changelist": 403, "change": 403, "history": 403, "delete": 403},
    "staff_view": {"changelist": 200, "change": 200, "history": 200, "delete": 403},
    "staff_change": {"changelist": 200, "change": 200, "history": 200, "delete": 403},
    "superuser": {"changelist": 200, "change": 200, "history": 200, "delete": 200},
}


@pytest.mark.parametrize("kind", list(ROLES))
@pytest.mark.parametrize("page", ["changelist", "change", "history", "delete"])
def test_admin_page_permissions_and_get_changes_nothing(kind, page):
    run = make_run("failed")
    StepAttempt.objects.create(workflow_run=run, step_name="charge", status="failed")
    client = role_client(kind)
    url = (
        CHANGELIST
        if page == "changelist"
        else reverse(f"admin:django_openworkflow_workflowrun_{page}", args=[run.pk])
    )
    before = admin_state()

    response = client.get(url)
    # Action parameters in a GET's query string do nothing either.
    client.get(url, {"action": "cancel_runs", "_selected_action": str(run.pk), "post": "yes"})

    assert response.status_code == PAGE_MATRIX[kind][page]
    if kind in ("anonymous", "non_staff"):
        assert response["Location"] == admin_login_url(url)
    assert admin_state() == before


# Admin actions posted by each role: only change permission applies them; a
# user with only the view permission is shown the list again; delete_selected
# is never applied without its confirmation step (and only superusers get that).
ACTION_MATRIX = {
    "anonymous": (302, False),
    "non_staff": (302, False),
    "staff_without_perm": (403, False),
    "staff_view": (200, False),
    "staff_change": (302, True),
    "superuser": (302, True),
}


@pytest.mark.parametrize("kind", list(ROLES))
@pytest.mark.parametrize(
    ("action", "status", "changed_status"),
    [
        ("resume_runs", "failed", "pending"),
        ("cancel_runs", "running", "canceled"),
        ("rerun_runs", "completed", "pending"),
    ],
)
def test_admin_action_permissions(kind, action, status, changed_status):
    run = make_run(status)
    client = role_client(kind)

    response = run_action(client, action, [run])

    expected_code, changes = ACTION_MATRIX[kind]
    assert response.status_code == expected_code
    if kind in ("anonymous", "non_staff"):
        assert response["Location"] == admin_login_url(CHANGELIST)
    run.refresh_from_db()
    assert run.status == (changed_status if changes else status)
    assert WorkflowRunEvent.objects.count() == (1 if changes else 0)
    assert LogEntry.objects.count() == (1 if changes else 0)


@pytest.mark.parametrize("kind", list(ROLES))
def test_delete_selected_is_never_applied_without_confirmation(kind):
    run = make_run("failed")
    client = role_client(kind)
    before = admin_state()

    response = run_action(client, "delete_selected", [run])

    assert (
        response.status_code
        == {
            "anonymous": 302,
            "non_staff": 302,
            "staff_without_perm": 403,
            "staff_view": 200,
            "staff_change": 302,  # "No action selected.": back to the list
            "superuser": 200,  # the confirmation page
        }[kind]
    )
    assert admin_state() == before


@pytest.mark.parametrize("kind", list(ROLES))
def test_admin_change_page_post_changes_nothing_for_any_role(kind):
    run = make_run("running", input={"a": 1})
    client = role_client(kind)
    before = admin_state()

    response = client.post(change_url(run), {"status": "completed", "input": "{}", "_save": "1"})

    assert (
        response.status_code
        == {
            "anonymous": 302,
            "non_staff": 302,
            "staff_without_perm": 405,
            "staff_view": 405,
            "staff_change": 405,
            "superuser": 405,
        }[kind]
    )
    assert admin_state() == before


@pytest.mark.parametrize("kind", list(ROLES))
@pytest.mark.parametrize(
    "post",
    [
        pytest.param(lambda c, run: run_action(c, "resume_runs", [run]), id="resume-action"),
        pytest.param(lambda c, run: run_action(c, "cancel_runs", [run]), id="cancel-action"),
        pytest.param(lambda c, run: run_action(c, "rerun_runs", [run]), id="rerun-action"),
        pytest.param(
            lambda c, run: c.post(
                CHANGELIST,
                {"action": "delete_selected", "_selected_action": [str(run.pk)], "post": "yes"},
            ),
            id="delete-selected-confirmed",
        ),
        pytest.param(
            lambda c, run: c.post(
                reverse("admin:django_openworkflow_workflowrun_delete", args=[run.pk]),
                {"post": "yes"},
            ),
            id="delete-page-confirmed",
        ),
        pytest.param(lambda c, run: c.post(change_url(run), {"_save": "1"}), id="change-page"),
    ],
)
def test_every_admin_post_needs_the_csrf_token(kind, post):
    failed, running = make_run("failed"), make_run("running")
    client = role_client(kind, enforce_csrf=True)
    before = admin_state()

    responses = [post(client, failed), post(client, running)]

    assert [r.status_code for r in responses] == [403, 403]
    assert b"CSRF verification failed" in responses[0].content
    assert admin_state() == before


@pytest.mark.parametrize("kind", ["staff_change", "superuser"])
def test_admin_actions_work_with_a_valid_csrf_token(kind):
    run = make_run("failed")
    client = role_client(kind, enforce_csrf=True)

    response = client.post(
        CHANGELIST,
        {
            "action": "resume_runs",
            "_selected_action": [str(run.pk)],
            "csrfmiddlewaretoken": CSRF_SECRET,
        },
    )

    assert response.status_code == 302
    run.refresh_from_db()
    assert run.status == "pending"


@pytest.mark.parametrize("model", ["workflowrun", "stepattempt"])
@pytest.mark.parametrize(
    "query", ["q=%00", "workflow_name=a%00b", "failed_step=%00", "status=%00", "kind=%00", "a%00=1"]
)
def test_a_nul_in_a_changelist_filter_is_a_bad_lookup_not_a_500(admin_client, model, query):
    # PostgreSQL refuses NUL in text parameters; without the check these are 500s there.
    response = admin_client.get(f"/admin/django_openworkflow/{model}/?{query}")
    assert response.status_code == 302
    assert response["Location"] == f"/admin/django_openworkflow/{model}/?e=1"


# --- deleting runs ---------------------------------------------------------------
# An active run is never deleted here: its worker, or a parent waiting for it,
# still needs it. Finished runs are deleted as usual, with confirmation.


@pytest.mark.parametrize(
    ("status", "deletable"),
    [("pending", False), ("running", False), ("completed", True), ("failed", True)],
)
def test_only_finished_runs_have_a_delete_page(admin_client, status, deletable):
    run = make_run(status)
    delete_url = reverse("admin:django_openworkflow_workflowrun_delete", args=[run.pk])

    html = admin_client.get(change_url(run)).content.decode()
    response = admin_client.post(delete_url, {"post": "yes"})

    assert (f'href="{delete_url}"' in html) is deletable
    assert response.status_code == (302 if deletable else 403)
    assert WorkflowRun.objects.filter(pk=run.pk).exists() is not deletable


def test_a_finished_run_is_deleted_with_its_step_attempts_and_events(admin_client):
    run = make_run("failed")
    StepAttempt.objects.create(workflow_run=run, step_name="charge", status="failed")
    WorkflowRun.objects.resume(run)
    WorkflowRun.objects.cancel(run)
    delete_url = reverse("admin:django_openworkflow_workflowrun_delete", args=[run.pk])

    page = admin_client.get(delete_url)
    response = admin_client.post(delete_url, {"post": "yes"})

    assert page.context["perms_lacking"] == set()
    assert response.status_code == 302
    assert not WorkflowRun.objects.filter(pk=run.pk).exists()
    assert not StepAttempt.objects.exists()
    assert not WorkflowRunEvent.objects.exists()


def test_deleting_a_finished_parent_leaves_its_active_child_running(admin_client):
    parent = make_run("failed")
    step = StepAttempt.objects.create(workflow_run=parent, step_name="ship", kind="workflow")
    child = make_run("running", parent_step_attempt=step)
    step.child_workflow_run = child
    step.save(update_fields=["child_workflow_run"])
    child_delete = reverse("admin:django_openworkflow_workflowrun_delete", args=[child.pk])
    parent_delete = reverse("admin:django_openworkflow_workflowrun_delete", args=[parent.pk])

    assert admin_client.post(child_delete, {"post": "yes"}).status_code == 403
    assert admin_client.post(parent_delete, {"post": "yes"}).status_code == 302

    child.refresh_from_db()
    assert child.status == "running"
    assert child.parent_step_attempt is None  # a root run now, never deleted with its parent


def test_delete_selected_skips_active_runs_and_says_how_many(admin_client):
    pending, running = make_run("pending"), make_run("running")
    done = make_run("completed")

    confirm = run_action(admin_client, "delete_selected", [pending, running, done])
    assert confirm.status_code == 200
    assert [str(m) for m in confirm.context["messages"]] == [
        "1 run skipped: it is pending (cancel it first).",
        "1 run skipped: it is running (cancel it first).",
    ]
    assert list(confirm.context["queryset"]) == [done]
    response = admin_client.post(
        CHANGELIST,
        {"action": "delete_selected", "_selected_action": [str(done.pk)], "post": "yes"},
    )

    assert messages_of(response) == [("success", "Successfully deleted 1 workflow run.")]
    assert set(WorkflowRun.objects.values_list("pk", flat=True)) == {pending.pk, running.pk}


def test_delete_selected_of_only_active_runs_deletes_nothing(admin_client):
    run = make_run("pending")

    response = run_action(admin_client, "delete_selected", [run])

    assert response.status_code == 302
    assert messages_of(response) == [("warning", "1 run skipped: it is pending (cancel it first).")]
    assert WorkflowRun.objects.filter(pk=run.pk).exists()


# --- rerun, corrections: the action, the marks and the details ---------------------------


def test_rerun_action_with_a_mixed_selection(admin_client, superuser):
    finished = [make_run("completed"), make_run("failed"), make_run("canceled")]
    active = [make_run("pending"), make_run("running"), make_run("running")]

    response = run_action(admin_client, "rerun_runs", [*finished, *active])

    assert response.status_code == 302
    assert messages_of(response) == [
        ("success", "3 runs rerun from the start."),
        ("warning", "1 run skipped: it is pending."),
        ("warning", "2 runs skipped: it is running."),
    ]
    statuses = dict(WorkflowRun.objects.values_list("pk", "status"))
    assert [statuses[run.pk] for run in finished] == ["pending"] * 3
    assert [statuses[run.pk] for run in active] == ["pending", "running", "running"]
    assert sorted(
        WorkflowRunEvent.objects.filter(by=superuser).values_list("run_id", "action")
    ) == sorted((run.pk, "rerun") for run in finished)
    # One admin history entry per rerun: the manager's (the action writes none of its own).
    assert sorted(LogEntry.objects.values_list("object_id", "change_message")) == sorted(
        (str(run.pk), "Rerun from the start") for run in finished
    )


def test_rerun_action_skips_runs_past_their_deadline(admin_client):
    late = make_run("completed", deadline_at=timezone.now() - timedelta(minutes=5))

    response = run_action(admin_client, "rerun_runs", [late])

    assert messages_of(response) == [
        ("warning", "0 runs rerun from the start."),
        ("warning", "1 run skipped: its deadline has passed."),
    ]
    late.refresh_from_db()
    assert late.status == "completed"


def test_change_page_shows_given_outputs_superseded_attempts_and_event_details(admin_client):
    bob = create_user("bob", "change_workflowrun", "correct_workflowrun")
    run = make_run("failed", input={"card": "tok_old"})
    StepAttempt.objects.create(
        workflow_run=run, step_name="reserve", status="completed", output="reserved", position=0
    )
    StepAttempt.objects.create(
        workflow_run=run,
        step_name="charge",
        status="failed",
        error={"type": "ValueError", "message": "card declined"},
        position=1,
    )
    WorkflowRun.objects.resume(
        run, input={"card": "tok_new"}, step_outputs={"charge": "paid"}, by=bob
    )
    WorkflowRun.objects.filter(pk=run.pk).update(status="completed")
    WorkflowRun.objects.rerun(run, from_step="charge")
    correction, rerun = run.events.order_by("id")
    at = {
        event.pk: timezone.localtime(event.at).strftime("%Y-%m-%d %H:%M:%S UTC")
        for event in (correction, rerun)
    }

    html = admin_client.get(change_url(run)).content.decode()

    # The output bob gave, then superseded by the rerun from its step.
    assert (
        f"<p>output given by bob at {at[correction.pk]}; superseded by the rerun at "
        f"{at[rerun.pk]}</p>" in html
    )
    assert (
        "<p>input: {&quot;card&quot;: &quot;tok_old&quot;} → {&quot;card&quot;: &quot;tok_new"
        "&quot;}<br>step “charge”: ValueError: card declined → &quot;paid&quot;</p>" in html
    )
    assert "<p>from step “charge”; steps run again: charge</p>" in html


def test_change_page_details_link_the_canceled_children(admin_client):
    run = make_run("completed")
    child = make_run("completed")
    WorkflowRunEvent.objects.create(
        run=run, action="rerun", details={"from_step": None, "canceled_children": [str(child.pk)]}
    )

    html = admin_client.get(change_url(run)).content.decode()

    assert (
        f'<p>from the start; child runs canceled: <a href="{change_url(child)}">{child.pk}</a></p>'
        in html
    )


@pytest.mark.parametrize(
    ("perms", "offered"),
    [
        (("view_workflowrun",), False),
        (("change_workflowrun",), False),
        (("view_workflowrun", "correct_workflowrun"), False),
        (("change_workflowrun", "correct_workflowrun"), True),
    ],
)
def test_change_page_links_resume_with_changes_for_those_who_may(client, perms, offered):
    client.force_login(create_user("someone", *perms))
    failed, completed = make_run("failed"), make_run("completed")
    link = reverse("django_openworkflow:run-correct", args=[failed.pk])

    assert (link in client.get(change_url(failed)).content.decode()) is offered
    assert "resume-with-changes" not in client.get(change_url(completed)).content.decode()
