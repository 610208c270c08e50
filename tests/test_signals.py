"""Django signals for the run lifecycle, sent after commit."""

import pytest
from django.db import transaction

from django_openworkflow import signals
from django_openworkflow.models import WorkflowRun
from tests.conftest import claim_and_execute, drain
from tests.testapp.workflows import echo, fails_at_once, flaky

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def received():
    events = []
    connected = []
    for name in (
        "run_started",
        "step_failed",
        "run_completed",
        "run_failed",
        "run_resumed",
        "run_canceled",
    ):

        def receiver(sender, run, signal, _name=name, **kwargs):
            assert sender is WorkflowRun
            # after commit: the change is visible to a fresh read
            status = WorkflowRun.objects.get(pk=run.pk).status
            events.append((_name, run.pk, status, kwargs))

        getattr(signals, name).connect(receiver)
        connected.append((getattr(signals, name), receiver))
    yield events
    for signal, receiver in connected:
        signal.disconnect(receiver)


def names(events):
    return [name for name, *_ in events]


def test_a_completed_run_sends_started_and_completed(received):
    run = echo.start(1)
    claim_and_execute()
    assert names(received) == ["run_started", "run_completed"]
    assert [(pk, status) for _, pk, status, _ in received] == [
        (run.pk, "running"),
        (run.pk, "completed"),
    ]


def test_a_failing_step_and_run_send_step_failed_and_run_failed(received):
    run = flaky.start({"failures": 5, "attempts": 2})
    drain()
    assert names(received) == [
        "run_started",
        "step_failed",
        "step_failed",
        "run_failed",
    ]
    step_events = [kwargs for name, _, _, kwargs in received if name == "step_failed"]
    assert [e["step_name"] for e in step_events] == ["flaky", "flaky"]
    assert step_events[0]["error"]["message"] == "boom 1"
    assert step_events[0]["attempt"].step_name == "flaky"
    assert received[-1][2] == "failed"
    assert WorkflowRun.objects.get(pk=run.pk).status == "failed"


def test_resume_and_cancel_send_their_signals_with_by(received, django_user_model):
    user = django_user_model.objects.create_user("ops")
    run = fails_at_once.start()
    claim_and_execute()
    received.clear()
    WorkflowRun.objects.resume(run, by=user)
    WorkflowRun.objects.cancel(run, by=user)
    assert [(name, status, kwargs) for name, _, status, kwargs in received] == [
        ("run_resumed", "pending", {"by": user}),
        ("run_canceled", "canceled", {"by": user}),
    ]


def test_signals_wait_for_the_commit(received):
    run = fails_at_once.start()
    claim_and_execute()
    received.clear()
    with transaction.atomic():
        WorkflowRun.objects.resume(run)
        assert received == []
    assert names(received) == ["run_resumed"]


def test_nothing_is_sent_when_the_transaction_rolls_back(received):
    run = fails_at_once.start()
    claim_and_execute()
    received.clear()
    with pytest.raises(RuntimeError), transaction.atomic():
        WorkflowRun.objects.resume(run)
        raise RuntimeError("rolled back")
    assert received == []


def test_a_failing_receiver_is_logged_and_does_not_break_the_engine(caplog):
    def broken(sender, **kwargs):
        raise ValueError("receiver bug")

    signals.run_completed.connect(broken)
    try:
        run = echo.start(2)
        run = claim_and_execute()
    finally:
        signals.run_completed.disconnect(broken)
    assert run.status == "completed"
    assert "signal receiver failed" in caplog.text
    assert "receiver bug" in caplog.text
