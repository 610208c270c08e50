"""The step kinds that wait: ``sleep``, ``run_workflow`` (a child run) and signals.

A wait stores a running attempt and parks the run (it frees the worker
slot); when the run is replayed, the wait settles under the run's row lock:
over (completed, failed or timed out) or parked again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..clock import Now
from ..durations import Duration, parse_duration
from ..errors import child_failed, child_missing, child_timeout
from ..exceptions import StepFailed
from ..models import StepAttempt, WorkflowRun
from ..names import check_name
from ..pauses import pause_point
from ..serialization import ensure_json
from ..tracing import current_context
from .control import Suspend, WaitFailed

if TYPE_CHECKING:
    from ..registry import Workflow
    from .execution import Execution

logger = logging.getLogger("django_openworkflow.engine")


class Waits:
    """Sleeps, child runs and signals of one pass."""

    def __init__(self, execution: Execution) -> None:
        self.x = execution
        self.history = execution.history
        self.store = execution.store

    def sleep(self, name: str, duration: Duration) -> None:
        delta = parse_duration(duration, what=f'duration of sleep "{name}"')
        name = self.x.step_name(name)
        if name in self.history.completed:
            return None
        open_sleep = self.history.waiting.get(name)
        if open_sleep is not None:
            self.settle(open_sleep, lambda: (False, None))
            return None
        wake_at = self.later(delta, f'sleep "{name}"')
        if delta <= timedelta(0):
            self.x.check_cap()
            with self.store.atomic():
                self.x.fence(renew=True)
                self.history.completed[name] = self.x.new_attempt(
                    name,
                    StepAttempt.Kind.SLEEP,
                    status="completed",
                    wake_at=wake_at,
                    finished_at=Now(),
                )
            return None
        self.begin(name, StepAttempt.Kind.SLEEP, wake_at)
        logger.info(
            "run sleeping run=%s workflow=%s step=%s until=%s",
            self.x.run.pk,
            self.x.run.workflow_name,
            name,
            wake_at.isoformat(),
        )
        raise Suspend("sleep")

    def run_workflow(
        self,
        workflow: Any,
        input: Any,
        *,
        name: str | None,
        timeout: Duration | None,
        placement: tuple[str | None, int | None, str | None] = (None, None, None),
    ) -> Any:
        from ..registry import Workflow

        child_name, known, step, delta = child_call(workflow, input, name=name, timeout=timeout)
        version = known.version if known else None
        step = self.x.step_name(step)
        replayed, output = self.history.replay_child(step)
        if replayed:
            return output
        waiting = self.history.waiting.get(step)
        if waiting is not None:
            return self.settle(waiting, lambda: self.child_outcome(waiting))
        run = self.x.run
        # Checked when the child is started, not on replay: a queue removed from QUEUES
        # since then keeps the runs already in it. An unknown name (its worker registers
        # it) gets the default queue and priority.
        child_workflow = known or Workflow(lambda ctx: None, name=child_name)
        child_placement = child_workflow.placement(*placement)

        def start_child(attempt: StepAttempt) -> None:
            child = self.store.insert_run(
                namespace=run.namespace,
                workflow_name=child_name,
                version=version,
                input=input,
                parent_step_attempt=attempt,
                trace_context=current_context(),  # the parent's pass
                **child_placement,
            )
            StepAttempt.objects.using(self.store.using).filter(pk=attempt.pk).update(
                child_workflow_run=child
            )
            attempt.child_workflow_run = child

        attempt = self.begin(
            step, StepAttempt.Kind.WORKFLOW, self.wake_at(delta, step), then=start_child
        )
        logger.info(
            "child started run=%s workflow=%s step=%s child=%s",
            run.pk,
            run.workflow_name,
            step,
            attempt.child_workflow_run_id,
        )
        raise Suspend("child")

    def child_outcome(self, attempt: StepAttempt) -> tuple[bool, Any]:
        """Inside the fenced transaction: (True, output) once the child completed.

        Fails the step for a failed, canceled or missing child.
        """
        child = (
            WorkflowRun.objects.using(self.store.using)
            .filter(pk=attempt.child_workflow_run_id)
            .values("pk", "workflow_name", "status", "output", "error")
            .first()
        )
        if child is None:
            raise WaitFailed(child_missing(attempt.step_name))
        if child["status"] == WorkflowRun.Status.COMPLETED:
            return True, child["output"]
        if child["status"] in (WorkflowRun.Status.FAILED, WorkflowRun.Status.CANCELED):
            canceled = child["status"] == WorkflowRun.Status.CANCELED
            raise WaitFailed(child_failed(child, canceled=canceled))
        return False, None

    def send_signal(self, signal: str, data: Any, *, name: str | None) -> list[str]:
        check_name(signal, "signal")
        step = self.x.step_name(signal if name is None else name)
        done = self.history.completed.get(step)
        if done is not None:
            return done.output  # type: ignore[return-value]
        ensure_json(data, f'data of signal step "{step}"')
        self.x.check_cap()
        run = self.x.run
        with self.store.atomic():
            # The lock order: the sender is locked with the waiting runs, oldest first.
            delivered = self.store.deliver_signal(run.namespace, signal, data, sender=run.pk)
            self.x.fence(renew=True)
            woken = [str(run_id) for run_id in delivered]
            self.history.completed[step] = self.x.new_attempt(
                step,
                StepAttempt.Kind.SIGNAL_SEND,
                status="completed",
                signal=signal,
                output=woken,
                finished_at=Now(),
            )
        logger.info(
            "signal sent run=%s workflow=%s step=%s signal=%s woken=%d",
            run.pk,
            run.workflow_name,
            step,
            signal,
            len(woken),
        )
        return woken

    def wait_for_signal(
        self, signal: str, *, name: str | None, timeout: Duration | None
    ) -> dict[str, Any] | None:
        check_name(signal, "signal")
        step = signal if name is None else name
        delta = timeout_delta(timeout, step)
        step = self.x.step_name(step)
        done = self.history.completed.get(step)
        if done is not None:
            return done.output  # type: ignore[no-any-return]
        waiting = self.history.waiting.get(step)
        if waiting is not None:
            return self.settle(waiting, lambda: self.delivered(waiting))  # type: ignore[no-any-return]
        self.begin(step, StepAttempt.Kind.SIGNAL_WAIT, self.wake_at(delta, step), signal=signal)
        logger.info(
            "run waiting run=%s workflow=%s step=%s signal=%s",
            self.x.run.pk,
            self.x.run.workflow_name,
            step,
            signal,
        )
        raise Suspend("signal")

    def wake_at(self, delta: timedelta | None, step: str) -> datetime | None:
        return None if delta is None else self.later(delta, f'timeout of step "{step}"')

    def later(self, delta: timedelta, what: str) -> datetime:
        try:
            return self.x.now() + delta
        except OverflowError:
            raise ValueError(f"{what} ({delta}) would end after the year 9999") from None

    def begin(
        self,
        name: str,
        kind: str,
        wake_at: datetime | None,
        *,
        then: Callable[[StepAttempt], None] | None = None,
        **fields: Any,
    ) -> StepAttempt:
        """Store a waiting attempt and park the run, in one fenced transaction."""
        self.x.check_cap()
        with self.store.atomic():
            self.x.fence()
            attempt = self.x.new_attempt(name, kind, wake_at=wake_at, **fields)
            if then is not None:
                then(attempt)
            self.store.park(self.x.claim, wake_at)
        self.x.parked_until = wake_at
        return attempt

    def delivered(self, attempt: StepAttempt) -> tuple[bool, Any]:
        current = (
            StepAttempt.objects.using(self.store.using)
            .filter(pk=attempt.pk)
            .values("status", "output")
            .get()
        )
        if current["status"] == StepAttempt.Status.COMPLETED:
            return True, current["output"]
        return False, None

    def settle(self, attempt: StepAttempt, outcome: Callable[[], tuple[bool, Any]]) -> Any:
        """Finish a waiting step if its wait is over; else park the run again.

        Runs in one fenced transaction: the run's row lock orders this check
        against deliverers (a finishing child, a signal), so no wake-up is lost.
        A wait that times out returns ``None`` (signals, sleeps) or fails the
        step (child workflows).
        """
        x = self.x
        failed: dict[str, Any] | None = None
        pause_point("wait.before-settle", run_id=x.run.pk, step=attempt.step_name)
        with self.store.atomic():
            x.fence()
            try:
                over, value = outcome()
            except WaitFailed as exc:
                failed, over, value = exc.error, True, None
            if not over and attempt.wake_at is not None and attempt.wake_at <= x.now():
                over, value = True, None
                if attempt.kind == StepAttempt.Kind.WORKFLOW:
                    failed = child_timeout(attempt.step_name, attempt.child_workflow_run_id)
            if not over:
                pause_point("wait.before-park", run_id=x.run.pk, step=attempt.step_name)
                self.store.park(x.claim, attempt.wake_at)
                x.parked_until = attempt.wake_at
            elif failed is not None:
                x.record_failures([(attempt, failed)])
            else:
                self.store.complete_wait(attempt.pk, value)
                attempt.status, attempt.output = StepAttempt.Status.COMPLETED, value
        if not over:
            raise Suspend("parked")
        if failed is not None:
            failures = len(self.history.failures[attempt.step_name])
            logger.info(
                "step failed run=%s workflow=%s step=%s error=%s attempts=%d",
                x.run.pk,
                x.run.workflow_name,
                attempt.step_name,
                failed["type"],
                failures,
            )
            raise StepFailed(attempt.step_name, failed, failures)
        self.history.completed[attempt.step_name] = attempt
        self.history.waiting.pop(attempt.step_name, None)
        return value


def child_call(
    workflow: Any, input: Any, *, name: str | None, timeout: Duration | None
) -> tuple[str, Workflow | None, str, timedelta | None]:
    """The checked arguments of ``run_workflow``: the child's name, its registered workflow
    (None for a name this process does not know), the step's name and the timeout."""
    from ..registry import Workflow, get_workflow

    known: Workflow | None
    if isinstance(workflow, Workflow):
        child_name, known = workflow.name, workflow
    elif isinstance(workflow, str) and workflow:
        child_name, known = workflow, get_workflow(workflow)
    else:
        raise TypeError(f"run_workflow() needs a workflow or its name, not {workflow!r}")
    of_step = "" if name is None else f' of step "{name}"'
    check_name(child_name, f"child workflow name{of_step}")
    step = child_name if name is None else name
    delta = timeout_delta(timeout, step)
    ensure_json(input, f'input of child workflow step "{step}"')
    return child_name, known, step, delta


def timeout_delta(timeout: Duration | None, step: str) -> timedelta | None:
    return None if timeout is None else parse_duration(timeout, what=f'timeout of step "{step}"')
