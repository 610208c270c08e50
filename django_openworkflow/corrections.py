"""Resume with changes and rerun: what the managers check and plan before they write.

``WorkflowRun.objects.resume(run, input=..., step_outputs=..., by=...)`` and
``WorkflowRun.objects.rerun(run, from_step=..., by=...)`` (``managers.py``)
take the run's row lock and write; the rules they apply live here, as pure
code over the arguments and the run's stored attempts:

- ``Correction``: the corrected input and step outputs, checked like any
  input or step result before the lock is taken; under the lock, the steps
  they name must have failed in the run's current generation.
- ``RerunPlan``: which steps a rerun serves from their stored results,
  which completed attempts it supersedes, which waits it keeps or closes,
  and which attempts' child runs it cancels.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.core.exceptions import PermissionDenied

from .names import check_name
from .serialization import ensure_json, json_problem

if TYPE_CHECKING:
    from .models import StepAttempt, WorkflowRun

CORRECT_PERMISSION = "django_openworkflow.correct_workflowrun"


class NotGiven:
    """The default of ``resume(input=...)``: None is an input like any other."""

    _instance: NotGiven | None = None

    def __new__(cls) -> NotGiven:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Any = NotGiven()


def expected_generation(value: Any) -> int | None:
    """``expected_generation=`` checked: None, or the ``resume_generation`` a caller read."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"expected_generation must be an int (a run's resume_generation), not {value!r}"
        )
    return value


def stale_message(run_id: Any, generation: int, expected: int) -> str:
    """The message of the ``InvalidTransition`` for a stale ``expected_generation``."""
    return (
        f"run {run_id} was resumed or rerun since it was read: it is at generation "
        f"{generation}, not {expected}"
    )


def describe_user(user: Any) -> str:
    get_username = getattr(user, "get_username", None)
    return str(get_username() if callable(get_username) else user)


def require_correct_permission(by: Any, run_id: Any) -> None:
    """A user (``by`` with ``has_perm``) needs ``correct_workflowrun`` to give new values.

    ``PermissionDenied`` otherwise. ``by`` None (the shell, code) or not a
    user object is not checked: the caller speaks for itself.
    """
    has_perm = getattr(by, "has_perm", None)
    if callable(has_perm) and not has_perm(CORRECT_PERMISSION):
        raise PermissionDenied(
            f"user {describe_user(by)} may not resume run {run_id} with changes: "
            f"that needs the permission {CORRECT_PERMISSION}"
        )


def quoted(names: Iterable[str]) -> str:
    return ", ".join(f'"{name}"' for name in names)


def failed_in(generation: int, attempts: Iterable[StepAttempt]) -> dict[str, StepAttempt]:
    """Each step that failed in ``generation``, with its last failed attempt (oldest first)."""
    failed: dict[str, StepAttempt] = {}
    for a in attempts:  # oldest first: the last failure wins
        if a.status == "failed" and a.resume_generation == generation:
            failed[a.step_name] = a
    return failed


def correctable_steps(generation: int, attempts: Iterable[StepAttempt]) -> dict[str, StepAttempt]:
    """The steps a resume may give an output: failed in ``generation`` and not completed
    since (no completed attempt that replay serves), each with its last failed attempt."""
    from .engine.history import is_served

    attempts = list(attempts)
    served = {a.step_name for a in attempts if is_served(a)}
    return {name: a for name, a in failed_in(generation, attempts).items() if name not in served}


@dataclass(frozen=True)
class Correction:
    """The changes of a resume: a new input (or ``NOT_GIVEN``) and outputs for failed steps."""

    run_id: Any
    input: Any = NOT_GIVEN
    step_outputs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def checked(cls, run_id: Any, input: Any, step_outputs: Any) -> Correction:
        """Check the values as ``start()`` checks an input and the engine a step's result.

        ``TypeError`` for a value that is not JSON, for ``step_outputs`` that
        is not a dict or a key that is not a step name; ``ValueError`` for a
        value that is too large or a key no database can store. Each names
        the run, the step and the problem.
        """
        if input is not NOT_GIVEN:
            ensure_json(input, f"input of run {run_id}")
        if step_outputs is None:
            step_outputs = {}
        if type(step_outputs) is not dict:
            raise TypeError(
                f"step_outputs of run {run_id} must be a dict of step names to outputs, "
                f"not {step_outputs!r:.80}"
            )
        for name, value in step_outputs.items():
            check_name(name, "step name", of=f" in step_outputs of run {run_id}")
            ensure_json(value, f'output given for step "{name}" of run {run_id}')
        return cls(run_id, input, dict(step_outputs))

    @property
    def given(self) -> bool:
        """Whether anything changes: a plain resume gives nothing."""
        return self.input is not NOT_GIVEN or bool(self.step_outputs)

    def failed_attempts(
        self, generation: int, attempts: Iterable[StepAttempt]
    ) -> dict[str, StepAttempt]:
        """Each named step's last failed attempt of ``generation`` (read under the lock).

        ``ValueError`` naming the run, the step and the steps that did fail
        for a step with no failed attempt in ``generation``, or with a
        completed attempt that replay serves (it failed, then succeeded).
        """
        attempts = list(attempts)
        failed = failed_in(generation, attempts)
        correctable = correctable_steps(generation, attempts)
        for name in self.step_outputs:
            if name in correctable:
                continue
            reason = (
                "it completed after it failed (its stored output is served)"
                if name in failed
                else f"it has no failed attempt in generation {generation}"
            )
            did_fail = (
                f"the steps that failed: {quoted(correctable)}"
                if correctable
                else f"no step failed in generation {generation}"
            )
            raise ValueError(
                f'cannot resume run {self.run_id} with an output for step "{name}": '
                f"{reason}; {did_fail}"
            )
        return {name: correctable[name] for name in self.step_outputs}

    def details(self, old_input: Any, failed: dict[str, StepAttempt]) -> dict[str, Any] | None:
        """``WorkflowRunEvent.details``: each changed value, old and new (None: no change).

        The record nests the values two or three levels deeper than they are
        stored elsewhere: ``ValueError`` (under the lock, before any write)
        where that is deeper than the database stores JSON (MySQL, MariaDB).
        """
        details: dict[str, Any] = {}
        if self.input is not NOT_GIVEN:
            details["input"] = {"old": old_input, "new": self.input}
        if self.step_outputs:
            details["step_outputs"] = {
                name: {"old": failed[name].error, "new": value}
                for name, value in self.step_outputs.items()
            }
        problem = json_problem(details)
        if problem:
            raise ValueError(
                f"cannot resume run {self.run_id} with these changes: the record of the old "
                f"and new values cannot be stored: {problem}"
            )
        return details or None

    def log_message(self) -> str:
        """The admin history's change message: ``Resumed with changes: input, step "x"``."""
        changed = ["input"] if self.input is not NOT_GIVEN else []
        changed += [f'step "{name}"' for name in self.step_outputs]
        return f"Resumed with changes: {', '.join(changed)}"


@dataclass
class RerunPlan:
    """What a rerun of a run does to its stored attempts (see ``RerunPlan.of``)."""

    from_step: str | None
    path: list[str]
    rerun_steps: list[str]  # the path from from_step on
    served_steps: list[str]  # the path before from_step: their completed attempts stay served
    supersede: list[int] = field(default_factory=list)  # completed attempts no longer served
    close_waits: list[int] = field(default_factory=list)  # open waits of steps that run again
    kept_steps: set[str] = field(default_factory=set)  # steps served: a result or an open wait

    @classmethod
    def of(
        cls, run: WorkflowRun, attempts: Iterable[StepAttempt], from_step: str | None
    ) -> RerunPlan:
        """Plan a rerun of ``run`` (its attempts read under its lock, oldest first).

        The stored path is ``history.stored_path`` of the run's generation.
        The steps at places before ``from_step``'s first place keep what
        replay serves them: their completed attempts and their open waits
        (which go on in the new generation). Every other step runs again:
        its completed attempts (of any generation) are superseded, its open
        waits closed, and its attempts' active child runs canceled. A step
        before ``from_step`` with nothing to serve (it failed and the
        workflow caught it) runs again too. ``ValueError`` for a
        ``from_step`` that is not on the path.
        """
        from .engine.history import is_served, stored_path
        from .managers import WAIT_KINDS

        attempts = list(attempts)
        placed = stored_path(attempts, run.resume_generation)
        path = [name for _, name in placed]
        if from_step is None:
            cut = None
        else:
            cut = next((place for place, name in placed if name == from_step), None)
            if cut is None:
                listed = quoted(path) if path else "it has no stored steps"
                raise ValueError(
                    f'cannot rerun run {run.pk} from step "{from_step}": it is not on the '
                    f"run's stored path ({listed})"
                )
        before = [name for place, name in placed if cut is not None and place < cut]
        plan = cls(from_step, path, path[len(before) :], before)
        served_steps = set(before)
        for a in attempts:
            open_wait = a.status == "running" and a.kind in WAIT_KINDS
            if a.step_name in served_steps and (is_served(a) or open_wait):
                plan.kept_steps.add(a.step_name)  # an open wait goes on in the new generation
            elif is_served(a):
                plan.supersede.append(a.pk)
            elif open_wait:
                plan.close_waits.append(a.pk)
        return plan

    def details(self, generation: int, canceled: Iterable[Any]) -> dict[str, Any]:
        """``WorkflowRunEvent.details`` of the rerun."""
        return {
            "from_step": self.from_step,
            "generation": generation,
            "rerun_steps": self.rerun_steps,
            "canceled_children": [str(pk) for pk in canceled],
        }

    def log_message(self) -> str:
        """The admin history's change message."""
        if self.from_step is None:
            return "Rerun from the start"
        return f'Rerun from step "{self.from_step}"'
