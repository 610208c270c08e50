"""Tasks of Django's task framework, run by ``WorkflowTaskBackend`` (tests/test_tasks.py)."""

from __future__ import annotations

import asyncio
import uuid

try:
    from django.tasks import task
except ImportError:  # Django 5.2: the backport
    from django_tasks import task

from django_openworkflow.tasks import WorkflowTaskBackend

from .models import Ledger


@task
def noop_task(*args, **kwargs):
    return None


@task
async def noop_task_async(*args, **kwargs):
    await asyncio.sleep(0)


@task
def calculate_meaning_of_life():
    return 42


@task
def add(a, b):
    return a + b


@task
def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


@task
async def async_add(a, b):
    await asyncio.sleep(0)
    return a + b


@task
def failing_task_value_error():
    raise ValueError("This Task failed due to ValueError")


@task
def failing_task_system_exit():
    raise SystemExit("This Task failed due to SystemExit")


class PaymentDeclined(Exception):
    pass


@task
def failing_task_custom_error(amount):
    raise PaymentDeclined(f"card declined for {amount}")


@task
def complex_exception():
    raise ValueError(ValueError("This task failed"))


@task
def complex_return_value():
    return {"when": object()}


@task(takes_context=True)
def get_task_id(context):
    return context.task_result.id


@task(takes_context=True)
def context_attempt(context):
    return {"attempt": context.attempt, "status": str(context.task_result.status)}


@task(backend="retrying", takes_context=True)
def flaky(context, succeed_on):
    """Fails until its ``succeed_on``-th attempt (a retry policy of 3 attempts)."""
    if context.attempt < succeed_on:
        raise ConnectionError(f"attempt {context.attempt} failed")
    return context.attempt


@task
def write_ledger(run_id, note):
    """A write of the task: a Ledger row (the enqueue's transaction test counts them)."""
    Ledger.objects.create(run_id=uuid.UUID(run_id), note=note)
    return note


@task
def needs_permission():
    """Fails until a Ledger row "allowed" exists (a run to resume once it does)."""
    if not Ledger.objects.filter(note="allowed").exists():
        raise PermissionError("not allowed yet")
    return "done"


def not_a_task():
    return "a plain function"


class SubclassBackend(WorkflowTaskBackend):
    """A project's own subclass (tests/test_tasks.py: it registers the task workflow too)."""
