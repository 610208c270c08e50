"""Workflow signals: send_signal() and ctx.step.send_signal / wait_for_signal."""

import threading

import pytest
from django.db import connection, transaction

from django_openworkflow import send_signal
from django_openworkflow.models import StepAttempt, WorkflowRun, WorkflowSignal
from django_openworkflow.testing import drain
from tests.testapp.models import SideEffect
from tests.testapp.workflows import signaller, waiter

pytestmark = pytest.mark.django_db(transaction=True)


def waiting(signal="go", **input):
    run = waiter.start({"signal": signal, **input})
    drain(time_travel=False)
    run.refresh_from_db()
    assert run.status == "pending"
    return run


def test_a_waiting_run_is_parked_without_a_timer():
    run = waiting()
    step = StepAttempt.objects.get(workflow_run=run, step_name="go")
    assert (step.kind, step.status, step.signal, step.wake_at) == (
        "signal_wait",
        "running",
        "go",
        None,
    )
    assert (run.worker_id, run.available_at) == (None, None)


def test_a_signal_during_the_wait_is_delivered_once():
    run = waiting()
    other = waiting("other")
    assert send_signal("go", {"colour": "green"}) == [str(run.pk)]
    assert send_signal("go", {"colour": "red"}) == []  # already delivered
    drain()
    run.refresh_from_db()
    assert run.status == "completed"
    assert run.output == {"data": {"colour": "green"}}
    assert SideEffect.objects.filter(run_id=run.pk, step="before").count() == 1
    other.refresh_from_db()
    assert other.status == "pending"


def test_a_signal_before_the_wait_is_not_delivered():
    assert send_signal("early", 1) == []
    run = waiting("early")
    drain()
    run.refresh_from_db()
    assert run.status == "pending"


def test_one_signal_wakes_every_waiting_run():
    runs = [waiting("broadcast") for _ in range(3)]
    assert sorted(send_signal("broadcast", "hi")) == sorted(str(r.pk) for r in runs)
    drain()
    assert [WorkflowRun.objects.get(pk=r.pk).output for r in runs] == [{"data": "hi"}] * 3


def test_a_wait_times_out_with_none():
    run = waiting("late", timeout="5m")
    assert run.available_at is not None
    drain()  # time travel past the timeout
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", None)
    assert send_signal("late", 1) == []


def test_idempotent_send_delivers_nothing_new():
    first = waiting("paid")
    assert send_signal("paid", {"n": 1}, idempotency_key="invoice-7") == [str(first.pk)]
    second = waiting("paid")
    assert send_signal("paid", {"n": 2}, idempotency_key="invoice-7") == []
    assert send_signal("paid", {"n": 3}, idempotency_key="invoice-8") == [str(second.pk)]
    record = WorkflowSignal.objects.get(idempotency_key="invoice-7")
    assert (record.signal, record.data, record.delivered_to) == ("paid", {"n": 1}, [str(first.pk)])


def test_a_signal_sent_inside_a_rolled_back_transaction_delivers_nothing():
    run = waiting("maybe")
    with pytest.raises(RuntimeError), transaction.atomic():
        send_signal("maybe", 1)
        raise RuntimeError("caller fails")
    step = StepAttempt.objects.get(workflow_run=run, step_name="maybe")
    assert step.status == "running"


def test_a_workflow_sends_a_signal_as_a_step_exactly_once():
    target = waiting("ping")
    sender = signaller.start({"signal": "ping", "data": [1, 2]})
    drain()
    sender.refresh_from_db()
    assert sender.output == [str(target.pk)]
    step = StepAttempt.objects.get(workflow_run=sender, step_name="ping")
    assert (step.kind, step.status, step.signal, step.output) == (
        "signal_send",
        "completed",
        "ping",
        [str(target.pk)],
    )
    target.refresh_from_db()
    assert target.output == {"data": [1, 2]}


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("",), TypeError, "signal must be a non-empty string, not ''"),
        ((None,), TypeError, "signal must be a non-empty string, not None"),
        (("go", {1, 2}), TypeError, 'data of signal "go" is not a JSON value: $ is a builtins.set'),
    ],
)
def test_bad_signals_are_refused(args, error, message):
    with pytest.raises(error) as info:
        send_signal(*args)
    assert str(info.value).startswith(message)


@pytest.mark.row_locks
def test_concurrent_sends_deliver_to_a_waiting_step_once():
    run = waiting("race")
    barrier = threading.Barrier(4)
    results = []

    def send(n):
        try:
            barrier.wait()
            results.append(send_signal("race", n))
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert sorted(len(r) for r in results) == [0, 0, 0, 1]
    drain()
    run.refresh_from_db()
    assert run.status == "completed"


@pytest.mark.postgres
def test_a_signal_wakes_a_waiting_worker_at_once(worker_process):
    import time

    run = waiter.start({"signal": "bell"})
    proc = worker_process("--poll-interval", "60")
    end = time.monotonic() + 20
    while not StepAttempt.objects.filter(workflow_run=run, step_name="bell").exists():
        assert time.monotonic() < end, proc.output()
        time.sleep(0.05)
    assert send_signal("bell", "ding") == [str(run.pk)]
    assert run.result(timeout=10) == {"data": "ding"}
