"""Prometheus metrics of a worker (the ``[metrics]`` extra): ``runworker --metrics-port``.

``WorkerMetrics`` keeps them in a registry of its own (never the global
default one, so several live side by side in one process):

- as an instrument (``instruments.py``) it counts each finished run, each
  step attempt by status and times the attempts;
- at scrape time it reads the worker's busy slots, and from the database the
  runs in progress, the due runs and the age of the oldest due run per queue
  (``queue_status.queue_load()``: two aggregate queries over the partial
  indexes of active runs, stopped after ``query_timeout`` seconds). When the
  database does not answer in time the scrape still answers, with the other
  metrics and ``openworkflow_metrics_scrape_errors_total`` counted up.

Step names are labelled without the ``:1``, ``:2``... that a step called
again under the same name gets (``engine/history.py``), so a loop of steps is
one series, and at most ``MAX_STEP_SERIES`` workflow/step pairs get series of
their own; later ones are counted under ``step="(other)"``.

``serve()`` starts the HTTP endpoint on a daemon thread; ``stop()`` ends it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db import DatabaseError, connections
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from .conf import app_settings
from .queue_status import QueueLoad, queue_load

if TYPE_CHECKING:
    from .models import StepAttempt, WorkflowRun
    from .worker import Worker

logger = logging.getLogger(__name__)

# Step durations from a few milliseconds (a database write) to an hour (a batch
# job): 2.5x apart up to 10 s as Prometheus's defaults are, then about 2x to 5x
# apart up to an hour. Each bucket is a series per workflow and step.
BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    *(30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0),
)
QUERY_TIMEOUT = 2.0  # seconds each database query of a scrape may take
MAX_STEP_SERIES = 1000  # workflow/step pairs labelled by name; the others are "(other)"
OTHER_STEPS = "(other)"


def step_label(name: str) -> str:
    """The step name without the ``:N`` of a repeated call ("page:3" -> "page")."""
    base, colon, number = name.rpartition(":")
    if colon and base and number.isascii() and number.isdigit():
        return base
    return name


class WorkerMetrics:
    """One worker's metrics in ``self.registry``; install it with ``instruments.install()``."""

    def __init__(
        self,
        *,
        namespace: str | None = None,
        using: str | None = None,
        busy_slots: Callable[[], int] | None = None,
        slots: int | None = None,
        query_timeout: float | None = QUERY_TIMEOUT,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.runs_finished = Counter(
            "openworkflow_runs_finished",
            "Runs this worker completed or failed.",
            ["workflow", "status"],
            registry=r,
        )
        self.executions = Counter(
            "openworkflow_executions",
            "Passes of runs through their workflow function, by how they ended: completed, "
            "failed, retrying (the workflow function raised), parked (a sleep, a wait, a "
            "step's retry), lost (canceled, taken over), crashed.",
            ["workflow", "outcome"],
            registry=r,
        )
        self.step_attempts = Counter(
            "openworkflow_step_attempts",
            "Step attempts executed: completed, failed, or interrupted (the engine unwound "
            "through it: the claim was lost, the worker was interrupted).",
            ["workflow", "step", "status"],
            registry=r,
        )
        self.step_duration = Histogram(
            "openworkflow_step_duration_seconds",
            "How long step functions ran, with the storing of the result of step.atomic.",
            ["workflow", "step"],
            buckets=BUCKETS,
            registry=r,
        )
        if busy_slots is not None:
            busy = Gauge("openworkflow_worker_slots_busy", "Slots executing a run.", registry=r)
            busy.set_function(busy_slots)
        if slots is not None:
            total = Gauge("openworkflow_worker_slots", "Slots of this worker.", registry=r)
            total.set(slots)
        self.queues = QueueCollector(
            namespace or app_settings.NAMESPACE, using or app_settings.DATABASE, query_timeout
        )
        r.register(self.queues)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._steps: set[tuple[str, str]] = set()
        self._capped = False
        self._lock = threading.Lock()

    @classmethod
    def for_worker(cls, worker: Worker, **kwargs: Any) -> WorkerMetrics:
        return cls(
            namespace=worker.namespace,
            using=worker.using,
            busy_slots=lambda: worker.busy_slots,
            slots=worker.concurrency,
            **kwargs,
        )

    # --- the instrument ---------------------------------------------------------------

    def execution(self, run: WorkflowRun) -> _Pass:
        return _Pass(self, run.workflow_name)

    def runs_ended(self, status: str, workflow_names: Sequence[str]) -> None:
        """Runs this worker ended outside a pass: its deadline sweep failed them."""
        for name in workflow_names:
            self.runs_finished.labels(name, status).inc()

    def step(self, workflow: str, name: str) -> str:
        """The step label of ``name``: its base name, or ``(other)`` past the series cap."""
        label = step_label(name)
        key = (workflow, label)
        if key in self._steps:
            return label
        with self._lock:
            if len(self._steps) >= MAX_STEP_SERIES:
                if not self._capped:
                    self._capped = True
                    logger.warning(
                        "metrics: more than %d workflow/step names; later ones are counted as "
                        "step=%s (step names built from data?) workflow=%s step=%s",
                        MAX_STEP_SERIES,
                        OTHER_STEPS,
                        workflow,
                        label,
                    )
                return OTHER_STEPS
            self._steps.add(key)
        return label


class _Pass:
    """The observer of one pass of a run."""

    __slots__ = ("metrics", "workflow")

    def __init__(self, metrics: WorkerMetrics, workflow: str) -> None:
        self.metrics = metrics
        self.workflow = workflow

    def step_started(self, attempt: StepAttempt, number: int) -> _Step:
        return _Step(self, self.metrics.step(self.workflow, attempt.step_name))

    def run_finished(self, status: str, error: dict[str, Any] | None) -> None:
        self.metrics.runs_finished.labels(self.workflow, status).inc()

    def run_retrying(self, error: dict[str, Any]) -> None:
        pass  # counted by ended("retrying")

    def ended(self, outcome: str) -> None:
        self.metrics.executions.labels(self.workflow, outcome).inc()


class _Step:
    __slots__ = ("execution", "started", "step")

    def __init__(self, execution: _Pass, step: str) -> None:
        self.execution = execution
        self.step = step
        self.started = time.perf_counter()

    def ended(self, error: dict[str, Any] | None, *, exc: BaseException | None = None) -> None:
        seconds = time.perf_counter() - self.started
        status = "interrupted" if exc is not None else "failed" if error else "completed"
        metrics, workflow = self.execution.metrics, self.execution.workflow
        metrics.step_attempts.labels(workflow, self.step, status).inc()
        metrics.step_duration.labels(workflow, self.step).observe(seconds)


# --- read from the database at scrape time --------------------------------------------


class QueueCollector:
    """``openworkflow_runs_in_progress``, ``_runs_due``, ``_oldest_due_age_seconds`` per queue.

    Read at each scrape, on the scraping thread's connection: opened for the
    scrape and closed after it (a connection the thread had is left open).
    A database error or timeout leaves these three out of the scrape, counts
    ``openworkflow_metrics_scrape_errors_total`` and is logged once, until a
    scrape reads them again.
    """

    def __init__(self, namespace: str, using: str, timeout: float | None) -> None:
        self.namespace = namespace
        self.using = using
        self.timeout = timeout
        self.errors = 0
        self.failing = False
        self.last: list[QueueLoad] | None = None  # the last reading, for concurrent scrapes
        self._lock = threading.Lock()
        self._reading = threading.Lock()  # one scrape at a time reads the database

    def describe(self) -> Iterable[Metric]:
        return [*self._families(), self._errors()]

    def collect(self) -> Iterator[Metric]:
        yield from self._gauges(self._loads())
        yield self._errors()

    def _loads(self) -> list[QueueLoad] | None:
        """This scrape's reading; None when it failed. While another scrape reads, the last
        reading: scrapes hammering the endpoint cost the database one query at a time and
        never a second connection."""
        if not self._reading.acquire(blocking=False):
            return self.last
        try:
            loads = self._read()
        except DatabaseError as exc:
            with self._lock:
                self.errors += 1
                first, self.failing = not self.failing, True
            if first:
                logger.warning(
                    "metrics: queue gauges not read namespace=%s error=%s: %s (logged once "
                    "until they are read again)",
                    self.namespace,
                    type(exc).__name__,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                )
            return None
        finally:
            self._reading.release()
        with self._lock:
            recovered, self.failing = self.failing, False
        if recovered:
            logger.info("metrics: queue gauges read again namespace=%s", self.namespace)
        self.last = loads
        return loads

    def _gauges(self, loads: list[QueueLoad] | None) -> Iterator[Metric]:
        if loads is None:
            return
        in_progress, due, age = self._families()
        for load in loads:
            in_progress.add_metric([load.queue], load.in_progress)
            due.add_metric([load.queue], load.due)
            oldest = load.oldest_due_age
            age.add_metric([load.queue], 0.0 if oldest is None else oldest.total_seconds())
        yield from (in_progress, due, age)

    def _read(self) -> list[QueueLoad]:
        connection = connections[self.using]
        opened = connection.connection is None
        try:
            return queue_load(self.namespace, self.using, timeout=self.timeout)
        finally:
            if opened:
                connection.close()

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "openworkflow_runs_in_progress",
                "Runs started and not finished (running, or parked in a sleep, a wait, a "
                "retry): what a queue's concurrency counts.",
                labels=["queue"],
            ),
            GaugeMetricFamily(
                "openworkflow_runs_due",
                "Runs a worker may take now: new, woken, retrying, or whose lease expired.",
                labels=["queue"],
            ),
            GaugeMetricFamily(
                "openworkflow_oldest_due_age_seconds",
                "How long the oldest due run has been due (0: none is due).",
                labels=["queue"],
            ),
        )

    def _errors(self) -> CounterMetricFamily:
        return CounterMetricFamily(
            "openworkflow_metrics_scrape_errors",
            "Scrapes whose database reads failed or timed out.",
            value=self.errors,
        )


# --- the endpoint --------------------------------------------------------------------


@dataclass
class MetricsServer:
    """``/metrics`` served on a daemon thread, for one worker's metrics (installed)."""

    metrics: WorkerMetrics
    server: Any
    thread: threading.Thread

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def stop(self) -> None:
        from .instruments import uninstall

        uninstall(self.metrics)
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve(metrics: WorkerMetrics, addr: str, port: int) -> MetricsServer:
    """Serve ``metrics`` on ``addr:port`` (0: a free port) and install it; ``OSError`` if
    the address cannot be bound."""
    from .instruments import install

    server, thread = _start_http_server(port, addr=addr, registry=metrics.registry)
    install(metrics)
    served = MetricsServer(metrics, server, thread)
    logger.info("metrics served url=%s", served.url)
    return served
