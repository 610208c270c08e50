"""Workers on the pages and in the admin: the Workers page, the holder on the run page, the
warning for runs no live worker takes, and the read-only WorkflowWorker admin."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_openworkflow.clock import Now
from django_openworkflow.models import WorkflowRun, WorkflowWorker
from tests.users import create_user, login_as

pytestmark = pytest.mark.django_db

WORKERS_URL = reverse("django_openworkflow:workers")
CHANGELIST = reverse("admin:django_openworkflow_workflowworker_changelist")
XSS = "<script>alert('owf')</script>"
ESCAPED_XSS = "&lt;script&gt;alert(&#x27;owf&#x27;)&lt;/script&gt;"


def register(worker_id: str, **fields) -> WorkflowWorker:
    fields.setdefault("namespace", "default")
    fields.setdefault("concurrency", 4)
    fields.setdefault("workflows", ["echo"])
    fields.setdefault("host", "host-1")
    fields.setdefault("pid", 4242)
    WorkflowWorker.objects.register(worker_id, **fields)
    return WorkflowWorker.objects.get(pk=worker_id)


def seen_ago(worker_id: str, seconds: float, *, stopped: bool = False) -> None:
    ago = Now() - timedelta(seconds=seconds)
    WorkflowWorker.objects.filter(pk=worker_id).update(
        last_seen_at=ago, **({"stopped_at": ago} if stopped else {})
    )


def row(html: str, worker_id: str) -> str:
    return html[html.index(f'id="worker-{worker_id}"') :].split("</tr>")[0]


def make_run(workflow: str = "echo", status: str = "pending", **fields) -> WorkflowRun:
    if status == "running":
        fields.setdefault("started_at", timezone.now())
    return WorkflowRun.objects.create(workflow_name=workflow, status=status, **fields)


def run_page(client, run) -> str:
    return client.get(reverse("django_openworkflow:run-detail", args=[run.pk])).content.decode()


@pytest.fixture
def staff_client(client):
    login_as(client, "staff_view")
    return client


# --- the Workers page -----------------------------------------------------------------


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
def test_the_workers_page_needs_the_run_list_permission(client, kind, expected):
    login_as(client, kind)
    response = client.get(WORKERS_URL)
    assert response.status_code == expected
    if kind == "anonymous":
        assert response["Location"] == f"/accounts/login/?next={WORKERS_URL}"


def test_the_workers_page_lists_live_then_stopped_and_dead_workers_of_the_last_day(staff_client):
    register("w-dead", host="host-2")
    seen_ago("w-dead", 3600)
    register("w-live", queues=["emails", "default"], workflows=["echo", "sleeper"])
    WorkflowWorker.objects.seen("w-live", busy_slots=3)
    register("w-stopped", namespace="other")
    seen_ago("w-stopped", 600, stopped=True)
    register("w-old")
    seen_ago("w-old", 25 * 3600)

    html = staff_client.get(WORKERS_URL).content.decode()

    assert html.index('id="worker-w-live"') < html.index('id="worker-w-dead"')
    assert html.index('id="worker-w-live"') < html.index('id="worker-w-stopped"')
    assert "w-old" not in html
    assert "1 live worker" in html
    live = row(html, "w-live")
    assert 'owf-status-live">live</span>' in live
    assert '<td class="owf-worker-queues">emails, default</td>' in live
    assert '<td class="owf-slots">3 / 4</td>' in live
    assert "<summary>2 workflows</summary><ul><li>echo</li><li>sleeper</li></ul>" in live
    assert '<td class="owf-host">host-1</td>' in live
    assert '<td class="owf-pid">4242</td>' in live
    dead = row(html, "w-dead")
    assert 'owf-status-dead"' in dead and ">dead</span>" in dead
    assert "every queue" in dead
    assert "— / 4" in dead  # a dead worker's busy slots are not known
    assert "(1 h 0 min ago)" in dead
    stopped = row(html, "w-stopped")
    assert 'owf-status-stopped">stopped</span>' in stopped
    assert "<td>other</td>" in stopped
    assert f'<a href="{WORKERS_URL}" aria-current="page">Workers</a>' in html


def test_the_workers_page_escapes_what_workers_wrote(staff_client):
    register("w1", host=XSS, queues=[XSS], workflows=[XSS])
    html = staff_client.get(WORKERS_URL).content.decode()
    assert XSS not in html
    assert html.count(ESCAPED_XSS) == 3


def test_the_workers_page_without_workers(staff_client):
    html = staff_client.get(WORKERS_URL).content.decode()
    assert "No worker has run in the last day." in html


def test_every_page_links_to_the_workers_page(staff_client):
    html = staff_client.get(reverse("django_openworkflow:run-list")).content.decode()
    assert f'<a href="{WORKERS_URL}">Workers</a>' in html


# --- the run page -------------------------------------------------------------------


def test_the_run_page_shows_the_live_worker_holding_a_running_run(staff_client):
    register("w-live")
    run = make_run(status="running", worker_id="w-live")
    html = run_page(staff_client, run)
    holder = html[html.index('class="owf-holder"') :].split("</dd>")[0]
    assert f'<a href="{WORKERS_URL}#worker-w-live"><code>w-live</code></a>' in holder
    assert 'owf-status-live">live</span>' in holder
    assert "owf-unserved" not in html


def test_the_run_page_says_when_the_holding_worker_is_dead(staff_client):
    register("w-gone")
    seen_ago("w-gone", 3600)
    register("w-other")
    run = make_run(status="running", worker_id="w-gone")
    html = run_page(staff_client, run)
    holder = html[html.index('class="owf-holder"') :].split("</dd>")[0]
    assert ">dead</span>" in holder
    assert (
        "last seen 1 h 0 min ago: another worker takes the run over when its lease runs out"
        in holder
    )
    assert "owf-unserved" not in html  # w-other will


def test_the_run_page_says_when_the_holding_worker_has_no_row(staff_client):
    register("w-other")
    run = make_run(status="running", worker_id="w-unknown")
    holder = run_page(staff_client, run).split('class="owf-holder"')[1].split("</dd>")[0]
    assert "<code>w-unknown</code>" in holder
    assert 'owf-status-dead">not registered</span>' in holder


def test_a_finished_run_shows_its_last_worker_without_liveness(staff_client):
    run = make_run(status="completed", worker_id="w-done", finished_at=timezone.now())
    html = run_page(staff_client, run)
    assert '<dd class="owf-holder">w-done</dd>' in html
    assert "owf-unserved" not in html


def test_an_active_run_no_live_worker_registered_is_flagged(staff_client):
    register("w1", workflows=["sleeper"])
    register("w2", workflows=["sleeper"])
    html = run_page(staff_client, make_run("echo"))
    assert (
        "No live worker runs workflow “echo”: none of the 2 live workers of namespace "
        "“default” has registered it. Deploy the code that defines it to the workers."
    ) in html


def test_an_active_run_without_any_live_worker_is_flagged(staff_client):
    register("w-dead")
    seen_ago("w-dead", 3600)
    register("w-elsewhere", namespace="other")
    html = run_page(staff_client, make_run("echo"))
    assert "No worker of namespace “default” is live: this run waits until one starts." in html


def test_an_active_run_in_a_queue_no_live_worker_serves_is_flagged(staff_client):
    register("w1", queues=["default"])
    html = run_page(staff_client, make_run("echo", queue="emails"))
    assert (
        "No live worker runs workflow “echo” in queue “emails”: the live workers that "
        "registered it serve other queues."
    ) in html
    register("w2", queues=None)
    assert "owf-unserved" not in run_page(staff_client, make_run("echo", queue="emails"))


def test_a_finished_run_is_never_flagged(staff_client):
    html = run_page(staff_client, make_run("echo", status="failed"))
    assert "owf-unserved" not in html


def test_the_run_page_reads_the_workers_with_one_query(staff_client):
    register("w1")
    register("w-gone")
    seen_ago("w-gone", 3600)
    run = make_run(status="running", worker_id="w-gone")
    with CaptureQueriesContext(connection) as queries:
        html = run_page(staff_client, run)
    assert ">dead</span>" in html
    table = WorkflowWorker._meta.db_table
    assert sum(table in q["sql"] for q in queries.captured_queries) == 1


# --- the admin -----------------------------------------------------------------------


def test_the_admin_lists_workers_read_only(client):
    client.force_login(create_user("root", superuser=True))
    register("w-live", queues=["emails"])
    register("w-dead")
    seen_ago("w-dead", 3600)
    html = client.get(CHANGELIST).content.decode()
    assert "w-live" in html and "w-dead" in html
    assert 'owf-status-live">live</span>' in html
    assert 'owf-status-dead"' in html
    assert "emails" in html and "every queue" in html
    assert "0 / 4" in html
    assert client.get(reverse("admin:django_openworkflow_workflowworker_add")).status_code == 403
    change = reverse("admin:django_openworkflow_workflowworker_change", args=["w-live"])
    response = client.get(change)
    assert response.status_code == 200
    assert 'name="_save"' not in response.content.decode()  # a view page, no Save
    delete = reverse("admin:django_openworkflow_workflowworker_delete", args=["w-live"])
    assert client.get(delete).status_code == 403


@pytest.mark.parametrize(("kind", "expected"), [("staff_view", 200), ("staff_without_perm", 403)])
def test_the_admin_shows_workers_to_those_who_may_see_runs(client, kind, expected):
    login_as(client, kind)
    assert client.get(CHANGELIST).status_code == expected
