"""OpenTelemetry: a span per pass of a run, a child span per step attempt, and trace context.

With ``opentelemetry-api`` installed (the ``[otel]`` extra) and
``OPENWORKFLOW["TRACING"]`` true (the default):

- ``start()``, ``start_many()``, a child run started by a step and a
  schedule's tick store the current W3C trace context on the run
  (``WorkflowRun.trace_context``: what the global propagator injects,
  ``traceparent`` and ``tracestate``, ``baggage`` too by default). No span is
  current but a tracer provider is configured: the start is a root span
  ``start <workflow>`` of its own, so every pass of the run shares its trace.
- Each pass is a span ``workflow <name>`` (kind CONSUMER: a worker took the
  run from a queue that ``start()`` filled, as a message consumer does), whose
  parent is the stored context: the passes of a run, in any process and after
  any resume, are in the trace of the code that started it. It is the current
  span on the workflow's thread during the pass, so user code and the runs it
  starts see it.
- Each step attempt is a span ``step <name>`` (kind INTERNAL), a child of the
  pass's span, current on the thread that calls the step's function (a pool
  thread for ``step.parallel``).
- ``WorkflowRun.objects.resume()`` inside a span stores that span's context
  under ``trace_context["resumed"]`` with the new resume generation; the
  passes of that generation carry a link to it (no migration: a key of the
  JSON column, which the propagators never read).

Nothing is done, and ``opentelemetry`` is not even imported, until the first
start or pass; when no tracer provider is configured (the API's default proxy
or no-op provider), passes make no spans at all: one check per pass, none per
step. See docs/tracing.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from . import instruments
from .conf import app_settings

if TYPE_CHECKING:
    from .models import StepAttempt, WorkflowRun

TRACER_NAME = "django_openworkflow"
RESUMED = "resumed"  # the key of trace_context holding the last resume's context

RECHECK = 1.0  # seconds between two looks for a global tracer provider while there is none

_api: Any = None  # the OpenTelemetry modules once imported; False: not installed


def _otel() -> Any:
    """The OpenTelemetry API (imported on first use), or None when it is not installed."""
    global _api
    if _api is None:
        try:
            from opentelemetry import context, propagate, trace
            from opentelemetry.trace import Link, SpanKind, Status, StatusCode
        except ImportError:
            _api = False
        else:
            _api = SimpleNamespace(
                context=context,
                propagate=propagate,
                trace=trace,
                Link=Link,
                SpanKind=SpanKind,
                Status=Status,
                StatusCode=StatusCode,
                unconfigured=(trace.ProxyTracerProvider, trace.NoOpTracerProvider),
            )
    return _api or None


def available() -> bool:
    """``opentelemetry-api`` is installed (found without importing it)."""
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except (ImportError, ValueError):
        return False


class TracingInstrument:
    """The instrument (``instruments.py``) making the spans of passes and steps.

    ``tracer_provider``: None (the default) uses the global provider, which a
    project configures with ``trace.set_tracer_provider()``; tests give one of
    their own, since the global provider can be set once per process.
    """

    def __init__(self, tracer_provider: Any = None) -> None:
        self.tracer_provider = tracer_provider
        self._global: Any = None  # the global provider once configured (it never changes then)
        self._unconfigured_until = 0.0  # time.monotonic() until which none is configured
        self.idle = False  # a worker started without a provider: its passes are not traced
        self._tracer: tuple[Any, Any] | None = None  # (provider, its tracer)

    def tracer(self) -> Any:
        """The tracer, or None when tracing is off or no tracer provider is configured.

        Checked at each start and pass: the provider first (with none
        configured, that is all a pass costs), then the setting.
        """
        api = _otel()
        if api is None:
            return None
        provider = self.tracer_provider or self._global or self.global_provider(api)
        if provider is None or not app_settings.TRACING:
            return None
        cached = self._tracer
        if cached is None or cached[0] is not provider:
            from . import __version__

            cached = self._tracer = (provider, provider.get_tracer(TRACER_NAME, __version__))
        return cached[1]

    def global_provider(self, api: Any) -> Any:
        """The global tracer provider, or None while nobody configured one (the API's proxy).

        While none is configured the answer is kept for ``RECHECK`` seconds: a
        worker without the SDK pays a clock read per pass, and one that
        configures it late starts tracing within that time.
        """
        now = time.monotonic()
        if now < self._unconfigured_until:
            return None
        provider = api.trace.get_tracer_provider()
        if isinstance(provider, api.unconfigured):
            self._unconfigured_until = now + RECHECK
            return None
        self._global = provider  # set once per process: OpenTelemetry refuses to replace it
        return provider

    def prepare(self) -> None:
        """A worker's start: import the API and look for a provider now, not in a pass (the
        import takes tens of milliseconds, which the first passes would wait for).

        With no provider configured by then (the project configures it in its
        settings or an ``AppConfig.ready()``, which run before), the worker's
        passes skip tracing without looking again: measured, even the look cost
        its throughput.
        """
        self.idle = self.tracer() is None

    def execution(self, run: WorkflowRun) -> ExecutionSpan | None:
        if self.idle and self.tracer_provider is None:
            return None
        tracer = self.tracer()
        return None if tracer is None else ExecutionSpan(_otel(), tracer, run)


instrument = TracingInstrument()


def install() -> None:
    """Install the instrument when ``opentelemetry-api`` is installed (``AppConfig.ready``)."""
    if available():
        instruments.install(instrument)


class ExecutionSpan:
    """The span of one pass (an ``ExecutionObserver``), current on the workflow's thread."""

    def __init__(self, api: Any, tracer: Any, run: WorkflowRun) -> None:
        self.api = api
        self.tracer = tracer
        self.run = run
        self.run_id = str(run.pk)
        stored = run.trace_context if isinstance(run.trace_context, dict) else {}
        parent = extract(api, stored)
        self.span = tracer.start_span(
            f"workflow {run.workflow_name}",
            context=parent,
            kind=api.SpanKind.CONSUMER,
            attributes={
                "openworkflow.run_id": self.run_id,
                "openworkflow.workflow": run.workflow_name,
                "openworkflow.resume_generation": run.resume_generation,
                "openworkflow.queue": run.queue,
                "openworkflow.attempt": run.attempts + 1,
            },
            links=resume_links(api, stored, run.resume_generation),
        )
        self.context = api.trace.set_span_in_context(self.span, parent)
        self.token = api.context.attach(self.context)

    def step_started(self, attempt: StepAttempt, number: int) -> StepSpan:
        return StepSpan(self, attempt, number)

    def run_finished(self, status: str, error: dict[str, Any] | None) -> None:
        self.span.set_attribute("openworkflow.status", status)
        if error is not None:
            record_error(self.api, self.span, error)

    def run_retrying(self, error: dict[str, Any]) -> None:
        """The workflow function raised; the run is tried again later (a new pass)."""
        record_error(self.api, self.span, error)

    def ended(self, outcome: str) -> None:
        try:
            self._end(outcome)
        finally:  # whatever the SDK raises: the slot thread keeps no span current
            self.api.context.detach(self.token)

    def _end(self, outcome: str) -> None:
        span = self.span
        span.set_attribute("openworkflow.outcome", outcome)
        if outcome == "crashed":
            exc = sys.exc_info()[1]  # ended() is called in a finally: what unwinds the pass
            if exc is not None:
                span.record_exception(exc)
            span.set_status(self.api.Status(self.api.StatusCode.ERROR, "crashed"))
        span.end()


class StepSpan:
    """The span of one step attempt (a ``StepObserver``), current on the thread calling it."""

    def __init__(self, execution: ExecutionSpan, attempt: StepAttempt, number: int) -> None:
        api = self.api = execution.api
        # The pass's context, explicitly: step.parallel calls steps on threads of a pool.
        self.span = execution.tracer.start_span(
            f"step {attempt.step_name}",
            context=execution.context,
            kind=api.SpanKind.INTERNAL,
            attributes={
                "openworkflow.run_id": execution.run_id,
                "openworkflow.workflow": execution.run.workflow_name,
                "openworkflow.step": attempt.step_name,
                "openworkflow.attempt": number,
                "openworkflow.resume_generation": attempt.resume_generation,
            },
        )
        self.token = api.context.attach(api.trace.set_span_in_context(self.span, execution.context))

    def ended(self, error: dict[str, Any] | None, *, exc: BaseException | None = None) -> None:
        try:
            self._end(error, exc)
        finally:
            self.api.context.detach(self.token)

    def _end(self, error: dict[str, Any] | None, exc: BaseException | None) -> None:
        span = self.span
        if error is not None:
            span.set_attribute("openworkflow.outcome", "failed")
            record_error(self.api, span, error)
        elif exc is not None:
            outcome = unwound(exc)
            span.set_attribute("openworkflow.outcome", outcome)
            if outcome == "crashed":
                span.record_exception(exc)
                span.set_status(self.api.Status(self.api.StatusCode.ERROR, type(exc).__name__))
        else:
            span.set_attribute("openworkflow.outcome", "completed")
        span.end()


def unwound(exc: BaseException) -> str:
    """How a step ended that the engine unwound through: lost, parked, or crashed."""
    from .engine.control import ClaimLost, Suspend

    if isinstance(exc, ClaimLost):
        return "lost"
    if isinstance(exc, Suspend):
        return "parked"
    return "crashed"


def record_error(api: Any, span: Any, error: dict[str, Any]) -> None:
    """A stored error (type, message, traceback) as the span's exception event and status."""
    kind = str(error.get("type") or "Error")
    attributes = {"exception.type": kind, "exception.message": str(error.get("message") or "")}
    if error.get("traceback"):
        attributes["exception.stacktrace"] = str(error["traceback"])
    span.add_event("exception", attributes)
    span.set_status(api.Status(api.StatusCode.ERROR, kind))


def extract(api: Any, stored: dict[str, Any]) -> Any:
    """The context in a stored carrier: its text values only (the propagators take nothing else)."""
    carrier = {key: value for key, value in stored.items() if isinstance(value, str)}
    return api.propagate.extract(carrier) if carrier else api.context.Context()


def resume_links(api: Any, stored: dict[str, Any], generation: int) -> list[Any]:
    resumed = stored.get(RESUMED)
    if not isinstance(resumed, dict) or resumed.get("generation") != generation:
        return []
    span_context = api.trace.get_current_span(extract(api, resumed)).get_span_context()
    if not span_context.is_valid:
        return []
    return [api.Link(span_context, {"openworkflow.link": "resume"})]


# --- trace context of new and resumed runs -------------------------------------------------


def _current_context(api: Any) -> dict[str, str] | None:
    """The current trace context as the propagator writes it; None without a valid span
    (or when a propagator of the project fails: reported, never raised into ``start()``)."""
    try:
        if not api.trace.get_current_span().get_span_context().is_valid:
            return None
        carrier: dict[str, str] = {}
        api.propagate.inject(carrier)
    except Exception as exc:
        instruments.report(instrument, "inject", exc)
        return None
    return carrier or None


def current_context() -> dict[str, str] | None:
    """The current span's trace context to store on a run, or None (a child run's start)."""
    api = _otel()
    if api is None or not app_settings.TRACING:
        return None
    return _current_context(api)


@contextmanager
def starting(workflow_name: str, *, runs: int = 1) -> Iterator[dict[str, str] | None]:
    """The trace context to store on the runs started in this block, or None.

    The current span's context; with none current (a cron tick, a shell) and a
    tracer provider configured, a root span ``start <workflow>`` around the
    block, so the passes of the run share a trace.
    """
    api = _otel()
    if api is None or not app_settings.TRACING:
        yield None
        return
    context = _current_context(api)
    tracer = None if context is not None else instrument.tracer()
    if tracer is None:
        yield context
        return
    attributes = {"openworkflow.workflow": workflow_name, "openworkflow.runs": runs}
    try:
        span = tracer.start_span(
            f"start {workflow_name}", kind=api.SpanKind.PRODUCER, attributes=attributes
        )
        token = api.context.attach(api.trace.set_span_in_context(span))
    except Exception as exc:  # the SDK failed: the run starts untraced
        instruments.report(instrument, "start", exc)
        yield None
        return
    try:
        yield _current_context(api)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            span.record_exception(exc)
            span.set_status(api.Status(api.StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        try:
            span.end()
        except Exception as exc:
            instruments.report(instrument, "start", exc)
        finally:
            api.context.detach(token)


def resumed(trace_context: Any, generation: int) -> dict[str, Any] | None:
    """``trace_context`` with the current span's context for the passes of ``generation``.

    None (nothing to store) when tracing is off or no valid span is current.
    """
    api = _otel()
    if api is None or not app_settings.TRACING:
        return None
    context = _current_context(api)
    if context is None:
        return None
    stored = dict(trace_context) if isinstance(trace_context, dict) else {}
    stored[RESUMED] = {"generation": generation, **context}
    return stored
