"""What the queues are doing: ``queue_status``, the Queues page, and the queue on the run
list, the run page and the admin."""

from __future__ import annotations

import uuid
from datetime import timedelta
from unittest import mock

import pytest
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from django_openworkflow.models import QueueStart, WorkflowRun
from django_openworkflow.queue_status import HeldBack, queue_overview, slot_wait
from django_openworkflow.store import get_store
from tests.testapp.workflows import echo
from tests.users import login_as

pytestmark = pytest.mark.django_db

QUEUES = {
    "default": {},
    "emails": {"concurrency": 2, "rate_limit": "100/m"},
    "billing": {"key_concurrency": 1},
    "reports": {"rate_limit": "2/h"},
}
XSS = "<script>alert('owf')</script>"
ESCAPED_XSS = "&lt;script&gt;alert(&#x27;owf&#x27;)&lt;/script&gt;"


@pytest.fixture(autouse=True)
def queues():
    with override_settings(OPENWORKFLOW={"QUEUES": QUEUES}):
        yield


@pytest.fixture
def staff_client(client):
    login_as(client, "staff_view")
    return client


def queues_url() -> str:
    return reverse("django_openworkflow:queues")


def list_url() -> str:
    return reverse("django_openworkflow:run-list")


def detail_url(run) -> str:
    return reverse("django_openworkflow:run-detail", args=[run.pk])


def make_run(queue: str = "default", status: str = "pending", **fields) -> WorkflowRun:
    """A run as the engine leaves it: ``started=True`` means claimed at least once."""
    if fields.pop("started", False):
        fields["started_at"] = timezone.now() - timedelta(minutes=1)
    fields.setdefault("workflow_name", "echo")
    run = WorkflowRun.objects.create(queue=queue, status=status, **fields)
    run.refresh_from_db()
    return run


def in_progress(queue: str, n: int = 1, **fields) -> list[WorkflowRun]:
    """Runs holding a slot: claimed once, not finished (``running``, or parked)."""
    return [make_run(queue, "running", started=True, **fields) for _ in range(n)]


def waiting(queue: str, n: int = 1, **fields) -> list[WorkflowRun]:
    """Runs waiting to start: pending, due, never started."""
    return [make_run(queue, **fields) for _ in range(n)]


def state_of(name: str, namespace: str = "default"):
    [state] = [s for s in queue_overview(namespace) if s.name == name]
    return state


def claim(n: int) -> list[WorkflowRun]:
    claims = get_store().claim(
        namespace="default", workflow_names=["echo"], limit=n, worker_id="w", lease_seconds=30
    )
    return [c.run for c in claims]


def local(moment) -> str:
    return f"{timezone.localtime(moment):%Y-%m-%d %H:%M:%S %Z}"


# --- queue_overview: which queues ----------------------------------------------------


def test_overview_has_every_configured_queue_and_the_other_queues_with_active_runs():
    make_run("legacy")  # a queue since removed from the setting, with a run still to do
    make_run("gone", "completed")  # only finished runs: not shown

    states = queue_overview("default")

    assert [s.name for s in states] == ["billing", "default", "emails", "legacy", "reports"]
    assert [s.configured for s in states] == [True, True, True, False, True]
    assert [s.limits for s in states] == [
        "1 per key",
        "no limits",
        "concurrency 2, at most 100/m",
        "not configured, no limits",
        "at most 2/h",
    ]
    assert states[1].queue.limited is False


def test_without_queues_in_the_setting_the_overview_has_the_default_queue():
    with override_settings(OPENWORKFLOW={}):
        assert [(s.name, s.configured, s.pending) for s in queue_overview("default")] == [
            ("default", True, 0)
        ]


# --- queue_overview: counts ------------------------------------------------------------


def test_overview_counts_pending_waiting_in_progress_and_running():
    waiting("emails", 2)
    make_run("emails", available_at=timezone.now() + timedelta(hours=1))  # due later
    make_run("emails", started=True, available_at=None)  # parked: keeps its slot
    make_run("emails", started=True)  # woken from a sleep: due, but started
    in_progress("emails")
    make_run("emails", "completed", started=True)
    make_run("emails", "failed", started=True)
    make_run("emails", namespace="other")  # another namespace
    waiting("default")

    emails = state_of("emails")

    assert (emails.pending, emails.due, emails.in_progress, emails.running) == (5, 2, 3, 1)
    assert state_of("default").due == 1
    assert state_of("emails", namespace="other").due == 1


def test_a_run_past_its_deadline_is_not_waiting_to_start():
    make_run("emails", deadline_at=timezone.now() - timedelta(seconds=1))
    assert state_of("emails").due == 0


def test_oldest_waiting_age_is_measured_on_the_database_clock():
    an_hour_ago = timezone.now() - timedelta(hours=1)
    waiting("emails", available_at=an_hour_ago)
    waiting("emails", available_at=an_hour_ago + timedelta(minutes=30))
    make_run("emails", started=True, available_at=an_hour_ago - timedelta(days=1))  # started

    a_day_later = timezone.now() + timedelta(days=1)
    with mock.patch("django.utils.timezone.now", return_value=a_day_later):  # Python's clock
        age = state_of("emails").oldest_due_age

    assert timedelta(hours=1) <= age < timedelta(hours=2)
    assert state_of("billing").oldest_due_age is None


def test_overview_takes_a_few_queries_whatever_the_number_of_runs(
    django_assert_max_num_queries,
):
    def add_runs(keys: range) -> None:
        for i in keys:
            for queue in ("emails", "billing", "reports", "default", f"legacy-{i}"):
                in_progress(queue, concurrency_key=f"k-{i}")
                waiting(queue, concurrency_key=f"k-{i}")

    add_runs(range(6))  # more full keys than are listed one by one
    with django_assert_max_num_queries(6) as few:
        queue_overview("default")
    add_runs(range(6, 20))

    with django_assert_max_num_queries(len(few.captured_queries)):
        queue_overview("default")


@pytest.mark.django_db(databases=["default", "workflows"])
def test_overview_reads_the_engine_database():
    waiting("emails")
    WorkflowRun.objects.using("workflows").create(workflow_name="echo", queue="emails")
    WorkflowRun.objects.using("workflows").create(workflow_name="echo", queue="emails")

    [default_side] = [s for s in queue_overview("default") if s.name == "emails"]
    with override_settings(OPENWORKFLOW={"QUEUES": QUEUES, "DATABASE": "workflows"}):
        [engine_side] = [s for s in queue_overview("default") if s.name == "emails"]
    [given] = [s for s in queue_overview("default", using="workflows") if s.name == "emails"]

    assert (default_side.due, engine_side.due, given.due) == (1, 2, 2)


# --- queue_overview: held back ---------------------------------------------------------


def test_a_full_queue_holds_back_every_run_waiting_to_start():
    in_progress("emails", 2)
    waiting("emails", 3)

    assert state_of("emails").held == (
        HeldBack("concurrency", 3, "concurrency 2 of 2 in progress"),
    )


def test_a_queue_with_a_free_slot_holds_back_nothing():
    in_progress("emails")
    waiting("emails", 3)
    in_progress("default", 5)
    waiting("default", 5)

    assert state_of("emails").held == ()
    assert state_of("default").held == ()


def test_a_full_queue_with_nothing_waiting_holds_back_nothing():
    in_progress("emails", 2)
    assert state_of("emails").held == ()


def test_full_keys_hold_back_their_runs_and_no_others():
    in_progress("billing", concurrency_key="customer-7")
    in_progress("billing", concurrency_key="customer-8")
    make_run("billing", started=True, available_at=None, concurrency_key="customer-8")  # parked
    waiting("billing", 2, concurrency_key="customer-7")
    waiting("billing", 1, concurrency_key="customer-8")
    waiting("billing", 4, concurrency_key="customer-9")  # a free key
    waiting("billing", 4)  # no key: not limited by key_concurrency
    make_run("billing", "completed", started=True, concurrency_key="customer-9")

    billing = state_of("billing")

    assert billing.due == 11
    assert billing.held == (
        HeldBack("key", 2, "key 'customer-7' has 1 of 1 in progress", key="customer-7"),
        HeldBack("key", 1, "key 'customer-8' has 2 of 1 in progress", key="customer-8"),
    )
    assert (billing.other_full_keys, billing.held_by_other_keys) == (0, 0)


def test_beyond_the_top_five_full_keys_the_others_are_summed_up():
    for i in range(8):
        in_progress("billing", concurrency_key=f"k{i}")
        waiting("billing", 10 - i, concurrency_key=f"k{i}")

    billing = state_of("billing")

    assert [(h.key, h.count) for h in billing.held] == [
        ("k0", 10),
        ("k1", 9),
        ("k2", 8),
        ("k3", 7),
        ("k4", 6),
    ]
    assert (billing.other_full_keys, billing.held_by_other_keys) == (3, 5 + 4 + 3)


def test_a_reached_rate_limit_holds_back_every_run_waiting_to_start_until_its_next_start():
    first = QueueStart.objects.create(
        namespace="default",
        queue="reports",
        run_id=uuid.uuid4(),
        started_at=timezone.now() - timedelta(minutes=20),
    )
    QueueStart.objects.create(
        namespace="default", queue="reports", run_id=uuid.uuid4(), started_at=timezone.now()
    )
    QueueStart.objects.create(  # outside the window
        namespace="default",
        queue="reports",
        run_id=uuid.uuid4(),
        started_at=timezone.now() - timedelta(hours=2),
    )
    waiting("reports", 3)

    reports = state_of("reports")

    next_start_at = first.started_at + timedelta(hours=1)
    assert reports.recent_starts == 2
    assert reports.held == (
        HeldBack(
            "rate",
            3,
            f"rate limit 2/h reached; next start at {local(next_start_at)}",
            next_start_at=next_start_at,
        ),
    )
    assert state_of("emails").recent_starts == 0
    assert state_of("billing").recent_starts is None


def test_the_overview_agrees_with_the_claim():
    """What the claim starts and what the overview then says is held back, with runs
    claimed through the store (rate-limit starts recorded by the claim itself)."""
    for _ in range(5):
        echo.start({}, queue="reports")
        echo.start({}, queue="emails")

    claimed = claim(10)

    assert sorted(run.queue for run in claimed) == ["emails", "emails", "reports", "reports"]
    emails, reports = state_of("emails"), state_of("reports")
    assert (emails.in_progress, emails.running, emails.due, emails.recent_starts) == (2, 2, 3, 2)
    assert [(h.limit, h.count) for h in emails.held] == [("concurrency", 3)]
    assert (reports.in_progress, reports.due, reports.recent_starts) == (2, 3, 2)
    [held] = reports.held
    first = QueueStart.objects.filter(queue="reports").earliest("started_at").started_at
    assert held.next_start_at == first + timedelta(hours=1)
    assert claim(10) == []  # held back indeed


# --- slot_wait ---------------------------------------------------------------------------


def test_slot_wait_names_the_full_queue():
    in_progress("emails", 2)
    [run] = waiting("emails")

    assert slot_wait(run) == (
        "Waiting for a slot in queue 'emails': concurrency 2 of 2 in progress."
    )


def test_slot_wait_names_the_full_key():
    in_progress("billing", concurrency_key="customer-7")
    [held] = waiting("billing", concurrency_key="customer-7")
    [free] = waiting("billing", concurrency_key="customer-8")
    [keyless] = waiting("billing")

    assert slot_wait(held) == (
        "Waiting for a slot in queue 'billing': key 'customer-7' has 1 of 1 in progress."
    )
    assert slot_wait(free) is None
    assert slot_wait(keyless) is None


def test_slot_wait_names_the_rate_limit_and_when_the_next_run_may_start():
    for _ in range(3):
        echo.start({}, queue="reports")
    claim(3)
    [run] = WorkflowRun.objects.filter(queue="reports", started_at=None)
    first = QueueStart.objects.filter(queue="reports").earliest("started_at").started_at

    assert slot_wait(run) == (
        "Waiting for a slot in queue 'reports': "
        f"rate limit 2/h reached; next start at {local(first + timedelta(hours=1))}."
    )


def test_slot_wait_names_every_full_limit():
    in_progress("emails", 2)
    for _ in range(100):
        QueueStart.objects.create(
            namespace="default", queue="emails", run_id=uuid.uuid4(), started_at=timezone.now()
        )
    [run] = waiting("emails")

    text = slot_wait(run)

    assert text is not None
    assert text.startswith(
        "Waiting for a slot in queue 'emails': concurrency 2 of 2 in progress; "
        "rate limit 100/m reached; next start at "
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"status": "running", "started": True},
        {"started": True},  # woken: it has its slot already
        {"available_at": timezone.now() + timedelta(hours=1)},  # not due yet
        {"status": "failed"},
        {"namespace": "other"},  # the limit is full in "default" only
    ],
    ids=["running", "started", "not-due", "failed", "other-namespace"],
)
def test_slot_wait_is_none_for_a_run_not_waiting_to_start(fields):
    in_progress("emails", 2)
    run = make_run("emails", **fields)
    assert slot_wait(run) is None


def test_slot_wait_is_none_while_a_slot_is_free_or_without_limits():
    in_progress("emails")
    [emails] = waiting("emails")
    in_progress("default", 10)
    [default] = waiting("default")
    [legacy] = waiting("legacy")

    assert [slot_wait(run) for run in (emails, default, legacy)] == [None, None, None]


# --- the Queues page ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("anonymous", 302),
        ("non_staff", 403),
        ("staff_without_perm", 403),
        ("staff_view", 200),
        ("staff_change", 200),
        ("superuser", 200),
    ],
)
def test_queues_page_permissions(client, kind, expected):
    login_as(client, kind)

    response = client.get(queues_url())

    assert response.status_code == expected
    if kind == "anonymous":
        assert response["Location"] == f"/accounts/login/?next={queues_url()}"


@pytest.mark.parametrize(
    ("method", "expected"),
    [("get", 200), ("head", 200), *[(m, 405) for m in ("post", "put", "patch", "delete")]],
)
def test_queues_page_is_get_only(staff_client, method, expected):
    response = getattr(staff_client, method)(queues_url())

    assert response.status_code == expected
    assert response.get("Allow") == (None if expected == 200 else "GET, HEAD")


def test_queues_page_shows_each_queue_with_its_limits_counts_and_held_runs(staff_client):
    in_progress("emails", 2)
    waiting("emails", 3, available_at=timezone.now() - timedelta(hours=3, minutes=30))
    in_progress("billing", concurrency_key="customer-7")
    waiting("billing", concurrency_key="customer-7")
    make_run("legacy")

    html = staff_client.get(queues_url()).content.decode()

    assert '<td class="owf-queue"><a href="/workflows/?queue=emails">emails</a></td>' in html
    assert '<td class="owf-limits">concurrency 2, at most 100/m' in html
    assert (
        '<td class="owf-pending"><a href="/workflows/?queue=emails&amp;status=pending">3</a></td>'
        in html
    )
    assert '<td class="owf-due">3</td>' in html
    assert '<td class="owf-oldest">3 h 30 min</td>' in html
    assert '<td class="owf-in-progress">2 <span class="owf-muted">/ 2</span></td>' in html
    assert '<li class="owf-held-concurrency">3 runs: concurrency 2 of 2 in progress</li>' in html
    assert (
        '<li class="owf-held-key">1 run: key &#x27;customer-7&#x27; has 1 of 1 in progress</li>'
        in html
    )
    assert '<td class="owf-limits owf-muted">not configured, no limits' in html
    assert '<a href="/workflows/?queue=legacy">legacy</a>' in html


def test_queues_page_shows_the_rate_window_and_every_other_full_key(staff_client):
    QueueStart.objects.create(
        namespace="default", queue="reports", run_id=uuid.uuid4(), started_at=timezone.now()
    )
    for i in range(7):
        in_progress("billing", concurrency_key=f"k{i}")
        waiting("billing", concurrency_key=f"k{i}")

    html = staff_client.get(queues_url()).content.decode()

    assert '<div class="owf-muted">1 start in the window (2/h)</div>' in html
    assert '<li class="owf-held-key owf-muted">2 runs of 2 other full keys</li>' in html


def test_queues_page_is_linked_from_the_run_list_and_links_back(staff_client):
    run_list = staff_client.get(list_url()).content.decode()
    queues = staff_client.get(queues_url()).content.decode()

    assert f'<a href="{queues_url()}">Queues</a>' in run_list
    assert f'<a href="{list_url()}" aria-current="page">Runs</a>' in run_list
    assert f'<a href="{queues_url()}" aria-current="page">Queues</a>' in queues
    assert f'<a href="{list_url()}">Runs</a>' in queues


def test_queues_page_refreshes_while_a_queue_has_active_runs(staff_client):
    refresh = '<meta http-equiv="refresh" content="3">'
    make_run("emails", "completed", started=True)
    assert refresh not in staff_client.get(queues_url()).content.decode()
    make_run("emails")
    assert refresh in staff_client.get(queues_url()).content.decode()


def test_queues_page_escapes_queue_names_and_keys(staff_client):
    in_progress("billing", concurrency_key=XSS)
    waiting("billing", concurrency_key=XSS)
    make_run(XSS)

    html = staff_client.get(queues_url()).content.decode()

    assert XSS not in html
    quoted = "%3Cscript%3Ealert%28%27owf%27%29%3C/script%3E"
    assert (
        f'<td class="owf-queue"><a href="/workflows/?queue={quoted}">{ESCAPED_XSS}</a></td>' in html
    )
    assert f"key &#x27;{ESCAPED_XSS}&#x27; has 1 of 1 in progress" in html


# --- the run list, the run page and the admin ---------------------------------------------


def test_run_list_filters_by_queue_and_the_counts_follow(staff_client):
    wanted = make_run("emails", "failed")
    make_run("emails", "completed")
    make_run("billing", "failed")

    response = staff_client.get(list_url(), {"queue": "emails", "status": "failed"})

    assert [run.pk for run in response.context["page"]] == [wanted.pk]
    counts = {tab["value"]: tab["count"] for tab in response.context["status_tabs"]}
    assert (counts[None], counts["completed"]) == (2, 1)
    assert response.context["queue_names"] == ["billing", "default", "emails", "reports"]
    html = response.content.decode()
    assert '<option value="emails" selected>emails</option>' in html
    assert '<input type="hidden" name="status" value="failed">' in html


def test_run_list_offers_queues_that_only_active_runs_name(staff_client):
    make_run("legacy", "pending")
    make_run("retired", "completed")  # no DISTINCT over a long history: not offered
    response = staff_client.get(list_url())
    assert "legacy" in response.context["queue_names"]
    assert "retired" not in response.context["queue_names"]


def test_run_list_shows_queue_priority_and_key(staff_client):
    make_run("billing", priority=-7, concurrency_key="customer-7")
    make_run("emails", priority=50)

    html = staff_client.get(list_url()).content.decode()

    assert (
        '<td class="owf-queue">billing</td>\n      <td class="owf-priority">-7</td>\n'
        '      <td class="owf-key">customer-7</td>' in html
    )
    assert (
        '<td class="owf-queue">emails</td>\n      <td class="owf-priority">50</td>\n'
        '      <td class="owf-key">—</td>' in html
    )


def test_run_page_shows_queue_priority_and_key(staff_client):
    keyed = make_run("billing", "completed", priority=-7, concurrency_key="customer-7")
    plain = make_run("emails", "completed")

    keyed_html = staff_client.get(detail_url(keyed)).content.decode()
    plain_html = staff_client.get(detail_url(plain)).content.decode()

    assert (
        '<dt>Queue</dt><dd class="owf-queue"><a href="/workflows/?queue=billing">billing</a></dd>'
        in keyed_html
    )
    assert '<dt>Priority</dt><dd class="owf-priority">-7</dd>' in keyed_html
    assert '<dt>Concurrency key</dt><dd class="owf-key">customer-7</dd>' in keyed_html
    assert '<dt>Priority</dt><dd class="owf-priority">0</dd>' in plain_html
    assert "Concurrency key" not in plain_html


def test_run_page_says_which_limit_holds_a_run_waiting_to_start(staff_client):
    in_progress("billing", concurrency_key="customer-7")
    [held] = waiting("billing", concurrency_key="customer-7")
    [free] = waiting("billing", concurrency_key="customer-8")

    held_html = staff_client.get(detail_url(held)).content.decode()
    free_html = staff_client.get(detail_url(free)).content.decode()

    assert (
        '<dt>Waiting for</dt><dd class="owf-slot-wait">Waiting for a slot in queue '
        "&#x27;billing&#x27;: key &#x27;customer-7&#x27; has 1 of 1 in progress.</dd>" in held_html
    )
    assert "owf-slot-wait" not in free_html


ADMIN_CHANGELIST = "admin:django_openworkflow_workflowrun_changelist"


def test_admin_filters_by_queue_and_shows_priority_and_key(client):
    login_as(client, "superuser")
    wanted = make_run("billing", priority=-7, concurrency_key="customer-7")
    make_run("emails")

    response = client.get(reverse(ADMIN_CHANGELIST), {"queue": "billing"})

    assert [run.pk for run in response.context["cl"].result_list] == [wanted.pk]
    html = response.content.decode()
    assert '<td class="field-queue">billing</td>' in html
    assert '<td class="field-priority">-7</td>' in html
    assert '<td class="field-concurrency_key">customer-7</td>' in html
    assert '<details data-filter-title="queue" open>' in html
    assert '<a href="?queue=emails">emails</a>' in html  # the filter offers the other queue
