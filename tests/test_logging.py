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

import json
import logging
import logging.config
import signal
import sys
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from django_openworkflow import RetryPolicy, workflow
from django_openworkflow.logging import JSONFormatter
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.store import get_store
from tests.conftest import claim_and_execute, drain, make_due
from tests.testapp.workflows import interrupted_once

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

    # Every engine and worker line about a run names its workflow too.
    about_runs = [m for m in messages if " run=" in m]
    assert about_runs
    assert [m for m in about_runs if " workflow=" not in m] == []

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


def failure_lines(caplog, run: WorkflowRun) -> list[str]:
    """The INFO-and-above lines about ``run`` that report a failure or a retry, without the
    retry's time (``at=``)."""
    return [
        record.getMessage().split(" at=")[0]
        for record in caplog.records
        if record.levelno >= logging.INFO
        and f" run={run.pk} " in record.getMessage()
        and ("failed" in record.getMessage() or "retry" in record.getMessage())
    ]


def test_a_step_failure_names_run_workflow_step_and_error_type(caplog):
    caplog.set_level(logging.INFO, logger="django_openworkflow")
    run = step_fails.start(INPUT)
    drain(timeout=60)

    assert failure_lines(caplog, run) == [
        f"step retry scheduled run={run.pk} workflow=log-secret-step-fails step=charge "
        "error=ValueError attempts=1",
        f"step failed run={run.pk} workflow=log-secret-step-fails step=charge "
        "error=ValueError attempts=2",
        f"run failed run={run.pk} workflow=log-secret-step-fails step=charge error=ValueError",
    ]
    assert_no_marker(caplog)


def test_a_workflow_failure_names_run_workflow_and_error_type(caplog):
    caplog.set_level(logging.INFO, logger="django_openworkflow")
    run = workflow_fails.start(INPUT)
    drain(timeout=60)

    assert failure_lines(caplog, run) == [
        f"run retry scheduled run={run.pk} workflow=log-secret-workflow-fails error=KeyError "
        "attempts=1",
        f"run failed run={run.pk} workflow=log-secret-workflow-fails error=KeyError attempts=2",
    ]
    assert_no_marker(caplog)


ORDER = ["a"]  # the first step's name: the test changes it between two passes


@workflow(name="log-secret-changes-order")
def changes_order(ctx):
    ctx.step.run(ORDER[0], lambda: ctx.input["card"])
    ctx.step.sleep("pause", "10ms")


def test_a_non_determinism_failure_names_the_step_called_and_the_one_expected(caplog):
    caplog.set_level(logging.INFO, logger="django_openworkflow")
    run = changes_order.start(INPUT)
    assert claim_and_execute().status == WorkflowRun.Status.PENDING  # "a" ran, then the sleep
    ORDER[0] = "b"
    try:
        make_due(run)
        assert claim_and_execute().status == WorkflowRun.Status.FAILED
    finally:
        ORDER[0] = "a"

    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.getMessage() == (
        f"run failed run={run.pk} workflow=log-secret-changes-order step=b "
        "error=NonDeterministicWorkflow expected=a"
    )
    assert_no_marker(caplog)


@workflow(name="log-secret-workflow-deadline", retry_policy=RetryPolicy(initial_interval="1h"))
def workflow_deadline(ctx):
    raise KeyError(f"no order for {ctx.input['card']}")


@workflow(name="log-secret-sleeps")
def sleeps(ctx):
    ctx.step.sleep("nap", "1h")


def test_deadline_failures_name_run_workflow_step_and_error_type(caplog):
    caplog.set_level(logging.INFO, logger="django_openworkflow")
    soon = timezone.now() + timedelta(seconds=30)
    step_late = deadline.start(INPUT, deadline_at=soon)  # its step's retry: after the deadline
    body_late = workflow_deadline.start(INPUT, deadline_at=soon)  # its own retry: after it too
    drain(timeout=60)
    swept = sleeps.start(INPUT, deadline_at=soon)
    assert claim_and_execute().status == WorkflowRun.Status.PENDING  # asleep for an hour
    WorkflowRun.objects.filter(pk=swept.pk).update(deadline_at=timezone.now())
    assert get_store().fail_overdue("default") == 1  # the worker's sweep

    assert failure_lines(caplog, step_late) == [
        f"run failed run={step_late.pk} workflow=log-secret-deadline step=charge "
        "error=ValueError reason=deadline"
    ]
    assert failure_lines(caplog, body_late) == [
        f"run failed run={body_late.pk} workflow=log-secret-workflow-deadline error=KeyError "
        "attempts=1 reason=deadline"
    ]
    assert failure_lines(caplog, swept) == [
        f"run failed run={swept.pk} workflow=log-secret-sleeps error=DeadlineExceeded "
        "reason=deadline"
    ]
    assert_no_marker(caplog)


def test_a_step_cut_short_by_its_worker_is_logged_as_lost(caplog):
    caplog.set_level(logging.INFO, logger="django_openworkflow")
    run = interrupted_once.start()  # the first attempt's KeyboardInterrupt crashes the pass
    drain(timeout=60)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"step failed run={run.pk} workflow=interrupted-once step=step error=WorkerLost"
    ]


def assert_no_marker(caplog) -> None:
    """The failures above carry the marker in their messages and inputs: no record has it."""
    assert caplog.records
    assert [full_text(r) for r in caplog.records if MARKER in full_text(r)] == []


# --- JSONFormatter ----------------------------------------------------------------------


def record(name: str, level: int, msg: str, *args, exc_info=None) -> logging.LogRecord:
    made = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)
    made.created = 1796040000.25  # 2026-11-30 12:00:00.250 UTC
    return made


def test_the_json_formatter_parses_our_key_value_fields():
    line = JSONFormatter().format(
        record(
            "django_openworkflow.engine",
            logging.INFO,
            "run failed run=%s workflow=%s step=%s error=%s attempts=%d",
            7,
            "charge-order",
            "charge",
            "CardDeclined",
            3,
        )
    )
    assert line == (
        '{"time": "2026-11-30T12:00:00.250+00:00", "level": "INFO", '
        '"logger": "django_openworkflow.engine", '
        '"message": "run failed run=7 workflow=charge-order step=charge error=CardDeclined '
        'attempts=3", "event": "run failed", "fields": {"run": "7", "workflow": '
        '"charge-order", "step": "charge", "error": "CardDeclined", "attempts": "3"}}'
    )


def test_the_json_formatter_keeps_spaces_in_the_last_field():
    message = (
        "database error worker=vm:12:ab retry_in=0.4s error=connection refused\n"
        "\tIs the server running? hint=set OPTIONS"
    )
    line = json.loads(
        JSONFormatter().format(record("django_openworkflow.worker", logging.WARNING, message))
    )
    assert (line["event"], line["fields"]) == (
        "database error",
        {
            "worker": "vm:12:ab",
            "retry_in": "0.4s",
            "error": "connection refused\n\tIs the server running?",
            "hint": "set OPTIONS",
        },
    )
    assert (
        JSONFormatter()
        .format(record("django_openworkflow", logging.INFO, "runs=3 purged=yes"))
        .endswith('"event": "", "fields": {"runs": "3", "purged": "yes"}}')
    )


def test_the_json_formatter_reads_each_value_from_its_argument_whatever_it_holds():
    fields = json.loads(
        JSONFormatter().format(
            record(
                "django_openworkflow.engine",
                logging.INFO,
                "step failed run=%s step=%s error=%s ratio=%.1f%% at=%r",
                7,
                "charge run=1 error=None\nforged",
                "ValueError",
                42.25,
                "x y=z",
            )
        )
    )["fields"]
    assert fields == {
        "run": "7",
        "step": "charge run=1 error=None\nforged",
        "error": "ValueError",
        "ratio": "42.2%",
        "at": "'x y=z'",
    }


def test_the_json_formatter_falls_back_to_the_text_when_the_template_does_not_fit():
    # A dict of named arguments, and a count of arguments the template does not match.
    named = logging.LogRecord(
        "django_openworkflow", logging.INFO, __file__, 1, "ran run=%(run)s", ({"run": 7},), None
    )
    assert json.loads(JSONFormatter().format(named))["fields"] == {"run": "7"}
    odd = record("django_openworkflow", logging.INFO, "ran run=%s of=%*d", 7, 3, 9)
    assert json.loads(JSONFormatter().format(odd))["fields"] == {"run": "7", "of": "  9"}


def test_the_json_formatter_writes_other_loggers_lines_as_they_are():
    line = JSONFormatter().format(
        record("django.request", logging.ERROR, "Internal Server Error: %s", "/a=b c=d")
    )
    assert line == (
        '{"time": "2026-11-30T12:00:00.250+00:00", "level": "ERROR", '
        '"logger": "django.request", "message": "Internal Server Error: /a=b c=d"}'
    )


def test_the_json_formatter_writes_the_exception_type_and_traceback():
    def fail():
        raise ValueError("boom")

    try:
        fail()
    except ValueError:
        exc_info = sys.exc_info()
    line = json.loads(
        JSONFormatter().format(
            record("django_openworkflow.worker", logging.ERROR, "crashed", exc_info=exc_info)
        )
    )
    assert (line["exc_type"], line["event"], line["fields"]) == ("ValueError", "crashed", {})
    assert line["traceback"].startswith("Traceback (most recent call last):\n")
    assert line["traceback"].endswith('    raise ValueError("boom")\nValueError: boom')


def test_the_json_formatter_is_configured_from_django_logging(capsys):
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"json": {"()": "django_openworkflow.logging.JSONFormatter"}},
            "handlers": {
                "json": {
                    "class": "logging.StreamHandler",
                    "formatter": "json",
                    "stream": "ext://sys.stderr",
                }
            },
            "loggers": {"tests.json": {"handlers": ["json"], "level": "INFO"}},
        }
    )
    logger = logging.getLogger("tests.json")
    try:
        logger.info("hello")
    finally:
        for handler in logger.handlers[:]:
            logger.removeHandler(handler)
    line = json.loads(capsys.readouterr().err)
    assert (line["level"], line["logger"], line["message"]) == ("INFO", "tests.json", "hello")


JSON_SETTINGS = """
from tests.settings import *  # noqa: F403

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "django_openworkflow.logging.JSONFormatter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
"""


def test_runworker_writes_json_lines_through_the_projects_logging(worker_process, tmp_path):
    """A handler of the project's on the root logger replaces runworker's console handler."""
    (tmp_path / "json_settings.py").write_text(JSON_SETTINGS)
    run = step_fails.start(INPUT)
    proc = worker_process(
        "--settings",
        "json_settings",
        "--pythonpath",
        str(tmp_path),
        "--poll-interval",
        "0.05",
        "--workflows-module",
        "tests.test_logging",
    )
    end = time.monotonic() + 60
    while WorkflowRun.objects.filter(pk=run.pk).active().exists():
        assert time.monotonic() < end, "the run is still active after 60 s"
        time.sleep(0.05)
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0

    lines = [json.loads(line) for line in proc.output().splitlines()]
    assert {line["logger"] for line in lines} >= {"django_openworkflow.worker"}
    [failed] = [line for line in lines if line["event"] == "run failed"]
    del failed["time"]
    assert failed == {
        "level": "INFO",
        "logger": "django_openworkflow.engine",
        "message": f"run failed run={run.pk} workflow=log-secret-step-fails step=charge "
        "error=ValueError",
        "event": "run failed",
        "fields": {
            "run": str(run.pk),
            "workflow": "log-secret-step-fails",
            "step": "charge",
            "error": "ValueError",
        },
    }
    assert MARKER not in proc.output()
