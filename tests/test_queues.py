"""Queues and flow control (SPEC section 9), in-process.

Placing runs (``@workflow(queue=, priority=)``, ``start()``, ``start_many()``,
child runs), what is refused (unknown queues, bad priorities and keys,
``runworker --queue``, check E010), and the claim's limits seen from outside
the store: a resume gives its slot back, a changed setting counts at the
next claim, priority is strict (a low-priority run waits while higher ones
are due), a property test of random queues, runs and operations, and worker
threads claiming at once. The store-by-store contract of the claim (order,
``queues=``, each limit, slots kept, the rate window) is in test_store.py.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.db.models import F
from django.db.models.functions import Now
from django.test import override_settings
from django.utils import timezone
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from django_openworkflow import workflow
from django_openworkflow.checks import check_settings
from django_openworkflow.managers import ACTIVE
from django_openworkflow.models import QueueStart, WorkflowRun
from django_openworkflow.queues import configured_queues, parse_rate
from django_openworkflow.store import Claim, Claims, Store, get_store
from django_openworkflow.testing import drain, pause_at
from django_openworkflow.worker import Worker
from tests.conftest import NOT_BEHIND_A_POOLER, Backend, blocked_on_a_lock, claim_and_execute
from tests.testapp.workflows import counts_its_queue, echo, queued, queued_parent

QUEUES = {
    "default": {},
    "emails": {"concurrency": 5, "rate_limit": "100/m"},
    "billing": {"key_concurrency": 1},
}
KNOWN = "known queues: billing, default, emails"


@pytest.fixture
def queues(settings):
    """The queues of SPEC section 9 configured."""
    settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "QUEUES": QUEUES}


def set_queues(settings, queues: dict) -> None:
    settings.OPENWORKFLOW = {**settings.OPENWORKFLOW, "QUEUES": queues}


def placement(run: WorkflowRun) -> tuple[str, int, str | None]:
    """The run's queue, priority and key as stored."""
    return WorkflowRun.objects.values_list("queue", "priority", "concurrency_key").get(pk=run.pk)


def take(limit=10, *, worker="w1", queues=None) -> Claims:
    return get_store().claim(
        namespace="default",
        workflow_names=["echo", "queued"],
        limit=limit,
        worker_id=worker,
        lease_seconds=30,
        queues=queues,
    )


def claimed_ids(claims: list[Claim]) -> set:
    return {claim.run_id for claim in claims}


# --- placing runs ------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_run_takes_its_workflows_queue_and_priority(queues):
    assert (queued.queue, queued.priority) == ("emails", 10)
    assert placement(queued.start({"to": "a"})) == ("emails", 10, None)
    assert placement(echo.start(None)) == ("default", 0, None)


@pytest.mark.django_db
def test_start_overrides_the_queue_and_priority_for_one_run(queues):
    run = queued.start(None, queue="billing", priority=-100, concurrency_key="user-1")
    assert (run.queue, run.priority, run.concurrency_key) == ("billing", -100, "user-1")
    assert placement(run) == ("billing", -100, "user-1")
    # zero and "default" are overrides too, not "use the workflow's"
    assert placement(queued.start(None, queue="default", priority=0)) == ("default", 0, None)


@pytest.mark.django_db
def test_start_many_places_every_run_alike(queues):
    runs = queued.start_many([1, 2], priority=50, concurrency_key="k")
    assert [placement(run) for run in runs] == [("emails", 50, "k"), ("emails", 50, "k")]
    runs = queued.start_many([3], queue="billing")
    assert [placement(run) for run in runs] == [("billing", 10, None)]


@pytest.mark.django_db
def test_a_child_run_takes_its_workflows_defaults_unless_run_workflow_overrides_them(queues):
    # the child's workflow's queue and priority, not its parent's
    first = queued_parent.start({}, queue="billing", priority=-5)
    assert claim_and_execute().pk == first.pk
    child = WorkflowRun.objects.get(workflow_name="queued")
    assert placement(child) == ("emails", 10, None)

    second = queued_parent.start({"queue": "billing", "priority": -3, "concurrency_key": "o-7"})
    WorkflowRun.objects.filter(pk=child.pk).update(available_at=None)  # not claimed now
    parent = claim_and_execute()
    assert (parent.pk, parent.status) == (second.pk, "pending")  # waiting for its child
    [child] = WorkflowRun.objects.filter(workflow_name="queued").exclude(pk=child.pk)
    assert placement(child) == ("billing", -3, "o-7")


@pytest.mark.django_db
def test_a_child_run_in_an_unknown_queue_fails_its_parent_and_is_not_stored(queues):
    queued_parent.start({"queue": "nowhere"})
    parent = claim_and_execute()
    assert parent is not None and parent.status == "failed"
    assert parent.error["type"] == "ValueError"
    assert parent.error["message"] == (
        f"queue 'nowhere' of workflow \"queued\" is not in OPENWORKFLOW['QUEUES']; {KNOWN}"
    )
    assert not WorkflowRun.objects.filter(workflow_name="queued").exists()


@pytest.mark.django_db
def test_an_unknown_queue_is_refused_at_start_naming_the_known_queues(queues):
    message = f"queue 'nowhere' of workflow \"queued\" is not in OPENWORKFLOW['QUEUES']; {KNOWN}"
    with pytest.raises(ValueError) as info:
        queued.start(None, queue="nowhere")
    assert str(info.value) == message
    with pytest.raises(ValueError) as info:
        queued.start(None, queue="nowhere", idempotency_key="once")
    assert str(info.value) == message
    with pytest.raises(ValueError) as info:
        queued.start_many([1, 2], queue="nowhere")
    assert str(info.value) == message
    assert not WorkflowRun.objects.exists()


@pytest.mark.django_db
def test_a_workflows_own_queue_must_be_configured_when_a_run_starts(settings):
    set_queues(settings, {"billing": {}})
    with pytest.raises(ValueError) as info:
        queued.start(None)
    assert str(info.value) == (
        "queue 'emails' of workflow \"queued\" is not in OPENWORKFLOW['QUEUES']; "
        "known queues: billing, default"
    )
    assert not WorkflowRun.objects.exists()
    assert placement(queued.start(None, queue="billing")) == ("billing", 10, None)


OUT_OF_RANGE = 'priority of workflow "queued" must be from -100 to 100 (higher runs first), not '


@pytest.mark.parametrize(
    ("priority", "error", "message"),
    [
        (101, ValueError, OUT_OF_RANGE + "101"),
        (-101, ValueError, OUT_OF_RANGE + "-101"),
        (1.5, TypeError, 'priority of workflow "queued" must be a whole number, not 1.5'),
        ("5", TypeError, "priority of workflow \"queued\" must be a whole number, not '5'"),
        (True, TypeError, 'priority of workflow "queued" must be a whole number, not True'),
    ],
)
@pytest.mark.django_db
def test_a_bad_priority_is_refused_naming_it(queues, priority, error, message):
    with pytest.raises(error) as info:
        queued.start(None, priority=priority)
    assert str(info.value) == message
    with pytest.raises(error) as info:
        queued.start_many([1], priority=priority)
    assert str(info.value) == message
    assert not WorkflowRun.objects.exists()


@pytest.mark.parametrize(
    ("key", "error", "message"),
    [
        (
            "",
            TypeError,
            "concurrency_key of workflow \"queued\" must be a non-empty string, not ''",
        ),
        (7, TypeError, 'concurrency_key of workflow "queued" must be a non-empty string, not 7'),
        (
            "k" * 256,
            ValueError,
            'concurrency_key of workflow "queued" is 256 characters long; at most 255 are allowed',
        ),
        (
            "a\x00",
            ValueError,
            "concurrency_key 'a\\x00' of workflow \"queued\" contains the character U+0000 "
            "(NUL), which PostgreSQL cannot store",
        ),
    ],
)
@pytest.mark.django_db
def test_a_bad_concurrency_key_is_refused_naming_it(queues, key, error, message):
    with pytest.raises(error) as info:
        queued.start(None, concurrency_key=key)
    assert str(info.value) == message
    assert not WorkflowRun.objects.exists()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"priority": 200}, ValueError, OUT_OF_RANGE.replace("queued", "q") + "200"),
        (
            {"priority": None},
            TypeError,
            'priority of workflow "q" must be a whole number, not None',
        ),
        ({"queue": ""}, TypeError, "queue of workflow \"q\" must be a non-empty string, not ''"),
        (
            {"queue": "q" * 101},
            ValueError,
            'queue of workflow "q" is 101 characters long; at most 100 are allowed',
        ),
    ],
)
def test_workflow_refuses_a_bad_default_queue_or_priority(options, error, message):
    with pytest.raises(error) as info:
        workflow(name="q", **options)(lambda ctx: None)
    assert str(info.value) == message


# --- runworker --queue and check E010 ----------------------------------------------------


@pytest.mark.django_db
def test_runworker_refuses_an_unknown_queue(queues):
    with pytest.raises(CommandError) as info:
        call_command("runworker", "--queue", "emails", "--queue", "nowhere", "--queue", "nope")
    assert str(info.value) == (
        "--queue: unknown queue 'nope', 'nowhere': OPENWORKFLOW['QUEUES'] has "
        "billing, default, emails"
    )
    with pytest.raises(ValueError) as info:
        Worker(queues=["nowhere"])
    assert str(info.value) == (
        "unknown queue 'nowhere': OPENWORKFLOW['QUEUES'] has billing, default, emails"
    )


@pytest.mark.django_db(transaction=True)
def test_runworker_queue_serves_only_the_queues_named(queues):
    email = queued.start(None)
    bill = queued.start(None, queue="billing")
    plain = echo.start(None)
    call_command("runworker", "--burst", "--queue", "emails", "--queue", "billing", verbosity=0)
    statuses = dict(WorkflowRun.objects.values_list("pk", "status"))
    assert statuses == {email.pk: "completed", bill.pk: "completed", plain.pk: "pending"}


def e010(message: str) -> tuple[str, str]:
    return ("django_openworkflow.E010", f"OPENWORKFLOW['QUEUES']: {message}.")


RATE = 'a rate limit is "N/s", "N/m" or "N/h" with N at least 1, not '
WHOLE = "must be a whole number of at least 1, or None, not "


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([], [e010("QUEUES must be a dict of queue name -> limits, not list")]),
        ({"": {}}, [e010("queue name must be a non-empty string, not ''")]),
        ({" ": {}}, [e010("queue name must be a non-empty string, not ' '")]),
        ({5: {}}, [e010("queue name must be a non-empty string, not 5")]),
        (
            {"q" * 101: {}},
            [e010(f"queue name {'q' * 40!r}… is 101 characters; at most 100")],
        ),
        ({"emails": None}, [e010("queue 'emails' must map to a dict of limits, not None")]),
        (
            {"emails": {"limit": 5}},
            [
                e010(
                    "queue 'emails' has an unknown option 'limit' "
                    "(known: concurrency, key_concurrency, rate_limit)"
                )
            ],
        ),
        ({"emails": {"concurrency": 0}}, [e010(f"queue 'emails': concurrency {WHOLE}0")]),
        ({"emails": {"concurrency": True}}, [e010(f"queue 'emails': concurrency {WHOLE}True")]),
        ({"emails": {"concurrency": "5"}}, [e010(f"queue 'emails': concurrency {WHOLE}'5'")]),
        (
            {"emails": {"key_concurrency": 1.5}},
            [e010(f"queue 'emails': key_concurrency {WHOLE}1.5")],
        ),
        ({"emails": {"rate_limit": "5/x"}}, [e010(f"queue 'emails': {RATE}'5/x'")]),
        ({"emails": {"rate_limit": "0/s"}}, [e010(f"queue 'emails': {RATE}'0/s'")]),
        ({"emails": {"rate_limit": 5}}, [e010(f"queue 'emails': {RATE}5")]),
        (
            {"a": {"concurrency": -1}, "b": {"rate_limit": "1/d"}},
            [e010(f"queue 'a': concurrency {WHOLE}-1"), e010(f"queue 'b': {RATE}'1/d'")],
        ),
    ],
)
def test_check_e010_reports_each_bad_queues_value(value, expected):
    with override_settings(OPENWORKFLOW={"QUEUES": value}):
        assert [(m.id, m.msg) for m in check_settings()] == expected
        # a worker started without the checks serves the default queue, without limits
        assert list(configured_queues()) == ["default"]


def test_check_e010_passes_good_queues():
    good = {**QUEUES, "bulk": {"concurrency": None, "rate_limit": " 10 / s "}}
    with override_settings(OPENWORKFLOW={"QUEUES": good}):
        assert check_settings() == []
        assert sorted(configured_queues()) == ["billing", "bulk", "default", "emails"]


# --- the limits over time ------------------------------------------------------------------


@pytest.mark.django_db
def test_a_resumed_run_gives_up_its_slot_until_it_starts_again_and_counts_again(settings):
    set_queues(settings, {"emails": {"concurrency": 1, "rate_limit": "2/h"}})
    store = get_store()
    first = queued.start(1)
    [claim] = take()
    assert store.finish(claim, "failed", error={"type": "E", "message": "boom"})
    WorkflowRun.objects.resume(first)
    second = queued.start(2, priority=50)
    # the resumed run holds no slot: the other run takes the only one
    [second_claim] = take()
    assert (second_claim.run_id, second_claim.first_start) == (second.pk, True)
    assert store.finish(second_claim, "completed")
    # two first starts in the hour: the resumed run waits for the window to slide
    held = take()
    assert held == []
    assert held.retry_at == claim.db_now + timedelta(hours=1)
    QueueStart.objects.update(started_at=F("started_at") - timedelta(hours=1))
    [again] = take()
    assert (again.run_id, again.first_start) == (first.pk, True)
    # its start counts again, in a window of its own
    assert list(QueueStart.objects.values_list("run_id", "started_at")) == [
        (first.pk, again.db_now)
    ]


@pytest.mark.django_db
def test_a_changed_limit_counts_from_the_next_claim(settings):
    set_queues(settings, {"emails": {"concurrency": 1}})
    minute_ago = timezone.now() - timedelta(minutes=1)
    queued.start_many(list(range(3)), available_at=minute_ago)
    queued.start_many(list(range(3)), concurrency_key="k")  # due after those
    assert len(take()) == 1
    assert take() == []
    set_queues(settings, {"emails": {"concurrency": 4}})
    assert len(take()) == 3
    assert take() == []
    set_queues(settings, {"emails": {"key_concurrency": 1}})  # the key has one in progress
    assert take() == []
    set_queues(settings, {"emails": {}})  # no limits: PostgreSQL's one-statement claim
    assert len(take()) == 2
    assert set(WorkflowRun.objects.values_list("status", flat=True)) == {"running"}


@pytest.mark.parametrize("limits", [{}, {"concurrency": 1}], ids=["unlimited", "limited"])
@pytest.mark.django_db
def test_priority_is_strict_a_lower_priority_run_waits_while_higher_ones_are_due(settings, limits):
    """The documented choice: no ageing. A run of lower priority, however long it has
    been due, is claimed only when no run of higher priority is due."""
    set_queues(settings, {"default": limits})
    store = get_store()
    low = echo.start("low", priority=-1)
    WorkflowRun.objects.filter(pk=low.pk).update(available_at=Now() - timedelta(days=1))
    for _ in range(5):
        echo.start("high", priority=1)
        echo.start("high", priority=1)  # more keep arriving
        [claim] = take(limit=1)
        assert claim.run.input == "high"
        assert store.finish(claim, "completed")
    for _ in range(5):
        [claim] = take(limit=1)
        assert claim.run.input == "high"
        assert store.finish(claim, "completed")
    [claim] = take(limit=1)
    assert claim.run_id == low.pk


# --- a property: random queues, runs and operations ----------------------------------------

QUEUE_NAMES = ["default", "q1", "q2"]
KEYS = [None, "a", "b"]

limits = st.builds(
    lambda concurrency, key_concurrency, rate: {
        name: value
        for name, value in [
            ("concurrency", concurrency),
            ("key_concurrency", key_concurrency),
            ("rate_limit", rate and f"{rate}/h"),
        ]
        if value
    },
    st.sampled_from([None, None, 1, 2, 3]),
    st.sampled_from([None, 1, 1, 2]),
    st.sampled_from([None, None, None, 2, 5]),
)
queue_settings = st.fixed_dictionaries({name: limits for name in QUEUE_NAMES})
run_specs = st.lists(
    st.tuples(st.sampled_from(QUEUE_NAMES), st.sampled_from(KEYS), st.integers(-1, 1)),
    min_size=2,
    max_size=16,
)
served = st.none() | st.lists(st.sampled_from(QUEUE_NAMES), min_size=1, max_size=3, unique=True)
first_claim = st.tuples(st.just("claim"), st.just("w1"), st.integers(1, 16), st.none())
claim_op = st.tuples(
    st.just("claim"), st.sampled_from(["w1", "w2", "w3"]), st.integers(1, 8), served
)
run_op = st.tuples(
    st.sampled_from(["finish", "park", "park", "expire", "fail-resume"]), st.integers(0, 99)
)
wake_op = st.tuples(st.just("wake"), st.integers(0, 99))
operations = st.lists(st.one_of(claim_op, run_op, run_op, wake_op), min_size=1, max_size=24)


@contextlib.contextmanager
def rolled_back():
    """One hypothesis example's database work, undone afterwards (inside the test's transaction)."""
    with transaction.atomic():
        yield
        transaction.set_rollback(True)


@dataclass
class Snapshot:
    """The runs as a claim sees them: those in progress per queue and per (queue, key),
    first starts in the rate window per queue, and the due runs in claim order."""

    per_queue: Counter
    per_key: Counter
    starts: Counter
    due: list  # (pk, queue, key, priority, available_at, started_at)

    @classmethod
    def read(cls, served: list[str] | None) -> Snapshot:
        in_progress = WorkflowRun.objects.filter(status__in=ACTIVE, started_at__isnull=False)
        rows = list(in_progress.values_list("queue", "concurrency_key"))
        due = WorkflowRun.objects.due().filter(namespace="default", workflow_name="echo")
        if served is not None:
            due = due.filter(queue__in=served)
        fields = ("pk", "queue", "concurrency_key", "priority", "available_at", "started_at")
        return cls(
            per_queue=Counter(queue for queue, _ in rows),
            per_key=Counter((queue, key) for queue, key in rows if key is not None),
            starts=Counter(QueueStart.objects.values_list("queue", flat=True)),
            due=sorted(due.values_list(*fields), key=lambda row: (-row[3], row[4], row[0])),
        )


class Limits:
    """The queues' limits as the settings state them, applied to snapshots of the runs."""

    def __init__(self, queues: dict) -> None:
        self.concurrency = {name: q.get("concurrency") for name, q in queues.items()}
        self.key_concurrency = {name: q.get("key_concurrency") for name, q in queues.items()}
        self.rate = {
            name: parse_rate(q["rate_limit"])[0] if q.get("rate_limit") else None
            for name, q in queues.items()
        }

    def room(self, snapshot: Snapshot, queue: str, key: str | None) -> bool:
        """Whether a run of ``queue`` with ``key`` may start now."""
        concurrency, per_key, rate = (
            self.concurrency.get(queue),
            self.key_concurrency.get(queue),
            self.rate.get(queue),
        )
        return not (
            (concurrency and snapshot.per_queue[queue] >= concurrency)
            or (rate and snapshot.starts[queue] >= rate)
            or (per_key and key is not None and snapshot.per_key[queue, key] >= per_key)
        )

    def expected(self, before: Snapshot, limit: int) -> set:
        """The runs a claim of ``limit`` takes: due runs in claim order, each one the limits
        let start (or already in progress), until ``limit``."""
        taken: set = set()
        for pk, queue, key, _, _, started_at in before.due:
            if len(taken) == limit:
                break
            if started_at is None and not self.room(before, queue, key):
                continue
            taken.add(pk)
            if started_at is None:
                before.per_queue[queue] += 1
                before.starts[queue] += 1
                if key is not None:
                    before.per_key[queue, key] += 1
        return taken

    def check(self, claims: Claims, limit: int, served: list[str] | None, before: Snapshot):
        after = Snapshot.read(served)
        for queue, concurrency in self.concurrency.items():
            assert not concurrency or after.per_queue[queue] <= concurrency, after
            assert not self.rate[queue] or after.starts[queue] <= self.rate[queue], after
        for (queue, _key), count in after.per_key.items():
            assert count <= (self.key_concurrency.get(queue) or count), after
        # no head-of-line blocking: a claim that took fewer than it could left no run behind
        # that may start
        if len(claims) < limit:
            left = [row for row in after.due if row[5] is not None or self.room(after, *row[1:3])]
            assert left == [], f"left behind: {left}"
        # and it took the runs the limits allow, in claim order
        assert claimed_ids(claims) == self.expected(before, limit)


def play(store: Store, queues: dict, specs: list, ops: list) -> None:
    """Create the runs, apply the operations, then claim all that may start; check each
    claim."""
    base = timezone.now() - timedelta(hours=1)
    ticks = iter(range(1, 10_000))
    WorkflowRun.objects.bulk_create(
        WorkflowRun(
            namespace="default",
            workflow_name="echo",
            queue=queue,
            concurrency_key=key,
            priority=priority,
            available_at=base + timedelta(seconds=next(ticks)),
        )
        for queue, key, priority in specs
    )
    limits_now = Limits(queues)
    held: dict = {}  # run id -> its live claim
    parked: list = []

    def past() -> object:  # a due time no other run has
        return base + timedelta(seconds=next(ticks))

    for op in [*ops, ("claim", "w1", len(specs), None)]:
        kind = op[0]
        if kind == "claim":
            _, worker, limit, served_queues = op
            before = Snapshot.read(served_queues)
            claims = store.claim(
                namespace="default",
                workflow_names=["echo"],
                limit=limit,
                worker_id=worker,
                lease_seconds=30,
                queues=served_queues,
            )
            limits_now.check(claims, limit, served_queues, before)
            held.update({claim.run_id: claim for claim in claims})
        elif kind == "wake":
            if parked:
                run_id = parked.pop(op[1] % len(parked))
                WorkflowRun.objects.filter(pk=run_id).update(available_at=past())
        elif held:
            run_id = list(held)[op[1] % len(held)]
            claim = held.pop(run_id)
            if kind == "finish":
                assert store.finish(claim, "completed")
            elif kind == "park":
                assert store.park(claim, None)
                parked.append(run_id)
            elif kind == "expire":  # its worker died: the next claim takes it over
                WorkflowRun.objects.filter(pk=run_id).update(available_at=past())
            else:
                assert store.finish(claim, "failed", error={"type": "E"})
                WorkflowRun.objects.resume(run_id)
                WorkflowRun.objects.filter(pk=run_id).update(available_at=past())


@pytest.mark.django_db
def test_every_claim_keeps_the_limits_and_passes_over_no_run_they_allow():
    """On PostgreSQL, PostgresStore: its one-statement claim when no served queue has
    limits, the ORM store's claim when one has."""
    store = get_store()

    @given(queues=queue_settings, specs=run_specs, first=first_claim, ops=operations)
    @hypothesis_settings(max_examples=30)
    def check(queues, specs, first, ops):
        with rolled_back(), override_settings(OPENWORKFLOW={"QUEUES": queues}):
            play(store, queues, specs, [first, *ops])

    check()


# --- worker threads at once ------------------------------------------------------------------


@pytest.mark.row_locks
@pytest.mark.django_db(transaction=True)
def test_a_claim_waiting_for_a_queue_holds_no_run_rows_meanwhile(settings):
    """The lock order of a claim: the queues' locks first, then rows. MariaDB locks the
    rows a scan passes over; a claim that scanned first and then waited for a queue held
    rows the queue's holder had to update: a deadlock."""
    set_queues(settings, {"emails": {"concurrency": 1}})
    queued.start_many([1, 2, 3])
    echo.start_many([4, 5])
    took: dict[str, Claims] = {}
    first = Backend(lambda: took.__setitem__("first", take(limit=1, worker="w1")))
    second = Backend(lambda: took.__setitem__("second", take(limit=5, worker="w2")))
    with pause_at("claim.queue-counted", when=lambda c: c["queue"] == "emails") as pause:
        first.start()
        pause.wait()  # the first holds the queue's lock
        second.start()
        assert blocked_on_a_lock(second)
    first.finish()
    second.finish()
    assert [claim.run.workflow_name for claim in took["first"]] == ["queued"]
    assert sorted(claim.run.workflow_name for claim in took["second"]) == ["echo", "echo"]


@pytest.mark.parametrize(
    "limits",
    [{"concurrency": 1}, {"key_concurrency": 1}, {"rate_limit": "1/h"}],
    ids=["concurrency", "key_concurrency", "rate_limit"],
)
@pytest.mark.row_locks
@pytest.mark.django_db(transaction=True)
def test_a_second_claim_waits_for_the_queue_while_the_first_counts(settings, limits):
    """Two workers never both see the last free slot: the second claim waits for the
    queue's lock until the first has taken the slot and committed."""
    set_queues(settings, {"emails": limits})
    queued.start_many([1, 2], concurrency_key="k")
    took: dict[str, Claims] = {}
    first = Backend(lambda: took.__setitem__("first", take(worker="w1")))
    second = Backend(lambda: took.__setitem__("second", take(worker="w2")))
    with pause_at("claim.queue-counted", when=lambda c: c["queue"] == "emails") as pause:
        first.start()
        pause.wait()  # the first holds the queue's lock: it counted no run in progress
        second.start()
        assert blocked_on_a_lock(second)
    first.finish()
    second.finish()
    assert (len(took["first"]), len(took["second"])) == (1, 0)
    assert WorkflowRun.objects.filter(status="running").count() == 1


# --- PostgreSQL's claim in one round trip ----------------------------------------------------


def other_claimer():
    """A connection of its own, as another worker's: (connection, the queue lock's SQL)."""
    import psycopg

    from django_openworkflow.store.postgres import lock_text

    params = connection.get_connection_params()
    for option in ("cursor_factory", "context", "server_side_binding"):
        params.pop(option, None)
    lock = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
    return psycopg.connect(**params), (lock, [lock_text("queue", "default", "emails")])


@pytest.mark.postgres
@NOT_BEHIND_A_POOLER
@pytest.mark.django_db(transaction=True)
def test_the_one_round_trip_claim_counts_what_another_committed_while_it_waited(
    settings, monkeypatch
):
    """With no test hook at its pause points, PostgreSQL sends a limited claim's queue locks
    and its claim in one query, one transaction. The claim's snapshot is taken when the
    lock is granted, not before it waits: it sees the runs another worker started meanwhile,
    and the limit holds."""
    from django_openworkflow.store.postgres import PostgresStore

    in_one = []
    real = PostgresStore._in_one_transaction

    def spy(store, statements):
        in_one.append(len(statements))
        return real(store, statements)

    monkeypatch.setattr(PostgresStore, "_in_one_transaction", spy)
    set_queues(settings, {"emails": {"concurrency": 2}})
    runs = queued.start_many([1, 2, 3, 4])
    took: dict[str, Claims] = {}
    claimer = Backend(lambda: took.__setitem__("claims", take(worker="w2")))
    other, lock = other_claimer()
    with other, other.transaction():
        other.execute(*lock)  # another worker's claim holds the queue
        claimer.start()
        assert blocked_on_a_lock(claimer)
        # ... and starts two runs of it, on a lease, before it commits
        other.execute(
            "UPDATE django_openworkflow_workflowrun SET status = 'running', worker_id = 'w1',"
            " claim_token = gen_random_uuid(), started_at = statement_timestamp(),"
            " available_at = statement_timestamp() + interval '5 minutes' WHERE id = ANY(%s)",
            [[runs[0].pk, runs[1].pk]],
        )
    claimer.finish()
    assert took["claims"] == []
    assert in_one == [2]  # the lock and the claim
    assert WorkflowRun.objects.filter(status="running").count() == 2


@pytest.mark.postgres
@NOT_BEHIND_A_POOLER
@pytest.mark.django_db(transaction=True)
def test_a_failed_one_round_trip_claim_leaves_its_connection_clean(settings):
    """An error inside the one-round-trip claim (here the queue lock's timeout) rolls it
    back whole and comes out as Django's error; the connection claims again afterwards."""
    from django.db import OperationalError
    from psycopg import pq

    set_queues(settings, {"emails": {"concurrency": 2}})
    queued.start_many([1, 2, 3])
    released = threading.Event()
    seen: dict[str, object] = {}

    def claim_twice() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '100ms'")
        with pytest.raises(OperationalError, match="lock timeout"):
            take(worker="w2")
        seen["status"] = connection.connection.info.transaction_status
        assert released.wait(10)
        seen["claims"] = take(worker="w2")

    claimer = Backend(claim_twice)
    other, lock = other_claimer()
    with other:
        with other.transaction():
            other.execute(*lock)
            claimer.start()
            end = time.monotonic() + 10
            while "status" not in seen and claimer.is_alive() and time.monotonic() < end:
                time.sleep(0.01)  # until the claim has given up on the lock
        released.set()
    claimer.finish()
    assert seen["status"] == pq.TransactionStatus.IDLE
    assert len(seen["claims"]) == 2
    assert WorkflowRun.objects.filter(status="running").count() == 2


@pytest.mark.postgres
@NOT_BEHIND_A_POOLER
@pytest.mark.django_db(transaction=True)
def test_the_one_round_trip_claim_prepares_its_statements_again_after_a_discard(settings):
    """A pooler or a ``DISCARD ALL`` drops a session's prepared statements; the claim then
    prepares its own again and claims, rather than failing at every claim."""
    set_queues(settings, {"emails": {"concurrency": 2}})
    queued.start_many([1, 2, 3])
    assert len(take(limit=1)) == 1  # prepares the lock and the claim on this connection
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    assert len(take(limit=1)) == 1
    assert take(limit=1) == []  # the limit of 2 still counts
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'owf_%%'")
        assert cursor.fetchone()[0] == 2


@pytest.mark.postgres
@NOT_BEHIND_A_POOLER
@pytest.mark.django_db(transaction=True)
def test_behind_a_pooler_that_loses_prepared_statements_claims_go_one_by_one(
    settings, monkeypatch, caplog
):
    """A pooler in transaction mode runs SQL PREPARE on one server connection and the next
    query on another. After two misses in a row the claim says so, once, and claims of
    limited queues go statement by statement from then on."""
    from django.db import ProgrammingError

    from django_openworkflow.store import postgres

    def prepare_elsewhere(raw, name, text):  # as if the next query went to another server
        raw.execute(f"PREPARE {name} AS {text}")
        raw.execute(f"DEALLOCATE {name}")

    monkeypatch.setitem(postgres._ONE_ROUND_TRIP, "usable", True)
    monkeypatch.setattr(postgres.PostgresStore, "_prepare", staticmethod(prepare_elsewhere))
    set_queues(settings, {"emails": {"concurrency": 2}})
    queued.start_many([1, 2, 3])
    with pytest.raises(ProgrammingError, match="does not exist"):
        take(limit=1)
    assert "claims of limited queues go statement by statement" in caplog.text
    assert len(take(limit=5)) == 2
    assert take(limit=5) == []


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_claim_locks_only_the_runs_it_takes_from_queues_without_limits(settings):
    """A claim reads the best runs of each queue without limits but locks only those it
    takes: a claim at the same moment takes the others."""
    set_queues(settings, {"default": {}, "other": {}, "emails": {"concurrency": 5}})
    first = echo.start(1, priority=5)
    second = echo.start(2, queue="other")
    took: dict[str, Claims] = {}
    with transaction.atomic():  # the first claim's transaction stays open meanwhile
        assert claimed_ids(take(limit=1, worker="w1")) == {first.pk}
        other = Backend(lambda: took.__setitem__("claims", take(limit=1, worker="w2")))
        other.start()
        other.finish()
    assert claimed_ids(took["claims"]) == {second.pk}


@pytest.mark.parametrize(
    "limits", [{"concurrency": 1}, {"key_concurrency": 1}], ids=["concurrency", "key_concurrency"]
)
@pytest.mark.django_db
def test_a_worker_serving_every_queue_takes_runs_of_a_queue_no_longer_configured(settings, limits):
    """A run whose queue was taken out of ``QUEUES`` after it started is claimed by a worker
    that serves every queue: PostgreSQL finds the queues with runs in its index, not in the
    settings."""
    set_queues(settings, {"emails": limits})
    retired = echo.start(1)
    WorkflowRun.objects.filter(pk=retired.pk).update(queue="retired")
    limited = queued.start(2)
    assert claimed_ids(take()) == {retired.pk, limited.pk}


THREAD_QUEUES = {"narrow": {"concurrency": 2, "key_concurrency": 1}, "rated": {"rate_limit": "5/h"}}


def load() -> tuple[int, int, int]:
    """Runs of "narrow" in progress, the most of one key among them, starts of "rated"."""
    in_progress = WorkflowRun.objects.filter(
        queue="narrow", status__in=ACTIVE, started_at__isnull=False
    )
    keys = Counter(in_progress.values_list("concurrency_key", flat=True))
    rated = QueueStart.objects.filter(queue="rated").count()
    return sum(keys.values()), max(keys.values(), default=0), rated


def claim_in_a_loop(worker_id: str, claimed: list, seen: list) -> None:
    """Claim until no run of "narrow" is pending; a claim's runs finish after the next claim."""
    store = get_store()
    previous: list[Claim] = []
    try:
        while True:
            claims = store.claim(
                namespace="default",
                workflow_names=["echo"],
                limit=2,
                worker_id=worker_id,
                lease_seconds=30,
            )
            claimed.extend(claim.run_id for claim in claims)
            seen.append(load())
            for claim in previous:
                assert store.finish(claim, "completed")
            previous = list(claims)
            pending = WorkflowRun.objects.filter(status="pending", queue="narrow")
            if not previous and not pending.exists():
                return
            if not claims:
                time.sleep(0.005)  # held back: let the others finish theirs
    finally:
        connection.close()


def in_threads(target, count: int) -> None:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    assert errors == []


@pytest.mark.django_db(transaction=True)
def test_the_limits_hold_with_threads_claiming_at_once(settings):
    """On SQLite the IMMEDIATE transaction's write lock serialises the claims; on
    PostgreSQL and MariaDB the queue's lock does."""
    set_queues(settings, THREAD_QUEUES)
    narrow = [
        WorkflowRun(namespace="default", workflow_name="echo", queue="narrow", concurrency_key=k)
        for k in ["a", "b", "c"] * 6
    ]
    rated = [
        WorkflowRun(namespace="default", workflow_name="echo", queue="rated") for _ in range(8)
    ]
    WorkflowRun.objects.bulk_create(narrow + rated)
    claimed: list = []
    seen: list = []
    in_threads(lambda i: claim_in_a_loop(f"w{i}", claimed, seen), 4)
    assert max(runs for runs, _, _ in seen) <= 2
    assert max(per_key for _, per_key, _ in seen) == 1
    assert max(starts for _, _, starts in seen) == 5
    assert sorted(Counter(claimed).values()) == [1] * (18 + 5)  # no run claimed twice
    statuses = Counter(WorkflowRun.objects.values_list("queue", "status"))
    assert statuses == {
        ("narrow", "completed"): 18,
        ("rated", "completed"): 5,
        ("rated", "pending"): 3,
    }


@pytest.mark.django_db(transaction=True)
def test_the_limits_hold_with_worker_threads(settings):
    set_queues(settings, THREAD_QUEUES)
    runs = [counts_its_queue.start(None, concurrency_key=k) for k in ["a", "b", "c"] * 4]

    def work(i: int) -> None:
        while WorkflowRun.objects.active().exists():
            Worker(concurrency=3, burst=True, poll_interval=0.02, worker_id=f"w{i}").run()

    in_threads(work, 2)
    assert set(WorkflowRun.objects.values_list("status", flat=True)) == {"completed"}
    outputs = [WorkflowRun.objects.get(pk=run.pk).output for run in runs]
    assert {output["runs"] for output in outputs} <= {1, 2}
    assert {output["per_key"] for output in outputs} == {1}


@workflow(name="sleeps-in-narrow", queue="narrow")
def parks_in_narrow(ctx):
    if ctx.input["sleep"]:
        ctx.step.sleep("nap", ctx.input["sleep"])
    return "done"


@pytest.mark.django_db
def test_drain_returns_when_a_full_queue_holds_the_only_due_run(settings):
    """A run parked for an hour keeps the queue's one place; the other waits, drain() returns."""
    settings.OPENWORKFLOW = {"QUEUES": {"default": {}, "narrow": {"concurrency": 1}}}
    sleeper = parks_in_narrow.start({"sleep": 3600})
    held = parks_in_narrow.start({"sleep": 0})
    drain(time_travel=False)
    drain()  # travels past the hour: the sleeper ends, then the held run starts and ends
    sleeper.refresh_from_db()
    held.refresh_from_db()
    assert (sleeper.status, held.status) == ("completed", "completed")


@pytest.mark.django_db
def test_drain_slides_a_full_rate_window(settings):
    settings.OPENWORKFLOW = {"QUEUES": {"default": {}, "narrow": {"rate_limit": "1/h"}}}
    runs = [parks_in_narrow.start({"sleep": 0}) for _ in range(3)]
    drain()
    starts = sorted(
        WorkflowRun.objects.filter(pk__in=[r.pk for r in runs]).values_list("status", flat=True)
    )
    assert starts == ["completed"] * 3
    assert QueueStart.objects.count() <= 1  # older starts left the window as time passed
