"""No secrets in the logs: inputs, step results and error messages stay out of INFO and above.

The rule: INFO (and WARNING, ERROR) lines name runs, workflows, steps, counts
and times; inputs, results and error messages live in the database (the run
pages show them), never in those log lines. The engine logs no inputs at all,
DEBUG included; were it to, DEBUG would be the only level allowed.

Every workflow here carries a marker string in its input; the steps return
it, raise it in their error messages, send it as signal data, pass it to a
child and return it in values that are refused as not JSON. Each test first
checks that the marker did reach the stored runs (so it was there to leak)
and that INFO lines were captured (so a leak would have been seen).
"""

from __future__ import annotations

import logging
import signal
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from django_openworkflow import RetryPolicy, workflow
from django_openworkflow.models import StepAttempt, WorkflowRun
from tests.conftest import claim_and_execute, drain

pytestmark = pytest.mark.django_db(transaction=True)

MARKER = "s3cr3t-9f4e2a"
INPUT = {"card": f"4111-{MARKER}", "nested": {"token": MARKER}}
FAST = RetryPolicy(initial_interval="10ms", maximum_interval="20ms", maximum_attempts=2)


@workflow(name="log-secret-completes")
def completes(ctx):
    echoed = ctx.step.run("echo", lambda: {"token": ctx.input["nested"]["token"]})
    ctx.step.sleep("pause", "10ms")  # a second pass: the replay serves the stored result
    return {"echoed": echoed, "card": ctx.input["card"]}


@workflow(name="log-secret-step-fails")
def step_fails(ctx):
    def charge():
        raise ValueError(f"card {ctx.input['card']} was declined")

    ctx.step.run("charge", charge, retry_policy=FAST)


@workflow(name="log-secret-workflow-fails", retry_policy=FAST)
def workflow_fails(ctx):
    raise KeyError(f"no order for {ctx.input['card']}")


@workflow(name="log-secret-result-refused")
def result_refused(ctx):
    return ctx.step.run("bad", lambda: {"card": {ctx.input["card"]}})  # a set: not JSON


@workflow(name="log-secret-output-refused")
def output_refused(ctx):
    return {"card": (ctx.input["card"],)}  # a tuple: not JSON


@workflow(name="log-secret-child")
def child(ctx):
    raise RuntimeError(f"child saw {ctx.input['card']}")


@workflow(name="log-secret-parent")
def parent(ctx):
    return ctx.step.run_workflow(child, ctx.input)


@workflow(name="log-secret-waiter")
def waiter(ctx):
    return ctx.step.wait_for_signal("log-secret-signal", timeout="30s")


@workflow(name="log-secret-sender")
def sender(ctx):
    return ctx.step.send_signal("log-secret-signal", ctx.input)


@workflow(name="log-secret-deadline")
def deadline(ctx):
    def charge():
        raise ValueError(f"card {ctx.input['card']} was declined")

    ctx.step.run("charge", charge, retry_policy=RetryPolicy(initial_interval="1h"))


EXPECTED = {
    "log-secret-completes": "completed",
    "log-secret-step-fails": "failed",
    "log-secret-workflow-fails": "failed",
    "log-secret-result-refused": "failed",
    "log-secret-output-refused": "failed",
    "log-secret-parent": "failed",
    "log-secret-child": "failed",
    "log-secret-waiter": "completed",
    "log-secret-sender": "completed",
    "log-secret-deadline": "failed",
}


def full_text(record: logging.LogRecord) -> str:
    """The message with its traceback and stack, as a handler would write them."""
    return logging.Formatter("%(message)s").format(record) + (record.stack_info or "")


def stored_text(run: WorkflowRun) -> str:
    attempts = StepAttempt.objects.filter(workflow_run=run).values_list("output", "error")
    return repr((run.input, run.output, run.error, list(attempts)))


def run_everything() -> list[WorkflowRun]:
    """One run of each workflow above, to the end, on an in-process worker."""
    waiting = waiter.start(None)
    assert claim_and_execute() is not None  # the waiter waits before the signal is sent
    runs = [waiting]
    for wf in (completes, step_fails, workflow_fails, result_refused, output_refused, parent):
        runs.append(wf.start(INPUT))
    runs.append(sender.start(INPUT))
    runs.append(deadline.start(INPUT, deadline_at=timezone.now() + timedelta(seconds=30)))

    drain(timeout=60)

    runs += list(WorkflowRun.objects.filter(workflow_name="log-secret-child"))
    for run in runs:
        run.refresh_from_db()
    return runs


def test_inputs_results_and_error_messages_never_reach_info_logs(caplog):
    caplog.set_level(logging.DEBUG, logger="django_openworkflow")

    runs = run_everything()

    # The marker is in every run's stored data: it was there to leak.
    assert {run.workflow_name: run.status for run in runs} == EXPECTED
    for run in runs:
        assert MARKER in stored_text(run), run.workflow_name
    by_name = {run.workflow_name: run for run in runs}
    assert MARKER in by_name["log-secret-step-fails"].error["message"]
    assert MARKER in by_name["log-secret-workflow-fails"].error["message"]
    assert MARKER in by_name["log-secret-deadline"].error["message"]
    assert by_name["log-secret-waiter"].output == {"data": INPUT}
    # INFO lines were captured: a leak would have been seen.
    records = [r for r in caplog.records if r.name.startswith("django_openworkflow")]
    messages = [r.getMessage() for r in records if r.levelno == logging.INFO]
    for expected in ("run claimed", "run completed", "step failed", "run failed"):
        assert any(m.startswith(expected) for m in messages), expected

    leaks = [
        (r.levelname, r.name, full_text(r))
        for r in records
        if r.levelno >= logging.INFO and MARKER in full_text(r)
    ]
    assert leaks == []
    # Nothing logs inputs at DEBUG either (allowed there, but not done).
    assert not any(MARKER in full_text(r) for r in records if r.levelno < logging.INFO)


def test_the_runworker_command_logs_no_inputs_at_its_default_verbosity(worker_process):
    runs = [wf.start(INPUT) for wf in (completes, step_fails, workflow_fails, result_refused)]
    proc = worker_process(
        "-v", "1", "--poll-interval", "0.05", "--workflows-module", "tests.test_logging"
    )
    end = time.monotonic() + 60
    while WorkflowRun.objects.filter(pk__in=[r.pk for r in runs]).active().exists():
        assert time.monotonic() < end, "runs still active after 60 s"
        time.sleep(0.05)
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0

    output = proc.output()
    for run in runs:
        run.refresh_from_db()
        assert MARKER in stored_text(run)
    assert [run.status for run in runs] == ["completed", "failed", "failed", "failed"]
    # INFO lines were written (claims, completions, failures), none with the marker.
    for expected in (
        "run claimed run=",
        "run completed run=",
        "step failed run=",
        "run failed run=",
    ):
        assert expected in output
    assert MARKER not in output


def test_failure_lines_name_the_error_type_and_the_step(caplog):
    caplog.set_level(logging.INFO, logger="django_openworkflow")
    runs = {wf.name: wf.start(INPUT) for wf in (step_fails, workflow_fails)}
    runs["deadline"] = deadline.start(INPUT, deadline_at=timezone.now() + timedelta(seconds=30))
    drain(timeout=60)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]

    def lines(prefix):
        return [m.split(" at=")[0] for m in messages if m.startswith(prefix)]

    step, body, late = (
        runs[k].pk for k in ("log-secret-step-fails", "log-secret-workflow-fails", "deadline")
    )
    assert lines(f"step retry scheduled run={step} ") == [
        f"step retry scheduled run={step} steps=charge error=ValueError"
    ]
    assert lines(f"step failed run={step} ") == [
        f"step failed run={step} step=charge error=ValueError attempts=2"
    ]
    assert lines(f"run failed run={step} ") == [
        f"run failed run={step} step=charge error=ValueError"
    ]
    assert lines(f"run retry scheduled run={body} ") == [
        f"run retry scheduled run={body} error=KeyError attempts=1"
    ]
    assert lines(f"run failed run={body} ") == [f"run failed run={body} error=KeyError attempts=2"]
    assert lines(f"run failed run={late} ") == [
        f"run failed run={late} step=charge error=ValueError reason=deadline"
    ]
    assert not any(MARKER in m for m in messages)
