"""The step kinds that execute code: ``step.run``, ``step.atomic`` and ``step.parallel``."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from django.db import connections

from ..durations import DEFAULT_STEP_RETRY_POLICY, RetryPolicy
from ..errors import Refused, deadline_error, refused_again, step_error
from ..exceptions import StepFailed
from ..liveness import current as current_liveness
from ..liveness import enter_user_code, leave_user_code
from ..models import StepAttempt, WorkflowRun
from ..pauses import pause_point
from ..registry import is_async_function
from ..serialization import json_problem, size_problem, to_json
from .control import ClaimLost, Suspend
from .loops import Step, close_thread_loop

if TYPE_CHECKING:
    from .execution import Execution

logger = logging.getLogger("django_openworkflow.engine")

Outcome = tuple[Any, "dict[str, Any] | None"]  # (result, None) or (None, error)


class Steps:
    """Executes the steps of one pass: attempts, results, failures and retries."""

    def __init__(self, execution: Execution) -> None:
        self.x = execution
        self.history = execution.history
        self.store = execution.store

    def run(
        self, name: str, fn: Callable[[], Any], policy: RetryPolicy | None, *, atomic: bool
    ) -> Any:
        policy = check_step_args(name, fn, policy)
        if atomic:
            refuse_async_atomic(name, fn, self.x.run.pk)
        name = self.x.step_name(name)
        replayed, value = self.history.replay(name, policy)
        if replayed:
            return value
        attempt = self.begin(name, atomic=atomic)
        result, error = self.invoke(attempt, fn, atomic=atomic, defer=not atomic)
        if error is None:
            self.history.completed[name] = attempt
            return result
        self.after_failures([(attempt, error)], policy)
        raise AssertionError("unreachable: after_failures raises")  # pragma: no cover

    def parallel(
        self, steps: Iterable[tuple[str, Callable[[], Any]]], policy: RetryPolicy | None
    ) -> list[Any]:
        entries = parallel_entries(steps, policy, self.x.step_name)
        step_policy = policy or DEFAULT_STEP_RETRY_POLICY
        results: list[Any] = [None] * len(entries)
        for index, (name, _fn) in enumerate(entries):
            replayed, value = self.history.replay(name, step_policy)
            if replayed:
                results[index] = value
        todo = [
            (index, self.begin(name), fn)
            for index, (name, fn) in enumerate(entries)
            if name not in self.history.completed
        ]
        outcomes = self.invoke_many([(attempt, fn) for _, attempt, fn in todo])
        failed = []
        for (index, attempt, _), (result, error) in zip(todo, outcomes, strict=True):
            if error is None:
                self.history.completed[attempt.step_name] = attempt
                results[index] = result
            else:
                failed.append((attempt, error))
        if failed:
            self.after_failures(failed, step_policy)
        return results

    def begin(self, name: str, *, atomic: bool = False) -> StepAttempt:
        """Store a running attempt (and the previous step's deferred result)."""
        x = self.x
        x.check_cap()
        pause_point("step.before-fence", run_id=x.run.pk, step=name)
        started_at = x.now()
        position = self.history.positions.get(name)
        attempt_id = self.store.start_step(
            x.claim,
            name=name,
            generation=x.generation,
            position=position,
            started_at=started_at,
            atomic=atomic,
            deferred=x.deferred,
        )
        if attempt_id is None:
            raise ClaimLost
        x.deferred = None
        self.history.attempt_count += 1
        return StepAttempt(
            pk=attempt_id,
            workflow_run_id=x.run.pk,
            step_name=name,
            kind=StepAttempt.Kind.RUN,
            atomic=atomic,
            status=StepAttempt.Status.RUNNING,
            resume_generation=x.generation,
            started_at=started_at,
            position=position,
        )

    def invoke(
        self, attempt: StepAttempt, fn: Callable[[], Any], *, atomic: bool, defer: bool = False
    ) -> Outcome:
        """Call ``fn`` and store its result; return ``(result, None)`` or ``(None, error)``.

        Only what ``fn`` raises (any exception but ``KeyboardInterrupt`` and the
        engine's own unwinding) and a refused result are failures of the step;
        a failed write of the engine's own raises. With ``defer`` the result is
        stored by this run's next write (the next step's start, a park or the
        finish), in the same commit.
        """
        number = len(self.history.failures.get(attempt.step_name, ())) + 1
        observed = self.x.observer.step_started(attempt, number)
        try:
            outcome = self.invoke_observed(attempt, fn, atomic=atomic, defer=defer)
        except BaseException as exc:
            observed.ended(None, exc=exc)
            raise
        observed.ended(outcome[1])
        return outcome

    def invoke_observed(
        self, attempt: StepAttempt, fn: Callable[[], Any], *, atomic: bool, defer: bool
    ) -> Outcome:
        if atomic:
            return self.invoke_atomic(attempt, fn)
        try:
            result = self.call(attempt, fn)
            text = self.check_result(attempt.step_name, result)
        except (Suspend, KeyboardInterrupt):
            raise
        except BaseException as exc:
            return None, step_error(exc)
        if defer:
            # The JSON text, taken now: the workflow may change the value it gets back.
            self.x.deferred = (attempt.pk, text, self.x.now())
            attempt.status = StepAttempt.Status.COMPLETED
            attempt.output = result
        else:
            with self.store.atomic():
                self.complete(attempt, result)
        return result, None

    def invoke_atomic(self, attempt: StepAttempt, fn: Callable[[], Any]) -> Outcome:
        """``step.atomic``: ``fn``'s writes and the step's result commit together.

        An exception once both are written (a ``transaction.on_commit`` hook of
        ``fn`` that raises, a commit whose reply was lost) is no failure of a
        step that committed: whether it did is looked up under the fence.
        """
        x = self.x
        stored = False
        try:
            with self.store.atomic():
                result = self.call_atomic(attempt, fn)
                self.check_result(attempt.step_name, result)
                self.complete(attempt, result)
                stored = True
                pause_point("step.atomic-stored", run_id=x.run.pk, step=attempt.step_name)
        except ClaimLost:
            with self.store.atomic():
                if not self.store.fence(x.claim):
                    raise
            # The claim holds: the fence failed on a change fn made to its own run
            # (a cancel, say), which rolled back with it and would on every replay.
            return None, step_error(
                Refused(
                    f'step "{attempt.step_name}" of run {x.run.pk} changed its own run '
                    "(canceled it?) inside its transaction, which the step's completion "
                    "then refused; do that in ctx.step.run, which commits at once",
                    TypeError,
                )
            )
        except (Suspend, KeyboardInterrupt):
            raise
        except BaseException as exc:
            error = step_error(exc)
            if not (stored and self.committed(attempt)):
                return None, error
            logger.warning(
                "step committed, then raised (an on_commit hook or the commit's reply "
                "failed; the step is not repeated) run=%s workflow=%s step=%s error=%s",
                x.run.pk,
                x.run.workflow_name,
                attempt.step_name,
                error["type"],
            )
        pause_point("step.after-commit", run_id=x.run.pk, step=attempt.step_name)
        return result, None

    def call(self, attempt: StepAttempt, fn: Callable[[], Any]) -> Any:
        """``fn()``; a coroutine it returns (an ``async def`` function's) is run to completion."""
        self.x.in_step.name = attempt.step_name
        watched = enter_user_code()  # the statement watchdog leaves the step's own alone
        try:
            result = fn()
            if type(result) is CoroutineType:  # the one check the sync path pays
                return self.await_step(attempt, result)
            return result
        finally:
            leave_user_code(watched)
            self.x.in_step.name = None

    def await_step(self, attempt: StepAttempt, coro: Step) -> Any:
        """Run an async step's coroutine on this thread's event loop (``loops.py``).

        While it runs, ``Execution.awaiting`` names the step: a step called from
        its sync calls, which run on another thread, is refused as nested.
        """
        x = self.x
        label = f"run={x.run.pk} workflow={x.run.workflow_name} step={attempt.step_name}"
        x.awaiting[attempt.pk] = attempt.step_name
        try:
            return x.run_coroutine(coro, label)
        finally:
            del x.awaiting[attempt.pk]

    def call_atomic(self, attempt: StepAttempt, fn: Callable[[], Any]) -> Any:
        """``fn()`` of ``step.atomic``, inside its transaction: a coroutine is refused.

        (``refuse_async_atomic`` refuses async functions before the step starts;
        this catches a plain callable that returns a coroutine.)
        """
        self.x.in_step.name = attempt.step_name
        watched = enter_user_code()
        try:
            result = fn()
        finally:
            leave_user_code(watched)
            self.x.in_step.name = None
        if type(result) is CoroutineType:
            result.close()  # never awaited: no warning about it
            raise Refused(async_atomic_message(attempt.step_name, self.x.run.pk, fn), TypeError)
        return result

    def committed(self, attempt: StepAttempt) -> bool:
        """After an error at or after a commit: did the attempt's completion commit?"""
        connection = self.store.connection
        if (
            connection.connection is not None
            and not connection.in_atomic_block
            and not connection.is_usable()
        ):
            connection.close()  # the connection was lost: look on a new one
        with self.store.atomic():
            self.x.fence()
            return (
                StepAttempt.objects.using(self.store.using)
                .filter(  # type: ignore[no-any-return]
                    pk=attempt.pk, status=StepAttempt.Status.COMPLETED
                )
                .exists()
            )

    def invoke_many(self, calls: list[tuple[StepAttempt, Callable[[], Any]]]) -> list[Outcome]:
        if self.x.max_parallel <= 1 or len(calls) <= 1:
            return [self.invoke(attempt, fn, atomic=False) for attempt, fn in calls]
        using = self.store.using
        liveness = current_liveness()

        def call(attempt: StepAttempt, fn: Callable[[], Any]) -> Outcome:
            try:
                if liveness is None:
                    return self.invoke(attempt, fn, atomic=False)
                with liveness.thread():  # this thread's engine statements are watched too
                    return self.invoke(attempt, fn, atomic=False)
            finally:
                close_thread_loop()  # the event loop of an async step, made for this call
                connections[using].close()  # this thread's own connection

        workers = min(self.x.max_parallel, len(calls))
        with ThreadPoolExecutor(workers, thread_name_prefix="openworkflow-step") as pool:
            futures = [pool.submit(call, attempt, fn) for attempt, fn in calls]
        return [future.result() for future in futures]  # re-raises ClaimLost

    def check_result(self, name: str, result: Any) -> str:
        """The result's JSON text, as stored; ``Refused`` when it cannot be stored."""
        run_id = self.x.run.pk
        problem = json_problem(result)
        if problem and inspect.isawaitable(result):
            raise Refused(
                f'step "{name}" of run {run_id} returned an awaitable that is not a coroutine '
                f"({type(result).__qualname__}): a step awaits "
                "what an async def function returns; await this one inside an async def "
                "step function and return its result",
                TypeError,
            )
        if problem:
            raise Refused(
                f'step "{name}" of run {run_id} returned a value that is not JSON: {problem}',
                TypeError,
            )
        text = to_json(result)
        too_large = size_problem(result, text)
        if too_large:
            raise Refused(
                f'step "{name}" of run {run_id} returned a value that is too large: {too_large}',
                ValueError,
            )
        return text

    def complete(self, attempt: StepAttempt, result: Any) -> None:
        """Inside a transaction: renew the lease (fenced) and store the result."""
        if not self.store.complete_step(self.x.claim, attempt.pk, result):
            raise ClaimLost
        attempt.status = StepAttempt.Status.COMPLETED
        attempt.output = result

    def after_failures(
        self, failed: list[tuple[StepAttempt, dict[str, Any]]], policy: RetryPolicy
    ) -> None:
        """Steps raised: store every failure, then raise ``TypeError``/``StepFailed`` or park.

        All the failures of one pass (several with ``parallel``) are stored in
        one fenced transaction before anything is raised, so no sibling's real
        error is lost behind another's.
        """
        x = self.x
        pause_point("step.before-failure", run_id=x.run.pk, steps=[a.step_name for a, _ in failed])
        failures = self.history.failures
        counts = {a.step_name: len(failures.get(a.step_name, [])) + 1 for a, _ in failed}
        refused = [(a, e) for a, e in failed if e.get("retryable") is False]
        exhausted = [(a, e) for a, e in failed if policy.exhausted(counts[a.step_name])]
        retry_at = None
        if not refused and not exhausted:
            times = [x.retry_at(policy, counts[a.step_name]) for a, _ in failed]
            exhausted = [entry for entry, at in zip(failed, times, strict=True) if at is None]
            retry_at = None if exhausted else min(at for at in times if at is not None)
        past_deadline = retry_at is not None and x.past_deadline(retry_at)
        with self.store.atomic():
            x.fence()
            x.record_failures(failed)
            if retry_at is not None and not past_deadline:
                self.store.park(x.claim, retry_at)
        for attempt, error in failed:
            if not any(attempt is a for a, _ in refused + exhausted):
                continue  # to be retried: logged with the retry
            logger.info(
                "step failed run=%s workflow=%s step=%s error=%s attempts=%d",
                x.run.pk,
                x.run.workflow_name,
                attempt.step_name,
                error["type"],
                counts[attempt.step_name],
            )
        if refused:
            raise refused_again(refused[0][1])
        if exhausted:
            attempt, error = exhausted[0]
            raise StepFailed(attempt.step_name, error, counts[attempt.step_name])
        assert retry_at is not None
        if past_deadline:
            attempt, error = failed[0]
            x.finish(WorkflowRun.Status.FAILED, error=deadline_error(error, step=attempt.step_name))
            logger.info(
                "run failed run=%s workflow=%s step=%s error=%s reason=deadline",
                x.run.pk,
                x.run.workflow_name,
                attempt.step_name,
                error["type"],
            )
            raise Suspend("deadline")
        x.parked_until = retry_at
        for attempt, error in failed:
            logger.info(
                "step retry scheduled run=%s workflow=%s step=%s error=%s attempts=%d at=%s",
                x.run.pk,
                x.run.workflow_name,
                attempt.step_name,
                error["type"],
                counts[attempt.step_name],
                retry_at.isoformat(),
            )
        raise Suspend("step retry")


def check_step_args(name: Any, fn: Any, policy: RetryPolicy | None) -> RetryPolicy:
    if not callable(fn):
        if type(fn) is CoroutineType:
            fn.close()  # never awaited: no warning about it
            raise TypeError(
                f"step {name!r} needs a callable, not the coroutine {fn!r}: pass the async "
                "function itself (or a lambda or functools.partial calling it), which the "
                "step calls once, and not on replay"
            )
        raise TypeError(f"step {name!r} needs a callable, not {fn!r}")
    if policy is not None and not isinstance(policy, RetryPolicy):
        raise TypeError(f"retry_policy of step {name!r} must be a RetryPolicy, not {policy!r}")
    return policy or DEFAULT_STEP_RETRY_POLICY


def refuse_async_atomic(name: str, fn: Callable[[], Any], run_id: Any) -> None:
    """``step.atomic`` takes no async function: ``TypeError`` naming the step and the run."""
    if is_async_function(fn):
        raise TypeError(async_atomic_message(name, run_id, fn))


def async_atomic_message(name: str, run_id: Any, fn: Any) -> str:
    return (
        f'step.atomic "{name}" of run {run_id} was given an async function ({fn!r}): '
        "Django's transaction.atomic() is synchronous, and the ORM calls of an async "
        "function run on another connection, outside the step's transaction; use a sync "
        "function here, or ctx.step.run for the async one"
    )


def parallel_entries(
    steps: Iterable[tuple[str, Callable[[], Any]]],
    policy: RetryPolicy | None,
    step_name: Callable[[str], str],
) -> list[tuple[str, Callable[[], Any]]]:
    """The checked ``(name, fn)`` pairs of ``parallel``, each named (in order) by ``step_name``."""
    entries = []
    for entry in steps:
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise TypeError(f"parallel() takes (name, fn) pairs, not {entry!r}")
        check_step_args(entry[0], entry[1], policy)
        entries.append((step_name(entry[0]), entry[1]))
    return entries
