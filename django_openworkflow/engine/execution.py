"""Execute one claimed run: one pass of its workflow function.

Each time a worker takes a run, the workflow function is called from the
top. Steps that already completed return their stored results without
running again; the first step without a result runs, and its attempt is
stored. Sleeps and waits *park* the run: it goes back to ``pending`` with
``available_at`` set to the wake-up time and frees the worker slot. Every
write goes through the store, fenced by the claim token.

``Execution`` ties the parts together: ``History`` (what was stored and how
this pass names its steps), ``Steps`` (run, atomic, parallel) and ``Waits``
(sleep, child runs, signals).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from django.utils import timezone

from ..clock import Now
from ..durations import DEFAULT_WORKFLOW_RETRY_POLICY, RetryPolicy
from ..errors import (
    ATTEMPT_CAP_EXCEEDED,
    DEADLINE_ERROR,
    DEADLINE_EXCEEDED,
    NON_DETERMINISTIC,
    WORKER_LOST,
    WORKER_LOST_ERROR,
    Refused,
    attempt_cap,
    deadline_error,
    non_deterministic,
)
from ..exceptions import StepFailed
from ..instruments import NOTHING, ExecutionObserver
from ..instruments import execution as observe
from ..models import StepAttempt, WorkflowRun
from ..registry import async_body_message
from ..serialization import describe_exception, ensure_json
from ..signals import run_completed, run_failed, send_after_commit, step_failed
from ..store import Claim, Deferred, Store, get_store
from .context import WorkflowContext
from .control import ClaimLost, EngineDatabaseError, NonDeterminism, Suspend
from .history import History
from .loops import Step, run_on_thread_loop
from .steps import Steps
from .waits import Waits

if TYPE_CHECKING:
    from ..registry import Workflow

logger = logging.getLogger("django_openworkflow.engine")

MAX_STEP_ATTEMPTS = 1000


class Execution:
    """One pass of a claimed run through its workflow function."""

    def __init__(
        self,
        claim: Claim,
        workflow: Workflow,
        *,
        store: Store | None = None,
        max_parallel: int = 8,
        run_coroutine: Callable[[Step, str], Any] = run_on_thread_loop,
    ) -> None:
        self.claim = claim
        self.run = claim.run
        self.workflow = workflow
        self.store = store or get_store(claim.run._state.db)
        self.using = self.store.using
        self._clock_offset = claim.clock_offset
        self.generation: int = claim.run.resume_generation
        self.history = History(claim.run.pk, self.generation)
        self.atomic_depth = 0  # the transaction depth of the workflow thread (execute())
        self.in_step = threading.local()  # .name: the step whose fn this thread is running
        # How an async step's coroutine is run (loops.py): on this thread's event loop
        # (the worker), or with its sync calls on this thread (the testing helper).
        self.run_coroutine = run_coroutine
        self.awaiting: dict[Any, str] = {}  # attempt id -> name of the async steps running
        # Threads for ctx.step.parallel(); 1 runs the steps one after another
        # on this thread (the testing helper does, to stay in the test's transaction).
        self.max_parallel = max_parallel
        self.parked_until: datetime | None = None  # set when this pass parks the run on a timer
        # A finished step's result waits here until the next write of this run
        # (the next step's start, a park, the finish) stores it in the same commit.
        self.deferred: Deferred | None = None
        self.steps = Steps(self)
        self.waits = Waits(self)
        self.observer: ExecutionObserver = NOTHING  # traces and metrics (instruments.py)
        self.outcome: str | None = None  # how the pass ended, for the observer

    def __repr__(self) -> str:
        return f"<Execution run={self.run.pk} generation={self.generation}>"

    # --- clock and fencing --------------------------------------------------

    def now(self) -> datetime:
        """The database clock, estimated from the offset seen at the claim."""
        return timezone.now() + self._clock_offset

    def fence(self, *, renew: bool = False) -> None:
        """Inside a transaction: make sure the claim still holds, or unwind.

        Stores the deferred result of the previous step in the same transaction.
        """
        if not self.store.fence(self.claim, renew=renew, deferred=self.deferred):
            raise ClaimLost
        self.deferred = None

    def claim_lost(self) -> None:
        """The fence failed: find out why, finish what is ours to finish, and unwind."""
        row = self.current_row()
        if (
            row
            and row["claim_token"] == self.claim.token
            and row["status"] == WorkflowRun.Status.RUNNING
            and row["deadline_at"] is not None
            and row["deadline_at"] <= row["db_now"]
        ):
            error = dict(DEADLINE_ERROR)
            if self.store.fail_at_deadline(self.claim, self.generation, error, self.deferred):
                self.deferred = None
                self.finished(WorkflowRun.Status.FAILED, {"error": error})
                logger.info(
                    "run failed run=%s workflow=%s error=%s reason=deadline",
                    self.run.pk,
                    self.run.workflow_name,
                    DEADLINE_EXCEEDED,
                )
                return
            row = self.current_row()  # the deadline sweep (or a cancel) came first
        if row and self.deferred is not None and row["status"] == WorkflowRun.Status.FAILED:
            # The deadline sweep failed the run after a step's function returned,
            # before its result was written: keep it, so a resume does not run it again.
            deferred, self.deferred = self.deferred, None
            self.store.store_late_result(self.run.pk, self.generation, deferred)
        logger.info(
            "claim lost run=%s workflow=%s status=%s",
            self.run.pk,
            self.run.workflow_name,
            row["status"] if row else "deleted",
        )

    def current_row(self) -> dict[str, Any] | None:
        return (  # type: ignore[no-any-return]
            WorkflowRun.objects.using(self.using)
            .filter(pk=self.run.pk)
            .annotate(db_now=Now())
            .values("status", "claim_token", "deadline_at", "db_now")
            .first()
        )

    # --- the pass ------------------------------------------------------------

    def execute(self) -> None:
        # Steps are called at this transaction depth; deeper, workflow code opened a
        # transaction that would hold (or roll back) what the steps commit.
        self.atomic_depth = len(self.store.connection.atomic_blocks)
        self.observer = observe(self.run)
        ending = "crashed"  # unless the pass ends one of the ways below
        try:
            self.load_history()
            self.call_workflow()
            ending = "parked"  # returned without finishing: a workflow retry parked it
        except ClaimLost:
            ending = "lost"
            self.claim_lost()
        except EngineDatabaseError as exc:
            raise exc.error from None  # the worker releases the run
        except NonDeterminism as exc:
            self.finish(WorkflowRun.Status.FAILED, error=non_deterministic(str(exc)))
            logger.warning(
                "run failed run=%s workflow=%s step=%s error=%s expected=%s",
                self.run.pk,
                self.run.workflow_name,
                exc.step,
                NON_DETERMINISTIC,
                exc.expected,
            )
        except Suspend:
            ending = "parked"
        finally:
            self.observer.ended(self.outcome or ending)

    def load_history(self) -> None:
        """Read the stored attempts (none for a run's first start); fail the lost ones."""
        if self.claim.first_start and self.generation == 0:
            return
        attempts = list(
            StepAttempt.objects.using(self.using).filter(workflow_run_id=self.run.pk).order_by("id")
        )
        lost = [a for a in attempts if a.status == StepAttempt.Status.RUNNING and a.kind == "run"]
        if lost:
            with self.store.atomic():
                self.fence()
                self.store.fail_steps((a.pk, WORKER_LOST_ERROR) for a in lost)
            for a in lost:
                a.status = StepAttempt.Status.FAILED
                a.error = dict(WORKER_LOST_ERROR)
            for a in lost:
                logger.warning(
                    "step failed run=%s workflow=%s step=%s error=%s",
                    self.run.pk,
                    self.run.workflow_name,
                    a.step_name,
                    WORKER_LOST,
                )
        self.history.load(attempts)

    def call_workflow(self) -> None:
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
            self.finish(WorkflowRun.Status.FAILED, error=error)
            logger.info(
                "run failed run=%s workflow=%s step=%s error=%s",
                self.run.pk,
                self.run.workflow_name,
                exc.step_name,
                exc.error.get("type"),
            )
            return
        except BaseException as exc:  # SystemExit, asyncio.CancelledError: failures of the code
            self.workflow_error(exc)
            return
        try:
            if type(output) is CoroutineType:  # a plain callable around an async body
                output.close()  # never awaited: no warning about it
                raise TypeError(async_body_message(self.workflow.name, output))
            ensure_json(output, f'output of workflow "{self.workflow.name}" (run {self.run.pk})')
        except (TypeError, ValueError) as refused:
            error = describe_exception(refused)
            self.finish(WorkflowRun.Status.FAILED, error=error)
            logger.info(
                "run failed run=%s workflow=%s error=%s reason=output-refused",
                self.run.pk,
                self.run.workflow_name,
                error["type"],
            )
            return
        self.finish(WorkflowRun.Status.COMPLETED, output=output)
        logger.info("run completed run=%s workflow=%s", self.run.pk, self.run.workflow_name)

    def workflow_error(self, exc: BaseException) -> None:
        """The workflow function raised: retry the run under its policy, or fail it."""
        policy = self.workflow.retry_policy or DEFAULT_WORKFLOW_RETRY_POLICY
        attempts = self.run.attempts + 1
        error = describe_exception(exc)
        retry_at = None if policy.exhausted(attempts) else self.retry_at(policy, attempts)
        if retry_at is None:
            self.finish(WorkflowRun.Status.FAILED, error=error, attempts=attempts)
            logger.info(
                "run failed run=%s workflow=%s error=%s attempts=%d",
                self.run.pk,
                self.run.workflow_name,
                error["type"],
                attempts,
            )
            return
        if self.past_deadline(retry_at):
            self.finish(WorkflowRun.Status.FAILED, error=deadline_error(error), attempts=attempts)
            logger.info(
                "run failed run=%s workflow=%s error=%s attempts=%d reason=deadline",
                self.run.pk,
                self.run.workflow_name,
                error["type"],
                attempts,
            )
            return
        with self.store.atomic():
            self.fence()
            self.store.park(self.claim, retry_at, attempts=attempts, error=error)
        self.parked_until = retry_at
        self.outcome = "retrying"
        self.observer.run_retrying(error)
        logger.info(
            "run retry scheduled run=%s workflow=%s error=%s attempts=%d at=%s",
            self.run.pk,
            self.run.workflow_name,
            error["type"],
            attempts,
            retry_at.isoformat(),
        )

    def finish(self, status: str, **fields: Any) -> None:
        """Complete or fail the run (fenced), with the last step's deferred result."""
        if not self.store.finish(self.claim, status, deferred=self.deferred, **fields):
            self.outcome = "lost"  # unless claim_lost() fails the run at its deadline
            self.claim_lost()  # the deferred result stays for a deadline failure to store
            return
        self.deferred = None
        self.finished(status, fields)

    def finished(self, status: str, fields: dict[str, Any]) -> None:
        self.run.status = status
        self.outcome = status
        self.observer.run_finished(status, fields.get("error"))
        for field in ("output", "error", "attempts"):
            if field in fields:
                setattr(self.run, field, fields[field])
        signal = run_completed if status == WorkflowRun.Status.COMPLETED else run_failed
        send_after_commit(signal, self.run, using=self.using)

    def retry_at(self, policy: RetryPolicy, failures: int) -> datetime | None:
        """When the next attempt may start; None when that is after the year 9999 (never)."""
        try:
            return self.now() + policy.delay(failures)
        except OverflowError:
            return None

    def past_deadline(self, when: datetime) -> bool:
        deadline = self.run.deadline_at
        return deadline is not None and when > deadline

    # --- step bookkeeping shared by the step kinds ---------------------------

    def step_name(self, name: str) -> str:
        """The stored name of a step call, refusing calls from where steps cannot run."""
        outer = getattr(self.in_step, "name", None)
        if outer is None and self.awaiting:  # from an async step's sync call, on its thread
            running = list(self.awaiting.values())  # a copy: parallel threads change it
            outer = running[0] if running else None
        if outer is not None:  # its Suspend would unwind (or roll back) the outer step
            raise Refused(
                f'step "{name}" was called inside the function of step "{outer}" of run '
                f"{self.run.pk}: steps cannot be nested; call them from the workflow function",
                TypeError,
            )
        refuse_inside_transaction(name, self.run.pk, self.store.connection, self.atomic_depth)
        return self.history.name(name)

    def check_cap(self) -> None:
        if self.history.attempt_count < MAX_STEP_ATTEMPTS:
            return
        self.finish(WorkflowRun.Status.FAILED, error=attempt_cap(self.run.pk, MAX_STEP_ATTEMPTS))
        logger.warning(
            "run failed run=%s workflow=%s error=%s reason=attempt-cap",
            self.run.pk,
            self.run.workflow_name,
            ATTEMPT_CAP_EXCEEDED,
        )
        raise Suspend("attempt cap")

    def new_attempt(self, name: str, kind: str, **fields: Any) -> StepAttempt:
        """Inside a fenced transaction: store a new attempt of the current generation."""
        fields.setdefault("position", self.history.positions.get(name))
        attempt: StepAttempt = self.store.insert_attempt(
            self.claim, step_name=name, kind=kind, resume_generation=self.generation, **fields
        )
        self.history.attempt_count += 1
        return attempt

    def record_failures(self, failed: list[tuple[StepAttempt, dict[str, Any]]]) -> None:
        """Inside a fenced transaction: fail these attempts (those still running)."""
        self.store.fail_steps((attempt.pk, error) for attempt, error in failed)
        for attempt, error in failed:
            attempt.status = StepAttempt.Status.FAILED
            attempt.error = error
            self.history.failed(attempt)
            send_after_commit(
                step_failed,
                self.run,
                using=self.using,
                step_name=attempt.step_name,
                error=error,
                attempt=attempt,
            )


def refuse_inside_transaction(name: str, run_id: Any, connection: Any, depth: int) -> None:
    """A step called deeper than ``depth`` transactions: inside a ``transaction.atomic()``
    of the workflow function, which would hold (or roll back) what the step commits."""
    if len(connection.atomic_blocks) > depth:
        raise TypeError(
            f'step "{name}" of run {run_id} was called inside a transaction.atomic() '
            "block of the workflow function: steps commit on their own (use "
            "ctx.step.atomic for database writes that must commit with a step)"
        )
