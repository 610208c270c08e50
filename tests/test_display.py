"""django_openworkflow.display: one way to show errors, statuses and refusals."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib import admin
from django.utils import timezone

from django_openworkflow.admin import StepAttemptInline, WorkflowRunEventInline
from django_openworkflow.display import (
    attempt_status,
    error_parts,
    error_summary,
    refusal_text,
    timeline,
)
from django_openworkflow.exceptions import Refusal
from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowRunEvent
from django_openworkflow.templatetags.openworkflow import register

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("error", "summary", "parts"),
    [
        (None, "", None),
        ({}, "", {"type": "", "message": "", "traceback": ""}),
        (
            {"type": "ValueError", "message": "bad", "traceback": ["a\n", "b\n"]},
            "ValueError: bad",
            {"type": "ValueError", "message": "bad", "traceback": "a\nb\n"},
        ),
        (
            {"type": "WorkerLost"},
            "WorkerLost",
            {"type": "WorkerLost", "message": "", "traceback": ""},
        ),
        (
            {"message": "only words"},
            "only words",
            {"type": "", "message": "only words", "traceback": ""},
        ),
        (
            "a bare string",
            "a bare string",
            {"type": "", "message": "a bare string", "traceback": ""},
        ),
    ],
)
def test_a_stored_error_is_split_and_summarized_one_way(error, summary, parts):
    assert error_parts(error) == parts
    assert error_summary(error) == summary


def test_the_admin_and_the_pages_summarize_errors_with_the_same_function():
    run = WorkflowRun.objects.create(workflow_name="echo", status="failed")
    error = {"type": "ValueError", "message": "card declined"}
    attempt = StepAttempt.objects.create(workflow_run=run, step_name="charge", error=error)
    event = WorkflowRunEvent.objects.create(run=run, action="resume", cleared_error=error)
    attempts = StepAttemptInline(WorkflowRun, admin.site)
    events = WorkflowRunEventInline(WorkflowRun, admin.site)

    assert attempts.error_summary(attempt) == "ValueError: card declined"
    assert events.cleared_error_summary(event) == "ValueError: card declined"
    assert register.filters["error_summary"] is error_summary


@pytest.mark.parametrize(
    ("run_status", "attempt_status_", "shown"),
    [
        ("running", "running", ("running", "running")),
        ("failed", "running", ("interrupted", "interrupted")),
        ("canceled", "running", ("interrupted", "interrupted")),
        ("failed", "failed", ("failed", "failed")),
        ("completed", "completed", ("completed", "completed")),
    ],
)
def test_an_attempt_left_running_on_a_finished_run_is_shown_interrupted_everywhere(
    run_status, attempt_status_, shown
):
    run = WorkflowRun.objects.create(workflow_name="echo", status=run_status)
    attempt = StepAttempt.objects.create(workflow_run=run, step_name="s", status=attempt_status_)
    column = StepAttemptInline(WorkflowRun, admin.site).status_shown

    assert attempt_status(attempt, run) == shown
    assert column(StepAttempt.objects.get(pk=attempt.pk)) == shown[1]
    [generation] = timeline(run, [attempt], now=timezone.now())
    [laid_out] = generation["attempts"]
    assert (laid_out.status_key, laid_out.status_label) == shown


@pytest.mark.parametrize(
    ("reason", "status", "text"),
    [
        (Refusal.STATUS, "completed", "it is completed"),
        (Refusal.STATUS, "running", "it is running"),
        (Refusal.DEADLINE, "failed", "its deadline has passed"),
        (Refusal.NEW_DEADLINE, "failed", "the new deadline is not in the future"),
        (None, None, "it no longer exists"),
    ],
)
def test_a_refusal_reads_from_its_reason_and_status(reason, status, text):
    assert refusal_text(reason, status) == text


def test_a_run_method_refusal_reads_the_same_as_the_managers():
    late = WorkflowRun.objects.create(
        workflow_name="echo", status="failed", deadline_at=timezone.now() - timedelta(minutes=1)
    )
    assert refusal_text(late.resume_refusal(), late.status) == "its deadline has passed"


def test_only_a_running_attempt_reads_its_run(django_assert_num_queries):
    run = WorkflowRun.objects.create(workflow_name="echo", status="failed")
    StepAttempt.objects.create(workflow_run=run, step_name="done", status="completed")
    StepAttempt.objects.create(workflow_run=run, step_name="open", status="running")
    done, open_ = StepAttempt.objects.order_by("id")  # their runs not loaded

    column = StepAttemptInline(WorkflowRun, admin.site).status_shown

    with django_assert_num_queries(0):
        assert attempt_status(done) == ("completed", "completed")
        assert column(done) == "completed"
    with django_assert_num_queries(1):
        assert attempt_status(open_) == ("interrupted", "interrupted")
