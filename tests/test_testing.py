"""The testing helper, used the way a user's own test suite would (no transaction=True)."""

from datetime import timedelta

import pytest
from django.utils import timezone

from django_openworkflow import send_signal
from django_openworkflow.models import WorkflowRun
from django_openworkflow.testing import drain, run_to_completion, travel
from tests.testapp.models import SideEffect
from tests.testapp.workflows import fan_out, flaky, parent, sleeper, waiter

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
