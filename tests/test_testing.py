"""The testing helper, used the way a user's own test suite would (no transaction=True)."""

from datetime import timedelta

import pytest
from django.utils import timezone

from django_openworkflow import send_signal
from django_openworkflow.models import WorkflowRun
from django_openworkflow.testing import drain, run_to_completion, travel
from django_openworkflow.waiting import WaitingFor
from tests.conftest import claim_and_execute
from tests.testapp.models import SideEffect
from tests.testapp.workflows import fails_once, fan_out, flaky, parent, sleeper, waiter

pytestmark = pytest.mark.django_db  # a plain test transaction: everything runs in this thread


def test_run_to_completion_skips_a_long_sleep():
    run = run_to_completion(sleeper, {"sleep": "7d"})
    assert (run.status, run.output) == ("completed", 2)


def test_retry_delays_are_skipped_too():
    run = run_to_completion(flaky, {"failures": 3, "initial": "1h"})
    assert (run.status, run.output) == ("completed", 4)


def test_child_workflows_and_parallel_steps_run_in_the_test_transaction():
    assert run_to_completion(parent, {"child": "echo", "child_input": 9}).output == {"child": 9}
    assert run_to_completion(fan_out, {"concurrent": False}).output == "ABC"


def test_a_run_waiting_for_a_signal_waits_until_it_is_sent():
    run = run_to_completion(waiter, {"signal": "approved"})
    assert run.status == "pending"
    send_signal("approved", {"by": "qa"})
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", {"data": {"by": "qa"}})


def test_without_time_travel_timers_are_left_alone():
    run = run_to_completion(sleeper, {"sleep": "1h"}, time_travel=False)
    assert run.status == "pending"
    assert SideEffect.objects.filter(run_id=run.pk, step="after").count() == 0


def test_deadlines_move_with_time_travel():
    run = sleeper.start({"sleep": "2h"}, deadline_at=timezone.now() + timedelta(hours=1))
    drain()
    run.refresh_from_db()
    assert run.status == "failed"
    assert run.error["type"] == "DeadlineExceeded"


def test_travel_moves_every_timer_by_the_same_amount():
    run = sleeper.start({"sleep": "1h"}, available_at=timezone.now() + timedelta(minutes=30))
    before = WorkflowRun.objects.get(pk=run.pk).available_at
    travel(timedelta(minutes=10))
    assert WorkflowRun.objects.get(pk=run.pk).available_at == before - timedelta(minutes=10)


def test_a_run_that_never_ends_is_reported():
    from django_openworkflow import RetryPolicy, workflow
    from django_openworkflow.registry import _registry

    @workflow(name="forever", retry_policy=RetryPolicy(maximum_attempts=0))
    def forever(ctx):
        raise RuntimeError("again")  # retried without end

    try:
        with pytest.raises(RuntimeError) as info:
            forever.start()
            drain(max_passes=5)
        assert str(info.value) == "drain() stopped after 5 passes; a run never ends"
    finally:
        _registry.pop("forever", None)


def test_drain_sleeps_skips_sleeps_and_retries_but_never_a_signal_timeout():
    napping = sleeper.start({"sleep": "7d"})
    retrying = flaky.start({"failures": 2, "initial": "1h"})
    waiting = waiter.start({"signal": "approved", "timeout": "1h"})

    drain(time_travel="sleeps")

    for run in (napping, retrying, waiting):
        run.refresh_from_db()
    assert (napping.status, napping.output) == ("completed", 2)
    assert (retrying.status, retrying.output) == ("completed", 3)
    wait = waiting.waiting_for()
    assert (wait.kind, wait.step, wait.signal) == ("signal", "approved", "approved")
    assert timedelta(minutes=59) < wait.until - timezone.now() <= timedelta(hours=1)
    send_signal("approved", {"by": "qa"})
    drain(time_travel="sleeps")
    waiting.refresh_from_db()
    assert (waiting.status, waiting.output) == ("completed", {"data": {"by": "qa"}})


def test_drain_refuses_an_unknown_time_travel():
    with pytest.raises(ValueError) as info:
        drain(time_travel="signals")
    assert str(info.value) == "time_travel must be True, False or \"sleeps\", not 'signals'"


def test_waiting_for_says_what_a_parked_run_waits_for():
    napping = run_to_completion(sleeper, {"sleep": "1h"}, time_travel=False)
    wait = napping.waiting_for()
    assert (wait.kind, wait.step, wait.child_run_id, wait.signal) == ("sleep", "nap", None, None)
    assert wait.until == napping.step_attempts.get(step_name="nap").wake_at

    retrying = run_to_completion(flaky, {"failures": 1, "initial": "1h"}, time_travel=False)
    assert retrying.waiting_for() == WaitingFor(
        kind="retry", step="flaky", until=retrying.available_at
    )

    fails_once.start()
    again = claim_and_execute()  # one pass: the workflow failed and waits for its retry
    assert again.waiting_for() == WaitingFor(kind="retry", step=None, until=again.available_at)

    parked = run_to_completion(parent, {"child": "waiter", "child_input": {"signal": "x"}})
    child = WorkflowRun.objects.get(parent_step_attempt__workflow_run=parked)
    assert parked.waiting_for() == WaitingFor(
        kind="child", step="waiter", until=None, child_run_id=child.pk
    )
    assert child.waiting_for() == WaitingFor(kind="signal", step="x", until=None, signal="x")

    assert run_to_completion(sleeper, {"sleep": "1ms"}).waiting_for() is None  # completed
    assert sleeper.start().waiting_for() is None  # due, not started
