"""Fuzzing the run pages and the Resume / Cancel endpoints with hypothesis.

Arbitrary run ids in the path, arbitrary query strings for the run list and
arbitrary POST data for the transitions, sent by a logged-in superuser. Never
a 500; unknown or malformed ids are 404; a GET changes nothing; what was sent
is never rendered unescaped; a transition goes back to this site only.
"""

from __future__ import annotations

import contextlib
from urllib.parse import quote, urlencode, urlsplit

import pytest
from django.contrib.admin.models import LogEntry
from django.db import transaction
from django.test import Client
from django.urls import reverse
from hypothesis import assume, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowRunEvent

pytestmark = pytest.mark.django_db

STATUSES = [choice.value for choice in WorkflowRun.Status]
RUNS_PER_PAGE = 50

# Markup that would run if it reached the page unescaped; "owf()" is on no page.
PAYLOADS = [
    "<script>owf()</script>",
    '"><img src=x onerror=owf()>',
    "'><svg onload=owf()>",
    '" autofocus onfocus="owf()',
    "</title></textarea><owf-tag>",
    "<!--owf()-->",
]
OFF_SITE = [
    "//evil.example/",
    "https://evil.example/",
    "http://testserver@evil.example/",
    "/\\evil.example/",
    "\\\\evil.example/",
    "\t//evil.example/",
    " //evil.example/",
    "///evil.example/",
    "javascript:owf()",
    "data:text/html,<script>owf()</script>",
    "https:evil.example",
]

payload_text = st.builds(
    "{}{}{}".format, st.text(max_size=5), st.sampled_from(PAYLOADS), st.text(max_size=5)
)
values = st.one_of(
    st.text(),  # any code point but lone surrogates: control characters, NUL, RTL marks
    st.text(alphabet=st.characters(max_codepoint=31), max_size=10),
    st.text(min_size=300, max_size=3000),
    payload_text,
    st.sampled_from([*STATUSES, "", "FAILED", " failed", "all", "alpha", " alpha ", "beta"]),
    st.integers().map(str),
    st.integers(min_value=10**18, max_value=10**40).map(str),
    st.integers(max_value=-1).map(str),
    st.sampled_from(["9" * 5000, "1e309", "nan", "inf", "-0", "1.5", "2_0", " 2 ", "0x2"]),
    st.sampled_from(["\uff12", "\u0662", "\u202e2"]),  # fullwidth and Arabic-Indic 2, RTL mark
    st.sampled_from(OFF_SITE),
)
keys = st.one_of(
    st.sampled_from(
        [
            *["status", "workflow", "queue", "q", "page", "next", "o", "p", "e", "all"],
            "csrfmiddlewaretoken",
        ]
    ),
    st.text(max_size=10),
)
query_params = st.lists(st.tuples(keys, values), max_size=6)


def run_id_segments():
    return st.one_of(
        st.text(min_size=1),
        st.text(min_size=1000, max_size=3000),
        st.uuids().map(str),  # well formed, but no such run
        st.uuids().map(lambda u: str(u).upper()),
        st.uuids().map(lambda u: u.hex),
        st.uuids().map(lambda u: f"{{{u}}}"),
        st.uuids().map(lambda u: f"urn:uuid:{u}"),
        st.uuids().map(lambda u: f" {u}"),
        st.uuids().map(lambda u: str(u).replace("-", "\u2010")),
        payload_text,
        st.sampled_from(
            [".", "..", "%", "%00", "\x00", "null", "None", "-1", "0", "' OR 1=1 --", "1;"]
        ),
    )


@contextlib.contextmanager
def rolled_back():
    """One example's database writes, undone afterwards (inside the test's transaction)."""
    with transaction.atomic():
        yield
        transaction.set_rollback(True)


def snapshot() -> tuple:
    """Everything a request could change."""
    return (
        list(
            WorkflowRun.objects.order_by("pk").values_list(
                "pk", "status", "error", "attempts", "resume_generation", "updated_at"
            )
        ),
        WorkflowRunEvent.objects.count(),
        LogEntry.objects.count(),
        StepAttempt.objects.count(),
    )


def make_run(status: str, workflow_name: str = "alpha") -> WorkflowRun:
    error = {"type": "ValueError", "message": "declined"} if status == "failed" else None
    return WorkflowRun.objects.create(
        status=status, workflow_name=workflow_name, queue=workflow_name, error=error
    )


@pytest.fixture
def superuser_client(django_user_model):
    client = Client()
    client.force_login(django_user_model.objects.create_superuser("root", "root@example.com"))
    return client


def assert_nothing_raw(body: str, sent: list[str]) -> None:
    for payload in PAYLOADS:
        if any(payload in value for value in sent):
            assert payload not in body


def assert_on_this_site(location: str) -> None:
    # How browsers read it: backslashes as slashes, leading whitespace and controls dropped.
    parts = urlsplit(location.replace("\\", "/").lstrip("".join(map(chr, range(33)))))
    assert parts.scheme in ("", "http", "https"), location
    assert parts.netloc in ("", "testserver"), location


# --- run ids in the path -------------------------------------------------------------


def test_any_run_id_in_the_path_is_404_unless_the_run_exists(superuser_client):
    runs = {str(make_run(status).pk) for status in ("failed", "running", "completed")}
    before = snapshot()

    @given(segment=run_id_segments())
    @hypothesis_settings(max_examples=100)
    def check(segment):
        assume(not any(segment.startswith(run_id) for run_id in runs))
        base = f"/workflows/{quote(segment, safe='')}/"

        for response in (
            superuser_client.get(base),
            superuser_client.head(base),
            superuser_client.post(f"{base}resume/"),
            superuser_client.post(f"{base}cancel/"),
        ):
            assert response.status_code == 404
        assert snapshot() == before

    check()


# --- the run list's query string ---------------------------------------------------------


def test_any_query_string_gives_the_run_list_filtered_and_escaped(superuser_client):
    for i in range(RUNS_PER_PAGE + 10):
        make_run(STATUSES[i % len(STATUSES)], "alpha" if i % 2 else "beta")
    before = snapshot()

    @given(params=query_params)
    @hypothesis_settings(max_examples=80)
    def check(params):
        response = superuser_client.get(
            f"{reverse('django_openworkflow:run-list')}?{urlencode(params)}"
        )

        assert response.status_code == 200
        assert response["Content-Type"] == "text/html; charset=utf-8"
        body = response.content.decode()
        assert_nothing_raw(body, [value for _, value in params] + [key for key, _ in params])
        last = dict(params)  # a repeated parameter: the last one counts
        page = response.context["page"]
        assert 1 <= page.number <= page.paginator.num_pages
        with contextlib.suppress(ValueError):
            wanted = int(last.get("page", ""))
            if 1 <= wanted <= page.paginator.num_pages:
                assert page.number == wanted
        if last.get("status") in STATUSES:
            assert {run.status for run in page} <= {last["status"]}
        workflow = last.get("workflow", "").strip()
        if workflow and "\x00" not in workflow:
            assert {run.workflow_name for run in page} <= {workflow}
        queue = last.get("queue", "").strip()
        if queue and "\x00" not in queue:
            assert {run.queue for run in page} <= {queue}
        assert snapshot() == before

    check()


@pytest.mark.parametrize("name", ["run-detail", "run-resume", "run-cancel"])
def test_a_get_with_any_query_string_changes_nothing(superuser_client, name):
    runs = [make_run("failed"), make_run("running")]
    before = snapshot()

    @given(params=query_params, run=st.sampled_from(runs), head=st.booleans())
    @hypothesis_settings(max_examples=40)
    def check(params, run, head):
        url = f"{reverse(f'django_openworkflow:{name}', args=[run.pk])}?{urlencode(params)}"

        response = superuser_client.head(url) if head else superuser_client.get(url)

        assert response.status_code == (200 if name == "run-detail" else 405)
        assert_nothing_raw(response.content.decode(), [value for _, value in params])
        assert snapshot() == before

    check()


# --- POST data for resume and cancel ----------------------------------------------------


@pytest.mark.parametrize(
    ("action", "status", "changed"),
    [("resume", "failed", "pending"), ("cancel", "running", "canceled")],
)
def test_any_post_data_makes_the_transition_and_goes_back_to_this_site(
    superuser_client, action, status, changed
):
    @given(params=query_params, next_url=st.none() | st.sampled_from(OFF_SITE) | values)
    @hypothesis_settings(max_examples=60)
    def check(params, next_url):
        pairs = params + ([("next", next_url)] if next_url is not None else [])
        with rolled_back():
            run = make_run(status)
            url = reverse(f"django_openworkflow:run-{action}", args=[run.pk])

            response = superuser_client.post(
                url, urlencode(pairs), content_type="application/x-www-form-urlencoded"
            )

            assert response.status_code == 302
            assert_on_this_site(response["Location"])
            run.refresh_from_db()
            assert run.status == changed
            assert run.events.get().action == action
            # Once more: refused (the run moved on), still no 500 and no change.
            again = superuser_client.post(
                url, urlencode(pairs), content_type="application/x-www-form-urlencoded"
            )
            assert again.status_code == 302
            assert_on_this_site(again["Location"])
            run.refresh_from_db()
            assert run.status == changed
            assert run.events.count() == 1

    check()


@pytest.mark.parametrize(
    ("action", "status", "changed"),
    [("resume", "failed", "pending"), ("cancel", "running", "canceled")],
)
def test_post_data_without_the_csrf_token_changes_nothing(
    django_user_model, action, status, changed
):
    client = Client(enforce_csrf_checks=True)
    client.force_login(django_user_model.objects.create_superuser("root", "root@example.com"))
    page_with_a_form = make_run("failed")
    client.get(reverse("django_openworkflow:run-detail", args=[page_with_a_form.pk]))
    token = client.cookies["csrftoken"].value

    @given(params=query_params, with_token=st.booleans())
    @hypothesis_settings(max_examples=50)
    def check(params, with_token):
        pairs = params + ([("csrfmiddlewaretoken", token)] if with_token else [])
        with rolled_back():
            run = make_run(status)
            before = snapshot()

            response = client.post(
                reverse(f"django_openworkflow:run-{action}", args=[run.pk]),
                urlencode(pairs),
                content_type="application/x-www-form-urlencoded",
            )

            if with_token:
                assert response.status_code == 302
                run.refresh_from_db()
                assert run.status == changed
            else:
                assert response.status_code == 403
                assert snapshot() == before

    check()
