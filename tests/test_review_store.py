"""The adversarial review of issue 11 (the store): old write paths against new ones.

Each test is one interleaving or fault that the engine before the store
(commit 4e07a54: engine.py, fastpath.py, managers.py) survived in a certain
way; the test checks the store-based engine keeps that behaviour.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from django_openworkflow.models import StepAttempt
from django_openworkflow.pauses import add_hook, remove_hook
from django_openworkflow.registry import get_workflow
from tests.test_store import execute, expire, stores, take
from tests.testapp.models import SideEffect

pytestmark = pytest.mark.django_db(transaction=True)


@contextmanager
def on_point(name, action, **match):
    """Run ``action`` once on the engine's own thread when it reaches pause point ``name``."""
    done = []

    def hook(context):
        if not done and all(context.get(key) == value for key, value in match.items()):
            done.append(action())

    add_hook(name, hook)
    try:
        yield done
    finally:
        remove_hook(name, hook)


def history(run):
    return [
        (a.step_name, a.status, a.error and a.error["type"])
        for a in StepAttempt.objects.filter(workflow_run=run).order_by("id")
    ]


@pytest.fixture(params=stores(), ids=lambda cls: cls.__name__)
def store(request):
    return request.param("default")


# --- the lease: the ORM stores renewed it at every step start ------------------------------


@pytest.mark.parametrize(
    "store_class",
    [cls for cls in stores() if cls.__name__ != "PostgresStore"],
    ids=lambda cls: cls.__name__,
)
def test_an_orm_store_renews_the_lease_when_a_step_starts(store_class):
    # 4e07a54: on every database but PostgreSQL, starting a step fenced with renew=True,
    # so a run that makes progress keeps its lease even when heartbeats fail (SQLite's
    # "database is locked", say). PostgreSQL's one-statement start left it to the heartbeat.
    store = store_class("default")
    run = get_workflow("review-two-steps").start()
    [claim] = take(store, "review-two-steps")
    expire(claim)  # no heartbeat got through since the claim

    def another_worker_claims():
        return [c.run_id for c in take(store, "review-two-steps", worker="other")]

    with on_point("step.before-fence", another_worker_claims, step="b") as taken:
        execute(store, claim)  # step "a" started, ran; then "b" is about to start
    assert taken == [[]]  # "a" started under a renewed lease: nobody could take the run
    run.refresh_from_db()
    assert (run.status, run.output) == ("completed", 3)
    assert SideEffect.objects.filter(run_id=run.pk, step="a").count() == 1
