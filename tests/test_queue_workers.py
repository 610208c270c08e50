"""Queue limits kept by real ``runworker`` processes (SPEC section 9).

Each run records when its work began and ended (``tests/testapp/queue_workflows.py``);
the tests compute overlaps from those intervals, never from how long they waited.
A recorded interval lies inside the time its run is in progress, so an overlap
seen here is a real one, and "at most N" is checked against the engine's own
count of in-progress runs too, sampled while the workers run.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

import pytest
from django.db.models import Max, Min, Q

from django_openworkflow import send_signal
from django_openworkflow.engine import Execution
from django_openworkflow.models import StepAttempt, WorkflowRun
from django_openworkflow.store import get_store
from tests.testapp.models import SideEffect
from tests.testapp.queue_workflows import hold, parks

pytestmark = pytest.mark.django_db(transaction=True)

# Every worker of this file: the queue workflows, and a short poll (a freed slot is seen soon).
WORKER = ("--workflows-module", "tests.testapp.queue_workflows", "--poll-interval", "0.05")

Span = tuple[datetime, datetime]


@pytest.fixture
def queues(settings):
    """Set ``OPENWORKFLOW["QUEUES"]`` here; return the environment that gives a worker
    process the same queues (``OPENWORKFLOW_TEST_QUEUES``, read by tests/settings.py)."""

    def configure(**limits: dict) -> dict[str, str]:
        setting = {"default": {}, **limits}
        settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "QUEUES": setting}
        return {"OPENWORKFLOW_TEST_QUEUES": json.dumps(setting)}

    return configure


def in_progress(queue: str) -> int:
    """The engine's count: runs of ``queue`` claimed once and not finished, parked included."""
    return WorkflowRun.objects.active().filter(queue=queue, started_at__isnull=False).count()


def finish(
    runs: Iterable[WorkflowRun], *, sample: Callable[[], int] | None = None, timeout: float = 30.0
) -> list[int]:
    """Wait until every run has completed; return what ``sample()`` gave at each look."""
    ids = [run.pk for run in runs]
    seen = []
    end = time.monotonic() + timeout
    while True:
        if sample is not None:
            seen.append(sample())
        if not WorkflowRun.objects.filter(pk__in=ids).active().exists():
            break
        assert time.monotonic() < end, f"runs still active after {timeout}s"
        time.sleep(0.02)
    statuses = WorkflowRun.objects.filter(pk__in=ids).values_list("status", flat=True)
    assert set(statuses) == {WorkflowRun.Status.COMPLETED}
    return seen


def wait_until(predicate: Callable[[], bool], message: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {message}"
        time.sleep(0.02)


def spans(runs: Iterable[WorkflowRun]) -> dict[object, Span]:
    """Each run's recorded interval: its first "begin" to its last "end", over all executions."""
    rows = (
        SideEffect.objects.filter(run_id__in=[run.pk for run in runs])
        .values("run_id")
        .annotate(begin=Min("at", filter=Q(step="begin")), end=Max("at", filter=Q(step="end")))
    )
    return {row["run_id"]: (row["begin"], row["end"]) for row in rows}


def max_overlap(intervals: Iterable[Span]) -> int:
    """The most intervals open at one instant (one ending as another begins: not both)."""
    events = sorted([(end, -1) for _, end in intervals] + [(begin, 1) for begin, _ in intervals])
    open_now = most = 0
    for _, change in events:
        open_now += change
        most = max(most, open_now)
    return most


def overlap(a: Span, b: Span) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.mark.postgres
def test_a_queue_concurrency_of_2_holds_across_two_workers_of_4_slots(queues, worker_process):
    env = queues(limited={"concurrency": 2})
    runs = [hold.start({"seconds": 0.3}, queue="limited") for _ in range(8)]
    for _ in range(2):
        worker_process(*WORKER, "--concurrency", "4", env=env)
    counts = finish(runs, sample=lambda: in_progress("limited"))

    assert max(counts) <= 2
    recorded = spans(runs)
    assert len(recorded) == 8
    assert max_overlap(recorded.values()) == 2
    assert in_progress("limited") == 0


@pytest.mark.postgres
def test_key_concurrency_1_keeps_one_run_of_a_key_and_never_blocks_other_keys(
    queues, worker_process
):
    env = queues(billing={"key_concurrency": 1})
    keys = ["a", "a", "a", "b", "b", "b", None, None]
    runs = [hold.start({"seconds": 0.3}, queue="billing", concurrency_key=key) for key in keys]
    for _ in range(2):
        worker_process(*WORKER, "--concurrency", "4", env=env)
    finish(runs)

    recorded = spans(runs)
    by_key: dict[str | None, list[Span]] = {}
    for run, key in zip(runs, keys, strict=True):
        by_key.setdefault(key, []).append(recorded[run.pk])
    assert max_overlap(by_key["a"]) == 1
    assert max_overlap(by_key["b"]) == 1
    # b's first run was due behind two held-back runs of a, and ran beside a's first.
    assert any(overlap(a, b) for a in by_key["a"] for b in by_key["b"])
    # Runs without a key are not limited by key_concurrency.
    assert max_overlap(by_key[None]) == 2


@pytest.mark.postgres
@pytest.mark.parametrize("queue", ["default", "limited"])
def test_one_slot_claims_by_priority_then_due_order(queue, queues, worker_process):
    # With no queue limited, PostgreSQL claims in one statement (store/postgres.py); a limited
    # queue goes through the claim that counts slots (store/limits.py), here a limit that
    # never binds.
    env = queues(limited={"concurrency": 50}) if queue == "limited" else queues()
    priorities = [0, 5, -3, 5, 0, 100, -3, 5, 0, -100]
    runs = [hold.start({}, queue=queue, priority=priority) for priority in priorities]
    due = [run.available_at for run in runs]
    assert due == sorted(due) and len(set(due)) == len(due)  # started in due order
    worker_process(*WORKER, "--concurrency", "1", env=env)
    finish(runs)

    # (priority, position in due order) of each run, in the order the worker claimed them
    position = {run.pk: i for i, run in enumerate(runs)}
    started = WorkflowRun.objects.filter(pk__in=position).order_by("started_at")
    order = [position[pk] for pk in started.values_list("pk", flat=True)]
    claimed = [(priorities[i], i) for i in order]
    expected = sorted(((p, i) for i, p in enumerate(priorities)), key=lambda pi: (-pi[0], pi[1]))
    assert claimed == expected


@pytest.mark.postgres
def test_a_rate_limit_of_4_per_second_spreads_12_first_executions(queues, worker_process):
    env = queues(paced={"rate_limit": "4/s"})
    runs = [hold.start({}, queue="paced") for _ in range(12)]
    for _ in range(2):
        worker_process(*WORKER, "--concurrency", "4", env=env)
    finish(runs)

    starts = sorted(
        WorkflowRun.objects.filter(pk__in=[run.pk for run in runs]).values_list(
            "started_at", flat=True
        )
    )
    assert starts[-1] - starts[0] >= timedelta(seconds=2)
    second = timedelta(seconds=1)
    busiest = max(sum(1 for t in starts if s <= t < s + second) for s in starts)
    assert busiest == 4


@pytest.mark.postgres
def test_a_killed_workers_runs_keep_their_slots_and_no_slot_leaks(queues, worker_process, tmp_path):
    env = queues(limited={"concurrency": 2})
    flag = tmp_path / "go"
    runs = [hold.start({"until": str(flag)}, queue="limited") for _ in range(4)]
    first = worker_process(*WORKER, "--concurrency", "4", "--lease", "1", env=env)
    begun = SideEffect.objects.filter(step="begin")
    wait_until(lambda: begun.count() >= 2, "the first worker to hold two runs")
    assert in_progress("limited") == 2
    held = set(begun.values_list("run_id", flat=True))
    assert len(held) == 2
    first.signal(signal.SIGKILL)
    first.wait()
    flag.touch()
    second = worker_process(*WORKER, "--concurrency", "4", "--lease", "5", env=env)
    counts = finish(runs, sample=lambda: in_progress("limited"))

    assert max(counts) <= 2
    recorded = spans(runs)
    assert len(recorded) == 4
    assert max_overlap(recorded.values()) == 2
    assert in_progress("limited") == 0
    # The killed worker's runs were taken over after its lease: each ran its step twice.
    ends = dict(SideEffect.objects.filter(step="end").values_list("run_id", "pid"))
    assert set(ends.values()) == {second.pid}
    for run_id in held:
        assert SideEffect.objects.filter(run_id=run_id, step="begin").count() == 2
        lost = StepAttempt.objects.get(workflow_run_id=run_id, status="failed")
        assert lost.error["type"] == "WorkerLost"
    # The killed worker's runs kept both places until one of them ended: the other two
    # began only then. (Not after both: one place freed lets one of them begin while the
    # other taken-over run still ends, which failed this test once.)
    first_end = min(recorded[pk][1] for pk in held)
    assert all(recorded[run.pk][0] >= first_end for run in runs if run.pk not in held)


def test_a_changed_limit_takes_effect_at_the_next_claim(queues):
    queues(limited={"concurrency": 1})
    for _ in range(5):
        hold.start({}, queue="limited")

    def claim():
        return get_store().claim(
            namespace="default",
            workflow_names=[hold.name],
            limit=10,
            worker_id="worker-a",
            lease_seconds=30,
        )

    first = claim()
    assert len(first) == 1
    assert claim() == []
    queues(limited={"concurrency": 3})
    assert len(claim()) == 2
    queues(limited={"concurrency": 2})
    Execution(first[0], hold).execute()  # 2 in progress: the queue is full again
    assert in_progress("limited") == 2
    assert claim() == []
    queues(limited={})  # no limits at all
    assert len(claim()) == 2


@pytest.mark.postgres
@pytest.mark.parametrize("park", ["signal", "sleep"])
def test_a_parked_run_keeps_its_key_slot(park, queues, worker_process):
    env = queues(billing={"key_concurrency": 1})
    first = parks.start(
        {"park": park, "signal": "queue-go", "sleep": "1s"}, queue="billing", concurrency_key="k"
    )
    worker_process(*WORKER, "--concurrency", "4", env=env)
    if park == "signal":
        parked = WorkflowRun.objects.filter(pk=first.pk, status="pending", started_at__isnull=False)
        wait_until(parked.exists, "the first run to park")
    else:
        begun = SideEffect.objects.filter(run_id=first.pk, step="begin")
        wait_until(begun.exists, "the first run to begin")
    second = hold.start({}, queue="billing", concurrency_key="k")
    other = hold.start({}, queue="billing", concurrency_key="other")
    finish([other])  # claimed past the held-back second run

    if park == "signal":  # parked until the test says: the state can be checked
        first.refresh_from_db()
        assert first.status == WorkflowRun.Status.PENDING
        assert first.worker_id is None  # parked: no worker holds it, yet it keeps its slot
        second.refresh_from_db()
        assert second.status == WorkflowRun.Status.PENDING
        assert second.started_at is None
        assert in_progress("billing") == 1
        assert send_signal("queue-go") == [str(first.pk)]
    finish([first, second])

    recorded = spans([first, second])
    assert recorded[first.pk][1] <= recorded[second.pk][0]
    assert in_progress("billing") == 0
