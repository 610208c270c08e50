"""django_openworkflow.names: every kind of name and key is refused the same way."""

from __future__ import annotations

import re
import uuid

import pytest
from django.db import connection
from django.utils import timezone

from django_openworkflow import send_signal, workflow
from django_openworkflow.engine import Execution, StepApi
from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowSignal
from django_openworkflow.names import MAX_NAME_LENGTH, check_name
from django_openworkflow.registry import Workflow, _registry
from django_openworkflow.store import Claim
from tests.testapp.workflows import echo

pytestmark = pytest.mark.django_db


def step() -> StepApi:
    """``ctx.step`` of an execution pass of an unsaved run (the checks come before any write)."""
    run = WorkflowRun(workflow_name="names", claim_token=uuid.uuid4())
    claim = Claim(run, run.claim_token, timezone.now(), first_start=True, lease_seconds=30)
    execution = Execution(claim, Workflow(lambda ctx: None, name="names"))
    execution.atomic_depth = len(connection.atomic_blocks)  # the test's transaction
    return StepApi(execution)


# Each kind of name or key, given the value to check.
KINDS = {
    "workflow name": lambda value: Workflow(lambda ctx: None, name=value),
    "@workflow name": lambda value: workflow(name=value)(lambda ctx: None),
    "step name": lambda value: step().run(value, lambda: None),
    "sleep step name": lambda value: step().sleep(value, 0),
    "atomic step name": lambda value: step().atomic(value, lambda: None),
    "parallel step name": lambda value: step().parallel([(value, lambda: None)]),
    "child workflow name": lambda value: step().run_workflow(value, name="child"),
    "child step name": lambda value: step().run_workflow("echo", name=value),
    "signal sending step name": lambda value: step().send_signal("go", name=value),
    "signal waiting step name": lambda value: step().wait_for_signal("go", name=value),
    "signal sent": lambda value: send_signal(value),
    "signal sent by a step": lambda value: step().send_signal(value),
    "signal waited for": lambda value: step().wait_for_signal(value),
    "run idempotency key": lambda value: echo.start(None, idempotency_key=value),
    "signal idempotency key": lambda value: send_signal("go", idempotency_key=value),
}

TOO_LONG = "k" * (MAX_NAME_LENGTH + 1)

# (value, exception, the end of its message: the same for every kind)
REFUSED = {
    "NUL": (
        "a\x00b",
        ValueError,
        "'a\\x00b'",
        NUL_END := ("contains the character U+0000 (NUL), which PostgreSQL cannot store"),
    ),
    "lone surrogate": (
        "a\udcffb",
        ValueError,
        "'a\\udcffb'",
        ("contains '\\udcff', which is not valid Unicode text"),
    ),
    "empty": ("", TypeError, "", "not ''"),
    "too long": (TOO_LONG, ValueError, "", f"is {len(TOO_LONG)} characters"),
    "wrong type": (7, TypeError, "", "not 7"),
}


def nothing_stored() -> bool:
    return not (
        WorkflowRun.objects.exists()
        or StepAttempt.objects.exists()
        or WorkflowSignal.objects.exists()
    )


@pytest.mark.parametrize("case", REFUSED)
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_name_and_key_is_refused_the_same_way(kind, case):
    value, error, quoted, problem = REFUSED[case]
    registered = dict(_registry)

    with pytest.raises(error) as info:
        KINDS[kind](value)

    message = str(info.value)
    if case == "too long":
        assert re.search(rf"{problem}( long)?; at most {MAX_NAME_LENGTH}", message), message
    else:
        assert message.endswith(problem), message
        assert quoted in message
    assert nothing_stored()
    assert _registry == registered


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x" * 255, None),
        (" ", "workflow name must be a non-empty string, not ' '"),
        ("\t\n", "workflow name must be a non-empty string, not '\\t\\n'"),
    ],
)
def test_only_workflow_names_refuse_blank_text(value, message):
    assert check_name(value, "step name") == value
    if message is None:
        assert check_name(value, "workflow name", blank=False) == value
    else:
        with pytest.raises(TypeError) as info:
            check_name(value, "workflow name", blank=False)
        assert str(info.value) == message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "signal 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk'… is 256 characters; at most 255"),
        (
            {"of": ' of workflow "echo"'},
            'signal of workflow "echo" is 256 characters long; at most 255 are allowed',
        ),
    ],
)
def test_the_length_message_names_the_value_or_its_owner(kwargs, message):
    with pytest.raises(ValueError) as info:
        check_name(TOO_LONG, "signal", **kwargs)
    assert str(info.value) == message
