"""The "Resume with changes" page: the form, its preview (a diff), the confirm, and who may."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from django_openworkflow.correction_forms import parse_json, unified_diff
from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowRunEvent
from django_openworkflow.testing import drain, pause_at, run_to_completion
from tests.conftest import backend_pid, wait_until_blocked
from tests.testapp.models import SideEffect
from tests.testapp.workflows import reserve_then_charge
from tests.users import CORRECT_ROLES, CSRF_SECRET, create_user, login_as, role_client

pytestmark = pytest.mark.django_db

XSS = "<script>alert('owf')</script>"
ESCAPED_XSS = "&lt;script&gt;alert(&#x27;owf&#x27;)&lt;/script&gt;"
# Who may use the page: change_workflowrun AND correct_workflowrun (superusers hold both).
MAY_CORRECT = ("staff_change_correct", "superuser")


def correct_url(run_or_id) -> str:
    return reverse("django_openworkflow:run-correct", args=[getattr(run_or_id, "pk", run_or_id)])


def detail_url(run_or_id) -> str:
    return reverse("django_openworkflow:run-detail", args=[getattr(run_or_id, "pk", run_or_id)])


def failed_charge(failures: int = 1) -> WorkflowRun:
    """A real run of reserve-then-charge that failed at "charge" ("reserve" completed); a
    resume without changes fails again while "charge" has run no more than ``failures`` times."""
    run = run_to_completion(reserve_then_charge, {"failures": failures})
    assert (run.status, run.resume_generation) == ("failed", 0)
    return run


def form_data(run: WorkflowRun, *, input_text=None, steps=(), action="preview", **extra) -> dict:
    """What the form posts: the input's text, and per step (name, use, output text)."""
    data = {
        "input": json.dumps(run.input) if input_text is None else input_text,
        "generation": str(run.resume_generation),
        "step-TOTAL_FORMS": str(len(steps)),
        "step-INITIAL_FORMS": str(len(steps)),
        "step-MIN_NUM_FORMS": "0",
        "step-MAX_NUM_FORMS": "1000",
        action: "1",
        **extra,
    }
    for i, (name, use, output) in enumerate(steps):
        data[f"step-{i}-name"] = name
        if use:
            data[f"step-{i}-use"] = "on"
        data[f"step-{i}-output"] = output
    return data


def charge_given(output: str = '"paid by phone"', **kwargs) -> dict:
    return {"steps": [("charge", True, output)], **kwargs}


def messages_of(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def state_of(run: WorkflowRun) -> tuple:
    """Everything a correction could change: the run, its attempts, events, admin history."""
    return (
        WorkflowRun.objects.values_list("status", "input", "resume_generation", "error").get(
            pk=run.pk
        ),
        sorted(StepAttempt.objects.values_list("id", "status", "output", "given_in")),
        WorkflowRunEvent.objects.count(),
        LogEntry.objects.count(),
    )


@pytest.fixture
def corrector(client):
    login_as(client, "staff_change_correct")
    return client


# --- who may: the role matrix, CSRF, methods ---------------------------------------------

# GET, preview and confirm answer each role so (302: the login page, or done: to the run).
ANSWERS = {
    "anonymous": 302,
    "non_staff": 403,
    "staff_without_perm": 403,
    "staff_view": 403,
    "staff_change": 403,  # change alone cannot correct
    "staff_correct": 403,  # nor correct alone
    "staff_change_correct": 200,
    "superuser": 200,
}


@pytest.mark.parametrize("kind", list(CORRECT_ROLES))
def test_the_page_by_role(kind):
    run = failed_charge()
    client = role_client(kind)
    before = state_of(run)

    response = client.get(correct_url(run))

    assert response.status_code == ANSWERS[kind]
    if kind == "anonymous":
        assert response["Location"] == f"/accounts/login/?next={correct_url(run)}"
    if kind in MAY_CORRECT:
        assert 'name="preview"' in response.content.decode()
    assert state_of(run) == before


@pytest.mark.parametrize("kind", list(CORRECT_ROLES))
def test_preview_by_role_changes_nothing(kind):
    run = failed_charge()
    client = role_client(kind)
    before = state_of(run)

    response = client.post(correct_url(run), form_data(run, **charge_given()))

    assert response.status_code == ANSWERS[kind]
    if kind == "anonymous":  # after logging in, the run's page (not a POST-only form)
        assert response["Location"] == f"/accounts/login/?next={detail_url(run)}"
    if kind in MAY_CORRECT:
        assert 'name="confirm"' in response.content.decode()
    assert state_of(run) == before


@pytest.mark.parametrize("kind", list(CORRECT_ROLES))
def test_confirm_by_role(kind):
    run = failed_charge()
    client = role_client(kind)
    before = state_of(run)

    response = client.post(correct_url(run), form_data(run, action="confirm", **charge_given()))

    if kind in MAY_CORRECT:
        assert response.status_code == 302
        assert response["Location"] == detail_url(run)
        run.refresh_from_db()
        assert (run.status, run.resume_generation) == ("pending", 1)
        event = run.events.get()
        assert (event.action, event.by.username) == ("resume", kind)
    else:
        assert response.status_code == ANSWERS[kind]
        assert state_of(run) == before


@pytest.mark.parametrize("kind", list(CORRECT_ROLES))
@pytest.mark.parametrize("action", ["preview", "confirm", "edit"])
@pytest.mark.parametrize("token", [None, "", "wrong-token"])
def test_every_post_without_a_valid_csrf_token_is_403(kind, action, token):
    run = failed_charge()
    client = role_client(kind, enforce_csrf=True)
    before = state_of(run)
    data = form_data(run, action=action, **charge_given())
    if token is not None:
        data["csrfmiddlewaretoken"] = token

    response = client.post(correct_url(run), data)

    assert response.status_code == 403
    assert b"CSRF verification failed" in response.content
    assert state_of(run) == before


@pytest.mark.parametrize("kind", list(CORRECT_ROLES))
def test_a_valid_csrf_token_leaves_only_the_permission_check(kind):
    run = failed_charge()
    client = role_client(kind, enforce_csrf=True)

    response = client.post(
        correct_url(run),
        form_data(run, action="confirm", csrfmiddlewaretoken=CSRF_SECRET, **charge_given()),
    )

    run.refresh_from_db()
    assert response.status_code == (302 if kind in MAY_CORRECT else ANSWERS[kind])
    assert run.status == ("pending" if kind in MAY_CORRECT else "failed")


@pytest.mark.parametrize("method", ["put", "patch", "delete", "options"])
def test_other_methods_are_405(corrector, method):
    run = failed_charge()

    response = getattr(corrector, method)(correct_url(run))

    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD, POST"


def test_head_answers(corrector):
    assert corrector.head(correct_url(failed_charge())).status_code == 200


@pytest.mark.parametrize("method", ["get", "post"])
def test_an_unknown_run_is_404(corrector, method):
    assert getattr(corrector, method)(correct_url(uuid.uuid4())).status_code == 404


# --- the form --------------------------------------------------------------------


def test_the_form_shows_the_input_and_each_failed_step(corrector):
    run = failed_charge()

    response = corrector.get(correct_url(run))

    html = response.content.decode()
    assert (
        '<textarea name="input" cols="40" rows="12" spellcheck="false" class="owf-json-field" '
        'id="id_input">\n{\n  &quot;failures&quot;: 1\n}</textarea>' in html
    )
    assert '<input type="hidden" name="generation" value="0" id="id_generation">' in html
    assert "<legend>Step “charge”</legend>" in html
    assert (
        '<p class="owf-step-error"><span class="owf-muted">failed with</span> '
        "RuntimeError: card declined</p>" in html
    )
    assert '<input type="checkbox" name="step-0-use" id="id_step-0-use">' in html
    assert '<textarea name="step-0-output"' in html
    assert "<legend>Step “reserve”</legend>" not in html  # completed: replay serves it
    assert [form["name"].value() for form in response.context["formset"].forms] == ["charge"]


def test_only_steps_failed_in_the_current_generation_and_not_completed_are_offered(corrector):
    run = WorkflowRun.objects.create(
        workflow_name="charge-order", status="failed", resume_generation=2, input={}
    )
    for generation, name, status in [
        (0, "old-failure", "failed"),  # an earlier generation's: resumed past it
        (1, "reserve", "completed"),
        (2, "flaky", "failed"),
        (2, "flaky", "completed"),  # failed, then completed on retry
        (2, "charge", "failed"),
        (2, "charge", "failed"),  # two failures: offered once
        (2, "notify", "failed"),
    ]:
        StepAttempt.objects.create(
            workflow_run=run,
            step_name=name,
            status=status,
            resume_generation=generation,
            error={"type": "ValueError", "message": f"{name} broke"}
            if status == "failed"
            else None,
        )

    response = corrector.get(correct_url(run))

    assert [form["name"].value() for form in response.context["formset"].forms] == [
        "charge",
        "notify",
    ]


def test_a_run_that_failed_outside_any_step_has_only_the_input(corrector):
    run = WorkflowRun.objects.create(
        workflow_name="charge-order",
        status="failed",
        input={"a": 1},
        error={"type": "KeyError", "message": "'b'"},
    )

    html = corrector.get(correct_url(run)).content.decode()

    assert "No step failed in the current generation" in html
    assert 'name="input"' in html


@pytest.mark.parametrize("status", ["pending", "running", "completed", "canceled"])
def test_a_run_that_is_not_failed_has_no_form(corrector, status):
    run = WorkflowRun.objects.create(workflow_name="charge-order", status=status)

    for response in (
        corrector.get(correct_url(run)),
        corrector.post(correct_url(run), form_data(run, input_text='{"a": 2}')),
    ):
        html = response.content.decode()
        assert response.status_code == 200
        assert (
            '<p class="owf-message owf-message-warning owf-correct-refused">This run cannot be '
            f"resumed with changes: it is {status}.</p>" in html
        )
        assert f'<a href="{detail_url(run)}">Back to the run</a>' in html
        assert 'name="input"' not in html
    assert not WorkflowRunEvent.objects.exists()


def test_a_run_past_its_deadline_has_no_form(corrector):
    run = failed_charge()
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=timezone.now() - timedelta(minutes=1))

    html = corrector.get(correct_url(run)).content.decode()

    assert "This run cannot be resumed with changes: its deadline has passed." in html
    assert 'name="input"' not in html


# --- preview: parse, check, diff; nothing changes -----------------------------------------


def test_preview_shows_a_diff_and_carries_the_values(corrector):
    run = failed_charge()
    before = state_of(run)

    response = corrector.post(
        correct_url(run),
        form_data(
            run,
            input_text='{"failures": 0, "note": "retry"}',
            steps=[("charge", True, '{"receipt": "r-1"}')],
        ),
    )

    html = response.content.decode()
    assert state_of(run) == before
    assert [diff.title for diff in response.context["diffs"]] == ["Input", "Step “charge”"]
    assert (
        '<pre class="owf-diff"><span class="owf-diff-line owf-diff-file">--- input (stored)</span>'
        '<span class="owf-diff-line owf-diff-file">+++ input (new)</span>'
        '<span class="owf-diff-line owf-diff-hunk">@@ -1,3 +1,4 @@</span>'
        '<span class="owf-diff-line owf-diff-context"> {</span>'
        '<span class="owf-diff-line owf-diff-del">-  &quot;failures&quot;: 1</span>'
        '<span class="owf-diff-line owf-diff-add">+  &quot;failures&quot;: 0,</span>'
        '<span class="owf-diff-line owf-diff-add">+  &quot;note&quot;: &quot;retry&quot;</span>'
        '<span class="owf-diff-line owf-diff-context"> }</span></pre>' in html
    )
    assert (
        '<span class="owf-diff-line owf-diff-del">-RuntimeError: card declined</span>'
        '<span class="owf-diff-line owf-diff-add">+{</span>' in html
    )
    # The confirm form carries the values as typed, and the generation they were made for.
    assert (
        '<input type="hidden" name="input" value="{&quot;failures&quot;: 0, &quot;note&quot;: '
        '&quot;retry&quot;}" id="id_input">' in html
    )
    assert '<input type="hidden" name="generation" value="0" id="id_generation">' in html
    assert '<input type="hidden" name="step-0-use" value="on">' in html
    assert '<button type="submit" name="confirm" value="1"' in html
    assert '<button type="submit" name="edit" value="1"' in html
    assert 'name="csrfmiddlewaretoken"' in html


def test_edit_goes_back_to_the_form_as_it_was_filled_in(corrector):
    run = failed_charge()

    response = corrector.post(
        correct_url(run),
        form_data(run, input_text='{"failures": 7}', action="edit", **charge_given('"x"')),
    )

    html = response.content.decode()
    assert response.context["diffs"] is None
    assert ">\n{&quot;failures&quot;: 7}</textarea>" in html
    assert '<input type="checkbox" name="step-0-use" id="id_step-0-use" checked>' in html
    assert ">\n&quot;x&quot;</textarea>" in html


def test_an_unchanged_input_is_not_part_of_the_correction(corrector):
    run = failed_charge()

    response = corrector.post(
        correct_url(run),
        form_data(run, input_text='{\n  "failures":   1\n}', **charge_given()),
    )

    assert [diff.title for diff in response.context["diffs"]] == ["Step “charge”"]


def test_nothing_to_change_is_a_form_error(corrector):
    run = failed_charge()

    for action in ("preview", "confirm"):
        response = corrector.post(
            correct_url(run), form_data(run, steps=[("charge", False, '"ignored"')], action=action)
        )
        assert response.status_code == 200
        assert response.context["form"].non_field_errors() == [
            "Nothing to change: edit the input or give a step's output. (The Resume button "
            "resumes the run as it is.)"
        ]
    assert not WorkflowRunEvent.objects.exists()


def trailing_comma_problem() -> str:
    """Python 3.13 words (and places) a trailing comma's error otherwise than 3.11 and 3.12."""
    try:
        json.loads('{"failures": 1,}')
    except json.JSONDecodeError as exc:
        return f"{exc.msg} (line {exc.lineno}, column {exc.colno})"
    raise AssertionError("a trailing comma is not JSON")


BAD_JSON = [
    ('{"failures": 1,}', trailing_comma_problem()),
    ('{\n  "failures" 1\n}', "Expecting ':' delimiter (line 2, column 14)"),
    ("[1, 2", "Expecting ',' delimiter (line 1, column 6)"),
    ("'single'", "Expecting value (line 1, column 1)"),
    ("1 2", "Extra data (line 1, column 3)"),
]
BAD_VALUES = [
    ("NaN", "is not a JSON value: $ is nan, which JSON cannot hold"),
    ("1e16", "is not a JSON value: $ is the float 1e+16: PostgreSQL gives floats of 1e16 and "
     "more back as integers; store it as an int or a string"),
    ('"a\\u0000b"', "is not a JSON value: $ contains the character U+0000 (NUL), which PostgreSQL "
     "cannot store"),
]  # fmt: skip


@pytest.mark.parametrize("action", ["preview", "confirm"])
@pytest.mark.parametrize(("text", "problem"), BAD_JSON)
def test_bad_json_in_the_input_is_a_form_error(corrector, action, text, problem):
    run = failed_charge()
    before = state_of(run)

    response = corrector.post(correct_url(run), form_data(run, input_text=text, action=action))

    assert response.status_code == 200
    assert response.context["form"].errors["input"] == [f"The input is not valid JSON: {problem}."]
    assert f"The input is not valid JSON: {problem}." in response.content.decode().replace(
        "&#x27;", "'"
    )
    assert response.context["diffs"] is None
    assert state_of(run) == before


@pytest.mark.parametrize("action", ["preview", "confirm"])
@pytest.mark.parametrize(("text", "problem"), BAD_JSON)
def test_bad_json_in_a_step_output_is_a_form_error(corrector, action, text, problem):
    run = failed_charge()
    before = state_of(run)

    response = corrector.post(correct_url(run), form_data(run, action=action, **charge_given(text)))

    [step_form] = response.context["formset"].forms
    assert step_form.errors["output"] == [
        f'The output of step "charge" is not valid JSON: {problem}.'
    ]
    assert state_of(run) == before


@pytest.mark.parametrize(("text", "problem"), BAD_VALUES)
def test_values_the_manager_would_refuse_are_form_errors(corrector, text, problem):
    run = failed_charge()
    before = state_of(run)

    as_input = corrector.post(correct_url(run), form_data(run, input_text=text))
    as_output = corrector.post(correct_url(run), form_data(run, **charge_given(text)))

    assert as_input.context["form"].errors["input"] == [f"The input {problem}"]
    assert as_output.context["formset"].forms[0].errors["output"] == [
        f'The output of step "charge" {problem}'
    ]
    assert state_of(run) == before


def test_empty_fields_ask_for_json(corrector):
    run = failed_charge()

    response = corrector.post(correct_url(run), form_data(run, input_text="  ", **charge_given("")))

    assert response.context["form"].errors["input"] == ["Enter the input as JSON (null for none)."]
    assert response.context["formset"].forms[0].errors["output"] == [
        'The output of step "charge" is empty: enter it as JSON (null for none).'
    ]


def test_an_output_left_unused_is_not_read(corrector):
    run = failed_charge()

    response = corrector.post(
        correct_url(run),
        form_data(run, input_text='{"failures": 0}', steps=[("charge", False, "{not json")]),
    )

    assert [diff.title for diff in response.context["diffs"]] == ["Input"]


@pytest.mark.parametrize("action", ["preview", "confirm", "edit"])
@pytest.mark.parametrize("total", [None, "x", "1001"])
def test_a_tampered_step_list_is_a_form_error_not_a_500(corrector, action, total):
    run = failed_charge()
    before = state_of(run)
    data = form_data(run, action=action, **charge_given())
    if total is None:
        del data["step-TOTAL_FORMS"]
    else:
        data["step-TOTAL_FORMS"] = total

    response = corrector.post(correct_url(run), data)

    assert response.status_code == 200
    assert response.context["formset"].non_form_errors()
    assert 'class="owf-form-errors"' in response.content.decode()
    assert state_of(run) == before


def test_a_step_that_did_not_fail_is_refused_in_the_preview(corrector):
    run = failed_charge()

    response = corrector.post(correct_url(run), form_data(run, steps=[("reserve", True, "1")]))

    assert response.context["form"].non_field_errors() == [
        f'Run {run.pk} has no failed step "reserve" in its current generation: it may have '
        "changed since this form was made."
    ]
    assert response.context["diffs"] is None


def test_a_preview_of_a_form_made_before_a_resume_starts_again(corrector):
    run = failed_charge(failures=2)
    stale = form_data(run, input_text='{"failures": 5}')
    WorkflowRun.objects.resume(run)
    drain()  # fails at "charge" again: generation 1
    run.refresh_from_db()
    assert (run.status, run.resume_generation) == ("failed", 1)

    response = corrector.post(correct_url(run), stale)

    html = response.content.decode()
    assert (
        "The run was resumed or rerun since this form was made (generation 0, now 1). The "
        "form below shows it as it is now: make your changes again." in html
    )
    assert response.context["form"]["input"].value() == '{\n  "failures": 2\n}'
    assert response.context["diffs"] is None


# --- confirm: the manager applies it ---------------------------------------------------


def test_confirm_resumes_with_the_given_output_and_the_run_completes_with_it(corrector):
    run = failed_charge()

    response = corrector.post(
        correct_url(run), form_data(run, action="confirm", **charge_given()), follow=True
    )

    assert response.redirect_chain == [(detail_url(run), 302)]
    html = response.content.decode()
    assert (
        f'<li class="owf-message owf-message-success">Run {run.pk} resumed with changes.</li>'
        in html
    )
    event = run.events.get()
    assert event.details == {
        "step_outputs": {
            "charge": {"old": run.step_attempts.get(status="failed").error, "new": "paid by phone"}
        }
    }
    given = run.step_attempts.get(given_in=event)
    assert (given.step_name, given.status, given.output) == ("charge", "completed", "paid by phone")
    # One admin history entry, written by the manager (the page writes none of its own).
    [entry] = LogEntry.objects.filter(object_id=str(run.pk))
    assert entry.user.username == "staff_change_correct"

    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", "paid by phone")
    assert SideEffect.objects.filter(run_id=run.pk, step="charge").count() == 1  # never ran again


def test_confirm_with_a_new_input(corrector):
    run = failed_charge()

    response = corrector.post(
        correct_url(run), form_data(run, input_text='{"failures": 0}', action="confirm")
    )

    assert response.status_code == 302
    run.refresh_from_db()
    assert run.input == {"failures": 0}
    assert run.events.get().details == {"input": {"old": {"failures": 1}, "new": {"failures": 0}}}
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", "charged")


def test_a_confirm_after_the_run_was_resumed_is_refused_with_a_message(corrector):
    run = failed_charge()
    previewed = form_data(run, action="confirm", **charge_given())
    WorkflowRun.objects.resume(run)  # someone pressed Resume meanwhile

    response = corrector.post(correct_url(run), previewed)

    assert response["Location"] == detail_url(run)
    assert messages_of(response) == [
        f"run {run.pk} was resumed or rerun since it was read: it is at generation 1, not 0"
    ]
    assert run.events.count() == 1
    assert not StepAttempt.objects.filter(given_in__isnull=False).exists()


def test_a_confirm_after_the_run_was_resumed_and_failed_again_is_refused(corrector):
    run = failed_charge(failures=2)
    previewed = form_data(run, action="confirm", **charge_given())
    WorkflowRun.objects.resume(run)
    drain()
    run.refresh_from_db()
    assert (run.status, run.resume_generation) == ("failed", 1)
    before = state_of(run)

    response = corrector.post(correct_url(run), previewed)

    assert response["Location"] == detail_url(run)
    [message] = messages_of(response)
    assert message == (
        f"run {run.pk} was resumed or rerun since it was read: it is at generation 1, not 0"
    )
    assert state_of(run) == before


def test_a_step_the_manager_refuses_goes_back_to_the_form(corrector):
    run = failed_charge()
    before = state_of(run)

    response = corrector.post(
        correct_url(run), form_data(run, action="confirm", steps=[("reserve", True, "1")])
    )

    assert response.status_code == 200
    [error] = response.context["form"].non_field_errors()
    assert error == (
        f'cannot resume run {run.pk} with an output for step "reserve": it has no failed '
        'attempt in generation 0; the steps that failed: "charge"'
    )
    assert state_of(run) == before


# --- concurrent corrections: exactly one wins, under the row lock --------------------


@pytest.mark.row_locks
@pytest.mark.django_db(transaction=True)
def test_two_confirms_at_once_exactly_one_wins():
    run = failed_charge()
    users = [
        create_user(name, "change_workflowrun", "correct_workflowrun") for name in ("ann", "bob")
    ]
    outputs = ['"ann paid"', '"bob paid"']
    responses: dict[str, object] = {}
    pids: dict[str, int] = {}

    def confirm(user, output):
        try:
            client = Client()
            client.force_login(user)
            pids[user.username] = backend_pid()
            responses[user.username] = client.post(
                correct_url(run), form_data(run, action="confirm", **charge_given(output))
            )
        finally:
            connection.close()

    first = threading.Thread(target=confirm, args=(users[0], outputs[0]))
    second = threading.Thread(target=confirm, args=(users[1], outputs[1]))
    with pause_at("resume.locked", when=lambda c: c.get("run_id") == run.pk) as pause:
        first.start()
        pause.wait()  # ann's resume holds the row lock
        second.start()
        wait_until(lambda: "bob" in pids)
        wait_until_blocked(pids["bob"], by=pids["ann"])  # bob's waits for it
    first.join(20)
    second.join(20)

    assert [responses[name].status_code for name in ("ann", "bob")] == [302, 302]
    assert messages_of(responses["ann"]) == [f"Run {run.pk} resumed with changes."]
    assert messages_of(responses["bob"]) == [
        f"run {run.pk} was resumed or rerun since it was read: it is at generation 1, not 0"
    ]
    event = run.events.get()
    assert event.by == users[0]
    assert list(StepAttempt.objects.filter(given_in__isnull=False).values_list("output")) == [
        ("ann paid",)
    ]


def wait_until(condition, timeout: float = 10.0) -> None:
    import time

    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "not reached in time"
        time.sleep(0.01)


# --- the run page: the link, the timeline mark, the history -------------------------------


@pytest.mark.parametrize("kind", list(CORRECT_ROLES))
def test_the_run_page_links_to_the_form_for_those_who_may_correct(kind):
    failed = failed_charge()
    completed = WorkflowRun.objects.create(workflow_name="charge-order", status="completed")
    client = role_client(kind)

    pages = [client.get(detail_url(run)) for run in (failed, completed)]

    link = f'<a class="owf-button owf-button-correct" href="{correct_url(failed)}">'
    assert (link in pages[0].content.decode()) is (kind in MAY_CORRECT)
    assert correct_url(completed) not in pages[1].content.decode()


def test_the_run_page_offers_no_correction_past_the_deadline(corrector):
    run = failed_charge()
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=timezone.now() - timedelta(hours=1))

    assert correct_url(run) not in corrector.get(detail_url(run)).content.decode()


def test_the_timeline_and_the_history_say_who_gave_the_output(corrector):
    run = failed_charge()
    corrector.post(
        correct_url(run),
        form_data(run, input_text='{"failures": 0}', action="confirm", **charge_given()),
    )
    event = run.events.get()
    at = f"{event.at:%Y-%m-%d %H:%M:%S} UTC"

    html = corrector.get(detail_url(run)).content.decode()

    assert '<tr class="owf-attempt owf-attempt-completed owf-attempt-given">' in html
    assert (
        f'<div class="owf-attempt-note">output given by staff_change_correct at {at}</div>' in html
    )
    assert (
        '<li><span class="owf-muted">input:</span> <code class="owf-old">{&quot;failures&quot;: '
        '1}</code> → <code class="owf-new">{&quot;failures&quot;: 0}</code></li>' in html
    )
    assert (
        '<li><span class="owf-muted">step “charge”:</span> <code class="owf-old">RuntimeError: '
        'card declined</code> → <code class="owf-new">&quot;paid by phone&quot;</code></li>' in html
    )


def test_an_output_given_in_the_shell_says_so(corrector):
    run = failed_charge()
    WorkflowRun.objects.resume(run, step_outputs={"charge": 1})
    at = f"{run.events.get().at:%Y-%m-%d %H:%M:%S} UTC"

    html = corrector.get(detail_url(run)).content.decode()

    assert f'<div class="owf-attempt-note">output given in the shell at {at}</div>' in html


def test_long_values_are_cut_in_the_history(corrector):
    run = failed_charge()
    WorkflowRun.objects.resume(run, input={"text": "x" * 500})

    html = corrector.get(detail_url(run)).content.decode()

    shown = "{&quot;text&quot;: &quot;" + "x" * 109 + "…"  # 120 characters, cut
    assert f'<code class="owf-new">{shown}</code>' in html


# --- hostile text is escaped everywhere ---------------------------------------------------


def test_hostile_step_names_errors_and_values_are_escaped(corrector):
    run = WorkflowRun.objects.create(
        workflow_name="charge-order", status="failed", input={"html": XSS}
    )
    StepAttempt.objects.create(
        workflow_run=run,
        step_name=XSS,
        status="failed",
        error={"type": "ValueError", "message": XSS},
    )
    steps = [(XSS, True, f'"{XSS}"')]

    pages = {
        "form": corrector.get(correct_url(run)),
        "preview": corrector.post(correct_url(run), form_data(run, input_text="{}", steps=steps)),
    }
    confirm = corrector.post(
        correct_url(run), form_data(run, input_text="{}", steps=steps, action="confirm")
    )
    assert confirm.status_code == 302
    pages["run"] = corrector.get(detail_url(run))

    for name, response in pages.items():
        html = response.content.decode()
        assert "<script>alert" not in html, name
        assert ESCAPED_XSS in html, name
    assert (
        f'<span class="owf-diff-line owf-diff-del">-ValueError: {ESCAPED_XSS}</span>'
        in pages["preview"].content.decode()
    )


# --- the pieces -------------------------------------------------------------------------


def test_parse_json_names_the_field_and_the_place():
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as caught:
        parse_json('{\n  "a": tru\n}', "The input")

    assert caught.value.messages == [
        "The input is not valid JSON: Expecting value (line 2, column 8)."
    ]
    assert parse_json('{"a": [1, 2.5, null]}', "x") == {"a": [1, 2.5, None]}


def test_parse_json_refuses_an_integer_too_long_to_read():
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as caught:
        parse_json("9" * 5000, "The input")

    assert caught.value.messages[0].startswith(
        "The input cannot be read as JSON: Exceeds the limit"
    )


def test_unified_diff_kinds():
    lines = unified_diff("a\nb\n", "a\nc\n", old_label="old", new_label="new")

    assert [(line.kind, line.text) for line in lines] == [
        ("file", "--- old"),
        ("file", "+++ new"),
        ("hunk", "@@ -1,2 +1,2 @@"),
        ("context", " a"),
        ("del", "-b"),
        ("add", "+c"),
    ]
