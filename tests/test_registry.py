import datetime
import threading
import time

import pytest
from django.db import connection, transaction
from django.utils import timezone

from django_openworkflow import RetryPolicy, workflow
from django_openworkflow.models import WorkflowRun
from django_openworkflow.registry import Workflow, _registry, get_workflow
from tests.conftest import ROW_LOCKS, Backend, blocked_on_a_lock, lock_holders
from tests.testapp.workflows import echo, three_steps

pytestmark = pytest.mark.django_db(transaction=True)


def test_start_inserts_a_pending_run():
    run = three_steps.start({"i": 7})
    assert isinstance(run, WorkflowRun)
    run.refresh_from_db()
    assert run.workflow_name == "three-steps"
    assert run.status == WorkflowRun.Status.PENDING
    assert run.input == {"i": 7}
    assert run.namespace == "default"
    assert run.worker_id is None
    assert run.available_at is not None
    assert run.resume_generation == 0


def test_start_refuses_non_json_input_at_once():
    with pytest.raises(TypeError) as info:
        echo.start({"when": datetime.date(2026, 1, 1)})
    assert str(info.value).startswith(
        "input of workflow \"echo\" is not a JSON value: $['when'] is a datetime.date"
    )
    assert WorkflowRun.objects.count() == 0


def test_start_inside_a_rolled_back_transaction_leaves_no_run():
    with pytest.raises(RuntimeError), transaction.atomic():
        echo.start({"x": 1})
        assert WorkflowRun.objects.count() == 1
        raise RuntimeError("caller's transaction fails")
    assert WorkflowRun.objects.count() == 0


def test_start_with_available_at_and_deadline():
    later = timezone.now() + datetime.timedelta(hours=1)
    deadline = timezone.now() + datetime.timedelta(hours=2)
    run = echo.start(None, available_at=later, deadline_at=deadline)
    run.refresh_from_db()
    assert run.available_at == later
    assert run.deadline_at == deadline
    assert not WorkflowRun.objects.due().filter(pk=run.pk).exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"available_at": "tomorrow"},
            TypeError,
            'available_at of workflow "echo" must be a datetime',
        ),
        ({"deadline_at": 5}, TypeError, 'deadline_at of workflow "echo" must be a datetime'),
        (
            {"idempotency_key": ""},
            TypeError,
            'idempotency_key of workflow "echo" must be a non-empty',
        ),
        (
            {"idempotency_key": "k" * 256},
            ValueError,
            'idempotency_key of workflow "echo" is 256 characters long',
        ),
    ],
)
def test_start_refuses_bad_arguments(kwargs, error, message):
    with pytest.raises(error) as info:
        echo.start(None, **kwargs)
    assert str(info.value).startswith(message)


def test_same_idempotency_key_returns_the_existing_run():
    first = echo.start({"n": 1}, idempotency_key="order-1")
    again = echo.start({"n": 2}, idempotency_key="order-1")
    other_key = echo.start({"n": 3}, idempotency_key="order-2")
    other_workflow = three_steps.start({"i": 1}, idempotency_key="order-1")
    assert again.pk == first.pk
    assert other_key.pk != first.pk
    assert other_workflow.pk != first.pk
    assert WorkflowRun.objects.count() == 3


def test_idempotency_key_expires_after_24_hours():
    first = echo.start(None, idempotency_key="daily")
    WorkflowRun.objects.filter(pk=first.pk).update(
        created_at=timezone.now() - datetime.timedelta(hours=24, seconds=1)
    )
    second = echo.start(None, idempotency_key="daily")
    assert second.pk != first.pk


@pytest.mark.row_locks
def test_concurrent_starts_with_the_same_key_make_one_run():
    barrier = threading.Barrier(8)
    ids, errors = [], []

    def start():
        try:
            barrier.wait()
            ids.append(echo.start({"x": 1}, idempotency_key="same-instant").pk)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert errors == []
    assert len(ids) == 8
    assert len(set(ids)) == 1
    assert WorkflowRun.objects.count() == 1


def test_starts_with_one_key_in_open_outer_transactions_make_one_run():
    """Six starters, each in its own outer transaction held open until every one has
    called start(): the key's lock lasts until the outer transaction ends, so the
    others wait for the first to commit, then find its run (PostgreSQL: advisory lock;
    MariaDB: the key's row lock; SQLite: the IMMEDIATE write lock serializes them)."""
    ready, release = threading.Barrier(6), threading.Event()
    started: list = []

    def starter():
        ready.wait(10)
        with transaction.atomic():
            started.append(echo.start({"x": 1}, idempotency_key="outer").pk)
            assert release.wait(10)  # commits only when the test says so

    threads = [Backend(starter) for _ in range(6)]
    for thread in threads:
        thread.start()
    end = time.monotonic() + 10
    # Until one start() returned and (with row locks) the five others wait for its lock.
    while not started or (ROW_LOCKS and len(started) + waiting(threads) < 6):
        assert time.monotonic() < end, f"{len(started)} returned, {waiting(threads)} wait"
        time.sleep(0.01)
    assert len(started) == 1  # the others wait for the first one's transaction
    release.set()
    for thread in threads:
        thread.finish()
    assert len(started) == 6
    assert set(started) == {started[0]}
    assert WorkflowRun.objects.count() == 1


@pytest.mark.row_locks
def test_a_rolled_back_start_lets_the_waiting_one_make_the_run():
    """The key's lock ends with a rollback too (a session lock such as GET_LOCK would not)."""
    holding, release = threading.Event(), threading.Event()
    runs: list = []

    def rolls_back():
        with pytest.raises(RuntimeError), transaction.atomic():
            echo.start({"x": 1}, idempotency_key="undone")
            holding.set()
            assert release.wait(10)
            raise RuntimeError("the caller's transaction fails")

    first = Backend(rolls_back)
    second = Backend(lambda: runs.append(echo.start({"x": 2}, idempotency_key="undone")))
    first.start()
    assert holding.wait(10)
    second.start()
    assert blocked_on_a_lock(second)
    release.set()
    first.finish()
    second.finish()
    assert list(WorkflowRun.objects.values_list("pk", "input")) == [(runs[0].pk, {"x": 2})]


def waiting(threads) -> int:
    """How many of ``threads`` wait for a lock now."""
    return sum(1 for t in threads if t.pid is not None and lock_holders(t.pid) is not None)


def test_workflow_decorator_name_defaults_to_dotted_path():
    @workflow
    def local_flow(ctx):
        return None

    try:
        assert isinstance(local_flow, Workflow)
        expected = (
            f"{__name__}.test_workflow_decorator_name_defaults_to_dotted_path.<locals>.local_flow"
        )
        assert local_flow.name == expected
        assert get_workflow(expected) is local_flow
    finally:
        _registry.pop(local_flow.name, None)


def test_workflow_decorator_with_version_and_policy():
    policy = RetryPolicy(maximum_attempts=2)

    @workflow(name="versioned-test-flow", version="2", retry_policy=policy)
    def versioned(ctx):
        return ctx.version

    try:
        assert versioned.version == "2"
        assert versioned.retry_policy is policy
        run = versioned.start()
        run.refresh_from_db()
        assert run.version == "2"
    finally:
        _registry.pop("versioned-test-flow", None)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: workflow(name="")(lambda ctx: None), "workflow name must be a non-empty string"),
        (lambda: workflow(name="x")(42), "@workflow must decorate a function, not 42"),
        (
            lambda: workflow(name="x", retry_policy={"maximum_attempts": 1})(lambda ctx: None),
            "retry_policy of workflow 'x' must be a RetryPolicy",
        ),
    ],
)
def test_workflow_decorator_refuses_bad_arguments(call, message):
    with pytest.raises(TypeError) as info:
        call()
    assert str(info.value).startswith(message)


def test_autodiscovery_registered_the_test_app_workflows():
    assert get_workflow("three-steps") is three_steps
