"""A stateful property test of the engine on the real database (hypothesis state machine).

It interleaves what workers and people do to runs of the ``stateful`` test
workflow (a step, then a sleep, a child run or a signal wait, then a
``step.atomic``): start, claim, execute, lease expiry and takeover, failing
and healing steps (a switch in the database), resume, cancel, signals, time
travel. After each rule it checks the invariants: no run is stuck, no step
completed twice in a generation, no committed ``step.atomic`` repeated, and
every resume and cancel recorded as an event.

Execution is synchronous, so a ``running`` run exists only between a claim
and its execution: the machine holds claims, expires their leases so another
claim takes the run over, then executes both (the first is fenced out).
"""

from datetime import timedelta

import pytest
from django.db.models import Count, Q
from django.db.models.functions import Now
from django.utils import timezone
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from django_openworkflow import send_signal
from django_openworkflow.diagnostics import stuck_runs
from django_openworkflow.engine import Execution
from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowRunEvent
from django_openworkflow.store import get_store
from django_openworkflow.testing import travel
from tests.testapp.models import Ledger, SideEffect
from tests.testapp.workflows import (
    FAIL_SWITCH,
    HOOK_SWITCH,
    STATEFUL_SIGNAL,
    SWITCH_RUN,
    stateful,
)

pytestmark = pytest.mark.django_db(transaction=True)

LEASE = 30.0
SHAPES = ["steps", "sleep", "child", "signal", "compensate"]


def clean():
    WorkflowRun.objects.all().delete()
    Ledger.objects.all().delete()
    SideEffect.objects.all().delete()


def claim(worker_id):
    return get_store().claim(
        worker_id=worker_id,
        workflow_names=[stateful.name],
        limit=1,
        lease_seconds=LEASE,
        namespace="default",
    )


def flip(switch):
    rows = SideEffect.objects.filter(run_id=SWITCH_RUN, step=switch)
    if rows.exists():
        rows.delete()
    else:
        SideEffect.objects.create(run_id=SWITCH_RUN, step=switch)


def execute(run):
    Execution(run, stateful, max_parallel=1).execute()


class Engine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        clean()
        self.held = []  # claimed runs not executed yet, oldest claim first
        self.workers = 0
        self.signals = 0

    def teardown(self):
        clean()

    def new_worker(self):
        self.workers += 1
        return f"worker-{self.workers}"

    # --- what workers do --------------------------------------------------------

    @rule(shape=st.sampled_from(SHAPES), deadline=st.sampled_from([None, 600]))
    def start(self, shape, deadline):
        deadline_at = None if deadline is None else timezone.now() + timedelta(seconds=deadline)
        stateful.start({"shape": shape}, deadline_at=deadline_at)

    @precondition(lambda self: len(self.held) < 3)
    @rule()
    def claim_and_hold(self):
        """A worker claims a due run (maybe one whose lease expired) and holds it."""
        self.held.extend(claim(self.new_worker()))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def execute_held(self, data):
        """A held claim is executed; a claim taken over meanwhile is fenced out."""
        index = data.draw(st.integers(0, len(self.held) - 1), label="held claim")
        execute(self.held.pop(index))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def expire_lease(self, data):
        """A held claim's lease ends (its worker stalls): the next claim may take the run."""
        held = data.draw(st.sampled_from(self.held), label="expired claim")
        WorkflowRun.objects.filter(pk=held.run_id, claim_token=held.token).update(
            available_at=Now() - timedelta(seconds=1)
        )

    @rule()
    def one_pass(self):
        """A worker claims a due run and executes it at once."""
        for run in claim(self.new_worker()):
            execute(run)

    @rule()
    def drain(self):
        """Workers fail the runs past their deadline, then execute every due run, as often
        as needed (never travelling in time)."""
        get_store().fail_overdue("default")
        for _ in range(20):
            claimed = claim(self.new_worker())
            if not claimed:
                return
            execute(claimed[0])

    @precondition(lambda self: not self.held)  # a held lease would expire far beyond the grace
    @rule(seconds=st.sampled_from([90, 7200]))  # past a retry delay; past a sleep too
    def time_passes(self, seconds):
        travel(timedelta(seconds=seconds))

    # --- what people and other code do ------------------------------------------

    @rule()
    def flip_fail_switch(self):
        """Steps start failing, or stop."""
        flip(FAIL_SWITCH)

    @rule()
    def flip_hook_switch(self):
        """The on_commit hook that the atomic step registers starts raising, or stops."""
        flip(HOOK_SWITCH)

    @rule(pick=st.integers(0, 9))
    def cancel(self, pick):
        active = list(WorkflowRun.objects.active().order_by("created_at", "pk"))
        if active:
            WorkflowRun.objects.cancel(active[pick % len(active)])

    @rule(pick=st.integers(0, 9))
    def resume(self, pick):
        failed = WorkflowRun.objects.failed().order_by("created_at", "pk")
        failed = list(failed)
        if failed:
            run = failed[pick % len(failed)]
            later = None if run.deadline_at is None else timezone.now() + timedelta(seconds=600)
            WorkflowRun.objects.resume(run, deadline_at=later)

    @rule()
    def signal(self):
        self.signals += 1
        send_signal(STATEFUL_SIGNAL, {"n": self.signals})

    # --- invariants ---------------------------------------------------------------

    @invariant()
    def no_run_is_stuck(self):
        stuck = stuck_runs()
        assert stuck == [], "\n".join(map(str, stuck))

    @invariant()
    def no_step_completed_twice_in_a_generation(self):
        twice = (
            StepAttempt.objects.completed()
            .values("workflow_run_id", "step_name", "resume_generation")
            .annotate(n=Count("pk"))
            .filter(n__gt=1)
        )
        assert list(twice) == []

    @invariant()
    def replays_are_deterministic(self):
        # The workflow branches only on its steps' outcomes: a replay always agrees.
        assert list(WorkflowRun.objects.filter(error__type="NonDeterministicWorkflow")) == []

    @invariant()
    def a_step_waits_for_one_child_at_a_time(self):
        # A child a person resumed after its parent's step gave up on it (and a resumed
        # parent started a new one) runs on alone: its end wakes nobody. Not counted.
        given_up = Q(resume_generation__gt=0) & ~Q(parent_step_attempt__status="running")
        twice = (
            WorkflowRun.objects.active()
            .filter(parent_step_attempt__isnull=False)
            .exclude(given_up)
            .values("parent_step_attempt__workflow_run_id", "parent_step_attempt__step_name")
            .annotate(n=Count("pk"))
            .filter(n__gt=1)
        )
        assert list(twice) == []

    @invariant()
    def no_committed_atomic_step_is_repeated(self):
        repeated = Ledger.objects.values("run_id", "note").annotate(n=Count("pk")).filter(n__gt=1)
        assert list(repeated) == []

    @invariant()
    def every_resume_and_cancel_is_an_event(self):
        runs = WorkflowRun.objects.annotate(
            resumes=Count("events", filter=Q(events__action=WorkflowRunEvent.Action.RESUME)),
            cancels=Count("events", filter=Q(events__action=WorkflowRunEvent.Action.CANCEL)),
        )
        for run in runs:
            assert run.resumes == run.resume_generation, run
            assert run.cancels == (1 if run.status == WorkflowRun.Status.CANCELED else 0), run


# The "ci" profile (the default): 25 sequences of 20 rules, a few seconds. With
# HYPOTHESIS_PROFILE=explore: 200 fresh sequences of 30 rules (minutes).
EXPLORING = hypothesis_settings.default.max_examples > 100
Engine.TestCase.settings = hypothesis_settings(
    max_examples=200 if EXPLORING else 25,
    stateful_step_count=30 if EXPLORING else 20,
    deadline=None,
)


@pytest.mark.timeout(1800 if EXPLORING else 120)
def test_the_engine_keeps_its_invariants_under_any_interleaving():
    Engine.TestCase().runTest()


# --- what the state machine found, as plain regression tests ---------------------------


def test_a_committed_atomic_step_is_not_run_again_when_its_on_commit_hook_raises():
    flip(HOOK_SWITCH)
    run = stateful.start({"shape": "steps"})
    for _ in range(3):
        for claimed in claim("worker"):
            execute(claimed)
    run.refresh_from_db()

    # The step's transaction committed its Ledger row and its result; the hook's error
    # comes after the commit and must not make the step run (and write) again.
    assert Ledger.objects.filter(run_id=run.pk).count() == 1
    assert list(
        StepAttempt.objects.filter(workflow_run=run, step_name="write").values_list("status")
    ) == [("completed",)]


def test_a_resumed_parent_does_not_start_a_second_child():
    parent = stateful.start({"shape": "child"}, deadline_at=timezone.now() + timedelta(minutes=10))
    [claimed] = claim("worker")
    execute(claimed)  # the parent starts its child and parks
    child = WorkflowRun.objects.get(parent_step_attempt__workflow_run=parent)
    travel(timedelta(hours=2))
    assert get_store().fail_overdue("default") == 1  # the parent; the child goes on
    WorkflowRun.objects.resume(parent, deadline_at=timezone.now() + timedelta(minutes=10))
    WorkflowRun.objects.filter(pk=parent.pk).update(available_at=Now() - timedelta(days=1))
    [claimed] = claim("worker")
    assert claimed.run_id == parent.pk
    execute(claimed)

    # The first child is still pending: the resumed parent must wait for it, not start another.
    children = WorkflowRun.objects.filter(parent_step_attempt__workflow_run=parent)
    assert list(children.values_list("pk", flat=True)) == [child.pk]


def test_a_compensated_run_can_be_resumed():
    run = stateful.start({"shape": "compensate"})
    execute(*claim("worker"))  # "first"; "risky" fails, "compensate" runs; the nap
    flip(FAIL_SWITCH)
    travel(timedelta(hours=2))
    execute(*claim("worker"))  # "write" fails
    execute(*claim("worker"))  # "write" fails again: the run fails
    run.refresh_from_db()
    assert run.error["message"] == (
        'step "write" failed after 2 attempts: RuntimeError: the switch is on in write'
    )
    flip(FAIL_SWITCH)
    WorkflowRun.objects.resume(run)
    execute(*claim("worker"))
    run.refresh_from_db()

    # The replay must not take the other branch: "risky" stays failed, "compensate" done.
    assert (run.status, run.error) == ("completed", None)
