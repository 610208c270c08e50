"""Adversarial review of schedules (SPEC section 10): each test states a claim of the spec
or of the code's docstrings and tries to break it.

The review of 2026-11-30 found the defects these tests pin (a repeated hour's ticks, clock
skew, the admin's save, MariaDB's deadlock on declare, ...); the others held up.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.contrib.messages import get_messages
from django.db import connection, connections
from django.db.models import DateTimeField, Value
from django.db.models.functions import Cast
from django.test.utils import override_settings
from django.urls import reverse
from django.utils import timezone

import django_openworkflow.schedules as schedules_module
from django_openworkflow import Schedule, workflow
from django_openworkflow.clock import Now
from django_openworkflow.cron import latest_tick, next_tick, ticks_between
from django_openworkflow.models import WorkflowRun, WorkflowSchedule
from django_openworkflow.registry import Workflow, _registry
from django_openworkflow.schedule_admin import WorkflowScheduleAdmin
from django_openworkflow.testing import pause_at
from tests.users import create_user

BERLIN = ZoneInfo("Europe/Berlin")
NAMES = ["tick"]
CHANGELIST = reverse("admin:django_openworkflow_workflowschedule_changelist")


def at(*args: int, zone: ZoneInfo = UTC) -> datetime:
    return datetime(*args, tzinfo=zone)


def schedule(name: str = "s", cron: str = "*/15 * * * *", **fields) -> WorkflowSchedule:
    fields.setdefault("next_run_at", timezone.now() - timedelta(days=1))
    fields.setdefault("timezone", "UTC")
    fields.setdefault("workflow_name", "tick")
    return WorkflowSchedule.objects.create(name=name, cron=cron, **fields)


def ticks_of(name: str = "s") -> list[datetime]:
    return list(
        WorkflowRun.objects.filter(schedule_name=name)
        .order_by("scheduled_at")
        .values_list("scheduled_at", flat=True)
    )


class DatabaseClock:
    """Set the database clock the schedule manager reads (``Now()`` in schedules.py)."""

    def __init__(self, monkeypatch):
        self.moment = timezone.now()
        monkeypatch.setattr(
            schedules_module, "Now", lambda: Cast(Value(self.moment), DateTimeField())
        )

    def set(self, moment: datetime) -> None:
        self.moment = moment


@pytest.fixture
def admin_client(client):
    client.force_login(create_user("root", superuser=True))
    return client


def messages_of(response) -> list[tuple[str, str]]:
    return [(m.level_tag, str(m)) for m in get_messages(response.wsgi_request)]


def db_now() -> datetime:
    """The database's clock (a throwaway row to read it through)."""
    probe = WorkflowSchedule.objects.create(name="probe-clock", workflow_name="-", cron="0 0 1 1 *")
    clock = WorkflowSchedule.objects.filter(pk=probe.pk).annotate(clock=Now())
    moment = clock.values_list("clock", flat=True).get()
    probe.delete()
    return moment


# === DST: the repeated hour ===============================================================


def test_latest_tick_in_the_repeated_hour_is_neither_an_hour_nor_a_day_early():
    # 2026-10-25, Europe/Berlin: 02:00-03:00 happens twice (00:00-01:00 UTC in summer time,
    # 01:00-02:00 UTC in winter time). ticks_between (forward) says "*/30" ticks at 01:00 and
    # 01:30 UTC, and "30 2" ticks at 00:30 UTC only. latest_tick reads the local time of a
    # moment of the second 02:xx as the first one (cronsim's reverse ignores fold).
    forward = list(
        ticks_between("*/30 * * * *", "Europe/Berlin", at(2026, 10, 25, 0), at(2026, 10, 25, 2))
    )
    assert at(2026, 10, 25, 1, 0) in [t.astimezone(UTC) for t in forward]

    # (Compared in UTC: Python never finds a time of a repeated hour equal to another zone's.)
    def latest(cron: str, moment: datetime) -> datetime:
        return latest_tick(cron, "Europe/Berlin", moment).astimezone(UTC)

    assert latest("*/30 * * * *", at(2026, 10, 25, 1, 0, 5)) == at(2026, 10, 25, 1, 0)  # 00:00
    assert latest("*/30 * * * *", at(2026, 10, 25, 1, 45)) == at(2026, 10, 25, 1, 30)  # 00:30
    assert latest("30 2 * * *", at(2026, 10, 25, 1, 10)) == at(2026, 10, 25, 0, 30)  # 10-24


@pytest.mark.django_db
def test_a_wildcard_hour_schedule_fires_the_ticks_of_both_repeated_hours(monkeypatch):
    # docs: "a time that happens twice ... fires once ... unless the hour field is *: then it
    # fires in both". The worker fires every tick on time, and still the second 02:00 and
    # 02:30 never run: each fire's latest_tick names the first 02:xx, which has its run.
    clock = DatabaseClock(monkeypatch)
    schedule("berlin", "*/30 * * * *", timezone="Europe/Berlin", next_run_at=at(2026, 10, 25, 0))
    for minute in range(0, 150, 30):  # fire 5 s after every tick from 00:00 to 02:00 UTC
        clock.set(at(2026, 10, 25, 0, 0, 5) + timedelta(minutes=minute))
        WorkflowSchedule.objects.fire_due("default", NAMES)
    assert ticks_of("berlin") == [
        at(2026, 10, 25, 0, 0) + timedelta(minutes=m) for m in range(0, 150, 30)
    ]


@pytest.mark.django_db
def test_a_late_fire_in_the_repeated_hour_starts_today_s_tick(monkeypatch):
    # "only the latest missed tick runs": the worker was down from 00:29 to 01:10 UTC, so the
    # latest tick is today's 02:30 summer time (00:30 UTC). The fire starts yesterday's.
    clock = DatabaseClock(monkeypatch)
    schedule("berlin", "30 2 * * *", timezone="Europe/Berlin", next_run_at=at(2026, 10, 25, 0, 30))
    clock.set(at(2026, 10, 25, 1, 10))
    [run] = WorkflowSchedule.objects.fire_due("default", NAMES)
    assert run.scheduled_at.astimezone(UTC) == at(2026, 10, 25, 0, 30)  # is 2026-10-24 00:30


@pytest.mark.django_db
def test_a_backfill_over_the_repeated_hour_twice_starts_nothing_twice():
    # "backfill ... skipping ticks that already have a run": the ticks already started are
    # compared in Python with `tick not in have`; a Berlin time of the repeated hour is never
    # equal to a UTC datetime (PEP 495), so the second backfill inserts them again.
    schedule("berlin", "*/30 * * * *", timezone="Europe/Berlin", next_run_at=None)
    first = WorkflowSchedule.objects.backfill("berlin", at(2026, 10, 25, 0), at(2026, 10, 25, 2))
    assert len(first) == 5
    assert (
        WorkflowSchedule.objects.backfill("berlin", at(2026, 10, 25, 0), at(2026, 10, 25, 2)) == []
    )


@pytest.mark.django_db
def test_the_spring_forward_gap_fires_once_at_0300(monkeypatch):
    clock = DatabaseClock(monkeypatch)
    schedule("berlin", "30 2 * * *", timezone="Europe/Berlin", next_run_at=at(2026, 3, 29, 1))
    clock.set(at(2026, 3, 29, 1, 0, 5))
    [run] = WorkflowSchedule.objects.fire_due("default", NAMES)
    assert run.scheduled_at == at(2026, 3, 29, 1)
    assert WorkflowSchedule.objects.get().next_run_at == at(2026, 3, 30, 0, 30)


@pytest.mark.django_db
def test_only_the_latest_missed_tick_runs_when_next_run_at_is_years_old(monkeypatch):
    clock = DatabaseClock(monkeypatch)
    schedule("old", "0 3 * * *", next_run_at=at(2020, 1, 1, 3))
    clock.set(at(2026, 6, 1, 12))
    [run] = WorkflowSchedule.objects.fire_due("default", NAMES)
    assert run.scheduled_at == at(2026, 6, 1, 3)
    assert WorkflowSchedule.objects.get().next_run_at == at(2026, 6, 2, 3)


@pytest.mark.django_db
def test_changing_the_zone_in_the_admin_plans_the_first_tick_of_the_new_zone(admin_client):
    s = schedule("zoned", "0 3 * * *", next_run_at=at(2099, 1, 1, 3))
    url = reverse("admin:django_openworkflow_workflowschedule_change", args=[s.pk])
    before = timezone.now()
    data = {"name": "zoned", "workflow_name": "tick", "cron": "0 3 * * *", "input": "null"}
    response = admin_client.post(url, {**data, "timezone": "Asia/Tokyo", "enabled": "on"})
    assert response.status_code == 302
    s.refresh_from_db()
    assert s.next_run_at == next_tick("0 3 * * *", "Asia/Tokyo", before)


# === clock skew: Python's clock plans, the database's clock fires ==========================


def _skewed_python_clock(monkeypatch, behind: timedelta) -> None:
    real = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real() - behind)


@pytest.mark.django_db
def test_resume_replays_no_missed_tick_when_python_s_clock_lags_the_database(monkeypatch):
    # SPEC: "resuming it does not replay the ticks it missed". resume() plans next_run_at with
    # timezone.now() (this process), fire_due reads the database's clock: with the app server
    # 10 minutes behind, the tick of 5 minutes ago (missed while paused) runs at once.
    five_ago = db_now() - timedelta(minutes=5)
    cron = f"{five_ago.minute} * * * *"  # one tick an hour, 5 minutes before now (db clock)
    s = schedule("skew", cron, enabled=False)
    _skewed_python_clock(monkeypatch, timedelta(minutes=10))
    resumed_at = db_now()
    WorkflowSchedule.objects.resume(s)
    started = WorkflowSchedule.objects.fire_due("default", NAMES)
    assert [run.scheduled_at for run in started if run.scheduled_at < resumed_at] == []


@pytest.mark.django_db
def test_a_new_schedule_fires_no_tick_from_before_it_was_created_under_clock_skew(
    monkeypatch,
):
    # SPEC: "A new schedule first fires at its first tick after it was created." created_at
    # is the database's clock; next_run_at is planned with Python's.
    five_ago = db_now() - timedelta(minutes=5)
    cron = f"{five_ago.minute} * * * *"
    _skewed_python_clock(monkeypatch, timedelta(minutes=10))
    wf = Workflow(lambda ctx: None, name="tick", schedule=Schedule(cron, name="fresh"))
    WorkflowSchedule.objects.declare([wf])
    created = WorkflowSchedule.objects.get(name="fresh")
    started = WorkflowSchedule.objects.fire_due("default", NAMES)
    assert [run.scheduled_at for run in started if run.scheduled_at < created.created_at] == []


# === a workflow whose queue is not configured ===============================================


@pytest.fixture
def unqueued():
    @workflow(name="review-unqueued", queue="nightly-queue")
    def unqueued_workflow(ctx):
        return None

    yield unqueued_workflow
    _registry.pop("review-unqueued")


@pytest.mark.django_db
def test_run_now_in_the_admin_on_a_workflow_whose_queue_is_gone_is_skipped_by_name(
    admin_client, unqueued
):
    # start_tick -> placement -> check_queue raises ValueError; the admin's _each catches
    # only LookupError and DoesNotExist, so the action is a server error.
    s = schedule("q", workflow_name="review-unqueued")
    response = admin_client.post(
        CHANGELIST, {"action": "run_schedules_now", "_selected_action": [str(s.pk)]}, follow=True
    )
    assert response.status_code == 200
    assert messages_of(response)[0][0] == "warning"
    assert WorkflowRun.objects.count() == 0


@pytest.mark.django_db
def test_a_schedule_whose_queue_is_gone_is_logged_once_by_name_and_reported_by_w004(
    caplog, unqueued
):
    # The tick is never fired: each sweep tries again and fails. The log line (once per
    # process) names the schedule and the queue, and check W004 names them too.
    from django_openworkflow.checks import check_stored_schedules, check_workflows

    schedule("q", workflow_name="review-unqueued")
    with caplog.at_level("ERROR", logger="django_openworkflow.schedules"):
        assert WorkflowSchedule.objects.fire_due("default", ["review-unqueued"]) == []
        assert WorkflowSchedule.objects.fire_due("default", ["review-unqueued"]) == []
    unknown = (
        "queue 'nightly-queue' of workflow \"review-unqueued\" is not in "
        "OPENWORKFLOW['QUEUES']; known queues: default"
    )
    assert caplog.messages == [f"schedule not fired schedule=q error=ValueError detail={unknown}"]
    problems = [*check_workflows(), *check_stored_schedules(databases=["default"])]
    assert [(p.id, p.msg) for p in problems if "nightly-queue" in str(p.msg)] == [
        ("django_openworkflow.W004", f"{unknown}: schedule 'q' starts no run.")
    ]


# === the admin ================================================================================


@pytest.mark.django_db
def test_a_declared_schedule_s_name_is_read_only_so_its_pause_survives_the_next_deploy(
    admin_client,
):
    # The docstring: "pausing and resuming it work, and a pause stays across deploys". The
    # name of a declared schedule is editable; the next declare deletes the renamed one (it is
    # declared_in_code and no longer declared) and creates the code's name again, enabled.
    wf = Workflow(lambda ctx: None, name="tick", schedule=Schedule("0 3 * * *", name="nightly"))
    WorkflowSchedule.objects.declare([wf])
    s = WorkflowSchedule.objects.get(name="nightly")
    url = reverse("admin:django_openworkflow_workflowschedule_change", args=[s.pk])
    response = admin_client.post(url, {"name": "nightly-renamed"})  # enabled unchecked: paused
    assert response.status_code == 302
    assert WorkflowSchedule.objects.get(pk=s.pk).enabled is False
    WorkflowSchedule.objects.declare([wf])  # the next worker starts
    # Now: "nightly-renamed" is deleted and "nightly" created again, enabled.
    assert list(WorkflowSchedule.objects.values_list("enabled", flat=True)) == [False]


@pytest.mark.django_db
def test_the_admin_s_save_writes_back_no_stale_next_run_at_nor_last_run_at(
    admin_client, monkeypatch
):
    # ModelAdmin.save_model saves every column of the object it read at the start of the
    # POST; a worker that fired the tick in between (it holds the row lock, the admin does
    # not take it) has its next_run_at and last_run_at overwritten.
    s = schedule("edited")
    original = WorkflowScheduleAdmin.save_model

    def fire_then_save(self, request, obj, form, change):
        WorkflowSchedule.objects.fire_due("default", NAMES)  # a worker, between read and write
        original(self, request, obj, form, change)

    monkeypatch.setattr(WorkflowScheduleAdmin, "save_model", fire_then_save)
    url = reverse("admin:django_openworkflow_workflowschedule_change", args=[s.pk])
    data = {"name": "edited", "workflow_name": "tick", "cron": "*/15 * * * *", "timezone": "UTC"}
    response = admin_client.post(url, {**data, "input": '{"v": 2}', "enabled": "on"})
    assert response.status_code == 302
    [tick] = ticks_of("edited")
    s.refresh_from_db()
    assert s.input == {"v": 2}
    assert (s.last_run_at, s.next_run_at) == (tick, tick + timedelta(minutes=15))


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"name": "dup", "input": "null"}, "Workflow schedule with this Namespace and Name"),
        ({"name": "new", "input": "{bad json"}, "Enter a valid JSON."),
        ({"name": "new", "input": "null", "cron": "0 0 30 2 *"}, "Bad day-of-month"),
        ({"name": "new", "input": "null", "timezone": "Mars/Olympus"}, "unknown time zone"),
    ],
)
def test_the_admin_form_refuses_bad_values_without_a_500(admin_client, fields, error):
    schedule("dup")
    data = {"workflow_name": "tick", "cron": "0 3 * * *", "timezone": "UTC", **fields}
    response = admin_client.post(reverse("admin:django_openworkflow_workflowschedule_add"), data)
    assert response.status_code == 200
    assert error in response.content.decode()


@pytest.mark.django_db
def test_deleting_a_schedule_in_the_admin_keeps_its_runs(admin_client):
    s = schedule("gone")
    WorkflowSchedule.objects.fire_due("default", NAMES)
    url = reverse("admin:django_openworkflow_workflowschedule_delete", args=[s.pk])
    assert admin_client.post(url, {"post": "yes"}).status_code == 302
    assert not WorkflowSchedule.objects.exists()
    assert len(ticks_of("gone")) == 1


@pytest.mark.django_db
def test_the_admin_pages_escape_a_schedule_s_data(admin_client):
    xss = "<script>alert('owf')</script>"
    schedule(xss, input={"k": xss}, workflow_name=xss)
    for url in (CHANGELIST, reverse("django_openworkflow:schedules")):
        html = admin_client.get(url).content.decode()
        assert "<script>alert" not in html


# === SQLite: run now's tick is the database clock, in milliseconds =========================


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's clock")
@pytest.mark.django_db
def test_two_run_nows_in_one_millisecond_do_not_clash_on_sqlite():
    # run_now's scheduled_at is Now(); on SQLite STRFTIME('%f') has milliseconds, so two
    # quick "Run now"s of one schedule get one tick and the second is an IntegrityError.
    s = schedule("quick", next_run_at=at(2099, 1, 1))
    for _ in range(200):
        WorkflowSchedule.objects.run_now(s)
    assert len(ticks_of("quick")) == 200


# === races between the write paths (row locks: PostgreSQL, MariaDB) =========================


def _in_thread(target, results: list, errors: list) -> threading.Thread:
    def body():
        try:
            results.append(target())
        except BaseException as exc:  # reported to the test
            errors.append(exc)
        finally:
            connection.close()

    return threading.Thread(target=body)


def _fire():
    return WorkflowSchedule.objects.fire_due("default", NAMES)


@pytest.mark.row_locks
@pytest.mark.django_db(transaction=True)
def test_a_backfill_racing_a_fire_of_the_same_tick_starts_it_once():
    s = schedule(next_run_at=timezone.now() - timedelta(seconds=1))
    results: list = []
    errors: list = []
    with pause_at("schedule.before-start") as pause:
        firing = _in_thread(_fire, results, errors)
        firing.start()
        tick = pause.wait()["tick"]
        backfilling = _in_thread(
            lambda: WorkflowSchedule.objects.backfill(s.name, tick - timedelta(minutes=15), tick),
            results,
            errors,
        )
        backfilling.start()
        backfilling.join(0.5)
        assert backfilling.is_alive()  # waits for the schedule's row lock
    firing.join(10)
    backfilling.join(10)
    assert errors == []
    assert ticks_of() == [tick - timedelta(minutes=15), tick]


@pytest.mark.row_locks
@pytest.mark.django_db(transaction=True)
def test_run_now_racing_a_fire_starts_both_and_the_ticks_go_on():
    s = schedule(next_run_at=timezone.now() - timedelta(seconds=1))
    results: list = []
    errors: list = []
    with pause_at("schedule.before-commit") as pause:
        firing = _in_thread(_fire, results, errors)
        firing.start()
        tick = pause.wait()["tick"]
        now = _in_thread(lambda: WorkflowSchedule.objects.run_now(s), results, errors)
        now.start()
        now.join(0.5)
        assert now.is_alive()
    firing.join(10)
    now.join(10)
    assert errors == []
    assert len(ticks_of()) == 2 and ticks_of()[0] == tick
    s.refresh_from_db()
    assert s.next_run_at == tick + timedelta(minutes=15)
    assert s.last_run_at == ticks_of()[1]


@pytest.mark.row_locks
@pytest.mark.django_db(transaction=True)
def test_a_pause_racing_a_fire_waits_for_it_and_nothing_fires_after():
    s = schedule(next_run_at=timezone.now() - timedelta(seconds=1))
    results: list = []
    errors: list = []
    with pause_at("schedule.before-start") as pause:
        firing = _in_thread(_fire, results, errors)
        firing.start()
        pause.wait()
        pausing = _in_thread(lambda: WorkflowSchedule.objects.pause(s), results, errors)
        pausing.start()
        pausing.join(0.5)
        assert pausing.is_alive()
    firing.join(10)
    pausing.join(10)
    assert errors == []
    assert len(ticks_of()) == 1
    WorkflowSchedule.objects.filter(pk=s.pk).update(next_run_at=timezone.now() - timedelta(days=1))
    assert _fire() == []


@pytest.mark.row_locks
@pytest.mark.django_db(transaction=True)
def test_a_pause_before_the_fire_takes_the_lock_starts_nothing():
    s = schedule(next_run_at=timezone.now() - timedelta(seconds=1))
    ids = list(WorkflowSchedule.objects.due().values_list("pk", flat=True))
    WorkflowSchedule.objects.pause(s)
    assert WorkflowSchedule.objects._fire(ids[0]) is None
    assert ticks_of() == []


@pytest.mark.row_locks
@pytest.mark.django_db(transaction=True)
def test_two_workers_declaring_at_once_create_one_schedule(monkeypatch):
    wf = Workflow(lambda ctx: None, name="tick", schedule=Schedule("0 3 * * *", name="both"))
    first_inside = threading.Event()
    let_go = threading.Event()
    original = WorkflowSchedule.reschedule
    calls: list = []

    def slow_reschedule(self, now=None):
        calls.append(self.name)
        if len(calls) == 1:  # the first declare created the row and has not committed
            first_inside.set()
            let_go.wait(10)
        original(self, now)

    monkeypatch.setattr(WorkflowSchedule, "reschedule", slow_reschedule)
    results: list = []
    errors: list = []
    a = _in_thread(lambda: WorkflowSchedule.objects.declare([wf]), results, errors)
    a.start()
    assert first_inside.wait(10)
    b = _in_thread(lambda: WorkflowSchedule.objects.declare([wf]), results, errors)
    b.start()
    b.join(0.5)
    assert b.is_alive()  # waits on the unique name
    let_go.set()
    a.join(10)
    b.join(10)
    assert errors == []
    assert WorkflowSchedule.objects.filter(name="both").count() == 1
    assert WorkflowSchedule.objects.get(name="both").next_run_at is not None


@pytest.mark.row_locks
@pytest.mark.django_db(transaction=True)
def test_three_workers_declaring_a_new_schedule_at_once_do_not_deadlock_on_mariadb():
    # A deploy starts several workers. A inserts the new schedule's row; B found no row too,
    # inserts, and waits on the unique name; C starts meanwhile. When A commits, B's insert
    # fails. With get_or_create under select_for_update, B kept a shared lock of the failed
    # insert (InnoDB keeps it after the savepoint's rollback) and then asked for an exclusive
    # one behind C, which waited for B's shared lock: a deadlock, and "schedules not
    # declared" at ERROR. Now B's whole transaction is rolled back and B tries again.
    wf = Workflow(lambda ctx: None, name="tick", schedule=Schedule("0 3 * * *", name="three"))
    results: list = []
    errors: list = []
    threads = {
        name: _in_thread(lambda: WorkflowSchedule.objects.declare([wf]), results, errors)
        for name in "ABC"
    }
    for name, thread in threads.items():
        thread.name = name
    with (
        pause_at(
            "schedule.declare-missing", when=lambda c: threading.current_thread().name == "B"
        ) as b_missing,
        pause_at(
            "schedule.declare-inserted", when=lambda c: threading.current_thread().name == "A"
        ) as a_inserted,
    ):
        threads["B"].start()
        b_missing.wait()  # B found no row and is about to insert it
        threads["A"].start()
        a_inserted.wait()  # A inserted it, not committed
        b_missing.release()
        threads["B"].join(0.5)
        assert threads["B"].is_alive()  # B's insert waits on the unique name
        threads["C"].start()
        threads["C"].join(0.5)
        a_inserted.release()  # A commits; B's insert fails, B tries again
        for thread in threads.values():
            thread.join(10)
    assert errors == []
    assert WorkflowSchedule.objects.filter(name="three").count() == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_connection_lost_mid_tick_starts_nothing_and_the_next_fire_starts_it_once():
    schedule(next_run_at=timezone.now() - timedelta(seconds=1))
    results: list = []
    errors: list = []
    pids: list = []

    def remember_pid(context):
        connection.ensure_connection()
        pids.append(connection.connection.info.backend_pid)

    with pause_at("schedule.before-commit") as pause:
        firing = _in_thread(lambda: (remember_pid({}), _fire())[1], results, errors)
        firing.start()
        pause.wait()
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pids[0]])
    firing.join(10)
    assert len(errors) == 1, errors
    from django.db import DatabaseError

    assert isinstance(errors[0], DatabaseError)
    assert ticks_of() == []
    assert len(_fire()) == 1
    assert len(ticks_of()) == 1


@pytest.mark.django_db
@override_settings(TIME_ZONE="Europe/Berlin")
def test_a_declared_schedule_without_a_zone_takes_settings_time_zone():
    wf = Workflow(lambda ctx: None, name="tick", schedule=Schedule("0 3 * * *", name="tz"))
    WorkflowSchedule.objects.declare([wf])
    assert WorkflowSchedule.objects.get(name="tz").timezone == "Europe/Berlin"
