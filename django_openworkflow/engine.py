"""Execute one claimed run: replay, steps, parking, retries.

Each time a worker takes a run, the workflow function is called from the
top. Steps that already completed return their stored results without
running again; the first step without a result runs, and its attempt is
stored. Sleeps (and, later, waits) *park* the run: it goes back to
``pending`` with ``available_at`` set to the wake-up time and frees the
worker slot. Every write is fenced by the claim token.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.db import connection, connections, router, transaction
from django.db.models.functions import Now
from django.utils import timezone

from . import fastpath
from .durations import (
    DEFAULT_STEP_RETRY_POLICY,
    DEFAULT_WORKFLOW_RETRY_POLICY,
    Duration,
    RetryPolicy,
    parse_duration,
)
from .exceptions import StepFailed
from .managers import DEADLINE_ERROR, notify
from .models import StepAttempt, WorkflowRun
from .names import MAX_NAME_LENGTH, check_name
from .pauses import pause_point
from .serialization import (
    describe_exception,
    ensure_json,
    json_problem,
    size_problem,
    to_json,
)
from .signals import run_completed, run_failed, send_after_commit, step_failed

if TYPE_CHECKING:
    from .registry import Workflow

logger = logging.getLogger(__name__)

MAX_STEP_ATTEMPTS = 1000

WORKER_LOST_ERROR = {
    "type": "WorkerLost",
    "message": "the worker executing this step stopped before the step finished "
    "(it crashed, lost its database connection, or its lease expired)",
}


class Suspend(BaseException):
    """Unwinds the workflow function when the run parks or the claim is lost.

    A ``BaseException`` so that ``except Exception`` in workflow code does not
    swallow it.
    """


class ClaimLost(Suspend):
    """A fenced write found the claim gone: lease taken over, canceled, or past the deadline."""


class NonDeterminism(Suspend):
    """The workflow called its steps in another order than when they first ran."""


class _Refused(Exception):
    """A step result that cannot be stored: not JSON (TypeError) or too large (ValueError)."""

    def __init__(self, message: str, kind: type[Exception]) -> None:
        super().__init__(message)
        self.kind = kind


class _WaitFailed(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error["message"])
        self.error = error


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

    def parallel(
        self,
        steps: Iterable[tuple[str, Callable[[], Any]]],
        *,
        retry_policy: RetryPolicy | None = None,
    ) -> list[Any]:
        """Run independent ``(name, fn)`` steps at once, each stored as its own attempt.

        Returns their results in the given order. Each ``fn`` runs on its own
        thread (and database connection); replay returns stored results.
        """
        return self._execution.parallel(steps, retry_policy)

    def sleep(self, name: str, duration: Duration) -> None:
        """Park the run for ``duration`` without holding a worker slot."""
        return self._execution.sleep(name, duration)

    def run_workflow(
        self,
        workflow: Workflow | str,
        input: Any = None,
        *,
        name: str | None = None,
        timeout: Duration | None = None,
    ) -> Any:
        """Start a child run and park until it ends; return its output.

        A failed or canceled child, or a ``timeout`` that passes first, fails
        the step (``StepFailed``); on timeout the child keeps running.
        """
        return self._execution.run_workflow(workflow, input, name=name, timeout=timeout)

    def send_signal(self, signal: str, data: Any = None, *, name: str | None = None) -> list[str]:
        """Deliver ``data`` to the runs waiting on ``signal`` now (exactly once, as a step)."""
        return self._execution.send_signal(signal, data, name=name)

    def wait_for_signal(
        self, signal: str, *, name: str | None = None, timeout: Duration | None = None
    ) -> dict[str, Any] | None:
        """Park until ``signal`` arrives: ``{"data": payload}``, or ``None`` on timeout."""
        return self._execution.wait_for_signal(signal, name=name, timeout=timeout)


class Execution:
    """One pass of a claimed run through its workflow function."""

    def __init__(
        self,
        run: WorkflowRun,
        workflow: Workflow,
        *,
        lease_seconds: float,
        max_parallel: int = 8,
    ) -> None:
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
        self.atomic_depth = 0  # the transaction depth of the workflow thread (execute())
        self.in_step = threading.local()  # .name: the step whose fn this thread is running
        self.positions: dict[str, int] = {}  # step name -> its place among this pass's calls
        self.history_positions: dict[int, str] = {}  # place -> the step stored there (binding)
        # Threads for ctx.step.parallel(); 1 runs the steps one after another
        # on this thread (the testing helper does, to stay in the test's transaction).
        self.max_parallel = max_parallel
        self.parked_until: datetime | None = None  # set when this pass parks the run on a timer
        self.using = router.db_for_write(WorkflowRun)
        # PostgreSQL: one statement per step (fastpath.py); elsewhere the ORM.
        self.fast = connections[self.using].vendor == "postgresql"
        # A finished step's result waits here until the next write of this run
        # (the next step's start, a park, the finish) stores it in the same commit.
        self.deferred: fastpath.Deferred | None = None
        # A run claimed for the first time has no history to load.
        self.is_new = (
            getattr(run, "previous_started_at", False) is None and run.resume_generation == 0
        )

    # --- clock and fencing --------------------------------------------------

    def now(self) -> datetime:
        """The database clock, estimated from the offset seen at the claim."""
        return timezone.now() + self._clock_offset

    def _fence(self, *, renew: bool = False) -> None:
        """Inside a transaction: make sure the claim still holds, or unwind.

        Stores the deferred result of the previous step in the same transaction.
        """
        if not WorkflowRun.objects.fence(
            self.run.pk, self.token, lease_seconds=self.lease_seconds if renew else None
        ):
            raise ClaimLost
        self._store_deferred()

    def _store_deferred(self) -> None:
        if self.deferred is not None:
            attempt_id, text, finished_at = self.deferred
            StepAttempt.objects.filter(pk=attempt_id, status="running").update(
                status="completed", output=json.loads(text), finished_at=finished_at
            )
            self.deferred = None

    def _claim_lost(self) -> None:
        """The fence failed: find out why, finish what is ours to finish, and unwind."""
        row = (
            WorkflowRun.objects.filter(pk=self.run.pk)
            .annotate(db_now=Now())
            .values("status", "claim_token", "deadline_at", "db_now", "error")
            .first()
        )
        if (
            row
            and row["claim_token"] == self.token
            and row["status"] == WorkflowRun.Status.RUNNING
            and row["deadline_at"] is not None
            and row["deadline_at"] <= row["db_now"]
        ):
            with transaction.atomic(using=self.using):
                self._finish(WorkflowRun.Status.FAILED, error=dict(DEADLINE_ERROR))
                # As the deadline sweep does: the step that was executing fails with it.
                StepAttempt.objects.filter(
                    workflow_run_id=self.run.pk,
                    resume_generation=self.generation,
                    status=StepAttempt.Status.RUNNING,
                    kind=StepAttempt.Kind.RUN,
                ).update(status="failed", error=DEADLINE_ERROR, finished_at=Now())
            logger.info("run failed run=%s reason=deadline", self.run.pk)
        else:
            if row and self.deferred is not None and row["status"] == WorkflowRun.Status.FAILED:
                self._store_late_result()
            logger.info(
                "claim lost run=%s status=%s", self.run.pk, row["status"] if row else "deleted"
            )

    def _store_late_result(self) -> None:
        """The deadline sweep failed the run after a step's function returned, before its
        result was written: store it, so a resume does not run that finished step again.

        Under the run's row lock, only while the run is still failed in this generation
        and only over what the sweep wrote (the attempt failed with the deadline).
        """
        attempt_id, text, finished_at = self.deferred  # type: ignore[misc]
        self.deferred = None
        with transaction.atomic(using=self.using):
            still_failed = WorkflowRun.objects.select_for_update().filter(
                pk=self.run.pk,
                status=WorkflowRun.Status.FAILED,
                resume_generation=self.generation,
            )
            if still_failed.exists():
                StepAttempt.objects.filter(
                    pk=attempt_id, status=StepAttempt.Status.FAILED, error=DEADLINE_ERROR
                ).update(
                    status=StepAttempt.Status.COMPLETED,
                    output=json.loads(text),
                    error=None,
                    finished_at=finished_at,
                )

    # --- the pass ------------------------------------------------------------

    def execute(self) -> None:
        # Steps are called at this transaction depth; deeper, workflow code opened a
        # transaction that would hold (or roll back) what the steps commit.
        self.atomic_depth = len(connections[self.using].atomic_blocks)
        try:
            self._load_history()
            self._execute()
        except ClaimLost:
            self._claim_lost()
        except NonDeterminism as exc:
            error = {"type": "NonDeterministicWorkflow", "message": str(exc)}
            self._finish(WorkflowRun.Status.FAILED, error=error)
            logger.warning("run failed run=%s reason=non-deterministic", self.run.pk)
        except Suspend:
            pass

    def _load_history(self) -> None:
        if self.is_new:
            return
        attempts = list(StepAttempt.objects.filter(workflow_run_id=self.run.pk).order_by("id"))
        lost = [
            a.pk
            for a in attempts
            if a.status == StepAttempt.Status.RUNNING and a.kind == StepAttempt.Kind.RUN
        ]
        if lost:
            with transaction.atomic(using=self.using):
                self._fence()
                StepAttempt.objects.filter(pk__in=lost, status="running").update(
                    status="failed", error=WORKER_LOST_ERROR, finished_at=Now()
                )
            for a in attempts:
                if a.pk in lost:
                    a.status = StepAttempt.Status.FAILED
                    a.error = dict(WORKER_LOST_ERROR)
            logger.warning("worker lost run=%s steps=%d", self.run.pk, len(lost))
        self.history_positions = replay_positions(attempts, self.generation)
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
        except (Suspend, KeyboardInterrupt):
            raise
        except StepFailed as exc:
            error = describe_exception(exc)
            error["step"] = exc.step_name
            if exc.error.get("traceback"):
                error["traceback"] = exc.error["traceback"]
            self._finish(WorkflowRun.Status.FAILED, error=error)
            logger.info(
                "run failed run=%s step=%s error=%s",
                self.run.pk,
                exc.step_name,
                exc.error.get("type"),
            )
            return
        except BaseException as exc:  # SystemExit, asyncio.CancelledError: failures of the code
            self._workflow_error(exc)
            return
        try:
            ensure_json(output, f'output of workflow "{self.workflow.name}" (run {self.run.pk})')
        except (TypeError, ValueError) as refused:
            self._finish(WorkflowRun.Status.FAILED, error=describe_exception(refused))
            logger.info("run failed run=%s reason=output-refused", self.run.pk)
            return
        self._finish(WorkflowRun.Status.COMPLETED, output=output)
        logger.info("run completed run=%s workflow=%s", self.run.pk, self.run.workflow_name)

    def _workflow_error(self, exc: BaseException) -> None:
        policy = self.workflow.retry_policy or DEFAULT_WORKFLOW_RETRY_POLICY
        attempts = self.run.attempts + 1
        error = describe_exception(exc)
        retry_at = None if policy.exhausted(attempts) else self._retry_at(policy, attempts)
        if retry_at is None:
            self._finish(WorkflowRun.Status.FAILED, error=error, attempts=attempts)
            logger.info(
                "run failed run=%s error=%s attempts=%d", self.run.pk, error["type"], attempts
            )
            return
        if self._past_deadline(retry_at):
            self._finish(WorkflowRun.Status.FAILED, error=_deadline_error(error), attempts=attempts)
            return
        with transaction.atomic(using=self.using):
            self._fence()
            WorkflowRun.objects.park_claimed(
                self.run.pk, self.token, retry_at, attempts=attempts, error=error
            )
        self.parked_until = retry_at
        logger.info(
            "run retry scheduled run=%s error=%s attempts=%d at=%s",
            self.run.pk,
            error["type"],
            attempts,
            retry_at,
        )

    def _finish(self, status: str, **fields: Any) -> None:
        wake_parent = self.run.parent_step_attempt_id is not None
        if self.fast and not wake_parent:
            finished = fastpath.finish(
                self.using,
                run_id=self.run.pk,
                token=self.token,
                status=status,
                deferred=self.deferred,
                **fields,
            )
        else:
            with transaction.atomic(using=self.using):
                finished = WorkflowRun.objects.finish_claimed(
                    self.run.pk, self.token, status, wake_parent=wake_parent, **fields
                )
                if finished:
                    self._store_deferred()
                pause_point("finish.before-commit", run_id=self.run.pk, status=status)
        if not finished:  # the deferred result stays for a deadline failure to store
            self._claim_lost()
            return
        self.deferred = None
        self.run.status = status
        for field in ("output", "error", "attempts"):
            if field in fields:
                setattr(self.run, field, fields[field])
        signal = run_completed if status == WorkflowRun.Status.COMPLETED else run_failed
        send_after_commit(signal, self.run)

    def _retry_at(self, policy: RetryPolicy, failures: int) -> datetime | None:
        """When the next attempt may start; None when that is after the year 9999 (never)."""
        try:
            return self.now() + policy.delay(failures)
        except OverflowError:
            return None

    def _past_deadline(self, when: datetime) -> bool:
        deadline = self.run.deadline_at
        return deadline is not None and when > deadline

    # --- step bookkeeping ----------------------------------------------------

    def _step_name(self, name: str) -> str:
        outer = getattr(self.in_step, "name", None)
        if outer is not None:  # its Suspend would unwind (or roll back) the outer step
            raise _Refused(
                f'step "{name}" was called inside the function of step "{outer}" of run '
                f"{self.run.pk}: steps cannot be nested; call them from the workflow function",
                TypeError,
            )
        if len(connections[self.using].atomic_blocks) > self.atomic_depth:
            raise TypeError(
                f'step "{name}" of run {self.run.pk} was called inside a transaction.atomic() '
                "block of the workflow function: steps commit on their own (use "
                "ctx.step.atomic for database writes that must commit with a step)"
            )
        check_name(name, "step name")
        candidate, index = name, 0
        while candidate in self.used_names:
            index += 1
            candidate = f"{name}:{index}"
        if len(candidate) > MAX_NAME_LENGTH:  # StepAttempt.step_name
            raise ValueError(
                f"step name {candidate[:40]!r}… is {len(candidate)} characters"
                f"{' with its number' if index else ''}; at most {MAX_NAME_LENGTH}"
            )
        self.used_names.add(candidate)
        position = len(self.positions)
        before = self.history_positions.get(position)
        if before is not None and before != candidate:
            raise NonDeterminism(
                f'run {self.run.pk} called step "{candidate}" as step call #{position + 1}, '
                f'where an earlier execution called "{before}": the workflow function must '
                "call its steps in the same order every time it is replayed (to change a "
                "workflow under running runs, branch on ctx.version)"
            )
        self.positions[candidate] = position
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
        fields.setdefault("position", self.positions.get(name))
        attempt = StepAttempt.objects.create(
            workflow_run_id=self.run.pk,
            step_name=name,
            kind=kind,
            resume_generation=self.generation,
            **fields,
        )
        self.attempt_count += 1
        return attempt

    # --- step.run / step.atomic / step.parallel --------------------------------

    def run_step(
        self, name: str, fn: Callable[[], Any], policy: RetryPolicy | None, *, atomic: bool
    ) -> Any:
        policy = self._check_step_args(name, fn, policy)
        name = self._step_name(name)
        replayed, value = self._replay(name, policy)
        if replayed:
            return value
        attempt = self._begin_attempt(name, atomic=atomic)
        result, error = self._invoke(attempt, fn, atomic=atomic, defer=not atomic)
        if error is None:
            self.completed[name] = attempt
            return result
        self._after_failures([(attempt, error)], policy)
        raise AssertionError("unreachable: _after_failures raises")  # pragma: no cover

    def parallel(
        self, steps: Iterable[tuple[str, Callable[[], Any]]], policy: RetryPolicy | None
    ) -> list[Any]:
        entries = []
        step_policy = policy or DEFAULT_STEP_RETRY_POLICY
        for entry in steps:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise TypeError(f"parallel() takes (name, fn) pairs, not {entry!r}")
            self._check_step_args(entry[0], entry[1], policy)
            entries.append((self._step_name(entry[0]), entry[1]))
        results: list[Any] = [None] * len(entries)
        todo: list[tuple[int, StepAttempt, Callable[[], Any]]] = []
        for index, (name, _fn) in enumerate(entries):
            replayed, value = self._replay(name, step_policy)
            if replayed:
                results[index] = value
        for index, (name, fn) in enumerate(entries):
            if name not in self.completed:
                todo.append((index, self._begin_attempt(name), fn))
        outcomes = self._invoke_many([(attempt, fn) for _, attempt, fn in todo])
        failed = []
        for (index, attempt, _), (result, error) in zip(todo, outcomes, strict=True):
            if error is None:
                self.completed[attempt.step_name] = attempt
                results[index] = result
            else:
                failed.append((attempt, error))
        if failed:
            self._after_failures(failed, step_policy)
        return results

    def _check_step_args(self, name: Any, fn: Any, policy: RetryPolicy | None) -> RetryPolicy:
        if not callable(fn):
            raise TypeError(f"step {name!r} needs a callable, not {fn!r}")
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise TypeError(f"retry_policy of step {name!r} must be a RetryPolicy, not {policy!r}")
        return policy or DEFAULT_STEP_RETRY_POLICY

    def _replay(self, name: str, policy: RetryPolicy) -> tuple[bool, Any]:
        """``(True, result)`` for a completed step; raise what a finished step raised.

        ``(False, None)`` when the step must run (again).
        """
        done = self.completed.get(name)
        if done is not None:
            return True, done.output
        failures = self.failures.get(name, [])
        if failures and failures[-1].error and failures[-1].error.get("retryable") is False:
            raise _refused_again(failures[-1].error)
        if policy.exhausted(len(failures)):
            raise StepFailed(name, failures[-1].error or {}, len(failures))
        return False, None

    def _begin_attempt(self, name: str, *, atomic: bool = False, **fields: Any) -> StepAttempt:
        self._check_cap()
        pause_point("step.before-fence", run_id=self.run.pk, step=name)
        if self.fast and not fields:
            started_at = self.now()
            attempt_id = fastpath.start_step(
                self.using,
                run_id=self.run.pk,
                token=self.token,
                name=name,
                generation=self.generation,
                started_at=started_at,
                position=self.positions.get(name),
                deferred=self.deferred,
                atomic=atomic,
            )
            if attempt_id is None:
                raise ClaimLost
            self.deferred = None
            self.attempt_count += 1
            return StepAttempt(
                pk=attempt_id,
                workflow_run_id=self.run.pk,
                step_name=name,
                kind=StepAttempt.Kind.RUN,
                atomic=atomic,
                status=StepAttempt.Status.RUNNING,
                resume_generation=self.generation,
                started_at=started_at,
                position=self.positions.get(name),
            )
        with transaction.atomic(using=self.using):
            self._fence(renew=True)
            kind = fields.pop("kind", StepAttempt.Kind.RUN)
            return self._new_attempt(name, kind, atomic=atomic, **fields)

    def _invoke(
        self, attempt: StepAttempt, fn: Callable[[], Any], *, atomic: bool, defer: bool = False
    ) -> tuple[Any, dict[str, Any] | None]:
        """Call ``fn`` and store its result; return ``(result, None)`` or ``(None, error)``.

        Only what ``fn`` raises (any exception but ``KeyboardInterrupt`` and the
        engine's own unwinding) and a refused result are failures of the step;
        a failed write of the engine's own raises. With ``defer`` the result is
        stored by this run's next write (the next step's start, a park or the
        finish), in the same commit.
        """
        if atomic:
            return self._invoke_atomic(attempt, fn)
        try:
            result = self._call(attempt, fn)
            text = self._check_result(attempt.step_name, result)
        except (Suspend, KeyboardInterrupt):
            raise
        except BaseException as exc:
            return None, _step_error(exc)
        if defer:
            # The JSON text, taken now: the workflow may change the value it gets back.
            self.deferred = (attempt.pk, text, self.now())
            attempt.status = StepAttempt.Status.COMPLETED
            attempt.output = result
        else:
            with transaction.atomic(using=self.using):
                self._complete_attempt(attempt, result)
        return result, None

    def _invoke_atomic(
        self, attempt: StepAttempt, fn: Callable[[], Any]
    ) -> tuple[Any, dict[str, Any] | None]:
        """``step.atomic``: ``fn``'s writes and the step's result commit together.

        An exception once both are written (a ``transaction.on_commit`` hook of
        ``fn`` that raises, a commit whose reply was lost) is no failure of a
        step that committed: whether it did is looked up under the fence.
        """
        stored = False
        try:
            with transaction.atomic(using=self.using):
                result = self._call(attempt, fn)
                self._check_result(attempt.step_name, result)
                self._complete_attempt(attempt, result)
                stored = True
        except ClaimLost:
            with transaction.atomic(using=self.using):
                if not WorkflowRun.objects.fence(self.run.pk, self.token):
                    raise
            # The claim holds: the fence failed on a change fn made to its own run
            # (a cancel, say), which rolled back with it and would on every replay.
            return None, _step_error(
                _Refused(
                    f'step "{attempt.step_name}" of run {self.run.pk} changed its own run '
                    "(canceled it?) inside its transaction, which the step's completion "
                    "then refused; do that in ctx.step.run, which commits at once",
                    TypeError,
                )
            )
        except (Suspend, KeyboardInterrupt):
            raise
        except BaseException as exc:
            error = _step_error(exc)
            if not (stored and self._committed(attempt)):
                return None, error
            logger.warning(
                "step committed, then raised run=%s step=%s error=%s "
                "(an on_commit hook or the commit's reply failed; the step is not repeated)",
                self.run.pk,
                attempt.step_name,
                error["type"],
            )
        pause_point("step.after-commit", run_id=self.run.pk, step=attempt.step_name)
        return result, None

    def _call(self, attempt: StepAttempt, fn: Callable[[], Any]) -> Any:
        self.in_step.name = attempt.step_name
        try:
            return fn()
        finally:
            self.in_step.name = None

    def _committed(self, attempt: StepAttempt) -> bool:
        """After an error at or after a commit: did the attempt's completion commit?"""
        connection = connections[self.using]
        if (
            connection.connection is not None
            and not connection.in_atomic_block
            and not connection.is_usable()
        ):
            connection.close()  # the connection was lost: look on a new one
        with transaction.atomic(using=self.using):
            self._fence()
            return StepAttempt.objects.filter(
                pk=attempt.pk, status=StepAttempt.Status.COMPLETED
            ).exists()

    def _invoke_many(
        self, calls: list[tuple[StepAttempt, Callable[[], Any]]]
    ) -> list[tuple[Any, dict[str, Any] | None]]:
        if self.max_parallel <= 1 or len(calls) <= 1:
            return [self._invoke(attempt, fn, atomic=False) for attempt, fn in calls]

        def call(attempt: StepAttempt, fn: Callable[[], Any]) -> Any:
            try:
                return self._invoke(attempt, fn, atomic=False)
            finally:
                connection.close()  # this thread's own connection

        workers = min(self.max_parallel, len(calls))
        with ThreadPoolExecutor(workers, thread_name_prefix="openworkflow-step") as pool:
            futures = [pool.submit(call, attempt, fn) for attempt, fn in calls]
        return [future.result() for future in futures]  # re-raises ClaimLost

    def _check_result(self, name: str, result: Any) -> str:
        """The result's JSON text, as stored; ``_Refused`` when it cannot be stored."""
        problem = json_problem(result)
        if problem:
            raise _Refused(
                f'step "{name}" of run {self.run.pk} returned a value that is not JSON: {problem}',
                TypeError,
            )
        text = to_json(result)
        too_large = size_problem(result, text)
        if too_large:
            raise _Refused(
                f'step "{name}" of run {self.run.pk} returned a value that is too large: '
                f"{too_large}",
                ValueError,
            )
        return text

    def _complete_attempt(self, attempt: StepAttempt, result: Any) -> None:
        """Inside a transaction: renew the lease (fenced) and store the result."""
        self._fence(renew=True)
        StepAttempt.objects.filter(pk=attempt.pk).update(
            status="completed", output=result, finished_at=Now()
        )
        attempt.status = StepAttempt.Status.COMPLETED
        attempt.output = result

    def _store_failure(self, attempt: StepAttempt, error: dict[str, Any]) -> None:
        """Inside a fenced transaction: fail the attempt, unless it is no longer running."""
        StepAttempt.objects.filter(pk=attempt.pk, status=StepAttempt.Status.RUNNING).update(
            status=StepAttempt.Status.FAILED, error=error, finished_at=Now()
        )
        attempt.status = StepAttempt.Status.FAILED
        attempt.error = error
        self.failures.setdefault(attempt.step_name, []).append(attempt)
        send_after_commit(
            step_failed, self.run, step_name=attempt.step_name, error=error, attempt=attempt
        )

    def _after_failures(
        self, failed: list[tuple[StepAttempt, dict[str, Any]]], policy: RetryPolicy
    ) -> None:
        """Steps raised: store every failure, then raise ``TypeError``/``StepFailed`` or park.

        All the failures of one pass (several with ``parallel``) are stored in
        one fenced transaction before anything is raised, so no sibling's real
        error is lost behind another's.
        """
        pause_point(
            "step.before-failure", run_id=self.run.pk, steps=[a.step_name for a, _ in failed]
        )
        counts = {a.step_name: len(self.failures.get(a.step_name, [])) + 1 for a, _ in failed}
        refused = [(a, e) for a, e in failed if e.get("retryable") is False]
        exhausted = [(a, e) for a, e in failed if policy.exhausted(counts[a.step_name])]
        retry_at = None
        if not refused and not exhausted:
            times = [self._retry_at(policy, counts[a.step_name]) for a, _ in failed]
            exhausted = [entry for entry, at in zip(failed, times, strict=True) if at is None]
            retry_at = None if exhausted else min(at for at in times if at is not None)
        past_deadline = retry_at is not None and self._past_deadline(retry_at)
        with transaction.atomic(using=self.using):
            self._fence()
            for attempt, error in failed:
                self._store_failure(attempt, error)
            if retry_at is not None and not past_deadline:
                WorkflowRun.objects.park_claimed(self.run.pk, self.token, retry_at)
        for attempt, error in failed:
            if not any(attempt is a for a, _ in refused + exhausted):
                continue  # to be retried: logged with the retry
            logger.info(
                "step failed run=%s step=%s error=%s attempts=%d",
                self.run.pk,
                attempt.step_name,
                error["type"],
                counts[attempt.step_name],
            )
        if refused:
            raise _refused_again(refused[0][1])
        if exhausted:
            attempt, error = exhausted[0]
            raise StepFailed(attempt.step_name, error, counts[attempt.step_name])
        assert retry_at is not None
        if past_deadline:
            attempt, error = failed[0]
            self._finish(
                WorkflowRun.Status.FAILED, error=_deadline_error(error, step=attempt.step_name)
            )
            logger.info(
                "run failed run=%s step=%s error=%s reason=deadline",
                self.run.pk,
                attempt.step_name,
                error["type"],
            )
            raise Suspend("deadline")
        self.parked_until = retry_at
        logger.info(
            "step retry scheduled run=%s steps=%s error=%s at=%s",
            self.run.pk,
            ",".join(attempt.step_name for attempt, _ in failed),
            ",".join(error["type"] for _, error in failed),
            retry_at.isoformat(),
        )
        raise Suspend("step retry")

    # --- waiting: sleep, child workflows, signals -----------------------------------

    def sleep(self, name: str, duration: Duration) -> None:
        delta = parse_duration(duration, what=f'duration of sleep "{name}"')
        name = self._step_name(name)
        if name in self.completed:
            return None
        open_sleep = self.waiting.get(name)
        if open_sleep is None:
            wake_at = self._later(delta, f'sleep "{name}"')
            if delta <= timedelta(0):
                self.completed[name] = self._begin_attempt(
                    name,
                    kind=StepAttempt.Kind.SLEEP,
                    status="completed",
                    wake_at=wake_at,
                    finished_at=Now(),
                )
                return None
            self._begin_wait(name, StepAttempt.Kind.SLEEP, wake_at)
            logger.info(
                "run sleeping run=%s step=%s until=%s", self.run.pk, name, wake_at.isoformat()
            )
            raise Suspend("sleep")
        self._settle_wait(open_sleep, lambda: (False, None))
        return None

    def run_workflow(
        self, workflow: Any, input: Any, *, name: str | None, timeout: Duration | None
    ) -> Any:
        from .registry import Workflow, get_workflow

        if isinstance(workflow, Workflow):
            child_name, version = workflow.name, workflow.version
        elif isinstance(workflow, str) and workflow:
            known = get_workflow(workflow)
            child_name, version = workflow, known.version if known else None
        else:
            raise TypeError(f"run_workflow() needs a workflow or its name, not {workflow!r}")
        of_step = "" if name is None else f' of step "{name}"'
        check_name(child_name, f"child workflow name{of_step}")
        step = child_name if name is None else name
        delta = _timeout(timeout, step)
        ensure_json(input, f'input of child workflow step "{step}"')
        step = self._step_name(step)
        done = self.completed.get(step)
        if done is not None:
            return done.output
        failures = self.failures.get(step, [])
        if failures:  # the child has its own retry policy: the step is not retried
            raise StepFailed(step, failures[-1].error or {}, len(failures))
        waiting = self.waiting.get(step)
        if waiting is None:

            def start_child(attempt: StepAttempt) -> None:
                child = WorkflowRun.objects.create(
                    namespace=self.run.namespace,
                    workflow_name=child_name,
                    version=version,
                    input=input,
                    parent_step_attempt=attempt,
                )
                StepAttempt.objects.filter(pk=attempt.pk).update(child_workflow_run=child)
                attempt.child_workflow_run = child
                notify(transaction.get_connection().alias, self.run.namespace)

            attempt = self._begin_wait(
                step, StepAttempt.Kind.WORKFLOW, self._wake_at(delta, step), then=start_child
            )
            logger.info(
                "child started run=%s step=%s child=%s",
                self.run.pk,
                step,
                attempt.child_workflow_run_id,
            )
            raise Suspend("child")
        return self._settle_wait(waiting, lambda: self._child_outcome(waiting))

    def _child_outcome(self, attempt: StepAttempt) -> tuple[bool, Any]:
        """Inside the fenced transaction: (True, output) once the child completed.

        Fails the step for a failed, canceled or missing child.
        """
        child = (
            WorkflowRun.objects.filter(pk=attempt.child_workflow_run_id)
            .values("pk", "workflow_name", "status", "output", "error")
            .first()
        )
        if child is not None and child["status"] == WorkflowRun.Status.COMPLETED:
            return True, child["output"]
        if child is None:
            error = {
                "type": "ChildWorkflowMissing",
                "message": f'the child run of step "{attempt.step_name}" no longer exists',
            }
        elif child["status"] in (WorkflowRun.Status.FAILED, WorkflowRun.Status.CANCELED):
            child_error = child["error"] or {}
            verb = "was canceled" if child["status"] == WorkflowRun.Status.CANCELED else "failed"
            error = {
                "type": "ChildWorkflowFailed",
                "message": (
                    f"child run {child['pk']} ({child['workflow_name']}) {verb}"
                    + (
                        f": {child_error.get('type')}: {child_error.get('message')}"
                        if child_error
                        else ""
                    )
                ),
                "child_run": str(child["pk"]),
            }
            if child_error.get("traceback"):
                error["traceback"] = child_error["traceback"]
        else:
            return False, None
        raise _WaitFailed(error)

    def send_signal(self, signal: str, data: Any, *, name: str | None) -> list[str]:
        from .signaling import deliver

        check_name(signal, "signal")
        step = self._step_name(signal if name is None else name)
        done = self.completed.get(step)
        if done is not None:
            return done.output  # type: ignore[return-value]
        ensure_json(data, f'data of signal step "{step}"')
        self._check_cap()
        with transaction.atomic(using=self.using):
            # The lock order: the sender is locked with the waiting runs, oldest first.
            delivered = deliver(self.using, self.run.namespace, signal, data, sender=self.run.pk)
            self._fence(renew=True)
            woken = [str(run_id) for run_id in delivered]
            self.completed[step] = self._new_attempt(
                step,
                StepAttempt.Kind.SIGNAL_SEND,
                status="completed",
                signal=signal,
                output=woken,
                finished_at=Now(),
            )
        logger.info("signal sent run=%s signal=%s woken=%d", self.run.pk, signal, len(woken))
        return woken

    def wait_for_signal(
        self, signal: str, *, name: str | None, timeout: Duration | None
    ) -> dict[str, Any] | None:
        check_name(signal, "signal")
        step = signal if name is None else name
        delta = _timeout(timeout, step)
        step = self._step_name(step)
        done = self.completed.get(step)
        if done is not None:
            return done.output  # type: ignore[no-any-return]
        waiting = self.waiting.get(step)
        if waiting is None:
            self._begin_wait(
                step, StepAttempt.Kind.SIGNAL_WAIT, self._wake_at(delta, step), signal=signal
            )
            logger.info("run waiting run=%s step=%s signal=%s", self.run.pk, step, signal)
            raise Suspend("signal")
        return self._settle_wait(waiting, lambda: self._delivered(waiting))  # type: ignore[no-any-return]

    def _wake_at(self, delta: timedelta | None, step: str) -> datetime | None:
        return None if delta is None else self._later(delta, f'timeout of step "{step}"')

    def _later(self, delta: timedelta, what: str) -> datetime:
        try:
            return self.now() + delta
        except OverflowError:
            raise ValueError(f"{what} ({delta}) would end after the year 9999") from None

    def _begin_wait(
        self,
        name: str,
        kind: str,
        wake_at: datetime | None,
        *,
        then: Callable[[StepAttempt], None] | None = None,
        **fields: Any,
    ) -> StepAttempt:
        """Store a waiting attempt and park the run, in one fenced transaction."""
        self._check_cap()
        with transaction.atomic(using=self.using):
            self._fence()
            attempt = self._new_attempt(name, kind, wake_at=wake_at, **fields)
            if then is not None:
                then(attempt)
            WorkflowRun.objects.park_claimed(self.run.pk, self.token, wake_at)
        self.parked_until = wake_at
        return attempt

    def _delivered(self, attempt: StepAttempt) -> tuple[bool, Any]:
        current = StepAttempt.objects.filter(pk=attempt.pk).values("status", "output").get()
        if current["status"] == StepAttempt.Status.COMPLETED:
            return True, current["output"]
        return False, None

    def _settle_wait(self, attempt: StepAttempt, outcome: Callable[[], tuple[bool, Any]]) -> Any:
        """Finish a waiting step if its wait is over; else park the run again.

        Runs in one fenced transaction: the run's row lock orders this check
        against deliverers (a finishing child, a signal), so no wake-up is lost.
        A wait that times out returns ``None`` (signals, sleeps) or fails the
        step (child workflows).
        """
        failed: dict[str, Any] | None = None
        pause_point("wait.before-settle", run_id=self.run.pk, step=attempt.step_name)
        with transaction.atomic(using=self.using):
            self._fence()
            try:
                over, value = outcome()
            except _WaitFailed as exc:
                failed, over, value = exc.error, True, None
            if not over and attempt.wake_at is not None and attempt.wake_at <= self.now():
                over, value = True, None
                if attempt.kind == StepAttempt.Kind.WORKFLOW:
                    failed = {
                        "type": "ChildWorkflowTimeout",
                        "message": (
                            f'step "{attempt.step_name}" timed out waiting for child run '
                            f"{attempt.child_workflow_run_id}; the child keeps running"
                        ),
                        "child_run": str(attempt.child_workflow_run_id),
                    }
            if not over:
                pause_point("wait.before-park", run_id=self.run.pk, step=attempt.step_name)
                WorkflowRun.objects.park_claimed(self.run.pk, self.token, attempt.wake_at)
                self.parked_until = attempt.wake_at
            elif failed is not None:
                self._store_failure(attempt, failed)
            else:
                StepAttempt.objects.filter(pk=attempt.pk, status="running").update(
                    status="completed", output=value, finished_at=Now()
                )
                attempt.status, attempt.output = StepAttempt.Status.COMPLETED, value
        if not over:
            raise Suspend("parked")
        if failed is not None:
            raise StepFailed(attempt.step_name, failed, len(self.failures[attempt.step_name]))
        self.completed[attempt.step_name] = attempt
        self.waiting.pop(attempt.step_name, None)
        return value


def replay_positions(attempts: Iterable[StepAttempt], generation: int) -> dict[int, str]:
    """The step each place in the call order must hold when ``generation`` replays.

    Every attempt of the current generation binds its place. An earlier
    generation binds only the places of its completed steps before its first
    unfinished one: after a step that failed, that generation's path followed
    the failure (a compensation, say), which a resumed run need not repeat.
    Later generations win.
    """
    by_generation: dict[int, list[tuple[int, str, bool]]] = {}
    for a in attempts:
        if a.position is not None:
            done = a.status == StepAttempt.Status.COMPLETED
            by_generation.setdefault(a.resume_generation, []).append(
                (a.position, a.step_name, done)
            )
    expected: dict[int, str] = {}
    for gen in sorted(by_generation):
        rows = by_generation[gen]
        if gen == generation:
            expected.update((position, name) for position, name, _ in rows)
            continue
        completed = {name for _, name, done in rows if done}
        cut = min((position for position, name, _ in rows if name not in completed), default=None)
        for position, name, _ in rows:
            if name in completed and (cut is None or position < cut):
                expected[position] = name
    return expected


def _step_error(exc: BaseException) -> dict[str, Any]:
    """The stored error of a failed step; a refused result is not retried."""
    error = describe_exception(exc)
    if isinstance(exc, _Refused):
        error["type"] = exc.kind.__name__
        error["retryable"] = False
    return error


def _refused_again(error: dict[str, Any]) -> Exception:
    """The error a refused step result raises, again on every replay."""
    kind = ValueError if error.get("type") == "ValueError" else TypeError
    return kind(error["message"])


def _timeout(timeout: Duration | None, step: str) -> timedelta | None:
    return None if timeout is None else parse_duration(timeout, what=f'timeout of step "{step}"')


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
