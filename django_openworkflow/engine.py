"""Execute one claimed run: replay, steps, parking, retries.

Each time a worker takes a run, the workflow function is called from the
top. Steps that already completed return their stored results without
running again; the first step without a result runs, and its attempt is
stored. Sleeps (and, later, waits) *park* the run: it goes back to
``pending`` with ``available_at`` set to the wake-up time and frees the
worker slot. Every write is fenced by the claim token.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.db.models.functions import Now
from django.utils import timezone

from .durations import (
    DEFAULT_STEP_RETRY_POLICY,
    DEFAULT_WORKFLOW_RETRY_POLICY,
    Duration,
    RetryPolicy,
    parse_duration,
)
from .exceptions import StepFailed
from .managers import DEADLINE_ERROR
from .models import StepAttempt, WorkflowRun
from .serialization import describe_exception, json_problem

if TYPE_CHECKING:
    from .registry import Workflow

logger = logging.getLogger(__name__)

MAX_STEP_ATTEMPTS = 1000

WORKER_LOST_ERROR = {
    "type": "WorkerLost",
    "message": "the worker executing this step stopped before the step finished "
    "(its lease expired)",
}


class Suspend(BaseException):
    """Unwinds the workflow function when the run parks or the claim is lost.

    A ``BaseException`` so that ``except Exception`` in workflow code does not
    swallow it.
    """


class ClaimLost(Suspend):
    """A fenced write found the claim gone: lease taken over, canceled, or past the deadline."""


class _NotJSON(TypeError):
    pass


class WorkflowContext:
    """What a workflow function sees.

    ``ctx.input``, ``ctx.run_id``, ``ctx.version`` and ``ctx.step``.
    """

    def __init__(self, execution: Execution) -> None:
        run = execution.run
        self.input = run.input
        self.run_id = run.pk
        self.version = run.version
        self.step = StepApi(execution)

    def __repr__(self) -> str:
        return f"<WorkflowContext run={self.run_id}>"


class StepApi:
    """``ctx.step``: the durable operations a workflow is made of."""

    def __init__(self, execution: Execution) -> None:
        self._execution = execution

    def run(
        self, name: str, fn: Callable[[], Any], *, retry_policy: RetryPolicy | None = None
    ) -> Any:
        """Run ``fn`` once and store its JSON result; on replay return the stored result."""
        return self._execution.run_step(name, fn, retry_policy, atomic=False)

    def atomic(
        self, name: str, fn: Callable[[], Any], *, retry_policy: RetryPolicy | None = None
    ) -> Any:
        """Like ``run``, but ``fn``'s database writes commit together with the step's result."""
        return self._execution.run_step(name, fn, retry_policy, atomic=True)

    def sleep(self, name: str, duration: Duration) -> None:
        """Park the run for ``duration`` without holding a worker slot."""
        return self._execution.sleep(name, duration)


class Execution:
    """One pass of a claimed run through its workflow function."""

    def __init__(self, run: WorkflowRun, workflow: Workflow, *, lease_seconds: float) -> None:
        self.run = run
        self.workflow = workflow
        self.token: uuid.UUID = run.claim_token  # type: ignore[assignment]
        self.lease_seconds = lease_seconds
        db_now = getattr(run, "db_now", None)
        self._clock_offset = (db_now - timezone.now()) if db_now else timedelta(0)
        self.generation = run.resume_generation
        self.used_names: set[str] = set()
        self.completed: dict[str, StepAttempt] = {}
        self.failures: dict[str, list[StepAttempt]] = {}
        self.waiting: dict[str, StepAttempt] = {}
        self.attempt_count = 0

    # --- clock and fencing --------------------------------------------------

    def now(self) -> datetime:
        """The database clock, estimated from the offset seen at the claim."""
        return timezone.now() + self._clock_offset

    def _fence(self, *, renew: bool = False) -> None:
        """Inside a transaction: make sure the claim still holds, or unwind."""
        if not WorkflowRun.objects.fence(
            self.run.pk, self.token, lease_seconds=self.lease_seconds if renew else None
        ):
            raise ClaimLost

    def _claim_lost(self) -> None:
        """The fence failed: find out why, finish what is ours to finish, and unwind."""
        row = (
            WorkflowRun.objects.filter(pk=self.run.pk)
            .annotate(db_now=Now())
            .values("status", "claim_token", "deadline_at", "db_now")
            .first()
        )
        if (
            row
            and row["claim_token"] == self.token
            and row["status"] == WorkflowRun.Status.RUNNING
            and row["deadline_at"] is not None
            and row["deadline_at"] <= row["db_now"]
        ):
            self._finish(WorkflowRun.Status.FAILED, error=dict(DEADLINE_ERROR))
            logger.info("run failed run=%s reason=deadline", self.run.pk)
        else:
            logger.info(
                "claim lost run=%s status=%s", self.run.pk, row["status"] if row else "deleted"
            )

    # --- the pass ------------------------------------------------------------

    def execute(self) -> None:
        try:
            self._load_history()
            self._execute()
        except ClaimLost:
            self._claim_lost()
        except Suspend:
            pass

    def _load_history(self) -> None:
        attempts = list(StepAttempt.objects.filter(workflow_run_id=self.run.pk).order_by("id"))
        lost = [
            a.pk
            for a in attempts
            if a.status == StepAttempt.Status.RUNNING and a.kind == StepAttempt.Kind.RUN
        ]
        if lost:
            with transaction.atomic():
                self._fence()
                StepAttempt.objects.filter(pk__in=lost, status="running").update(
                    status="failed", error=WORKER_LOST_ERROR, finished_at=Now()
                )
            for a in attempts:
                if a.pk in lost:
                    a.status = StepAttempt.Status.FAILED
                    a.error = dict(WORKER_LOST_ERROR)
            logger.warning("worker lost run=%s steps=%d", self.run.pk, len(lost))
        for a in attempts:
            if a.resume_generation == self.generation:
                self.attempt_count += 1
            if a.status == StepAttempt.Status.COMPLETED:
                self.completed[a.step_name] = a
            elif a.status == StepAttempt.Status.FAILED:
                if a.resume_generation == self.generation:
                    self.failures.setdefault(a.step_name, []).append(a)
            elif a.resume_generation == self.generation:
                self.waiting[a.step_name] = a

    def _execute(self) -> None:
        ctx = WorkflowContext(self)
        try:
            output = self.workflow.fn(ctx)
        except Suspend:
            raise
        except StepFailed as exc:
            error = describe_exception(exc)
            error["step"] = exc.step_name
            if exc.error.get("traceback"):
                error["traceback"] = exc.error["traceback"]
            self._finish(WorkflowRun.Status.FAILED, error=error)
            logger.info("run failed run=%s step=%s", self.run.pk, exc.step_name)
            return
        except Exception as exc:
            self._workflow_error(exc)
            return
        problem = json_problem(output)
        if problem:
            refused = TypeError(
                f'output of workflow "{self.workflow.name}" (run {self.run.pk}) '
                f"is not a JSON value: {problem}"
            )
            self._finish(WorkflowRun.Status.FAILED, error=describe_exception(refused))
            logger.info("run failed run=%s reason=output-not-json", self.run.pk)
            return
        self._finish(WorkflowRun.Status.COMPLETED, output=output)
        logger.info("run completed run=%s workflow=%s", self.run.pk, self.run.workflow_name)

    def _workflow_error(self, exc: Exception) -> None:
        policy = self.workflow.retry_policy or DEFAULT_WORKFLOW_RETRY_POLICY
        attempts = self.run.attempts + 1
        error = describe_exception(exc)
        if policy.exhausted(attempts):
            self._finish(WorkflowRun.Status.FAILED, error=error, attempts=attempts)
            logger.info(
                "run failed run=%s error=%s attempts=%d", self.run.pk, error["type"], attempts
            )
            return
        retry_at = self.now() + policy.delay(attempts)
        if self._past_deadline(retry_at):
            self._finish(WorkflowRun.Status.FAILED, error=_deadline_error(error), attempts=attempts)
            return
        with transaction.atomic():
            if not WorkflowRun.objects.park_claimed(
                self.run.pk, self.token, retry_at, attempts=attempts, error=error
            ):
                raise ClaimLost
        logger.info("run retry scheduled run=%s attempts=%d at=%s", self.run.pk, attempts, retry_at)

    def _finish(self, status: str, **fields: Any) -> None:
        if not WorkflowRun.objects.finish_claimed(self.run.pk, self.token, status, **fields):
            self._claim_lost()

    def _past_deadline(self, when: datetime) -> bool:
        deadline = self.run.deadline_at
        return deadline is not None and when > deadline

    # --- step bookkeeping ----------------------------------------------------

    def _step_name(self, name: str) -> str:
        if not isinstance(name, str) or not name:
            raise TypeError(f"step name must be a non-empty string, not {name!r}")
        candidate, index = name, 0
        while candidate in self.used_names:
            index += 1
            candidate = f"{name}:{index}"
        self.used_names.add(candidate)
        return candidate

    def _check_cap(self) -> None:
        if self.attempt_count < MAX_STEP_ATTEMPTS:
            return
        error = {
            "type": "AttemptCapExceeded",
            "message": f"run {self.run.pk} reached the cap of {MAX_STEP_ATTEMPTS} step attempts",
        }
        self._finish(WorkflowRun.Status.FAILED, error=error)
        logger.warning("run failed run=%s reason=attempt-cap", self.run.pk)
        raise Suspend("attempt cap")

    def _new_attempt(self, name: str, kind: str, **fields: Any) -> StepAttempt:
        """Inside a fenced transaction: store a new attempt of the current generation."""
        attempt = StepAttempt.objects.create(
            workflow_run_id=self.run.pk,
            step_name=name,
            kind=kind,
            resume_generation=self.generation,
            **fields,
        )
        self.attempt_count += 1
        return attempt

    # --- step.run / step.atomic ---------------------------------------------

    def run_step(
        self, name: str, fn: Callable[[], Any], policy: RetryPolicy | None, *, atomic: bool
    ) -> Any:
        if not callable(fn):
            raise TypeError(f'step "{name}" needs a callable, not {fn!r}')
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise TypeError(f'retry_policy of step "{name}" must be a RetryPolicy, not {policy!r}')
        policy = policy or DEFAULT_STEP_RETRY_POLICY
        name = self._step_name(name)
        done = self.completed.get(name)
        if done is not None:
            return done.output
        failures = self.failures.get(name, [])
        if failures and failures[-1].error and failures[-1].error.get("retryable") is False:
            raise TypeError(failures[-1].error["message"])
        if policy.exhausted(len(failures)):
            last = failures[-1].error or {}
            raise StepFailed(name, last, len(failures))
        self._check_cap()
        with transaction.atomic():
            self._fence()
            attempt = self._new_attempt(name, StepAttempt.Kind.RUN)
        try:
            if atomic:
                with transaction.atomic():
                    result = fn()
                    self._check_result(name, result)
                    self._complete_attempt(attempt, result)
            else:
                result = fn()
                self._check_result(name, result)
                with transaction.atomic():
                    self._complete_attempt(attempt, result)
        except Suspend:
            raise
        except _NotJSON as exc:
            error = describe_exception(exc)
            error["type"] = "TypeError"
            error["retryable"] = False
            self._fail_attempt(attempt, error)
            raise TypeError(str(exc)) from None
        except Exception as exc:
            self._step_error(name, attempt, describe_exception(exc), policy)
        self.completed[name] = attempt
        return result

    def _check_result(self, name: str, result: Any) -> None:
        problem = json_problem(result)
        if problem:
            raise _NotJSON(
                f'step "{name}" of run {self.run.pk} returned a value that is not JSON: {problem}'
            )

    def _complete_attempt(self, attempt: StepAttempt, result: Any) -> None:
        """Inside a transaction: renew the lease (fenced) and store the result."""
        self._fence(renew=True)
        StepAttempt.objects.filter(pk=attempt.pk).update(
            status="completed", output=result, finished_at=Now()
        )
        attempt.status = StepAttempt.Status.COMPLETED
        attempt.output = result

    def _fail_attempt(self, attempt: StepAttempt, error: dict[str, Any]) -> None:
        with transaction.atomic():
            self._fence()
            self._store_failure(attempt, error)

    def _store_failure(self, attempt: StepAttempt, error: dict[str, Any]) -> None:
        StepAttempt.objects.filter(pk=attempt.pk).update(
            status="failed", error=error, finished_at=Now()
        )
        attempt.status = StepAttempt.Status.FAILED
        attempt.error = error
        self.failures.setdefault(attempt.step_name, []).append(attempt)

    def _step_error(
        self, name: str, attempt: StepAttempt, error: dict[str, Any], policy: RetryPolicy
    ) -> None:
        """A step attempt raised: ``StepFailed`` when out of attempts, else park for a retry."""
        failed = len(self.failures.get(name, [])) + 1
        if policy.exhausted(failed):
            self._fail_attempt(attempt, error)
            logger.info("step failed run=%s step=%s attempts=%d", self.run.pk, name, failed)
            raise StepFailed(name, error, failed)
        retry_at = self.now() + policy.delay(failed)
        if self._past_deadline(retry_at):
            self._fail_attempt(attempt, error)
            self._finish(WorkflowRun.Status.FAILED, error=_deadline_error(error, step=name))
            logger.info("run failed run=%s step=%s reason=deadline", self.run.pk, name)
            raise Suspend("deadline")
        with transaction.atomic():
            self._fence()
            self._store_failure(attempt, error)
            WorkflowRun.objects.park_claimed(self.run.pk, self.token, retry_at)
        logger.info(
            "step retry scheduled run=%s step=%s attempt=%d at=%s",
            self.run.pk,
            name,
            failed,
            retry_at.isoformat(),
        )
        raise Suspend("step retry")

    # --- step.sleep -----------------------------------------------------------

    def sleep(self, name: str, duration: Duration) -> None:
        delta = parse_duration(duration, what=f'duration of sleep "{name}"')
        name = self._step_name(name)
        if name in self.completed:
            return None
        open_sleep = self.waiting.get(name)
        if open_sleep is not None:
            wake_at = open_sleep.wake_at
            assert wake_at is not None
            if wake_at <= self.now():
                with transaction.atomic():
                    self._fence()
                    StepAttempt.objects.filter(pk=open_sleep.pk).update(
                        status="completed", finished_at=Now()
                    )
                self.completed[name] = open_sleep
                return None
            self._park(wake_at)
        self._check_cap()
        wake_at = self.now() + delta
        with transaction.atomic():
            self._fence()
            if delta <= timedelta(0):
                self.completed[name] = self._new_attempt(
                    name,
                    StepAttempt.Kind.SLEEP,
                    status="completed",
                    wake_at=wake_at,
                    finished_at=Now(),
                )
                return None
            self._new_attempt(name, StepAttempt.Kind.SLEEP, wake_at=wake_at)
            WorkflowRun.objects.park_claimed(self.run.pk, self.token, wake_at)
        logger.info("run sleeping run=%s step=%s until=%s", self.run.pk, name, wake_at.isoformat())
        raise Suspend("sleep")

    def _park(self, until: datetime) -> None:
        with transaction.atomic():
            if not WorkflowRun.objects.park_claimed(self.run.pk, self.token, until):
                raise ClaimLost
        raise Suspend("parked")


def _deadline_error(last_error: dict[str, Any], *, step: str | None = None) -> dict[str, Any]:
    error = dict(DEADLINE_ERROR)
    error["message"] = (
        "deadline passed: the next retry would start after the run's deadline_at; last error: "
        f"{last_error.get('type')}: {last_error.get('message')}"
    )
    if step:
        error["step"] = step
    if last_error.get("traceback"):
        error["traceback"] = last_error["traceback"]
    return error
