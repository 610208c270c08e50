"""``manage.py workflow_status``: the text an on-call engineer reads, the JSON a machine reads,
and the exit status a probe reads."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from django_openworkflow.clock import Now
from django_openworkflow.models import WorkflowRun, WorkflowWorker

pytestmark = pytest.mark.django_db

# A live window of an hour: workers seen 10 minutes ago are live, and the ages printed are
# whole minutes however long the test takes.
SETTINGS = {"LEASE_SECONDS": 3600, "QUEUES": {"default": {}, "emails": {}}}
AT = re.compile(r"^Namespace '(\w+)' at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")


@pytest.fixture(autouse=True)
def settings_():
    with override_settings(OPENWORKFLOW=SETTINGS):
        yield


def worker(worker_id: str, *, seen: float = 600, stopped: bool = False, busy: int = 0, **fields):
    fields.setdefault("namespace", "default")
    fields.setdefault("concurrency", 4)
    fields.setdefault("workflows", ["echo"])
    WorkflowWorker.objects.register(worker_id, **fields)
    WorkflowWorker.objects.seen(worker_id, busy_slots=busy)
    ago = Now() - timedelta(seconds=seen)
    WorkflowWorker.objects.filter(pk=worker_id).update(
        last_seen_at=ago, **({"stopped_at": ago} if stopped else {})
    )


def run(workflow: str, *, queue: str = "default", due_ago: float | None = None, **fields):
    if due_ago is not None:
        fields["available_at"] = Now() - timedelta(seconds=due_ago)
    return WorkflowRun.objects.create(workflow_name=workflow, queue=queue, **fields)


@pytest.fixture
def busy_namespace():
    worker("w-1", host="web-1", pid=101, busy=2)
    worker("w-2", host="web-2", pid=102, queues=["emails"], workflows=["echo", "sleeper"])
    worker("w-3", host="web-3", pid=103, seen=7200, stopped=True)
    worker("w-4", host="web-4", pid=104, seen=7200)
    worker("w-other", host="web-9", pid=109, namespace="other", workflows=["ghost"])
    run("echo", due_ago=3600)
    run("echo", status="running", started_at=Now(), due_ago=-60)
    run("sleeper", due_ago=1800)
    run("ghost", queue="emails", due_ago=-3600)


def status(*args: str) -> tuple[str, int]:
    out = StringIO()
    try:
        call_command("workflow_status", *args, stdout=out)
    except SystemExit as exc:
        return out.getvalue(), int(exc.code or 0)
    return out.getvalue(), 0


def test_the_text_report(busy_namespace):
    text, code = status()
    first, rest = text.split("\n", 1)
    assert AT.match(first).group(1) == "default"
    assert rest == (
        "\n"
        "Queues\n"
        "  QUEUE    PENDING  DUE  IN PROGRESS  OLDEST DUE\n"
        "  default        2    2            1  1 h 0 min\n"
        "  emails         1    0            0  -\n"
        "\n"
        "Live workers\n"
        "  WORKER  HOST   PID  QUEUES  SLOTS BUSY  LAST SEEN\n"
        "  w-1     web-1  101  all     2/4         10 min 0 s ago\n"
        "  w-2     web-2  102  emails  0/4         10 min 0 s ago\n"
        "\n"
        "Active runs no live worker takes\n"
        "  WORKFLOW  QUEUE    ACTIVE  DUE  WHY\n"
        "  ghost     emails        1    0  no live worker registered the workflow\n"
        "  sleeper   default       1    1  no live worker that registered it serves the queue\n"
        "\n"
        "2 due, 1 in progress, 3 pending; 2 live workers (2 of 8 slots busy); "
        "1 stopped and 1 dead in the last day; PROBLEM: 1 due run no live worker takes.\n"
    )
    assert code == 1  # runs are due that no live worker takes


def test_the_json_report(busy_namespace):
    text, code = status("--json")
    report = json.loads(text)
    assert AT.match(f"Namespace 'default' at {report.pop('at')}")
    workers = {w.pk: w for w in WorkflowWorker.objects.all()}
    for entry in report["workers"]:
        row = workers[entry["worker_id"]]
        assert entry.pop("started_at") == row.started_at.isoformat()
        assert entry.pop("last_seen_at") == row.last_seen_at.isoformat()
        assert 600 <= entry.pop("last_seen_seconds_ago") < 660
    default = report["queues"][0]
    assert 3600 <= default.pop("oldest_due_age_seconds") < 3660
    assert report == {
        "namespace": "default",
        "queues": [
            {"queue": "default", "pending": 2, "due": 2, "in_progress": 1, "running": 1},
            {
                "queue": "emails",
                "pending": 1,
                "due": 0,
                "in_progress": 0,
                "running": 0,
                "oldest_due_age_seconds": None,
            },
        ],
        "workers": [
            {
                "worker_id": "w-1",
                "host": "web-1",
                "pid": 101,
                "queues": None,
                "workflows": ["echo"],
                "busy_slots": 2,
                "slots": 4,
            },
            {
                "worker_id": "w-2",
                "host": "web-2",
                "pid": 102,
                "queues": ["emails"],
                "workflows": ["echo", "sleeper"],
                "busy_slots": 0,
                "slots": 4,
            },
        ],
        "gone_workers": {"stopped": 1, "dead": 1},
        "unserved": [
            {
                "workflow": "ghost",
                "queue": "emails",
                "active": 1,
                "due": 0,
                "reason": "not_registered",
            },
            {
                "workflow": "sleeper",
                "queue": "default",
                "active": 1,
                "due": 1,
                "reason": "queue_not_served",
            },
        ],
        "summary": {
            "pending": 3,
            "due": 2,
            "in_progress": 1,
            "live_workers": 2,
            "busy_slots": 2,
            "slots": 8,
            "unserved_due": 1,
        },
    }
    assert code == 1


def test_an_empty_namespace_says_no_worker_is_live_and_exits_0():
    text, code = status()
    assert text.split("\n", 1)[1] == (
        "\n"
        "Queues\n"
        "  QUEUE    PENDING  DUE  IN PROGRESS  OLDEST DUE\n"
        "  default        0    0            0  -\n"
        "  emails         0    0            0  -\n"
        "\n"
        "Live workers\n"
        "  none (start one with: manage.py runworker)\n"
        "\n"
        "0 due, 0 in progress, 0 pending; 0 live workers.\n"
    )
    assert code == 0


def test_runs_not_yet_due_without_a_worker_are_listed_but_exit_0():
    run("echo", due_ago=-3600)
    text, code = status()
    assert (
        "Active runs no live worker takes\n"
        "  WORKFLOW  QUEUE    ACTIVE  DUE  WHY\n"
        "  echo      default       1    0  no live worker in the namespace\n"
        "\n"
        "0 due, 0 in progress, 1 pending; 0 live workers; "
        "1 workflow with active runs no live worker takes.\n"
    ) in text
    assert code == 0


def test_due_runs_without_any_live_worker_exit_1():
    worker("w-dead", seen=7200)
    run("echo", due_ago=60)
    text, code = status("--json")
    report = json.loads(text)
    assert report["unserved"] == [
        {"workflow": "echo", "queue": "default", "active": 1, "due": 1, "reason": "no_live_worker"}
    ]
    assert report["gone_workers"] == {"stopped": 0, "dead": 1}
    assert code == 1


def test_served_runs_exit_0(busy_namespace):
    WorkflowRun.objects.filter(workflow_name__in=["sleeper", "ghost"]).delete()
    text, code = status()
    assert "Active runs no live worker takes" not in text
    assert text.endswith(
        "2 live workers (2 of 8 slots busy); 1 stopped and 1 dead in the last day.\n"
    )
    assert code == 0


def test_another_namespace(busy_namespace):
    text, code = status("--namespace", "other")
    assert AT.match(text.split("\n", 1)[0]).group(1) == "other"
    assert "  w-other  web-9  109  all     0/4         10 min 0 s ago\n" in text
    assert "w-1" not in text
    assert code == 0


def test_an_empty_namespace_option_is_refused():
    with pytest.raises(CommandError, match=r"^--namespace must not be empty$"):
        call_command("workflow_status", "--namespace", "")


def test_the_report_is_at_the_database_clock_not_the_web_servers(monkeypatch):
    # Every age in the report is read on the database clock; so is its "at". A web server
    # whose clock is off (here: a day behind) prints the database's time.
    from django.utils import timezone

    from django_openworkflow.clock import database_now

    behind = timezone.now() - timedelta(days=1)
    monkeypatch.setattr(timezone, "now", lambda: behind)
    before = database_now("default").replace(microsecond=0)
    text, _ = status("--json")
    at = json.loads(text)["at"]
    assert before.isoformat() <= at <= (database_now("default") + timedelta(seconds=1)).isoformat()
    assert at.endswith("+00:00")
