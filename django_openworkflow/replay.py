"""Replay a run's stored history against the code now deployed, executing nothing.

``replay_run(run, attempts)`` calls the run's workflow function as it is
registered now, with the worker's own ``WorkflowContext`` and ``ctx.step``,
over a ``ReplayPass``: a pass that only replays. A step whose result is
stored returns it, as the worker's replay does; the first step without one
ends the replay (the code reached the place where the run stands); no step
function is ever called. Every step call is named by the engine's
``History``, so a call order that differs from the stored one is found
exactly where a worker would find it (``NonDeterminism``).

The answer is ``None`` when the code reaches the stored steps in their stored
order, else a ``Finding`` saying how it does not. Nothing is written: while
the workflow function runs, every database connection of the replaying
thread refuses statements other than reads (code outside steps must not
write, for the worker either). A thread the function starts itself is not
guarded (docs/deploying.md, Limits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from django.db import connections, transaction

from .conf import app_settings
from .durations import DEFAULT_STEP_RETRY_POLICY, Duration, RetryPolicy, parse_duration
from .engine import MAX_STEP_ATTEMPTS, History, NonDeterminism, Suspend, WorkflowContext
from .engine.execution import refuse_inside_transaction
from .engine.steps import check_step_args, parallel_entries, refuse_async_atomic
from .engine.waits import child_call, timeout_delta
from .logfields import first_line
from .names import check_name
from .progress import plural
from .registry import get_workflow
from .serialization import ensure_json

if TYPE_CHECKING:
    from .models import StepAttempt, WorkflowRun
    from .registry import Workflow

REORDERED = "reordered"  # the stored step is still called, later (swapped, or a step put before)
REMOVED = "removed"  # the code skips the stored step: it asks for one stored further on
RENAMED = "renamed"  # the code asks for a step the history does not have, never the stored one
NOT_REACHED = "not-reached"  # the code returned or raised before the stored steps it must reach
RAISED = "raised"  # the workflow function raised, having reached every stored step
UNREGISTERED = "unregistered"  # no workflow of the run's name in the code now deployed
KINDS = (REORDERED, REMOVED, RENAMED, NOT_REACHED, RAISED, UNREGISTERED)

# Statements a replay may send: reads, and the transaction control they may need.
READS = frozenset(
    {"SELECT", "SHOW", "EXPLAIN", "VALUES", "BEGIN", "SAVEPOINT", "RELEASE", "ROLLBACK"}
)
# What Django itself sends through the connection's cursor when a read of the replay
# opens a connection (MySQL/MariaDB's DatabaseWrapper.init_connection_state): settings of
# the session, no write. Refused, the connection would stay open without them.
SESSION_SETUP = frozenset(
    {
        "SET SQL_AUTO_IS_NULL = 0",
        *(
            f"SET SESSION TRANSACTION ISOLATION LEVEL {level}"
            for level in ("READ UNCOMMITTED", "READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE")
        ),
    }
)


@dataclass(frozen=True)
class Finding:
    """A run whose stored history the code now deployed no longer replays.

    ``position`` is the step call's place in the call order, from 0 (as
    ``StepAttempt.position``); ``stored_step`` the step the history has there;
    ``asked_for`` the step the code asked for instead (None when it asked for
    none: it returned or raised first).
    """

    run: str
    workflow: str
    version: str | None
    kind: str
    position: int | None
    stored_step: str | None
    asked_for: str | None
    message: str

    def __str__(self) -> str:
        return self.message

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class UnstoredStep(Suspend):
    """Ends a replay at the first step with no stored result (``step``): the run stands there."""

    def __init__(self, step: str) -> None:
        super().__init__(step)
        self.step = step


class WriteRefused(Exception):
    """A statement other than a read, sent while a replay executes nothing."""


# --- the pass ------------------------------------------------------------------------


class ReplayPass:
    """What ``WorkflowContext`` and ``StepApi`` drive in place of an ``Execution``.

    Steps are served from the stored history and named by ``History``; the
    first one with no stored result raises ``UnstoredStep``. A ``survey``
    pass checks no order and returns None for unstored steps (``[]`` for a
    signal sent) instead of stopping, to see which steps the code asks for
    further on; it stops after ``MAX_STEP_ATTEMPTS`` calls.
    """

    def __init__(
        self,
        run: WorkflowRun,
        attempts: Iterable[StepAttempt],
        *,
        using: str,
        survey: bool = False,
    ) -> None:
        self.run = run
        self.using = using
        self.survey = survey
        self.history = History(run.pk, run.resume_generation)
        self.history.load(attempts)
        if survey:
            self.history.bound = {}
        self.atomic_depth = 0  # set by call()
        self.steps = ReplaySteps(self)
        self.waits = ReplayWaits(self)

    def __repr__(self) -> str:
        return f"<ReplayPass run={self.run.pk} generation={self.history.generation}>"

    def call(self, workflow: Workflow) -> Any:
        """Call the workflow function with the worker's context; nothing it sends but reads
        reaches a database, and inside a transaction (a test's) nothing it did stays."""
        with refusing_writes(f"replaying run {self.run.pk}"), rolled_back():
            self.atomic_depth = len(connections[self.using].atomic_blocks)
            return workflow.fn(WorkflowContext(self))

    def step_name(self, name: str) -> str:
        """The stored name of a step call, as ``Execution.step_name`` gives it."""
        refuse_inside_transaction(name, self.run.pk, connections[self.using], self.atomic_depth)
        name = self.history.name(name)
        if self.survey and len(self.history.positions) > MAX_STEP_ATTEMPTS:
            raise UnstoredStep(name)
        return name

    def unstored(self, name: str, stand_in: Any = None) -> Any:
        """A step with no stored result: the end of the replay (``stand_in`` in a survey)."""
        if self.survey:
            return stand_in
        raise UnstoredStep(name)

    def calls(self) -> list[str]:
        """The step calls named so far, in call order."""
        return list(self.history.positions)

    def first_unreached(self) -> int | None:
        """The first stored place the code has not reached, or None."""
        called = len(self.history.positions)
        return min((p for p in self.history.bound if p >= called), default=None)


class ReplaySteps:
    """``step.run``, ``step.atomic`` and ``step.parallel`` of a ``ReplayPass``.

    Mirrors ``engine.steps.Steps`` (same signatures: a test compares them).
    """

    def __init__(self, replay: ReplayPass) -> None:
        self.x = replay
        self.history = replay.history

    def run(
        self, name: str, fn: Callable[[], Any], policy: RetryPolicy | None, *, atomic: bool
    ) -> Any:
        policy = check_step_args(name, fn, policy)
        if atomic:
            refuse_async_atomic(name, fn, self.x.run.pk)
        name = self.x.step_name(name)
        replayed, value = self.history.replay(name, policy)
        return value if replayed else self.x.unstored(name)

    def parallel(
        self, steps: Iterable[tuple[str, Callable[[], Any]]], policy: RetryPolicy | None
    ) -> list[Any]:
        names = [name for name, _ in parallel_entries(steps, policy, self.x.step_name)]
        step_policy = policy or DEFAULT_STEP_RETRY_POLICY
        results, missing = [], []
        for name in names:
            replayed, value = self.history.replay(name, step_policy)
            results.append(value)
            if not replayed:
                missing.append(name)
        return self.x.unstored(missing[0], results) if missing else results


class ReplayWaits:
    """Sleeps, child runs and signals of a ``ReplayPass``: an open wait is where the run
    stands. Mirrors ``engine.waits.Waits`` (same signatures: a test compares them)."""

    def __init__(self, replay: ReplayPass) -> None:
        self.x = replay
        self.history = replay.history

    def sleep(self, name: str, duration: Duration) -> None:
        parse_duration(duration, what=f'duration of sleep "{name}"')
        name = self.x.step_name(name)
        if name in self.history.completed:
            return None
        return self.x.unstored(name)  # type: ignore[no-any-return]

    def run_workflow(
        self,
        workflow: Any,
        input: Any,
        *,
        name: str | None,
        timeout: Duration | None,
        placement: tuple[str | None, int | None, str | None] = (None, None, None),
    ) -> Any:
        step = child_call(workflow, input, name=name, timeout=timeout)[2]
        step = self.x.step_name(step)
        replayed, output = self.history.replay_child(step)
        return output if replayed else self.x.unstored(step)

    def send_signal(self, signal: str, data: Any, *, name: str | None) -> list[str]:
        check_name(signal, "signal")
        step = self.x.step_name(signal if name is None else name)
        done = self.history.completed.get(step)
        if done is not None:
            return done.output  # type: ignore[return-value]
        ensure_json(data, f'data of signal step "{step}"')
        return self.x.unstored(step, [])  # type: ignore[no-any-return]

    def wait_for_signal(
        self, signal: str, *, name: str | None, timeout: Duration | None
    ) -> dict[str, Any] | None:
        check_name(signal, "signal")
        step = signal if name is None else name
        timeout_delta(timeout, step)
        step = self.x.step_name(step)
        done = self.history.completed.get(step)
        if done is not None:
            return done.output  # type: ignore[no-any-return]
        return self.x.unstored(step)  # type: ignore[no-any-return]


# --- the check -----------------------------------------------------------------------


def replay_run(
    run: WorkflowRun, attempts: Iterable[StepAttempt], *, using: str | None = None
) -> Finding | None:
    """Replay ``run`` (its ``attempts`` oldest first) against the registered code.

    None when the code reaches the stored steps in the stored order; else
    the ``Finding``. ``using``: the database whose transactions the
    workflow's steps must not be called inside (the run's own by default).
    """
    attempts = list(attempts)
    workflow = get_workflow(run.workflow_name)
    if workflow is None:
        return _finding(
            run,
            UNREGISTERED,
            None,
            None,
            None,
            f'no workflow "{run.workflow_name}" is registered in the code being checked',
        )
    using = using or run._state.db or app_settings.DATABASE
    replay = ReplayPass(run, attempts, using=using)
    raised: BaseException | None = None
    try:
        output = replay.call(workflow)
        ensure_json(output, f'output of workflow "{workflow.name}" (run {run.pk})')
    except UnstoredStep as stop:
        raised = stop
    except NonDeterminism as exc:
        return _changed_order(run, workflow, attempts, replay, exc, using)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # as the worker: SystemExit too is a failure of the code
        raised = exc
    return _not_reached(run, replay, raised)


def _changed_order(
    run: WorkflowRun,
    workflow: Workflow,
    attempts: Sequence[StepAttempt],
    replay: ReplayPass,
    exc: NonDeterminism,
    using: str,
) -> Finding:
    """The code asked for ``exc.step`` where the history has ``exc.expected``: how so?

    A survey of the code's calls tells whether the stored step comes later
    (reordered), or never, with a step asked for that the history has
    elsewhere (removed) or does not have (renamed).
    """
    position = len(replay.history.positions)
    stored, asked = exc.expected, exc.step
    later = survey(run, workflow, attempts, using)[position + 1 :]
    if stored in later:
        kind, why = REORDERED, f'"{stored}" comes later now'
    elif asked in replay.history.bound.values() or asked in replay.history.completed:
        kind, why = REMOVED, f'the code no longer calls "{stored}" there'
    else:
        kind, why = RENAMED, f'the history has no step "{asked}"'
    message = (
        f'step call #{position + 1} asks for "{asked}", where the stored history has '
        f'"{stored}": {why} ({kind})'
    )
    return _finding(run, kind, position, stored, asked, message)


def survey(
    run: WorkflowRun, workflow: Workflow, attempts: Sequence[StepAttempt], using: str
) -> list[str]:
    """The step calls the code makes, in order, checking no order and stopping at nothing."""
    replay = ReplayPass(run, attempts, using=using, survey=True)
    try:
        replay.call(workflow)
    except KeyboardInterrupt:
        raise
    except BaseException:  # the calls made until then are the answer
        pass
    return replay.calls()


def _not_reached(
    run: WorkflowRun, replay: ReplayPass, raised: BaseException | None
) -> Finding | None:
    """After the replay ended: a stored step the code did not reach, or what it raised."""
    position = replay.first_unreached()
    after = f"after {plural(len(replay.history.positions), 'step call')}"
    error = "" if raised is None else f": {_error(raised)}"
    if position is None:
        if raised is None or isinstance(raised, UnstoredStep):
            return None
        return _finding(
            run, RAISED, None, None, None, f"the workflow function raised {after}{error}"
        )
    stored = f'stored step "{replay.history.bound[position]}" (step call #{position + 1})'
    if isinstance(raised, UnstoredStep):
        at = replay.history.positions[raised.step] + 1
        message = (
            f'the replay stopped at step "{raised.step}" (step call #{at}), which has no '
            f"stored result, before reaching {stored}"
        )
    elif raised is None:
        message = f"the workflow function returned {after}, before reaching {stored}"
    else:
        message = f"the workflow function raised {after}, before reaching {stored}{error}"
    return _finding(run, NOT_REACHED, position, replay.history.bound[position], None, message)


def _error(exc: BaseException) -> str:
    """Type and first line of the message: never the whole text (it may quote values)."""
    text = first_line(exc)
    return type(exc).__name__ + (f": {text}" if text else "")


def _finding(
    run: WorkflowRun,
    kind: str,
    position: int | None,
    stored_step: str | None,
    asked_for: str | None,
    message: str,
) -> Finding:
    version = f", version {run.version}" if run.version else ""
    return Finding(
        run=str(run.pk),
        workflow=run.workflow_name,
        version=run.version,
        kind=kind,
        position=position,
        stored_step=stored_step,
        asked_for=asked_for,
        message=f"run {run.pk} ({run.workflow_name}{version}): {message}",
    )


# --- nothing written -----------------------------------------------------------------


@contextmanager
def refusing_writes(what: str) -> Iterator[None]:
    """Every database connection of this thread refuses statements other than reads."""
    with ExitStack() as stack:
        for connection in connections.all():
            stack.enter_context(connection.execute_wrapper(_refuse_writes(what, connection.alias)))
        yield


@contextmanager
def rolled_back() -> Iterator[None]:
    """In each transaction open on this thread (a test's), a savepoint rolled back at the end.

    A refused write raised inside ``Model.save()`` marks the transaction as
    needing a rollback; the savepoint's rollback leaves it usable. Outside
    transactions (the command) nothing is sent.
    """
    with ExitStack() as stack:
        for connection in connections.all(initialized_only=True):
            if connection.in_atomic_block:
                stack.enter_context(transaction.atomic(using=connection.alias))
                stack.callback(transaction.set_rollback, True, using=connection.alias)
        yield


def _refuse_writes(what: str, alias: str) -> Callable[..., Any]:
    def guard(execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any) -> Any:
        words = str(sql).lstrip(" \t\r\n(").split(None, 1)
        verb = words[0].upper() if words else ""
        if verb not in READS and not _session_setup(str(sql)):
            raise WriteRefused(
                f"{what} writes nothing, but {verb or 'a statement'} was sent to database "
                f'"{alias}": code outside steps must not write'
            )
        return execute(sql, params, many, context)

    return guard


def _session_setup(sql: str) -> bool:
    """Whether ``sql`` is Django's set-up of a new connection: ``SESSION_SETUP`` statements
    only, joined by "; " (nothing else may ride along)."""
    return all(part.strip().upper() in SESSION_SETUP for part in sql.split(";"))
