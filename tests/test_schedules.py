"""Schedules (SPEC section 10): cron ticks start exactly one run each."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.core.management import call_command
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from django_openworkflow import Schedule, workflow
from django_openworkflow.checks import check_stored_schedules, check_workflows
from django_openworkflow.cron import latest_tick, next_tick, ticks_between
from django_openworkflow.models import WorkflowRun, WorkflowSchedule
from django_openworkflow.pauses import add_hook, remove_hook
from django_openworkflow.registry import Workflow, _registry
from django_openworkflow.testing import pause_at
from django_openworkflow.worker import Worker
from tests.testapp.workflows import tick

BERLIN = ZoneInfo("Europe/Berlin")
NAMES = ["tick"]


def at(*args: int, zone: ZoneInfo = UTC) -> datetime:
    return datetime(*args, tzinfo=zone)


def schedule(name: str = "every-15", cron: str = "*/15 * * * *", **fields) -> WorkflowSchedule:
    fields.setdefault("next_run_at", timezone.now() - timedelta(days=1))
    fields.setdefault("timezone", "UTC")
    return WorkflowSchedule.objects.create(name=name, workflow_name="tick", cron=cron, **fields)


def scheduled_runs(name: str = "every-15") -> list[WorkflowRun]:
    return list(WorkflowRun.objects.filter(schedule_name=name).order_by("scheduled_at"))


# --- cron expressions, zones and DST (cronsim's semantics) ----------------------------


def test_a_bad_cron_expression_is_a_value_error_at_import_naming_it():
    with pytest.raises(ValueError) as error:

        @workflow(name="bad-cron", schedule="61 * * * *")
        def bad(ctx):
            pass

    assert (
        str(error.value) == "bad cron expression '61 * * * *' of workflow \"bad-cron\": Bad minute"
    )
    assert "bad-cron" not in _registry


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (Schedule, None),
        ("0 3 * *", "bad cron expression '0 3 * *' of workflow \"w\": Wrong number of fields"),
        (
            ["0 3 * * *", "0 4 * * *"],
            'two schedules of workflow "w" are named "w": give each '
            "schedule of the list its own name (Schedule(cron, name=...))",
        ),
        (3, 'schedule of workflow "w" must be a cron string, a Schedule or a list of them, not 3'),
    ],
)
def test_the_schedule_argument_is_checked(value, message):
    if value is Schedule:
        with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus' of schedule \"s\""):
            Schedule("0 3 * * *", name="s", timezone="Mars/Olympus")
        return
    with pytest.raises((TypeError, ValueError)) as error:
        Workflow(lambda ctx: None, name="w", schedule=value)
    assert str(error.value) == message


def test_schedules_are_named_after_the_workflow_unless_named():
    wf = Workflow(
        lambda ctx: None,
        name="report",
        schedule=["@daily", Schedule("0 12 * * mon-fri", name="report-noon", input={"a": 1})],
    )
    assert [(s.name, s.cron, s.input) for s in wf.schedules] == [
        ("report", "@daily", None),
        ("report-noon", "0 12 * * mon-fri", {"a": 1}),
    ]
    assert next_tick("@daily", "UTC", at(2026, 1, 1, 12)) == at(2026, 1, 2)


def test_ticks_are_whole_minutes_strictly_after_and_at_or_before():
    cron = "*/15 * * * *"
    assert next_tick(cron, "UTC", at(2026, 1, 1, 12, 15)) == at(2026, 1, 1, 12, 30)
    assert latest_tick(cron, "UTC", at(2026, 1, 1, 12, 15)) == at(2026, 1, 1, 12, 15)
    assert latest_tick(cron, "UTC", at(2026, 1, 1, 12, 29, 59)) == at(2026, 1, 1, 12, 15)
    assert list(ticks_between(cron, "UTC", at(2026, 1, 1, 12, 15), at(2026, 1, 1, 12, 45))) == [
        at(2026, 1, 1, 12, 15),
        at(2026, 1, 1, 12, 30),
        at(2026, 1, 1, 12, 45),
    ]


def test_daily_0230_in_berlin_on_the_spring_forward_day_runs_once_at_0300():
    # 2026-03-29: clocks jump from 02:00 to 03:00; 02:30 does not exist.
    ticks = list(ticks_between("30 2 * * *", "Europe/Berlin", at(2026, 3, 28), at(2026, 3, 30, 23)))
    assert ticks == [
        at(2026, 3, 28, 2, 30, zone=BERLIN),  # 01:30 UTC
        at(2026, 3, 29, 3, 0, zone=BERLIN),  # the first minute after the jump: 01:00 UTC
        at(2026, 3, 30, 2, 30, zone=BERLIN),  # 00:30 UTC
    ]
    assert [t.astimezone(UTC).hour for t in ticks] == [1, 1, 0]


def test_daily_0230_in_berlin_on_the_fall_back_day_runs_once_at_its_first_occurrence():
    # 2026-10-25: clocks go back from 03:00 to 02:00; 02:30 happens twice.
    ticks = list(
        ticks_between("30 2 * * *", "Europe/Berlin", at(2026, 10, 24), at(2026, 10, 26, 23))
    )
    assert [t.astimezone(UTC) for t in ticks] == [
        at(2026, 10, 24, 0, 30),
        at(2026, 10, 25, 0, 30),  # 02:30 summer time; not again at 01:30 UTC
        at(2026, 10, 26, 1, 30),
    ]


def test_a_schedule_with_a_wildcard_hour_runs_in_both_repeated_hours():
    ticks = list(
        ticks_between("30 * * * *", "Europe/Berlin", at(2026, 10, 25, 0, 0), at(2026, 10, 25, 2, 0))
    )
    # Both 02:30s. (Python never finds a time of a repeated hour equal to one of another
    # zone, so the ticks are compared in UTC.)
    assert [t.astimezone(UTC) for t in ticks] == [at(2026, 10, 25, 0, 30), at(2026, 10, 25, 1, 30)]


@pytest.mark.django_db
def test_backfill_across_the_dst_days_stores_the_ticks_in_utc():
    schedule("berlin", "30 2 * * *", timezone="Europe/Berlin")
    WorkflowSchedule.objects.backfill("berlin", at(2026, 3, 28), at(2026, 3, 30, 23))
    WorkflowSchedule.objects.backfill("berlin", at(2026, 10, 24), at(2026, 10, 26, 23))
    assert [run.scheduled_at for run in scheduled_runs("berlin")] == [
        at(2026, 3, 28, 1, 30),
        at(2026, 3, 29, 1, 0),
        at(2026, 3, 30, 0, 30),
        at(2026, 10, 24, 0, 30),
        at(2026, 10, 25, 0, 30),
        at(2026, 10, 26, 1, 30),
    ]


# --- declared in code -----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_worker_declares_the_schedules_of_its_workflows_at_its_first_tick_after_now():
    before = timezone.now()
    Worker(burst=True).run()
    declared = {s.name: s for s in WorkflowSchedule.objects.all()}
    assert sorted(declared) == ["declared-berlin", "declared-schedules"]
    berlin = declared["declared-berlin"]
    assert (berlin.workflow_name, berlin.cron, berlin.timezone, berlin.input) == (
        "declared-schedules",
        "0 0 29 2 *",
        "Europe/Berlin",
        {"n": 1},
    )
    assert declared["declared-schedules"].timezone == "UTC"  # settings.TIME_ZONE
    assert berlin.declared_in_code and berlin.enabled
    assert berlin.next_run_at == next_tick("0 0 29 2 *", "Europe/Berlin", before)
    assert WorkflowRun.objects.count() == 0


@pytest.mark.django_db
def test_declaring_again_updates_the_code_s_fields_keeps_a_pause_and_drops_the_undeclared():
    def declare(*schedules):
        wf = Workflow(lambda ctx: None, name="tick", schedule=list(schedules))
        WorkflowSchedule.objects.declare([wf])

    declare(Schedule("0 3 * * *", name="a"), Schedule("0 4 * * *", name="b"))
    WorkflowSchedule.objects.pause(WorkflowSchedule.objects.get(name="a"))
    first = WorkflowSchedule.objects.get(name="a").next_run_at
    declare(Schedule("0 3 * * *", name="a", input={"v": 2}))
    a = WorkflowSchedule.objects.get(name="a")
    assert (a.input, a.enabled, a.next_run_at) == ({"v": 2}, False, first)
    assert not WorkflowSchedule.objects.filter(name="b").exists()
    declare(Schedule("0 5 * * *", name="a", input={"v": 2}))
    a.refresh_from_db()
    assert a.cron == "0 5 * * *"
    assert a.next_run_at.astimezone(UTC).hour == 5


@pytest.mark.django_db
def test_a_schedule_added_in_the_admin_is_not_dropped_by_a_worker():
    schedule("by-hand")
    WorkflowSchedule.objects.declare([Workflow(lambda ctx: None, name="tick")])
    assert WorkflowSchedule.objects.filter(name="by-hand").exists()


# --- ticks ------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_only_the_latest_missed_tick_runs_and_the_run_reads_its_tick():
    schedule(input={"x": 1})  # due since yesterday: 96 ticks missed
    before = timezone.now()
    Worker(burst=True).run()
    [run] = scheduled_runs()
    expected = latest_tick("*/15 * * * *", "UTC", before)
    assert run.scheduled_at in {expected, expected + timedelta(minutes=15)}
    assert run.status == WorkflowRun.Status.COMPLETED
    assert run.output == {"scheduled_at": run.scheduled_at.isoformat(), "input": {"x": 1}}
    s = WorkflowSchedule.objects.get(name="every-15")
    assert s.last_run_at == run.scheduled_at
    assert s.next_run_at == run.scheduled_at + timedelta(minutes=15)


@pytest.mark.django_db
def test_a_fired_tick_does_not_fire_again():
    schedule(next_run_at=timezone.now() - timedelta(seconds=1))
    assert len(WorkflowSchedule.objects.fire_due("default", NAMES)) == 1
    assert WorkflowSchedule.objects.fire_due("default", NAMES) == []
    assert len(scheduled_runs()) == 1


@pytest.mark.django_db
def test_a_paused_schedule_starts_nothing_and_resuming_does_not_replay_missed_ticks():
    s = schedule()
    WorkflowSchedule.objects.pause(s)
    assert WorkflowSchedule.objects.fire_due("default", NAMES) == []
    before = timezone.now()
    s = WorkflowSchedule.objects.resume(s)
    assert s.enabled
    assert s.next_run_at == next_tick("*/15 * * * *", "UTC", before)
    assert WorkflowSchedule.objects.fire_due("default", NAMES) == []
    assert scheduled_runs() == []


@pytest.mark.django_db
def test_schedules_of_workflows_this_worker_does_not_know_are_left_to_others():
    schedule()
    assert WorkflowSchedule.objects.fire_due("default", ["echo"]) == []
    assert WorkflowSchedule.objects.fire_due("other-namespace", NAMES) == []
    assert len(WorkflowSchedule.objects.fire_due("default", NAMES)) == 1


@pytest.mark.django_db
def test_a_stored_bad_cron_stops_the_schedule_with_an_error_and_check_e016(caplog):
    s = schedule("broken", "0 3 * *")
    with caplog.at_level(logging.ERROR, logger="django_openworkflow.schedules"):
        assert WorkflowSchedule.objects.fire_due("default", NAMES) == []
    assert caplog.messages == [
        "schedule stopped schedule=broken error=bad cron expression '0 3 * *': "
        "Wrong number of fields"
    ]
    s.refresh_from_db()
    assert s.next_run_at is None
    [error] = check_stored_schedules(databases=["default"])
    assert (error.id, error.msg) == (
        "django_openworkflow.E016",
        "bad cron expression '0 3 * *' of schedule \"broken\": Wrong number of fields.",
    )


@pytest.mark.django_db
def test_check_w003_names_a_stored_schedule_of_an_unknown_workflow():
    WorkflowSchedule.objects.create(name="lost", workflow_name="no-such", cron="0 3 * * *")
    [warning] = check_stored_schedules(databases=["default"])
    assert (warning.id, warning.msg) == (
        "django_openworkflow.W003",
        "Schedule 'lost' starts workflow 'no-such', which no @workflow registers in this project.",
    )
    assert check_stored_schedules(databases=[]) == []


def test_check_e015_names_a_schedule_declared_by_two_workflows():
    @workflow(name="clash-a", schedule=Schedule("0 0 29 2 *", name="clash"))
    def a(ctx):
        pass

    @workflow(name="clash-b", schedule=Schedule("0 0 29 2 *", name="clash"))
    def b(ctx):
        pass

    try:
        [error] = [e for e in check_workflows() if e.id == "django_openworkflow.E015"]
        assert error.msg == "Schedule name 'clash' is declared by 2 workflows: clash-a, clash-b."
    finally:
        _registry.pop("clash-a")
        _registry.pop("clash-b")


@pytest.mark.django_db
def test_a_run_not_started_by_a_schedule_has_no_tick():
    run = tick.start({"y": 1})
    assert (run.schedule_name, run.scheduled_at) == (None, None)


# --- backfill and run now ---------------------------------------------------------------


@pytest.mark.django_db
def test_backfill_starts_one_run_per_tick_both_ends_included_and_skips_ticks_that_have_one():
    schedule(next_run_at=None, enabled=False)
    first = WorkflowSchedule.objects.backfill(
        "every-15", at(2026, 1, 1, 12), at(2026, 1, 1, 12, 30)
    )
    assert [run.scheduled_at for run in first] == [
        at(2026, 1, 1, 12),
        at(2026, 1, 1, 12, 15),
        at(2026, 1, 1, 12, 30),
    ]
    again = WorkflowSchedule.objects.backfill(
        "every-15", at(2026, 1, 1, 11, 50), at(2026, 1, 1, 12, 45)
    )
    assert [run.scheduled_at for run in again] == [at(2026, 1, 1, 12, 45)]
    assert len(scheduled_runs()) == 4
    assert (
        WorkflowSchedule.objects.backfill("every-15", at(2026, 1, 1, 12), at(2026, 1, 1, 12, 45))
        == []
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (
            ("nope", at(2026, 1, 1), at(2026, 1, 2)),
            WorkflowSchedule.DoesNotExist,
            "no workflow schedule is named 'nope' in namespace 'default'",
        ),
        (
            ("every-15", datetime(2026, 1, 1), at(2026, 1, 2)),
            ValueError,
            "backfill start must be an aware datetime, not datetime.datetime(2026, 1, 1, 0, 0)",
        ),
        (
            ("every-15", at(2026, 1, 2), at(2026, 1, 1)),
            ValueError,
            "backfill of schedule 'every-15': end 2026-01-01 00:00:00+00:00 is before start "
            "2026-01-02 00:00:00+00:00",
        ),
        (
            ("every-15", at(2026, 1, 1), at(2026, 12, 1)),
            ValueError,
            'backfill of schedule "every-15" from 2026-01-01 00:00:00+00:00 to 2026-12-01 '
            "00:00:00+00:00 has more than 10000 ticks: backfill it in shorter ranges",
        ),
    ],
)
def test_backfill_refuses_bad_arguments_by_name(args, error, message):
    schedule()
    with pytest.raises(error) as raised:
        WorkflowSchedule.objects.backfill(*args)
    assert str(raised.value) == message
    assert scheduled_runs() == []


@pytest.mark.django_db
def test_run_now_starts_a_run_outside_the_ticks_which_go_on():
    s = schedule(next_run_at=at(2099, 1, 1))
    run = WorkflowSchedule.objects.run_now(s)
    s.refresh_from_db()
    assert (run.schedule_name, s.last_run_at, s.next_run_at) == (
        "every-15",
        run.scheduled_at,
        at(2099, 1, 1),
    )
    assert abs(run.scheduled_at - timezone.now()) < timedelta(minutes=1)


@pytest.mark.django_db(transaction=True)
def test_a_second_run_of_one_tick_is_refused_by_the_database():
    s = schedule()
    [run] = WorkflowSchedule.objects.backfill(s.name, at(2026, 1, 1), at(2026, 1, 1))
    with pytest.raises(IntegrityError), transaction.atomic():
        WorkflowRun.objects.create(
            workflow_name="tick", schedule_name=s.name, scheduled_at=run.scheduled_at
        )
    # Runs of no schedule never clash (NULLs are distinct), nor do other schedules' ticks.
    WorkflowRun.objects.create(workflow_name="tick", scheduled_at=run.scheduled_at)
    WorkflowRun.objects.create(workflow_name="tick", scheduled_at=run.scheduled_at)
    WorkflowRun.objects.create(
        workflow_name="tick", schedule_name="other", scheduled_at=run.scheduled_at
    )
    assert WorkflowRun.objects.count() == 4


# --- exactly once, with concurrent workers and a crash mid-tick (PostgreSQL) -----------------


def _fire_in_thread(results: list, errors: list) -> threading.Thread:
    def fire():
        try:
            results.extend(WorkflowSchedule.objects.fire_due("default", NAMES))
        except BaseException as exc:  # reported to the test
            errors.append(exc)
        finally:
            connection.close()

    return threading.Thread(target=fire)


@pytest.mark.row_locks
@pytest.mark.django_db(transaction=True)
def test_a_tick_held_by_one_worker_is_skipped_by_the_others_and_fires_once():
    schedule()
    results: list = []
    errors: list = []
    with pause_at("schedule.before-commit") as pause:
        holder = _fire_in_thread(results, errors)
        holder.start()
        pause.wait()
        others = [_fire_in_thread(results, errors) for _ in range(2)]
        for thread in others:
            thread.start()
        for thread in others:
            thread.join(10)
        assert results == []  # they skipped the locked row; the holder has not committed
    holder.join(10)
    assert errors == []
    assert [run.pk for run in results] == [run.pk for run in scheduled_runs()]
    assert len(results) == 1


@pytest.mark.row_locks
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("raised", [RuntimeError("crash"), KeyboardInterrupt()])
def test_a_crash_mid_tick_starts_nothing_and_the_next_fire_starts_the_tick_once(raised):
    s = schedule()

    def crash(context):
        raise raised

    add_hook("schedule.before-commit", crash)
    results: list = []
    errors: list = []
    try:
        thread = _fire_in_thread(results, errors)
        thread.start()
        thread.join(10)
    finally:
        remove_hook("schedule.before-commit", crash)
    if isinstance(raised, RuntimeError):
        assert errors == []  # logged; the other schedules go on
    else:
        assert errors == [raised]
    assert scheduled_runs() == []
    assert WorkflowSchedule.objects.get().next_run_at == s.next_run_at
    assert len(WorkflowSchedule.objects.fire_due("default", NAMES)) == 1
    assert len(scheduled_runs()) == 1


@pytest.mark.row_locks
@pytest.mark.django_db(transaction=True)
def test_three_workers_start_each_tick_exactly_once():
    schedule("every-minute", "* * * * *", next_run_at=timezone.now() - timedelta(hours=1))
    workers = [Worker(concurrency=2, poll_interval=0.05) for _ in range(3)]
    threads = [threading.Thread(target=worker.run) for worker in workers]
    for thread in threads:
        thread.start()
    try:
        for _ in range(1200):  # up to a minute: a loaded machine (CI runs lanes side by side)
            runs = scheduled_runs("every-minute")
            if runs and all(run.status == WorkflowRun.Status.COMPLETED for run in runs):
                break
            threading.Event().wait(0.05)
    finally:
        for worker in workers:
            worker.stop()
        for thread in threads:
            thread.join(10)
    runs = scheduled_runs("every-minute")
    ticks = [run.scheduled_at for run in runs]
    assert len(ticks) == len(set(ticks)) >= 1  # no tick twice (a minute may pass meanwhile)
    assert all(run.status == WorkflowRun.Status.COMPLETED for run in runs)


@pytest.mark.django_db
def test_manage_py_check_database_reports_stored_schedules(capsys):
    WorkflowSchedule.objects.create(name="lost", workflow_name="no-such", cron="0 3 * * *")
    call_command("check", "--database", "default")
    assert "django_openworkflow.W003" in capsys.readouterr().err


def test_check_w004_names_a_scheduled_workflow_whose_queue_is_not_configured():
    @workflow(name="w004", queue="nowhere", schedule=Schedule("0 0 29 2 *", name="w004-nightly"))
    def w004(ctx):
        pass

    try:
        [warning] = [e for e in check_workflows() if e.id == "django_openworkflow.W004"]
        assert warning.msg == (
            "queue 'nowhere' of workflow \"w004\" is not in OPENWORKFLOW['QUEUES']; known "
            "queues: default: its schedules (w004-nightly) start no run."
        )
    finally:
        _registry.pop("w004")


@pytest.mark.django_db(transaction=True)
def test_a_worker_that_could_not_declare_its_schedules_at_its_start_declares_them_later(
    monkeypatch,
):
    from django.db import OperationalError

    from django_openworkflow.schedules import WorkflowScheduleManager

    declare = WorkflowScheduleManager.declare
    calls = []

    def away_at_first(self, workflows, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("the database is away")
        return declare(self, workflows, **kwargs)

    monkeypatch.setattr(WorkflowScheduleManager, "declare", away_at_first)
    Worker(burst=True).run()  # its start fails to declare; its first sweep declares
    assert len(calls) == 2
    assert WorkflowSchedule.objects.filter(name="declared-berlin").exists()
