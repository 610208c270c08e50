"""Hooks for traces and metrics: the engine reports what it does, instruments listen.

The engine asks ``execution(run)`` for an observer of each pass of a run
(one claim, one call of the workflow function) and reports to it:

- ``step_started(attempt, number)`` before a step's function is called, on
  the thread that calls it (a thread of its own for ``step.parallel``); the
  handle it returns gets ``ended(error)`` on that thread once the attempt's
  outcome is known (``error`` is the stored error, or ``None``), or
  ``ended(None, exc=...)`` when the engine unwinds through it (the claim was
  lost, the run parked, a ``KeyboardInterrupt``);
- ``run_finished(status, error)`` when the pass completed or failed the run;
- ``run_retrying(error)`` when the workflow function raised and the run was
  parked to be tried again under the workflow's retry policy;
- ``ended(outcome)`` once the pass is over: ``"completed"``, ``"failed"``,
  ``"retrying"`` (the workflow function raised and will be tried again),
  ``"parked"`` (a sleep, a wait, a step's retry: the run goes on later),
  ``"lost"`` (the claim was lost: canceled, taken over) or ``"crashed"``.

Runs that end outside a pass (the worker's deadline sweep fails runs
parked past their deadline: ``Store.fail_overdue``) are reported with
``runs_ended(status, workflow_names)``, to the instruments that have a
``runs_ended`` method.

Instruments (``tracing.py`` for OpenTelemetry, ``metrics.py`` for
Prometheus) are installed with ``install()``; with none installed the
observer does nothing and costs a few method calls per step.

**An instrument never breaks a run.** Each observer is wrapped so that an
exception it raises (a span processor, a sampler or a propagator of the
project that fails) is logged once per instrument, by type, and the
observer is dropped for the rest of the pass; ``ended()`` is still called,
so it can clean up (detach its context). The engine sees nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .models import StepAttempt, WorkflowRun


class StepObserver(Protocol):
    def ended(self, error: dict[str, Any] | None, *, exc: BaseException | None = None) -> None: ...


class ExecutionObserver(Protocol):
    def step_started(self, attempt: StepAttempt, number: int) -> StepObserver: ...

    def run_finished(self, status: str, error: dict[str, Any] | None) -> None: ...

    def run_retrying(self, error: dict[str, Any]) -> None: ...

    def ended(self, outcome: str) -> None: ...


class Instrument(Protocol):
    def execution(self, run: WorkflowRun) -> ExecutionObserver | None:
        """An observer of one pass of ``run``, or None to sit this one out."""

    # Optional: ``runs_ended(self, status: str, workflow_names: Sequence[str]) -> None``,
    # runs that ended outside a pass (see ``runs_ended()`` below).


logger = logging.getLogger(__name__)


class _Nothing:
    """The observer when no instrument listens (also a step observer)."""

    def step_started(self, attempt: StepAttempt, number: int) -> _Nothing:
        return self

    def run_finished(self, status: str, error: dict[str, Any] | None) -> None:
        pass

    def run_retrying(self, error: dict[str, Any]) -> None:
        pass

    def ended(self, *args: Any, **kwargs: Any) -> None:
        pass


NOTHING = _Nothing()


class _Step:
    def __init__(self, steps: list[StepObserver]) -> None:
        self.steps = steps

    def ended(self, error: dict[str, Any] | None, *, exc: BaseException | None = None) -> None:
        for step in reversed(self.steps):
            step.ended(error, exc=exc)


class _Many:
    """Several instruments' observers of one pass, told in turn (the last started ends first)."""

    def __init__(self, observers: list[ExecutionObserver]) -> None:
        self.observers = observers

    def step_started(self, attempt: StepAttempt, number: int) -> StepObserver:
        return _Step([o.step_started(attempt, number) for o in self.observers])

    def run_finished(self, status: str, error: dict[str, Any] | None) -> None:
        for observer in self.observers:
            observer.run_finished(status, error)

    def run_retrying(self, error: dict[str, Any]) -> None:
        for observer in self.observers:
            observer.run_retrying(error)

    def ended(self, outcome: str) -> None:
        for observer in reversed(self.observers):
            observer.ended(outcome)


class _Guarded:
    """One instrument's observer of a pass, whose exceptions never reach the engine."""

    __slots__ = ("broken", "instrument", "observer")

    def __init__(self, instrument: Instrument, observer: ExecutionObserver) -> None:
        self.instrument = instrument
        self.observer = observer
        self.broken = False

    def failed(self, where: str, exc: Exception) -> None:
        self.broken = True
        report(self.instrument, where, exc)

    def step_started(self, attempt: StepAttempt, number: int) -> StepObserver:
        if self.broken:
            return NOTHING
        try:
            return _GuardedStep(self, self.observer.step_started(attempt, number))
        except Exception as exc:
            self.failed("step_started", exc)
            return NOTHING

    def run_finished(self, status: str, error: dict[str, Any] | None) -> None:
        if not self.broken:
            try:
                self.observer.run_finished(status, error)
            except Exception as exc:
                self.failed("run_finished", exc)

    def run_retrying(self, error: dict[str, Any]) -> None:
        if not self.broken:
            try:
                self.observer.run_retrying(error)
            except Exception as exc:
                self.failed("run_retrying", exc)

    def ended(self, outcome: str) -> None:
        try:  # even when broken: the observer cleans up (its context, its span)
            self.observer.ended(outcome)
        except Exception as exc:
            self.failed("ended", exc)


class _GuardedStep:
    __slots__ = ("execution", "step")

    def __init__(self, execution: _Guarded, step: StepObserver) -> None:
        self.execution = execution
        self.step = step

    def ended(self, error: dict[str, Any] | None, *, exc: BaseException | None = None) -> None:
        try:
            self.step.ended(error, exc=exc)
        except Exception as failure:
            self.execution.failed("step ended", failure)


_instruments: list[Instrument] = []
_lock = threading.Lock()
_reported: set[int] = set()  # instruments whose failure was logged (once each)


def report(instrument: Instrument, where: str, exc: Exception) -> None:
    """Log an instrument's failure once per instrument (its later ones at DEBUG)."""
    first = id(instrument) not in _reported
    _reported.add(id(instrument))
    logger.log(
        logging.WARNING if first else logging.DEBUG,
        "instrument failed, the runs go on without it (logged once per instrument) "
        "instrument=%s at=%s error=%s",
        type(instrument).__name__,
        where,
        type(exc).__name__,
        exc_info=exc if first else None,
    )


def install(instrument: Instrument) -> None:
    """Have ``instrument`` observe every pass of every run from now on (once)."""
    with _lock:
        if instrument not in _instruments:
            _instruments.append(instrument)


def uninstall(instrument: Instrument) -> None:
    with _lock:
        if instrument in _instruments:
            _instruments.remove(instrument)


def prepare() -> None:
    """Before a worker's first claim: let the instruments do their one-time work (import
    their libraries), so that it does not stall the first passes."""
    for instrument in list(_instruments):
        ready = getattr(instrument, "prepare", None)
        if ready is None:
            continue
        try:
            ready()
        except Exception as exc:
            report(instrument, "prepare", exc)


def runs_ended(status: str, workflow_names: Sequence[str]) -> None:
    """Runs that ended outside a pass, one workflow name per run: the deadline sweep's.

    Told to the instruments that have a ``runs_ended`` method, after the commit;
    one that raises is logged and skipped (the runs are failed already).
    """
    if not _instruments or not workflow_names:
        return
    for instrument in list(_instruments):
        told = getattr(instrument, "runs_ended", None)
        if told is None:
            continue
        try:
            told(status, workflow_names)
        except Exception as exc:
            report(instrument, "runs_ended", exc)


def execution(run: WorkflowRun) -> ExecutionObserver:
    """The observer of one pass of ``run``: the installed instruments', or one doing nothing."""
    if not _instruments:
        return NOTHING
    observers: list[ExecutionObserver] = []
    for instrument in list(_instruments):
        try:
            observer = instrument.execution(run)
        except Exception as exc:
            report(instrument, "execution", exc)
            continue
        if observer is not None:
            observers.append(_Guarded(instrument, observer))
    if not observers:
        return NOTHING
    return observers[0] if len(observers) == 1 else _Many(observers)
