"""Hostile tasks for the review of ``WorkflowTaskBackend`` (tests/test_review_tasks.py).

Nothing imports this module at start-up: a worker process meets it first when it
executes one of its tasks.
"""

from __future__ import annotations

import os
import threading
import time

try:
    from django.tasks import task
except ImportError:  # Django 5.2: the backport
    from django_tasks import task

from .models import Ledger

# A task that holds its worker thread until the test lets it go (in-process workers).
running = threading.Event()
let_go = threading.Event()


@task
def held():
    running.set()
    let_go.wait(30)
    return "let go"


@task
def waits_for_file(path):
    """Runs until ``path`` exists (a worker process can be killed meanwhile)."""
    while not os.path.exists(path):
        time.sleep(0.05)
    return "done"


@task
def interrupts():
    raise KeyboardInterrupt


@task
def generator_exit():
    raise GeneratorExit("closed")


@task
def nul_and_surrogate():
    raise ValueError("nul \x00 and a lone surrogate \ud800 here")


@task
def huge_message():
    raise ValueError("x" * 100_000)


class UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")


@task
def unprintable():
    raise UnprintableError()


@task
def local_class():
    class LocalError(Exception):
        pass

    raise LocalError("defined in the function")


@task
def returns(kind):
    values = {
        "set": {1, 2},
        "nan": float("nan"),
        "object": object(),
        "tuple": (1, (2, 3)),
        "bytes": b"text",
        "bad bytes": b"\xff",
        "int keys": {1: "one"},
        "nul": "a\x00b",
    }
    return values[kind]


@task
def big_return(size):
    return "x" * size


@task
def args_back(*args, **kwargs):
    return [args, kwargs]


@task(takes_context=True)
def always_fails(context):
    raise PermissionError(f"attempt {context.attempt}")


@task
def writes(note):
    Ledger.objects.create(run_id="00000000-0000-0000-0000-000000000000", note=note)
    return note


# A workflow whose step.atomic enqueues a task, then fails once (docs/tasks.md: a task
# enqueued in a step.atomic is queued exactly once). Here, not in workflows.py: only the
# review's tests use it, and in-process workers know it once this module is imported.
from django_openworkflow import workflow  # noqa: E402

_passes: dict[str, int] = {}


@workflow(name="review-enqueue-in-step-atomic")
def enqueue_in_step_atomic(ctx):
    def enqueue():
        result = args_back.enqueue("once")
        _passes[str(ctx.run_id)] = _passes.get(str(ctx.run_id), 0) + 1
        if _passes[str(ctx.run_id)] == 1:
            raise ConnectionError("failed after the enqueue")
        return result.id

    return ctx.step.atomic("enqueue", enqueue)
