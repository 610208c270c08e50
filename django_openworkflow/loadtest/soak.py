"""The soak test's workflows, its mix and its audit (used by ``manage.py soak_workflows``).

Not autodiscovered: the command and its workers import this module. One
workflow, ``django_openworkflow.soak.mixed``, runs one *kind* of workflow
life per run, named in its input; each kind is a few steps of compressed
time (milliseconds where production has minutes or days):

========== ============================================================================
plain      three ``step.run`` steps
sleep      a step, ``step.sleep`` of 5 to 54 ms (the run parks and is claimed again),
           a step
retry      a step that fails twice before it succeeds (``RetryPolicy`` of 10 ms,
           doubling): three attempts
child      a child run (``step.run_workflow``) of a step and a 5 ms sleep
signal     ``step.wait_for_signal`` (timeout 10 minutes): the command sends each
           run its own signal once the run waits, with the run's number as data
deadline   started with a deadline 10 minutes ahead: a step, a 10 ms sleep, a step
========== ============================================================================

``DEFAULT_MIX`` says how often each kind comes: run ``i`` takes the kind at
``i`` modulo the mix's length, so any run count has the same proportions.
Each kind knows the output a run of it must end with (``Kind.expect``);
the audit reads every run back and compares.

A test (or you) can add kinds with ``@kind(...)`` in a module of its own,
passed to the command with ``--workflows-module``, and name them in
``--mix``: the test suite adds kinds that leak a thread, a file, a
connection or memory per run, to prove the soak's growth checks fail.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.db.models import Count

from ..conf import app_settings
from ..diagnostics import StuckRun, stuck_runs
from ..durations import RetryPolicy
from ..models import StepAttempt, WorkflowRun
from ..registry import workflow
from ..retention import FINISHED, Purge

NAMESPACE = "openworkflow-soak"
SIGNAL_PREFIX = "django_openworkflow.soak.go-"
FLAKES = 2  # failed attempts of a ``retry`` run's flaky step before it succeeds
RETRY_POLICY = RetryPolicy(
    initial_interval="10ms", backoff_coefficient=2, maximum_interval="100ms", maximum_attempts=5
)
DEFAULT_MIX = "plain=4,sleep=2,retry=1,child=1,signal=1,deadline=1"


@dataclass(frozen=True)
class Kind:
    """One kind of workflow life: its body, the value it must return, how it is started."""

    name: str
    body: Callable[[Any, int], Any]
    expect: Callable[[int], Any]
    deadline: timedelta | None = None
    signalled: bool = False  # the command sends it ``signal_name(i)`` once it waits


KINDS: dict[str, Kind] = {}


def kind(
    name: str,
    *,
    expect: Callable[[int], Any],
    deadline: timedelta | None = None,
    signalled: bool = False,
) -> Callable[[Callable[[Any, int], Any]], Callable[[Any, int], Any]]:
    """Register ``body(ctx, i)`` as the kind ``name``, whose runs must return ``expect(i)``."""

    def register(body: Callable[[Any, int], Any]) -> Callable[[Any, int], Any]:
        if name in KINDS:
            raise ValueError(f"soak kind {name!r} is registered twice")
        KINDS[name] = Kind(name, body, expect, deadline, signalled)
        return body

    return register


def signal_name(i: int) -> str:
    return f"{SIGNAL_PREFIX}{i}"


def output(kind_name: str, i: int, value: Any) -> dict[str, Any]:
    return {"i": i, "kind": kind_name, "value": value}


@workflow(name="django_openworkflow.soak.mixed")
def mixed(ctx: Any) -> dict[str, Any]:
    i, kind_name = ctx.input["i"], ctx.input["kind"]
    return output(kind_name, i, KINDS[kind_name].body(ctx, i))


@workflow(name="django_openworkflow.soak.child")
def child(ctx: Any) -> int:
    i = ctx.input["i"]
    doubled = ctx.step.run("double", lambda: 2 * i)
    ctx.step.sleep("nap", "5ms")
    return doubled  # type: ignore[no-any-return]


@kind("plain", expect=lambda i: i + 3)
def plain(ctx: Any, i: int) -> int:
    value = i
    for k in range(3):
        value = ctx.step.run(f"step-{k}", lambda v=value: v + 1)
    return value


@kind("sleep", expect=lambda i: i + 2)
def sleep(ctx: Any, i: int) -> int:
    before = ctx.step.run("before", lambda: i + 1)
    ctx.step.sleep("nap", f"{5 + i % 50}ms")
    return ctx.step.run("after", lambda: before + 1)  # type: ignore[no-any-return]


class Flake(Exception):
    """The planned failure of a ``retry`` run's flaky step."""


def _flaky(run_id: Any, i: int) -> int:
    """Fail while this run's step has failed fewer than ``FLAKES`` times, then return ``i``."""
    failed = (
        StepAttempt.objects.using(app_settings.DATABASE)
        .filter(workflow_run_id=run_id, step_name="flaky", status=StepAttempt.Status.FAILED)
        .count()
    )
    if failed < FLAKES:
        raise Flake(f"planned failure {failed + 1} of {FLAKES} of soak run {i}")
    return i


@kind("retry", expect=lambda i: i)
def retry(ctx: Any, i: int) -> int:
    run_id = ctx.run_id
    return ctx.step.run("flaky", lambda: _flaky(run_id, i), retry_policy=RETRY_POLICY)  # type: ignore[no-any-return]


@kind("child", expect=lambda i: 2 * i)
def with_child(ctx: Any, i: int) -> int:
    return ctx.step.run_workflow(child, {"i": i}, name="child")  # type: ignore[no-any-return]


@kind("signal", expect=lambda i: i, signalled=True)
def with_signal(ctx: Any, i: int) -> int | None:
    received = ctx.step.wait_for_signal(signal_name(i), name="go", timeout="10m")
    return None if received is None else received["data"]["i"]


@kind("deadline", expect=lambda i: i + 2, deadline=timedelta(minutes=10))
def with_deadline(ctx: Any, i: int) -> int:
    before = ctx.step.run("before", lambda: i + 1)
    ctx.step.sleep("nap", "10ms")
    return ctx.step.run("after", lambda: before + 1)  # type: ignore[no-any-return]


# --- the mix -------------------------------------------------------------------------------


def parse_mix(text: str) -> list[str]:
    """``"plain=4,sleep=2"`` -> the cycle of kind names, ``ValueError`` naming a bad part."""
    cycle: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, weight = part.partition("=")
        if name not in KINDS:
            known = ", ".join(sorted(KINDS))
            raise ValueError(f"unknown kind {name!r} in the mix (known: {known})")
        if not weight.isdigit():
            raise ValueError(f"the weight of {name!r} must be a whole number, not {weight!r}")
        cycle.extend([name] * int(weight))
    if not cycle:
        raise ValueError(f"the mix {text!r} names no run")
    return cycle


def kind_of(cycle: list[str], i: int) -> str:
    return cycle[i % len(cycle)]


def due(runs: int, duration: float, elapsed: float, burst: int) -> int:
    """How many of ``runs`` fed evenly over ``duration`` seconds are due ``elapsed`` in.

    At least ``burst`` (a first batch that keeps every slot busy); all at once
    without a duration.
    """
    if not duration:
        return runs
    return min(runs, max(burst, int(runs * elapsed / duration) + 1))


def start_batch(
    cycle: list[str], first: int, count: int, now: Any
) -> list[tuple[uuid.UUID, int, str]]:
    """Start runs ``first`` .. ``first + count - 1``, one ``start_many`` per kind.

    Returns (run id, number, kind) of each run.
    """
    by_kind: dict[str, list[int]] = {}
    for i in range(first, first + count):
        by_kind.setdefault(kind_of(cycle, i), []).append(i)
    started: list[tuple[uuid.UUID, int, str]] = []
    for name, numbers in by_kind.items():
        deadline = KINDS[name].deadline
        runs = mixed.start_many(
            ({"i": i, "kind": name} for i in numbers),
            deadline_at=None if deadline is None else now + deadline,
        )
        started += [(run.pk, run.input["i"], name) for run in runs]
    return started


def signal_waits(run_ids: Iterable[uuid.UUID]) -> list[tuple[uuid.UUID, str]]:
    """(run id, signal) of those runs that wait for a signal now."""
    waits = StepAttempt.objects.filter(
        workflow_run_id__in=list(run_ids),
        kind=StepAttempt.Kind.SIGNAL_WAIT,
        status=StepAttempt.Status.RUNNING,
    ).values_list("workflow_run_id", "signal")
    return [(run_id, str(signal)) for run_id, signal in waits]


def finished_runs(fed: int) -> int:
    """How many of the ``fed`` soak runs have finished (counted from the active ones)."""
    return fed - soak_runs().active().count()


def soak_runs() -> Any:
    return WorkflowRun.objects.filter(namespace=NAMESPACE, workflow_name=mixed.name)


def _no_rest(seconds: float) -> None:
    """The soak's clean-up does not yield to other runs: it is the only work left."""


def delete_runs() -> None:
    """Delete the soak's runs: the finished ones by retention's batches, then the rest."""
    Purge(dict.fromkeys(FINISHED, timedelta(0)), namespace=NAMESPACE, rest=_no_rest).run()
    WorkflowRun.objects.filter(namespace=NAMESPACE).delete()


# --- the audit -----------------------------------------------------------------------------


@dataclass
class Audit:
    """What the database holds after a soak, checked against what must hold."""

    runs: int
    statuses: dict[str, int] = field(default_factory=dict)
    children: dict[str, int] = field(default_factory=dict)
    wrong_outputs: list[str] = field(default_factory=list)  # the first few, as "run i: ..."
    wrong_output_count: int = 0
    stuck: list[StuckRun] = field(default_factory=list)
    flakes: int = 0  # planned failures of retry runs
    other_failures: dict[str, int] = field(default_factory=dict)  # failed attempts by type

    @property
    def completed(self) -> int:
        return self.statuses.get(WorkflowRun.Status.COMPLETED, 0)

    @property
    def not_completed(self) -> int:
        return self.runs - self.completed

    @property
    def children_not_completed(self) -> int:
        return sum(n for status, n in self.children.items() if status != "completed")

    @property
    def ok(self) -> bool:
        problems = (self.not_completed, self.children_not_completed, self.wrong_output_count)
        return not (any(problems) or self.stuck)


def audit(runs: int, expected_flakes: int) -> Audit:
    """Every soak run completed with its kind's output, nothing stuck, failures as planned."""
    result = Audit(runs=runs)
    result.stuck = stuck_runs(namespace=NAMESPACE)
    result.statuses = _statuses(soak_runs())
    result.children = _statuses(
        WorkflowRun.objects.filter(namespace=NAMESPACE, workflow_name=child.name)
    )
    for problem in _wrong_outputs():
        result.wrong_output_count += 1
        if len(result.wrong_outputs) < 5:
            result.wrong_outputs.append(problem)
    failed = Counter(
        dict(
            StepAttempt.objects.filter(
                workflow_run__namespace=NAMESPACE, status=StepAttempt.Status.FAILED
            )
            .values_list("error__type")
            .annotate(n=Count("pk"))
            .values_list("error__type", "n")
        )
    )
    result.flakes = failed.pop(Flake.__name__, 0)
    result.other_failures = {str(k): v for k, v in failed.items()}
    if result.flakes != expected_flakes:
        result.other_failures[f"{Flake.__name__} (expected {expected_flakes})"] = result.flakes
    return result


def _statuses(runs: Any) -> dict[str, int]:
    return {row["status"]: row["n"] for row in runs.values("status").annotate(n=Count("pk"))}


def _wrong_outputs() -> Iterator[str]:
    completed = soak_runs().filter(status=WorkflowRun.Status.COMPLETED)
    for given, got in completed.values_list("input", "output").iterator(chunk_size=2000):
        i, kind_name = given["i"], given["kind"]
        want = output(kind_name, i, KINDS[kind_name].expect(i))
        if got != want:
            yield f"run {i} ({kind_name}): output {got!r}, expected {want!r}"


def expected_flakes(cycle: list[str], runs: int) -> int:
    retry_runs = sum(1 for i in range(runs) if kind_of(cycle, i) == "retry")
    return FLAKES * retry_runs
