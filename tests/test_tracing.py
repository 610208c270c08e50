"""OpenTelemetry (tracing.py): spans of passes and steps, joined to the trace that started the run.

In-process tests give the instrument a ``TracerProvider`` of their own with an
in-memory exporter (the global provider can be set once per process); a
``runworker`` process sets the global provider in ``tests/settings_tracing.py``
and writes its spans to a file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test import override_settings
from django.utils import timezone
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from django_openworkflow import instruments, tracing, workflow
from django_openworkflow.checks import check_settings
from django_openworkflow.clock import Now
from django_openworkflow.engine import loops
from django_openworkflow.engine.control import ClaimLost, Suspend
from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowSchedule
from django_openworkflow.pauses import add_hook, remove_hook
from django_openworkflow.registry import get_workflow
from django_openworkflow.testing import drain
from tests.conftest import ROOT, claim_and_execute
from tests.conftest import drain as drain_with_workers

seen: dict[str, trace.SpanContext] = {}  # what workflow code saw as its current span


@workflow(name="traced-sees-its-span")
def sees_its_span(ctx):
    seen["workflow"] = trace.get_current_span().get_span_context()

    def step():
        seen["step"] = trace.get_current_span().get_span_context()
        return str(get_workflow("echo").start("from a step").pk)

    return ctx.step.run("look", step)


@workflow(name="traced-async-step")
def traced_async_step(ctx):
    async def step():
        seen["async step"] = trace.get_current_span().get_span_context()
        seen["its sync call"] = await sync_to_async(
            lambda: trace.get_current_span().get_span_context()
        )()
        return 1

    return ctx.step.run("look", step)


class Spans:
    """The spans finished so far, and a tracer to make the caller's spans with."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests")

    def named(self, name):
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def one(self, name):
        [span] = self.named(name)
        return span


@pytest.fixture
def spans():
    found = Spans()
    previous = tracing.instrument.tracer_provider
    tracing.instrument.tracer_provider = found.provider
    yield found
    tracing.instrument.tracer_provider = previous


def traceparent(span) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def steps(spans, name):
    return sorted(spans.named(f"step {name}"), key=lambda s: s.attributes["openworkflow.attempt"])


def exception_events(span):
    return [dict(e.attributes) for e in span.events if e.name == "exception"]


def test_the_instrument_is_installed_when_the_api_is():
    assert tracing.instrument in instruments._instruments


@pytest.mark.django_db
def test_each_pass_is_a_span_in_the_callers_trace_with_a_child_span_per_step(spans):
    with spans.tracer.start_as_current_span("request") as request:
        run = get_workflow("three-steps").start({"i": 1})
    assert run.trace_context == {"traceparent": traceparent(request)}
    drain()
    request = spans.one("request")
    run_span = spans.one("workflow three-steps")
    assert run_span.kind == SpanKind.CONSUMER
    assert run_span.context.trace_id == request.context.trace_id
    assert run_span.parent.span_id == request.context.span_id
    assert run_span.parent.is_remote
    assert dict(run_span.attributes) == {
        "openworkflow.run_id": str(run.pk),
        "openworkflow.workflow": "three-steps",
        "openworkflow.resume_generation": 0,
        "openworkflow.queue": "default",
        "openworkflow.attempt": 1,
        "openworkflow.status": "completed",
        "openworkflow.outcome": "completed",
    }
    assert run_span.status.status_code == StatusCode.UNSET
    for name in ("s0", "s1", "s2"):
        step = spans.one(f"step {name}")
        assert step.kind == SpanKind.INTERNAL
        assert step.context.trace_id == request.context.trace_id
        assert step.parent.span_id == run_span.context.span_id
        assert dict(step.attributes) == {
            "openworkflow.run_id": str(run.pk),
            "openworkflow.workflow": "three-steps",
            "openworkflow.step": name,
            "openworkflow.attempt": 1,
            "openworkflow.resume_generation": 0,
            "openworkflow.outcome": "completed",
        }
        assert run_span.start_time <= step.start_time <= step.end_time <= run_span.end_time


@pytest.mark.django_db
def test_the_pass_span_is_current_in_workflow_code_and_the_step_span_in_the_step(spans):
    seen.clear()
    with spans.tracer.start_as_current_span("request"):
        run = get_workflow("traced-sees-its-span").start()
    drain()
    run.refresh_from_db()
    run_span = spans.one("workflow traced-sees-its-span")
    step = spans.one("step look")
    assert seen == {"workflow": run_span.context, "step": step.context}
    # A run started by the step's code continues from the step's span.
    started = WorkflowRun.objects.get(pk=run.output)
    assert started.trace_context == {"traceparent": traceparent(step)}
    assert spans.one("workflow echo").parent.span_id == step.context.span_id


@pytest.mark.django_db
@pytest.mark.parametrize("runner", ["worker", "testing"])
def test_the_step_span_is_current_in_an_async_step_and_its_sync_calls(spans, runner):
    seen.clear()
    run = get_workflow("traced-async-step").start()
    try:
        if runner == "worker":  # the worker's own way: this thread's StepLoop
            claim_and_execute()
        else:
            drain()
    finally:
        loops.close_thread_loop()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", 1)
    step = spans.one("step look")
    assert seen == {"async step": step.context, "its sync call": step.context}


@pytest.mark.django_db
def test_every_pass_of_a_run_is_a_span_of_the_same_trace_and_retries_count_attempts(spans):
    with spans.tracer.start_as_current_span("request") as request:
        run = get_workflow("flaky").start({"failures": 2})
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED
    passes = spans.named("workflow flaky")
    assert len(passes) == 3
    assert {p.context.trace_id for p in passes} == {request.context.trace_id}
    assert {p.parent.span_id for p in passes} == {request.context.span_id}
    assert len({p.context.span_id for p in passes}) == 3
    assert [p.attributes["openworkflow.outcome"] for p in passes] == [
        "parked",
        "parked",
        "completed",
    ]
    attempts = steps(spans, "flaky")
    assert [s.attributes["openworkflow.attempt"] for s in attempts] == [1, 2, 3]
    for number, step in enumerate(attempts[:2], start=1):
        assert step.status.status_code == StatusCode.ERROR
        assert step.status.description == "ValueError"
        assert step.attributes["openworkflow.outcome"] == "failed"
        [event] = exception_events(step)
        assert event["exception.type"] == "ValueError"
        assert event["exception.message"] == f"boom {number}"
        assert 'raise ValueError(f"boom {done}")' in event["exception.stacktrace"]
    assert attempts[2].status.status_code == StatusCode.UNSET
    assert exception_events(attempts[2]) == []


@pytest.mark.django_db
def test_a_failed_run_is_a_span_with_status_error_and_the_runs_error(spans):
    with spans.tracer.start_as_current_span("request"):
        run = get_workflow("reserve-then-charge").start({"failures": 1})
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.FAILED
    run_span = spans.one("workflow reserve-then-charge")
    assert run_span.status.status_code == StatusCode.ERROR
    assert run_span.status.description == run.error["type"]
    assert run_span.attributes["openworkflow.status"] == "failed"
    [event] = exception_events(run_span)
    assert event["exception.type"] == run.error["type"]
    assert event["exception.message"] == run.error["message"]
    charge = spans.one("step charge")
    assert charge.status.status_code == StatusCode.ERROR
    assert exception_events(charge)[0]["exception.message"] == "card declined"


@pytest.mark.django_db
def test_an_interrupted_pass_is_a_crashed_span_with_the_exception(spans):
    run = get_workflow("interrupted-once").start()
    with pytest.raises(KeyboardInterrupt):
        drain()
    run_span = spans.one("workflow interrupted-once")
    step = spans.one("step step")
    for span in (run_span, step):
        assert span.status.status_code == StatusCode.ERROR
        assert span.attributes["openworkflow.outcome"] == "crashed"
        [event] = exception_events(span)
        assert event["exception.type"] == "KeyboardInterrupt"
    assert run_span.status.description == "crashed"
    # The next pass (the lease ran out) is a new span of the same trace.
    WorkflowRun.objects.filter(pk=run.pk).update(available_at=Now())
    drain()
    second = spans.named("workflow interrupted-once")[1]
    assert second.context.trace_id == run_span.context.trace_id
    assert second.attributes["openworkflow.outcome"] == "completed"


@pytest.mark.django_db
def test_a_step_whose_run_was_canceled_meanwhile_is_lost_not_failed(spans):
    run = get_workflow("three-steps").start()

    def cancel(context):
        WorkflowRun.objects.cancel(run.pk)

    add_hook("step.before-fence", cancel)
    try:
        drain()
    finally:
        remove_hook("step.before-fence", cancel)
    run_span = spans.one("workflow three-steps")
    assert run_span.attributes["openworkflow.outcome"] == "lost"
    assert run_span.status.status_code == StatusCode.UNSET
    assert spans.named("step s0") == []


@pytest.mark.parametrize(
    ("exc", "outcome", "status"),
    [(ClaimLost(), "lost", StatusCode.UNSET), (Suspend("child"), "parked", StatusCode.UNSET)],
)
def test_a_step_the_engine_unwinds_through_is_no_failure(spans, exc, outcome, status):
    run = WorkflowRun(workflow_name="echo", queue="default", attempts=0, resume_generation=0)
    observer = tracing.instrument.execution(run)
    observer.step_started(StepAttempt(step_name="s", resume_generation=0), 1).ended(None, exc=exc)
    observer.ended(outcome)
    step = spans.one("step s")
    assert step.attributes["openworkflow.outcome"] == outcome
    assert step.status.status_code == status
    assert exception_events(step) == []


@pytest.mark.django_db
def test_a_resumed_run_goes_on_in_its_trace_with_a_link_to_the_resume(spans):
    with spans.tracer.start_as_current_span("request") as request:
        run = get_workflow("reserve-then-charge").start({"failures": 1})
    drain()
    with spans.tracer.start_as_current_span("resume request") as resumer:
        WorkflowRun.objects.resume(run.pk)
    run.refresh_from_db()
    assert run.trace_context == {
        "traceparent": traceparent(request),
        "resumed": {"generation": 1, "traceparent": traceparent(resumer)},
    }
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED
    first, second = spans.named("workflow reserve-then-charge")
    assert first.links == ()
    assert second.attributes["openworkflow.resume_generation"] == 1
    assert second.context.trace_id == request.context.trace_id
    assert second.parent.span_id == request.context.span_id
    [link] = second.links
    assert link.context.trace_id == resumer.context.trace_id
    assert link.context.span_id == resumer.context.span_id
    assert dict(link.attributes) == {"openworkflow.link": "resume"}
    charges = spans.named("step charge")
    assert [c.attributes["openworkflow.resume_generation"] for c in charges] == [0, 1]
    assert charges[1].parent.span_id == second.context.span_id
    assert charges[1].status.status_code == StatusCode.UNSET


@pytest.mark.django_db
def test_a_rerun_run_goes_on_in_its_trace_with_a_link_to_the_rerun(spans):
    with spans.tracer.start_as_current_span("request") as request:
        run = get_workflow("three-steps").start({"i": 1})
    drain()
    with spans.tracer.start_as_current_span("rerun request") as rerunner:
        WorkflowRun.objects.rerun(run.pk, from_step="s1")
    run.refresh_from_db()
    assert run.trace_context == {
        "traceparent": traceparent(request),
        "resumed": {"generation": 1, "traceparent": traceparent(rerunner)},
    }
    drain()
    [first, second] = spans.named("workflow three-steps")
    assert first.links == ()
    assert second.attributes["openworkflow.resume_generation"] == 1
    assert second.parent.span_id == request.context.span_id
    [link] = second.links
    assert link.context.span_id == rerunner.context.span_id
    assert [s.attributes["openworkflow.resume_generation"] for s in spans.named("step s1")] == [
        0,
        1,
    ]
    assert len(spans.named("step s0")) == 1  # served


@pytest.mark.django_db
def test_a_resume_outside_any_span_keeps_the_trace_context_and_links_nothing(spans):
    with spans.tracer.start_as_current_span("request") as request:
        run = get_workflow("reserve-then-charge").start({"failures": 1})
    drain()
    WorkflowRun.objects.resume(run.pk)
    run.refresh_from_db()
    assert run.trace_context == {"traceparent": traceparent(request)}
    drain()
    second = spans.named("workflow reserve-then-charge")[1]
    assert second.links == ()
    assert second.parent.span_id == request.context.span_id


@pytest.mark.django_db
def test_a_link_is_for_the_passes_of_its_resume_only(spans):
    with spans.tracer.start_as_current_span("request"):
        run = get_workflow("reserve-then-charge").start({"failures": 2})
    drain()
    with spans.tracer.start_as_current_span("resume request"):
        WorkflowRun.objects.resume(run.pk)
    drain()
    WorkflowRun.objects.resume(run.pk)  # from a shell: no span
    drain()
    passes = spans.named("workflow reserve-then-charge")
    assert [len(p.links) for p in passes] == [0, 1, 0]


@pytest.mark.django_db
def test_a_child_run_continues_from_its_parents_pass(spans):
    with spans.tracer.start_as_current_span("request") as request:
        run = get_workflow("parent").start({"child": "echo", "child_input": 1})
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED
    first_pass = spans.named("workflow parent")[0]
    child = WorkflowRun.objects.get(workflow_name="echo")
    assert child.trace_context == {"traceparent": traceparent(first_pass)}
    child_span = spans.one("workflow echo")
    assert child_span.context.trace_id == request.context.trace_id
    assert child_span.parent.span_id == first_pass.context.span_id


@pytest.mark.django_db(transaction=True)
def test_parallel_steps_are_children_of_the_pass_on_their_own_threads(spans):
    with spans.tracer.start_as_current_span("request"):
        get_workflow("fan-out").start({})
    drain_with_workers()
    run_span = spans.one("workflow fan-out")
    branches = [spans.one(f"step {label}") for label in ("a", "b", "c")]
    assert {b.parent.span_id for b in branches} == {run_span.context.span_id}
    assert {b.context.trace_id for b in branches} == {run_span.context.trace_id}
    assert spans.one("step join").parent.span_id == run_span.context.span_id


@pytest.mark.django_db
def test_start_many_stores_the_callers_context_on_every_run(spans):
    with spans.tracer.start_as_current_span("import") as request:
        runs = get_workflow("echo").start_many([1, 2])
    expected = {"traceparent": traceparent(request)}
    assert [WorkflowRun.objects.get(pk=r.pk).trace_context for r in runs] == [expected] * 2


@pytest.mark.django_db
def test_a_start_without_a_span_is_a_root_span_the_passes_share(spans):
    run = get_workflow("flaky").start({"failures": 1})
    start = spans.one("start flaky")
    assert start.parent is None
    assert start.kind == SpanKind.PRODUCER
    assert dict(start.attributes) == {"openworkflow.workflow": "flaky", "openworkflow.runs": 1}
    assert run.trace_context == {"traceparent": traceparent(start)}
    drain()
    passes = spans.named("workflow flaky")
    assert len(passes) == 2
    assert {p.parent.span_id for p in passes} == {start.context.span_id}


@pytest.mark.django_db
def test_a_start_without_a_span_and_without_a_tracer_provider_stores_nothing():
    assert tracing.instrument.tracer() is None  # the global provider: nobody configured it
    run = get_workflow("echo").start(1)
    assert WorkflowRun.objects.get(pk=run.pk).trace_context is None
    assert instruments.execution(run) is instruments.NOTHING


def test_without_a_tracer_provider_a_pass_looks_for_one_at_most_once_a_second(monkeypatch):
    looks = []
    api = tracing._otel()
    monkeypatch.setattr(api.trace, "get_tracer_provider", lambda: looks.append(1) or PROXY)
    clock = [1000.0]
    monkeypatch.setattr(tracing.time, "monotonic", lambda: clock[0])
    instrument = tracing.TracingInstrument()
    for _ in range(3):
        assert instrument.tracer() is None
    assert len(looks) == 1
    clock[0] += tracing.RECHECK
    assert instrument.tracer() is None
    assert len(looks) == 2


PROXY = trace.ProxyTracerProvider()


@pytest.mark.django_db
def test_a_span_current_without_a_tracer_provider_is_still_propagated():
    # A request traced upstream (an incoming traceparent) in a process without the SDK.
    context = trace.SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=trace.TraceFlags(1))
    with trace.use_span(trace.NonRecordingSpan(context)):
        run = get_workflow("echo").start(1)
    run = WorkflowRun.objects.get(pk=run.pk)
    assert run.trace_context == {"traceparent": f"00-{0xABC:032x}-{0xDEF:016x}-01"}


@pytest.mark.django_db
def test_a_schedules_tick_is_a_root_span_the_run_continues(spans):
    WorkflowSchedule.objects.create(
        name="traced-every-15",
        workflow_name="tick",
        cron="*/15 * * * *",
        timezone="UTC",
        next_run_at=timezone.now() - timedelta(days=1),
    )
    [run] = WorkflowSchedule.objects.fire_due("default", ["tick"])
    start = spans.one("start tick")
    assert WorkflowRun.objects.get(pk=run.pk).trace_context == {"traceparent": traceparent(start)}


@pytest.mark.django_db
def test_tracing_off_stores_no_context_and_makes_no_spans(spans):
    with override_settings(OPENWORKFLOW={"TRACING": False}):
        with spans.tracer.start_as_current_span("request"):
            run = get_workflow("echo").start(1)
        assert WorkflowRun.objects.get(pk=run.pk).trace_context is None
        drain()
    assert [s.name for s in spans.exporter.get_finished_spans()] == ["request"]


@pytest.mark.parametrize("value", [1, "yes", None])
def test_a_tracing_setting_that_is_not_a_bool_is_reported(value):
    with override_settings(OPENWORKFLOW={"TRACING": value}):
        [error] = check_settings()
    assert (error.id, error.msg) == (
        "django_openworkflow.E017",
        f"OPENWORKFLOW['TRACING'] must be True or False, not {value!r}.",
    )


@pytest.mark.parametrize(
    "stored",
    [
        ["not", "a", "carrier"],
        {"traceparent": 5, "baggage": 7, "resumed": {"generation": 0, "traceparent": 5}},
        {"traceparent": "00-garbage", "resumed": {"generation": 0, "traceparent": "x"}},
    ],
)
@pytest.mark.django_db
def test_a_stored_context_the_propagators_cannot_read_is_ignored(spans, stored):
    run = get_workflow("echo").start(1)
    WorkflowRun.objects.filter(pk=run.pk).update(trace_context=stored)
    drain()
    run_span = spans.one("workflow echo")
    assert (run_span.parent, run_span.links) == (None, ())
    assert run_span.attributes["openworkflow.outcome"] == "completed"


def test_django_setup_does_not_import_opentelemetry():
    code = (
        "import sys, django; django.setup(); "
        "from django_openworkflow import instruments, tracing; "
        "print(tracing.instrument in instruments._instruments, "
        "'opentelemetry.trace' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.split() == ["True", "False"], done.stderr


@pytest.mark.django_db
def test_a_worker_imports_opentelemetry_before_its_first_claim(monkeypatch):
    # The import takes tens of milliseconds: in the first pass every slot would wait on it.
    from django_openworkflow import worker as worker_module

    imported = []
    monkeypatch.setattr(
        worker_module.Worker,
        "_loop",
        lambda self, names: imported.append(tracing._api not in (None, False)),
    )
    monkeypatch.setattr(tracing, "_api", None)
    monkeypatch.setattr(tracing.instrument, "idle", False)
    worker_module.Worker(burst=True, concurrency=1).run()
    assert imported == [True]
    # No provider configured when it started: its passes skip tracing without looking.
    assert tracing.instrument.idle is True
    monkeypatch.setattr(tracing.instrument, "tracer", lambda: pytest.fail("looked again"))
    assert tracing.instrument.execution(WorkflowRun(workflow_name="echo")) is None


# --- across processes ------------------------------------------------------------------


def worker_env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "OPENWORKFLOW_TEST_DB": str(connection.settings_dict["NAME"]),
        "PYTHONPATH": str(ROOT),
        **extra,
    }


@pytest.mark.django_db(transaction=True)
def test_a_runworker_process_continues_the_trace_of_the_caller(spans, tmp_path):
    span_file = tmp_path / "spans.jsonl"
    with spans.tracer.start_as_current_span("request") as request:
        run = get_workflow("three-steps").start({"i": 2})
    subprocess.run(
        [sys.executable, "-m", "django", "runworker", "--burst"],
        cwd=ROOT,
        env=worker_env(
            DJANGO_SETTINGS_MODULE="tests.settings_tracing", OPENWORKFLOW_TEST_SPANS=str(span_file)
        ),
        check=True,
        timeout=120,
    )
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.COMPLETED
    exported = [json.loads(line) for line in span_file.read_text().splitlines()]
    by_name = {s["name"]: s for s in exported}
    assert sorted(by_name) == ["step s0", "step s1", "step s2", "workflow three-steps"]
    trace_id = f"{request.context.trace_id:032x}"
    assert {s["trace_id"] for s in exported} == {trace_id}
    run_span = by_name["workflow three-steps"]
    assert run_span["parent_id"] == f"{request.context.span_id:016x}"
    assert run_span["attributes"]["openworkflow.run_id"] == str(run.pk)
    for name in ("s0", "s1", "s2"):
        assert by_name[f"step {name}"]["parent_id"] == run_span["span_id"]


BLOCKED = """
import sys
sys.modules["opentelemetry"] = None  # as if opentelemetry-api were not installed
import django
django.setup()
from django.core.management import call_command
from django_openworkflow import tracing
from django_openworkflow.models import WorkflowRun
from django_openworkflow.registry import get_workflow
run = get_workflow("three-steps").start({"i": 3})
call_command("runworker", "--burst")
run.refresh_from_db()
imported = sorted(m for m in sys.modules if m.startswith("opentelemetry.") and sys.modules[m])
print(run.status, run.trace_context, tracing.available(), imported)
"""


@pytest.mark.django_db(transaction=True)
def test_the_package_works_without_opentelemetry():
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED],
        cwd=ROOT,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "completed None False []"


@pytest.mark.django_db
def test_a_pass_whose_workflow_function_raised_and_is_retried_is_an_error_span(spans):
    with spans.tracer.start_as_current_span("request"):
        run = get_workflow("workflow-retries").start()
    drain()
    run.refresh_from_db()
    assert run.status == WorkflowRun.Status.FAILED
    passes = spans.named("workflow workflow-retries")
    assert [p.attributes["openworkflow.outcome"] for p in passes] == [
        "retrying",
        "retrying",
        "failed",
    ]
    for number, span in enumerate(passes, start=1):
        assert span.attributes["openworkflow.attempt"] == number
        assert span.status.status_code == StatusCode.ERROR
        assert span.status.description == "KeyError"
        [event] = exception_events(span)
        assert event["exception.type"] == "KeyError"
