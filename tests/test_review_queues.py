"""The adversarial review of issue 12 (queues and limits, SPEC section 9).

Each test is one interleaving or fault of the limited claim (``store/limits.py``)
or of a path that frees a place, forced with pause points and threads that
have connections of their own, never with sleeps.
"""

from __future__ import annotations

import pytest

from django_openworkflow.models import WorkflowRun
from django_openworkflow.store import Claims, get_store

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def queues(settings):
    """Set ``OPENWORKFLOW["QUEUES"]`` ("default" without limits, plus these)."""

    def configure(**limits: dict) -> None:
        settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "QUEUES": {"default": {}, **limits}}

    return configure


def claim(limit: int = 10, *, worker: str = "w1", queues: list[str] | None = None) -> Claims:
    return get_store().claim(
        namespace="default",
        workflow_names=["echo"],
        limit=limit,
        worker_id=worker,
        lease_seconds=30,
        queues=queues,
    )


# --- keyset pagination: runs due at one instant ----------------------------------------------


def test_runs_due_at_the_same_instant_as_a_page_end_are_found_on_the_next_page(queues):
    # One statement writes every run's available_at with the database clock (as start_many
    # does, or start() calls within one millisecond). SQLite keeps Now() with milliseconds
    # and a datetime parameter with microseconds: the same instant, unequal as text, so the
    # next page's "after this row" condition lost the rows due at the page end's instant.
    queues(billing={"key_concurrency": 1})
    WorkflowRun.objects.bulk_create(
        WorkflowRun(namespace="default", workflow_name="echo", queue="billing", concurrency_key="a")
        for _ in range(41)
    )
    assert WorkflowRun.objects.values("available_at").distinct().count() == 1
    last = WorkflowRun.objects.order_by("pk").last()  # last in claim order
    WorkflowRun.objects.filter(pk=last.pk).update(concurrency_key="b")

    claims = claim(2)  # a page of 20 runs of key "a" held back after the first
    assert {c.run.concurrency_key for c in claims} == {"a", "b"}
