"""ctx.step.parallel: independent steps run at once, one attempt each, replayed correctly."""

import signal
import time

import pytest

from django_openworkflow.models import StepAttempt, WorkflowRun
from tests.conftest import claim_and_execute, drain
from tests.testapp.models import SideEffect
from tests.testapp.workflows import fan_out

pytestmark = pytest.mark.django_db(transaction=True)


def test_parallel_steps_run_at_once_and_are_stored_one_attempt_each():
    run = fan_out.start({})
    run = claim_and_execute()  # the three branches meet at a barrier: they ran concurrently
    assert run.status == WorkflowRun.Status.COMPLETED
    assert run.output == "ABC"
    assert [
        (a.step_name, a.status, a.output)
        for a in StepAttempt.objects.filter(workflow_run=run).order_by("step_name")
    ] == [
        ("a", "completed", "A"),
        ("b", "completed", "B"),
        ("c", "completed", "C"),
        ("join", "completed", "ABC"),
    ]


def test_parallel_steps_replay_without_running_again():
    run = fan_out.start({"pause": True})
    run = claim_and_execute()
    assert run.status == "pending"  # parallel steps done, now sleeping
    drain()
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", "ABC")
    assert SideEffect.objects.filter(run_id=run.pk).count() == 3  # a, b, c once each


def test_a_failing_parallel_step_is_retried_alone():
    from django_openworkflow import RetryPolicy, workflow
    from django_openworkflow.registry import _registry

    @workflow(name="fan-out-flaky")
    def flaky_fan_out(ctx):
        def ok():
            SideEffect.objects.create(run_id=ctx.run_id, step="ok")
            return "ok"

        def flaky():
            SideEffect.objects.create(run_id=ctx.run_id, step="flaky")
            if SideEffect.objects.filter(run_id=ctx.run_id, step="flaky").count() < 2:
                raise ValueError("first try fails")
            return "flaky"

        policy = RetryPolicy(initial_interval="10ms")
        return ctx.step.parallel([("ok", ok), ("flaky", flaky)], retry_policy=policy)

    try:
        run = flaky_fan_out.start()
        drain()
        run.refresh_from_db()
        assert run.output == ["ok", "flaky"]
        assert SideEffect.objects.filter(run_id=run.pk, step="ok").count() == 1
        assert SideEffect.objects.filter(run_id=run.pk, step="flaky").count() == 2
    finally:
        _registry.pop("fan-out-flaky", None)


def test_parallel_refuses_anything_but_pairs():
    from django_openworkflow import workflow
    from django_openworkflow.registry import _registry

    @workflow(name="fan-out-bad")
    def bad(ctx):
        return ctx.step.parallel([lambda: 1])

    try:
        run = bad.start()
        run = claim_and_execute()
        assert run.status == "failed"
        assert run.error["message"].startswith("parallel() takes (name, fn) pairs, not <function")
    finally:
        _registry.pop("fan-out-bad", None)


@pytest.mark.row_locks
def test_after_a_kill_only_the_unfinished_parallel_step_runs_again(worker_process, tmp_path):
    flag = tmp_path / "go"
    run = fan_out.start({"concurrent": False, "block": "c", "path": str(flag)})
    first = worker_process("--lease", "1")
    end = time.monotonic() + 20
    while StepAttempt.objects.filter(workflow_run=run, status="completed").count() < 2:
        assert time.monotonic() < end, first.output()
        time.sleep(0.05)
    first.signal(signal.SIGKILL)
    first.wait()
    flag.touch()
    worker_process("--lease", "1")
    assert run.result(timeout=30) == "ABC"
    counts = {step: SideEffect.objects.filter(run_id=run.pk, step=step).count() for step in "abc"}
    assert counts == {"a": 1, "b": 1, "c": 2}
    lost = StepAttempt.objects.get(workflow_run=run, step_name="c", status="failed")
    assert lost.error["type"] == "WorkerLost"
