"""A run's replay history and the naming of its step calls: pure code, no database.

``History`` holds what earlier passes stored (completed steps, failures of
the current generation, open waits) and names this pass's step calls: a
repeated name gets ``:1``, ``:2``..., and each call's place in the call
order must be the place the stored history bound to that name.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..durations import RetryPolicy
from ..errors import refused_again
from ..exceptions import StepFailed
from ..models import StepAttempt
from ..names import MAX_NAME_LENGTH, check_name
from .control import NonDeterminism


class History:
    """The stored steps of one run, as the pass of ``generation`` replays them."""

    def __init__(self, run_id: Any, generation: int) -> None:
        self.run_id = run_id
        self.generation = generation
        self.completed: dict[str, StepAttempt] = {}
        self.failures: dict[str, list[StepAttempt]] = {}  # this generation's failures
        self.waiting: dict[str, StepAttempt] = {}  # this generation's open waits
        self.attempt_count = 0  # attempts of this generation
        self.used_names: set[str] = set()
        self.positions: dict[str, int] = {}  # step name -> its place among this pass's calls
        self.bound: dict[int, str] = {}  # place -> the step the history stored there

    def load(self, attempts: Iterable[StepAttempt]) -> None:
        """Take in the stored attempts, oldest first."""
        attempts = list(attempts)
        self.bound = replay_positions(attempts, self.generation)
        for a in attempts:
            current = a.resume_generation == self.generation
            if current:
                self.attempt_count += 1
            if is_served(a):
                self.completed[a.step_name] = a
            elif a.status == StepAttempt.Status.FAILED:
                if current:
                    self.failures.setdefault(a.step_name, []).append(a)
            elif current and a.status == StepAttempt.Status.RUNNING:
                self.waiting[a.step_name] = a

    def name(self, name: str) -> str:
        """The stored name of this step call; ``NonDeterminism`` if the order changed."""
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
        before = self.bound.get(position)
        if before is not None and before != candidate:
            raise NonDeterminism(
                f'run {self.run_id} called step "{candidate}" as step call #{position + 1}, '
                f'where an earlier execution called "{before}": the workflow function must '
                "call its steps in the same order every time it is replayed (to change a "
                "workflow under running runs, branch on ctx.version)",
                step=candidate,
                expected=before,
            )
        self.positions[candidate] = position
        return candidate

    def replay(self, name: str, policy: RetryPolicy) -> tuple[bool, Any]:
        """``(True, result)`` for a completed step; raise what a finished step raised.

        ``(False, None)`` when the step must run (again).
        """
        done = self.completed.get(name)
        if done is not None:
            return True, done.output
        failures = self.failures.get(name, [])
        if failures and failures[-1].error and failures[-1].error.get("retryable") is False:
            raise refused_again(failures[-1].error)
        if policy.exhausted(len(failures)):
            raise StepFailed(name, failures[-1].error or {}, len(failures))
        return False, None

    def replay_child(self, name: str) -> tuple[bool, Any]:
        """``(True, output)`` for a child-workflow step that completed; ``StepFailed`` for one
        that failed in this generation (the child has its own retry policy: the step is not
        retried); ``(False, None)`` when the child must be started or waited for.
        """
        done = self.completed.get(name)
        if done is not None:
            return True, done.output
        failures = self.failures.get(name, [])
        if failures:
            raise StepFailed(name, failures[-1].error or {}, len(failures))
        return False, None

    def failed(self, attempt: StepAttempt) -> int:
        """Count a failure of ``attempt``; return the step's failures so far."""
        self.failures.setdefault(attempt.step_name, []).append(attempt)
        return len(self.failures[attempt.step_name])


def is_served(attempt: StepAttempt) -> bool:
    """Whether replay returns this attempt's stored result: completed, and no rerun since
    asked for the step to run again."""
    return attempt.status == StepAttempt.Status.COMPLETED and attempt.superseded_by_id is None


def replay_positions(attempts: Iterable[StepAttempt], generation: int) -> dict[int, str]:
    """The step each place in the call order must hold when ``generation`` replays.

    Every attempt of the current generation binds its place. An earlier
    generation binds only the places of its completed steps before its first
    unfinished (or superseded: ``is_served``) one: after a step that failed,
    that generation's path followed the failure (a compensation, say), which a
    resumed run need not repeat.
    Later generations win.
    """
    by_generation: dict[int, list[tuple[int, str, bool]]] = {}
    for a in attempts:
        if a.position is not None:
            done = is_served(a)
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


def stored_path(attempts: Iterable[StepAttempt], generation: int) -> list[tuple[int, str]]:
    """The steps of the last path the run took, in call order: ``(place, step)``.

    ``replay_positions`` of the last generation up to ``generation`` that
    stored a step (a run resumed, then canceled before it ran a step, keeps
    the path on which it failed), sorted by place; a step bound at several
    places is listed once, at its first. What ``WorkflowRun.stored_path()``
    shows and ``rerun(from_step=...)`` chooses from.
    """
    attempts = list(attempts)
    last = max(
        (
            a.resume_generation
            for a in attempts
            if a.position is not None and a.resume_generation <= generation
        ),
        default=generation,
    )
    seen: set[str] = set()
    path = []
    for position, name in sorted(replay_positions(attempts, last).items()):
        if name not in seen:
            seen.add(name)
            path.append((position, name))
    return path
