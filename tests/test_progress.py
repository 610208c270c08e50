"""Progress on a terminal (``progress.py``), the commands that show it, ``backfill_schedule``."""

from __future__ import annotations

import itertools
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError, OutputWrapper
from django.core.management.color import color_style
from django.test import override_settings

from django_openworkflow import progress as progress_module
from django_openworkflow.models import WorkflowRun, WorkflowSchedule
from django_openworkflow.progress import Progress, clock_time
from tests.test_retention import HOUR, make_run


class TTY(StringIO):
    """A terminal, as far as ``isatty()`` tells."""

    def isatty(self) -> bool:
        return True


class Clock:
    """A clock that reads ``t``: the test moves it."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def ticking(monkeypatch):
    """Each read of the progress clock is one second after the one before (0 first)."""
    seconds = itertools.count()
    monkeypatch.setattr(progress_module, "now", lambda: float(next(seconds)))
    monkeypatch.setenv("COLUMNS", "200")


# --- the Progress object -----------------------------------------------------------------


def test_with_a_total_one_line_is_rewritten_and_ends_with_the_final_one():
    out, clock = TTY(), Clock()
    with Progress(out, "purge", total=4, unit="families", clock=clock, width=80) as progress:
        for done, detail in [(1, "deleted 10 runs"), (3, "deleted 30 runs"), (4, "")]:
            clock.t += 1
            progress.update(done, detail)
        clock.t += 1
    assert out.getvalue().split("\r") == [
        "",
        "purge: 1/4 families (25%), deleted 10 runs; 1.0/s, ETA 0:03",
        "purge: 3/4 families (75%), deleted 30 runs; 1.5/s, ETA 0:00",
        # shorter than the line before: padded to cover it
        "purge: 4/4 families (100%); 1.3/s, ETA 0:00".ljust(59),
        "purge: 4/4 families (100%); 1.0/s, took 0:04".ljust(43) + "\n",
    ]


def test_without_a_total_a_line_every_few_seconds_and_a_final_one():
    out, clock = TTY(), Clock()
    with Progress(out, "purge", unit="runs", clock=clock, every=5) as progress:
        for done in range(1, 13):
            clock.t = done
            progress.update(done * 10, f"{done} batches")
    assert out.getvalue() == (
        "purge: 50 runs, 5 batches; 10.0/s, 0:05 elapsed\n"
        "purge: 100 runs, 10 batches; 10.0/s, 0:10 elapsed\n"
        "purge: 120 runs, 12 batches; 10.0/s, took 0:12\n"
    )


def test_updates_are_written_at_most_once_an_interval():
    out, clock = TTY(), Clock()
    progress = Progress(out, "chaos", total=1000, clock=clock, interval=0.5, width=200)
    for done in range(1, 1001):
        clock.t = done / 1000  # a thousand updates in one second
        progress.update(done)
    # the first at once, then one each half second
    assert [line.split(";")[0] for line in out.getvalue().split("\r")[1:]] == [
        "chaos: 1/1000 (0%)",
        "chaos: 501/1000 (50%)",
    ]
    assert not progress.due()  # 0.499 s after the last line
    clock.t = 1.25
    assert progress.due()


def test_nothing_is_written_when_the_stream_is_not_a_terminal_or_verbosity_is_0():
    clock = Clock()
    for stream, verbosity in [(StringIO(), 1), (TTY(), 0), (StringIO(), 3)]:
        with Progress(stream, "purge", total=3, verbosity=verbosity, clock=clock) as progress:
            clock.t += 10
            progress.update(2)
        assert not progress.enabled
        assert not progress.due()
        assert stream.getvalue() == ""


def test_an_exception_ends_the_open_line_and_writes_no_final_one():
    out, clock = TTY(), Clock()
    with pytest.raises(KeyError), Progress(out, "backfill", total=5, clock=clock) as progress:
        clock.t = 1
        progress.update(1)
        raise KeyError("boom")
    assert out.getvalue() == "\rbackfill: 1/5 (20%); 1.0/s, ETA 0:04\n"


def test_a_line_longer_than_the_terminal_is_cut_so_that_it_can_be_rewritten():
    out, clock = TTY(), Clock()
    progress = Progress(out, "purge", total=10, clock=clock, width=20)
    clock.t = 1
    progress.update(1)
    assert out.getvalue() == "\rpurge: 1/10 (10%); "


def test_through_a_commands_output_wrapper_the_line_is_not_coloured():
    out, clock = TTY(), Clock()
    wrapper = OutputWrapper(out)
    wrapper.style_func = color_style(force_color=True).ERROR  # a command's stderr on a terminal
    with Progress(wrapper, "purge", total=1, clock=clock) as progress:
        clock.t = 2
        progress.update(1)
    assert out.getvalue() == (
        "\rpurge: 1/1 (100%); 0.5/s, ETA 0:00\rpurge: 1/1 (100%); 0.5/s, took 0:02\n"
    )


@pytest.mark.parametrize(
    ("seconds", "shown"), [(0, "0:00"), (5.9, "0:05"), (750, "12:30"), (3723, "1:02:03")]
)
def test_clock_time(seconds, shown):
    assert clock_time(seconds) == shown


# --- purge_workflow_runs -----------------------------------------------------------------


@pytest.mark.django_db
def test_purge_is_quiet_when_not_on_a_terminal():
    for hours in (5, 4, 3):
        make_run("completed", age=hours * HOUR)
    out, err = StringIO(), StringIO()
    call_command(
        "purge_workflow_runs", "--older-than", "1h", "--batch-size", "1", stdout=out, stderr=err
    )
    assert out.getvalue() == "deleted 3 runs, 3 step attempts, 3 events, 0 signals\n"
    assert err.getvalue() == ""


@pytest.mark.django_db
def test_purge_shows_each_batch_on_a_terminal(ticking):
    for hours in (5, 4, 3):
        make_run("completed", age=hours * HOUR)
    young = make_run("completed", age=timedelta(minutes=5))
    out, err = StringIO(), TTY()
    call_command(
        "purge_workflow_runs", "--older-than", "1h", "--batch-size", "1", stdout=out, stderr=err
    )
    assert out.getvalue() == "deleted 3 runs, 3 step attempts, 3 events, 0 signals\n"
    # the clock reads 0 when the progress starts, then 1, 2, 3 at each batch, 4 at the end
    assert err.getvalue().split("\r")[1:] == [
        "purge: 1/3 families (33%), deleted 1 run, 1 step attempt; 1.0/s, ETA 0:02",
        "purge: 2/3 families (66%), deleted 2 runs, 2 step attempts; 1.0/s, ETA 0:01",
        "purge: 3/3 families (100%), deleted 3 runs, 3 step attempts; 1.0/s, ETA 0:00",
        "purge: 3/3 families (100%), deleted 3 runs, 3 step attempts; 0.8/s, took 0:04\n",
    ]
    assert list(WorkflowRun.objects.values_list("pk", flat=True)) == [young.pk]


@pytest.mark.django_db
def test_purge_dry_run_says_would_delete_and_verbosity_0_shows_nothing(ticking):
    make_run("completed", age=3 * HOUR)
    err = TTY()
    call_command(
        "purge_workflow_runs", "--older-than", "1h", "--dry-run", stderr=err, stdout=StringIO()
    )
    assert err.getvalue().split("\r")[1:] == [
        "purge: 1/1 families (100%), would delete 1 run, 1 step attempt; 1.0/s, ETA 0:00",
        "purge: 1/1 families (100%), would delete 1 run, 1 step attempt; 0.5/s, took 0:02\n",
    ]
    err = TTY()
    call_command(
        "purge_workflow_runs", "--older-than", "1h", stderr=err, stdout=StringIO(), verbosity=0
    )
    assert err.getvalue() == ""
    assert not WorkflowRun.objects.exists()


# --- backfill_schedule -------------------------------------------------------------------


def make_schedule(name="every-15", cron="*/15 * * * *", zone="UTC"):
    return WorkflowSchedule.objects.create(
        name=name, workflow_name="tick", cron=cron, timezone=zone, next_run_at=None
    )


def backfill(*args, stderr=None, **options):
    out = StringIO()
    call_command("backfill_schedule", *args, stdout=out, stderr=stderr or StringIO(), **options)
    return out.getvalue()


def ticks(name="every-15"):
    runs = WorkflowRun.objects.filter(schedule_name=name).order_by("scheduled_at")
    return [run.scheduled_at.isoformat() for run in runs]


@pytest.mark.django_db(transaction=True)
def test_backfill_schedule_starts_one_run_per_tick_and_a_second_call_none():
    make_schedule()
    err = StringIO()
    assert backfill(
        "every-15", "--start", "2026-01-01T12:00Z", "--end", "2026-01-01T12:30+00:00", stderr=err
    ) == (
        "3 ticks of schedule 'every-15' from 2026-01-01T12:00:00+00:00 to "
        "2026-01-01T12:30:00+00:00: 3 runs started, 0 already had one.\n"
    )
    assert err.getvalue() == ""  # not a terminal
    assert ticks() == [
        "2026-01-01T12:00:00+00:00",
        "2026-01-01T12:15:00+00:00",
        "2026-01-01T12:30:00+00:00",
    ]
    assert set(WorkflowRun.objects.values_list("status", "workflow_name")) == {("pending", "tick")}
    assert backfill("every-15", "--start", "2026-01-01T12:00Z", "--end", "2026-01-01T12:45Z") == (
        "4 ticks of schedule 'every-15' from 2026-01-01T12:00:00+00:00 to "
        "2026-01-01T12:45:00+00:00: 1 run started, 3 already had one.\n"
    )
    assert len(ticks()) == 4


@pytest.mark.django_db(transaction=True)
def test_backfill_schedule_shows_each_tick_on_a_terminal(ticking):
    make_schedule()
    err = TTY()
    backfill("every-15", "--start", "2026-01-01T12:00Z", "--end", "2026-01-01T12:45Z", stderr=err)
    backfill("every-15", "--start", "2026-01-01T12:00Z", "--end", "2026-01-01T12:15Z", stderr=err)
    lines = err.getvalue().split("\n")
    assert lines[0].split("\r")[1:] == [
        "backfill every-15: 0/4 ticks (0%); 0.0/s, ETA ?",
        "backfill every-15: 1/4 ticks (25%); 0.5/s, ETA 0:06",
        "backfill every-15: 2/4 ticks (50%); 0.7/s, ETA 0:03",
        "backfill every-15: 3/4 ticks (75%); 0.8/s, ETA 0:01",
        "backfill every-15: 4/4 ticks (100%); 0.8/s, ETA 0:00",
        "backfill every-15: 4/4 ticks (100%); 0.7/s, took 0:06",
    ]
    assert lines[1].split("\r")[-1] == "backfill every-15: 2/2 ticks (100%); 0.5/s, took 0:04"
    assert lines[2:] == [""]


@pytest.mark.django_db(transaction=True)
def test_backfill_schedule_reads_times_without_an_offset_in_the_schedules_zone():
    make_schedule("nightly", "0 2 * * *", "Europe/Berlin")
    assert backfill("nightly", "--start", "2026-11-01", "--end", "2026-11-03T02:00") == (
        "3 ticks of schedule 'nightly' from 2026-11-01T00:00:00+01:00 to "
        "2026-11-03T02:00:00+01:00: 3 runs started, 0 already had one.\n"
    )
    assert ticks("nightly") == [
        "2026-11-01T01:00:00+00:00",
        "2026-11-02T01:00:00+00:00",
        "2026-11-03T01:00:00+00:00",
    ]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["nope", "--start", "2026-01-01", "--end", "2026-01-02"],
            "no workflow schedule is named 'nope' in namespace 'default'",
        ),
        (
            ["every-15", "--start", "2026-01-02", "--end", "2026-01-01"],
            "backfill of schedule 'every-15': end 2026-01-01 00:00:00+00:00 is before start "
            "2026-01-02 00:00:00+00:00",
        ),
        (
            ["every-15", "--start", "2026-01-01", "--end", "2026-12-01"],
            'backfill of schedule "every-15" from 2026-01-01 00:00:00+00:00 to 2026-12-01 '
            "00:00:00+00:00 has more than 10000 ticks: backfill it in shorter ranges",
        ),
        (
            ["berlin", "--start", "2026-03-29T02:30", "--end", "2026-03-30"],
            "--start 2026-03-29T02:30:00 does not exist in Europe/Berlin (the clocks skip it): "
            "give a UTC offset, e.g. 2026-03-29T00:30:00+00:00",
        ),
        (
            ["berlin", "--start", "2026-10-24", "--end", "2026-10-25T02:30"],
            "--end 2026-10-25T02:30:00 happens twice in Europe/Berlin (the clocks go back): give a "
            "UTC offset, 2026-10-25T02:30:00+02:00 for the first or 2026-10-25T02:30:00+01:00 "
            "for the second",
        ),
        (
            ["mars", "--start", "2026-01-01", "--end", "2026-01-02"],
            "schedule 'mars' cannot be backfilled: unknown time zone 'Mars/Olympus'; correct it "
            "in the admin",
        ),
        (
            ["orphan", "--start", "2026-01-01", "--end", "2026-01-02"],
            'schedule "orphan" starts workflow "gone", which is not registered in this process',
        ),
    ],
)
def test_backfill_schedule_refuses_bad_input(args, message):
    make_schedule()
    make_schedule("berlin", "30 2 * * *", "Europe/Berlin")
    WorkflowSchedule.objects.create(name="orphan", workflow_name="gone", cron="@daily")
    make_schedule("mars", zone="Mars/Olympus")
    with pytest.raises(CommandError) as info:
        backfill(*args)
    assert str(info.value) == message
    assert not WorkflowRun.objects.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["x", "--start", "yesterday", "--end", "2026-01-01"],
            "Error: argument --start: 'yesterday' is not an ISO 8601 date or time (2026-11-01, "
            "2026-11-01T02:00, 2026-11-01T02:00+01:00)",
        ),
        (["x", "--start", "2026-01-01"], "Error: the following arguments are required: --end"),
    ],
)
def test_backfill_schedule_refuses_bad_options(args, message):
    with pytest.raises(CommandError) as info:
        backfill(*args)
    assert str(info.value) == message


@pytest.mark.django_db(transaction=True)
def test_backfill_schedule_in_another_namespace():
    with override_settings(OPENWORKFLOW={"NAMESPACE": "other"}):
        WorkflowSchedule.objects.create(
            namespace="other", name="every-15", workflow_name="tick", cron="*/15 * * * *"
        )
    assert backfill(
        "every-15",
        "--namespace",
        "other",
        "--start",
        "2026-01-01T12:00Z",
        "--end",
        "2026-01-01T12:00Z",
    ) == (
        "1 tick of schedule 'every-15' from 2026-01-01T12:00:00+00:00 to "
        "2026-01-01T12:00:00+00:00: 1 run started, 0 already had one.\n"
    )
    assert list(WorkflowRun.objects.values_list("namespace", flat=True)) == ["other"]


@pytest.mark.django_db
def test_backfill_tells_its_progress_after_each_tick_started_or_skipped():
    make_schedule()
    from datetime import UTC, datetime

    start, end = datetime(2026, 1, 1, 12, tzinfo=UTC), datetime(2026, 1, 1, 12, 45, tzinfo=UTC)
    WorkflowSchedule.objects.backfill("every-15", start, start)
    told = []
    runs = WorkflowSchedule.objects.backfill(
        "every-15", start, end, progress=lambda done, total: told.append((done, total))
    )
    assert told == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]
    assert [run.scheduled_at.minute for run in runs] == [15, 30, 45]
