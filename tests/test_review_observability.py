"""Adversarial review of issue 14 (observability): faults the engine's hooks, the
registry and the reload should survive. Each test demonstrated a finding of the
review (written first as ``xfail(strict=True)``, failing before its fix).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import threading
import time
from datetime import timedelta

import pytest
from django.db import DatabaseError, InterfaceError
from django.utils import timezone
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from django_openworkflow import tracing, workflow
from django_openworkflow.durations import RetryPolicy
from django_openworkflow.logging import JSONFormatter
from django_openworkflow.models import WorkflowRun, WorkflowWorker
from django_openworkflow.pauses import add_hook, remove_hook
from django_openworkflow.testing import drain
from django_openworkflow.workers import Presence
from tests.conftest import WorkerThreads

# --- workflows of these tests ---------------------------------------------------------

gates: dict[str, threading.Event] = {}
opened = threading.Event()  # set: every gate is open (a test's end)


def gate(name: str) -> threading.Event:
    event = gates.setdefault(name, threading.Event())
    if opened.is_set():
        event.set()
    return event


@workflow(name="obs-review-two-steps")
def two_steps(ctx):
    a = ctx.step.run("a", lambda: 1)
    b = ctx.step.run("b", lambda: 2)
    return a + b


@workflow(name="obs-review-gated")
def gated(ctx):
    """Step a waits for gate "a-go" (and says it started); step b likewise with "b-go"."""

    def step(name):
        gate(f"{name}-started").set()
        assert gate(f"{name}-go").wait(30), f"gate {name}-go never opened"
        return name

    return [ctx.step.run("a", lambda: step("a")), ctx.step.run("b", lambda: step("b"))]


# --- a broken span processor (a user's, or a vendor's) ----------------------------------


class Broken(SpanProcessor):
    """Raises at the start or the end of the spans whose name starts with ``prefix``."""

    def __init__(self, when: str, prefix: str) -> None:
        self.when = when
        self.prefix = prefix

    def on_start(self, span, parent_context=None):
        if self.when == "start" and span.name.startswith(self.prefix):
            raise RuntimeError("span processor down")

    def on_end(self, span):
        if self.when == "end" and span.name.startswith(self.prefix):
            raise RuntimeError("span processor down")


@pytest.fixture
def broken_tracing():
    previous = tracing.instrument.tracer_provider

    def install(when: str, prefix: str) -> InMemorySpanExporter:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(Broken(when, prefix))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracing.instrument.tracer_provider = provider
        return exporter

    yield install
    tracing.instrument.tracer_provider = previous


def in_a_context_of_its_own(fn) -> trace.Span:
    """Call ``fn`` (what it raises is ignored) in a copy of this thread's context; the
    span current in that context after it (a context left attached by ``fn`` stays there,
    and never leaks into the other tests)."""

    def call():
        with contextlib.suppress(RuntimeError):
            fn()
        return trace.get_current_span()

    return contextvars.copy_context().run(call)


def final(run: WorkflowRun) -> WorkflowRun:
    return WorkflowRun.objects.get(pk=run.pk)


@pytest.mark.django_db
def test_a_span_processor_failing_at_a_steps_start_does_not_fail_the_run(broken_tracing):
    broken_tracing("start", "step ")
    run = two_steps.start()
    drain()
    run = final(run)
    assert (run.status, run.output, run.error) == ("completed", 3, None)


@pytest.mark.django_db
def test_a_span_processor_failing_at_a_steps_end_does_not_fail_the_run(broken_tracing):
    broken_tracing("end", "step ")
    run = two_steps.start()
    leaked = in_a_context_of_its_own(drain)
    run = final(run)
    assert (run.status, run.output, run.error) == ("completed", 3, None)
    assert leaked is trace.INVALID_SPAN  # no step span left current on this thread


@pytest.mark.django_db
def test_a_span_processor_failing_at_a_passs_start_does_not_stop_the_run(broken_tracing):
    broken_tracing("start", "workflow ")
    run = two_steps.start()
    drain()
    assert final(run).status == "completed"


@pytest.mark.django_db
def test_a_span_processor_failing_at_a_passs_end_leaves_no_context_attached(broken_tracing):
    broken_tracing("end", "workflow ")
    run = two_steps.start()
    leaked = in_a_context_of_its_own(drain)
    assert final(run).status == "completed"
    assert leaked is trace.INVALID_SPAN


@pytest.mark.django_db
def test_a_span_processor_failing_at_the_start_span_starts_the_run_untraced(broken_tracing):
    broken_tracing("start", "start ")
    in_a_context_of_its_own(two_steps.start)
    run = final_only()
    assert run.trace_context is None
    drain()
    assert final(run).status == "completed"


@pytest.mark.django_db
def test_a_span_processor_failing_at_the_start_spans_end_leaves_no_context_attached(
    broken_tracing,
):
    broken_tracing("end", "start ")
    leaked = in_a_context_of_its_own(two_steps.start)
    assert leaked is trace.INVALID_SPAN
    run = final_only()
    assert set(run.trace_context) == {"traceparent"}  # the start span's, ended or not
    drain()
    assert final(run).status == "completed"


def final_only() -> WorkflowRun:
    [run] = WorkflowRun.objects.all()
    return run


# --- a worker in this process -------------------------------------------------------------


def wait_for(condition, timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"{what} not reached within {timeout}s"
        time.sleep(0.02)


@pytest.fixture
def worker_thread():
    workers = WorkerThreads(poll_interval=0.05, concurrency=1)
    gates.clear()
    opened.clear()
    yield workers.start
    opened.set()
    for event in list(gates.values()):
        event.set()
    workers.stop_all()


def due(run: WorkflowRun) -> bool:
    return WorkflowRun.objects.due().filter(pk=run.pk).exists()


@pytest.mark.django_db(transaction=True)
def test_a_run_released_for_a_reload_stays_released(worker_thread):
    worker = worker_thread(worker_id="reloading", lease_seconds=30)
    run = gated.start()
    assert gate("a-started").wait(20)
    worker.stop()  # as stop_for_reload() does: no new run, then the release after the grace
    assert worker.release_in_flight() == 1
    assert due(run)  # released: the new process may claim it now
    gate("a-go").set()  # the old process goes on for a moment (its exit is not immediate)
    wait_for(lambda: worker.busy_slots == 0, what="the old process's pass to end")
    assert due(run), "the old process took the lease of the run it released back"
    assert not gate("b-started").is_set(), "the old process went on with the run it released"
    assert WorkflowRun.objects.get(pk=run.pk).claim_token is None


@pytest.mark.django_db(transaction=True)
def test_the_heartbeat_leaves_a_released_run_released(worker_thread):
    beats = []
    add_hook("heartbeat.before-renew", beats.append)
    try:
        worker = worker_thread(worker_id="reloading", lease_seconds=0.6)
        run = gated.start()
        assert gate("a-started").wait(20)
        assert worker.release_in_flight() == 1
        assert due(run)
        after = len(beats)
        # The heartbeat that began after the release has renewed once the next one begins.
        wait_for(lambda: len(beats) >= after + 2, what="two heartbeats after the release")
        assert due(run), "the old process's heartbeat renewed the lease of the released run"
    finally:
        remove_hook("heartbeat.before-renew", beats.append)


@pytest.mark.django_db(transaction=True)
def test_the_heartbeat_survives_an_interface_error(worker_thread):
    calls = []

    def hook(context):
        calls.append(context)
        if len(calls) == 1:
            raise InterfaceError("(0, '')")

    add_hook("heartbeat.before-renew", hook)
    try:
        worker_thread(worker_id="beats-on", lease_seconds=0.6)
        gated.start()
        assert gate("a-started").wait(20)
        wait_for(lambda: len(calls) >= 2, timeout=10, what="a heartbeat after the failed one")
    finally:
        remove_hook("heartbeat.before-renew", hook)


@pytest.mark.django_db(transaction=True)
def test_a_heartbeat_failure_logs_the_errors_type_and_first_line_only(worker_thread, caplog):
    caplog.set_level(logging.DEBUG, logger="django_openworkflow")
    calls = []
    text = (
        "duplicate key value violates unique constraint\n"
        "DETAIL:  Key (email)=(alice@example.com) already exists."
    )

    def hook(context):
        calls.append(context)
        if len(calls) == 1:
            raise DatabaseError(text)

    add_hook("heartbeat.before-renew", hook)
    try:
        worker_thread(worker_id="beats-on", lease_seconds=0.6)
        gated.start()
        assert gate("a-started").wait(20)
        wait_for(lambda: len(calls) >= 2, timeout=10, what="a heartbeat after the failed one")
    finally:
        remove_hook("heartbeat.before-renew", hook)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "heartbeat failed" in r.msg]
    assert lines == [
        (
            logging.WARNING,
            "heartbeat failed worker=beats-on error=DatabaseError "
            "detail=duplicate key value violates unique constraint",
        ),
        (logging.DEBUG, f"heartbeat failed worker=beats-on detail=DatabaseError: {text}"),
    ]


# --- how a pass ended, as the observers are told -------------------------------------------


@workflow(name="obs-review-canceled-in-its-last-step")
def canceled_in_its_last_step(ctx):
    """Its run is canceled while its last step runs: the finish finds the claim lost."""

    def cancel():
        WorkflowRun.objects.cancel(ctx.run_id)
        return 1

    return ctx.step.run("cancel", cancel)


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    previous = tracing.instrument.tracer_provider
    tracing.instrument.tracer_provider = provider
    yield exporter
    tracing.instrument.tracer_provider = previous


@pytest.mark.django_db
def test_a_pass_whose_finish_finds_the_run_canceled_is_lost(spans):
    run = canceled_in_its_last_step.start()
    drain()
    assert final(run).status == "canceled"
    [span] = [s for s in spans.get_finished_spans() if s.name.startswith("workflow ")]
    assert span.attributes["openworkflow.outcome"] == "lost"


# --- the registry: a worker restarted under its --worker-id ---------------------------------


@pytest.mark.django_db
def test_an_old_process_stopping_after_its_restart_leaves_the_new_one_live():
    def presence() -> Presence:
        return Presence(
            "fixed-id", namespace="default", concurrency=2, queues=None, using="default"
        )

    old, new = presence(), presence()
    old.register(["echo"])
    new.register(["echo"])  # the restart, while the old process still drains its runs
    old.stop()
    assert WorkflowWorker.objects.with_state().get(pk="fixed-id").state == "live"


# --- logs: names go into key=value lines unquoted ----------------------------------------


@workflow(name="obs-review-step-named-from-data")
def step_named_from_data(ctx):
    def fail():
        raise ValueError("no")

    return ctx.step.run(ctx.input, fail, retry_policy=RetryPolicy(maximum_attempts=1))


@pytest.mark.django_db
def test_the_json_formatter_keeps_a_step_name_holding_key_value_text(caplog):
    caplog.set_level(logging.INFO, logger="django_openworkflow")
    run = step_named_from_data.start("charge run=1 error=None")
    drain()
    [record] = [r for r in caplog.records if r.getMessage().startswith("step failed")]
    fields = json.loads(JSONFormatter().format(record))["fields"]
    assert (fields["run"], fields["step"], fields["error"]) == (
        str(run.pk),
        "charge run=1 error=None",
        "ValueError",
    )


# --- metrics: runs failed outside a pass ----------------------------------------------------


@pytest.fixture
def metrics():
    from django_openworkflow.instruments import install, uninstall
    from django_openworkflow.metrics import WorkerMetrics

    found = WorkerMetrics()
    install(found)
    yield found
    uninstall(found)


@workflow(name="obs-review-sleeps-past-its-deadline")
def sleeps_past_its_deadline(ctx):
    ctx.step.sleep("nap", "1h")
    return 1


@pytest.mark.django_db
def test_a_run_the_deadline_sweep_fails_is_counted_failed(metrics):
    from django_openworkflow.store import get_store

    run = sleeps_past_its_deadline.start(deadline_at=timezone.now() + timedelta(minutes=1))
    drain(time_travel=False)  # it sleeps
    WorkflowRun.objects.filter(pk=run.pk).update(deadline_at=timezone.now() - timedelta(seconds=1))
    assert get_store().fail_overdue("default") == 1  # a worker's sweep
    assert final(run).status == "failed"
    finished = metrics.registry.get_sample_value(
        "openworkflow_runs_finished_total",
        {"workflow": "obs-review-sleeps-past-its-deadline", "status": "failed"},
    )
    assert finished == 1


class PassesOnly:
    """An instrument without ``runs_ended`` (a project's own, written before it existed)."""

    def execution(self, run):
        return None


class RaisesAtTheSweep(PassesOnly):
    def runs_ended(self, status, workflow_names):
        raise RuntimeError("broken")


@pytest.mark.django_db
def test_the_sweep_fails_its_runs_whatever_the_other_instruments_do(metrics, caplog):
    from django_openworkflow.instruments import install, uninstall
    from django_openworkflow.store import get_store

    others = [PassesOnly(), RaisesAtTheSweep()]
    for instrument in others:
        install(instrument)
    try:
        run = sleeps_past_its_deadline.start(deadline_at=timezone.now() + timedelta(minutes=1))
        drain(time_travel=False)
        WorkflowRun.objects.filter(pk=run.pk).update(
            deadline_at=timezone.now() - timedelta(seconds=1)
        )
        assert get_store().fail_overdue("default") == 1
    finally:
        for instrument in others:
            uninstall(instrument)
    assert final(run).status == "failed"
    assert (
        "instrument failed, the runs go on without it (logged once per instrument) "
        "instrument=RaisesAtTheSweep at=runs_ended error=RuntimeError"
    ) in caplog.messages
    finished = metrics.registry.get_sample_value(
        "openworkflow_runs_finished_total",
        {"workflow": "obs-review-sleeps-past-its-deadline", "status": "failed"},
    )
    assert finished == 1
