"""``WorkflowSchedule.objects``: declare schedules, fire their ticks, backfill, pause, resume.

Exactly one run per tick. A worker fires a due schedule in one transaction:
it locks the schedule's row (``SKIP LOCKED``: a row another worker is firing
is left to it), re-reads ``next_run_at`` under the lock, inserts the run of
the latest tick that has none, and moves ``next_run_at`` past the database's
clock. A crash before the commit leaves nothing; after it, the tick is done.
Backfill and "Run now" lock the same row, and the unique constraint
``owf_run_schedule_tick_uniq`` (namespace, schedule, tick) refuses a second
run of one tick whatever path inserts it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import DatabaseError, DataError, IntegrityError, models
from django.utils import timezone

from .clock import Now
from .conf import app_settings
from .cron import check_cron, check_timezone, latest_tick, next_tick, ticks_between
from .logfields import failure, failure_text
from .pauses import pause_point
from .tracing import starting

if TYPE_CHECKING:
    from .models import WorkflowRun, WorkflowSchedule
    from .registry import Workflow
    from .store import Store

logger = logging.getLogger(__name__)

MAX_BACKFILL_TICKS = 10_000
_reported: set[tuple[int, str]] = set()  # (schedule id, error) logged by fire_due
FIRE_BATCH = 100  # due schedules looked at per sweep


def default_timezone() -> str:
    """``settings.TIME_ZONE``, the zone of a schedule that names none ("UTC" if unset)."""
    return str(getattr(settings, "TIME_ZONE", None) or "UTC")


class WorkflowScheduleQuerySet(models.QuerySet):  # type: ignore[type-arg]
    def in_namespace(self, namespace: str) -> WorkflowScheduleQuerySet:
        return self.filter(namespace=namespace)

    def due(self) -> WorkflowScheduleQuerySet:
        """Enabled schedules whose next tick has come (by the database's clock)."""
        return self.filter(enabled=True, next_run_at__lte=Now())


class WorkflowScheduleManager(models.Manager.from_queryset(WorkflowScheduleQuerySet)):  # type: ignore[misc]
    @property
    def store(self) -> Store:
        from .store import get_store

        return get_store(self.db)

    # --- declared in code -------------------------------------------------------------

    def declare(self, workflows: Iterable[Workflow], *, namespace: str | None = None) -> None:
        """Create or update the schedules these workflows declare; delete those they dropped.

        Called when a worker starts. The code wins for the cron expression,
        time zone, input and workflow; ``enabled`` stays as the admin left it,
        so a paused schedule stays paused across deploys. A schedule declared
        in code that its workflow no longer declares is deleted (its runs
        stay).
        """
        namespace = namespace or app_settings.NAMESPACE
        workflows = list(workflows)
        for wf in workflows:
            for declared in wf.schedules:
                self._declare_one(namespace, wf.name, declared)
        for wf in workflows:
            kept = [declared.name for declared in wf.schedules]
            self.in_namespace(namespace).filter(
                workflow_name=wf.name, declared_in_code=True
            ).exclude(name__in=kept).delete()

    def _declare_one(self, namespace: str, workflow_name: str, declared: Any) -> None:
        wanted = {
            "workflow_name": workflow_name,
            "cron": declared.cron,
            "timezone": declared.timezone or default_timezone(),
            "input": declared.input,
            "declared_in_code": True,
        }
        for attempt in range(3):
            try:
                with self.store.atomic():
                    self._create_or_update(namespace, declared.name, wanted)
                return
            except IntegrityError:
                # Another worker created it first. The transaction is rolled back, so no lock
                # of the failed insert is kept (on MariaDB, three workers starting at once
                # deadlocked on those); the next attempt updates the row it made.
                if attempt == 2:
                    raise

    def _create_or_update(self, namespace: str, name: str, wanted: dict[str, Any]) -> None:
        schedule = (
            self.select_for_update()
            .filter(namespace=namespace, name=name)
            .annotate(clock=Now())
            .first()
        )
        if schedule is None:
            pause_point("schedule.declare-missing", schedule=name)
            schedule = self.create(namespace=namespace, name=name, **wanted)
            pause_point("schedule.declare-inserted", schedule=name)
            schedule.reschedule(self.clock(schedule.pk))
            schedule.save(update_fields=["next_run_at"])
            return
        changed = [field for field in wanted if getattr(schedule, field) != wanted[field]]
        if not changed:
            return
        for field in changed:
            setattr(schedule, field, wanted[field])
        if {"cron", "timezone"} & set(changed):
            schedule.reschedule(schedule.clock)
            changed.append("next_run_at")
        schedule.updated_at = Now()
        schedule.save(update_fields=[*changed, "updated_at"])

    def clock(self, pk: int) -> datetime:
        """The database's clock, read with a schedule's row: ticks are planned by it, as
        ``fire_due`` judges them by it (Python's clock may be ahead or behind)."""
        clock: datetime = (
            self.filter(pk=pk).annotate(clock=Now()).values_list("clock", flat=True).get()
        )
        return clock

    # --- ticks --------------------------------------------------------------------------

    def fire_due(self, namespace: str, workflow_names: Iterable[str]) -> list[WorkflowRun]:
        """Start the run of every due schedule of these workflows; return the runs started.

        Only the latest tick that has come runs: ticks missed while no worker
        ran are not replayed one by one.
        """
        due = list(
            self.in_namespace(namespace)
            .due()
            .filter(workflow_name__in=list(workflow_names))
            .order_by("next_run_at")
            .values_list("pk", "name")[:FIRE_BATCH]
        )
        runs = []
        for pk, name in due:
            try:
                run = self._fire(pk)
            except (IntegrityError, DataError) as exc:
                self._not_fired(pk, name, exc)
                continue
            except DatabaseError:
                raise  # the connection or the server: the worker's loop reconnects, tries again
            except Exception as exc:  # the queue of its workflow is not configured, a bug...
                self._not_fired(pk, name, exc)
                continue
            if run is not None:
                runs.append(run)
        return runs

    def _not_fired(self, pk: int, name: str, exc: Exception) -> None:
        """The schedule stays due and is tried again each sweep: say so once per process.

        Nothing it raises stops the other schedules, nor the worker's claims.
        """
        if (pk, repr(exc)) in _reported:
            return
        _reported.add((pk, repr(exc)))
        logger.error(
            "schedule not fired schedule=%s error=%s",
            name,
            failure(exc),
            exc_info=not isinstance(exc, ValueError | DatabaseError),
        )
        logger.debug("schedule not fired schedule=%s detail=%s", name, failure_text(exc))

    def _fire(self, pk: int) -> WorkflowRun | None:
        from .registry import get_workflow

        with self.store.atomic():
            schedule = (
                self.select_for_update(skip_locked=True)
                .filter(pk=pk)
                .due()
                .annotate(clock=Now())
                .first()
            )
            if schedule is None:  # fired by another worker, or being fired, or paused
                return None
            workflow = get_workflow(schedule.workflow_name)
            if workflow is None:
                return None
            now = schedule.clock
            try:
                check_cron(schedule.cron)
                check_timezone(schedule.timezone)
            except (TypeError, ValueError) as exc:
                # Stored by hand, or read differently by another cronsim: stop until it is
                # corrected in the admin (which plans the next tick again). Check E016 says so.
                logger.error("schedule stopped schedule=%s error=%s", schedule.name, exc)
                schedule.next_run_at = None
                schedule.save(update_fields=["next_run_at"])
                return None
            tick = latest_tick(schedule.cron, schedule.timezone, now)
            pause_point("schedule.before-start", schedule=schedule.name, tick=tick)
            run = None
            if not self._runs(schedule).filter(scheduled_at=tick).exists():
                run = start_tick(self.store, workflow, schedule, tick)
                schedule.last_run_at = tick
            schedule.next_run_at = next_tick(schedule.cron, schedule.timezone, now)
            schedule.updated_at = Now()
            schedule.save(update_fields=["last_run_at", "next_run_at", "updated_at"])
            pause_point("schedule.before-commit", schedule=schedule.name, tick=tick)
        return run

    def backfill(
        self,
        name: str,
        start: datetime,
        end: datetime,
        *,
        namespace: str | None = None,
        progress: Callable[[int, int], object] | None = None,
    ) -> list[WorkflowRun]:
        """Start one run per tick from ``start`` to ``end`` (both included) that has none.

        Returns the runs started, oldest tick first. At most
        ``MAX_BACKFILL_TICKS`` ticks in one call. ``progress(done, ticks)`` is
        told the number of ticks once they are known (``done`` 0), then after
        each tick, started or skipped (all in the one transaction: nothing is
        committed before the last).
        """
        namespace = namespace or app_settings.NAMESPACE
        for value, what in ((start, "start"), (end, "end")):
            if not isinstance(value, datetime) or timezone.is_naive(value):
                raise ValueError(f"backfill {what} must be an aware datetime, not {value!r}")
        if end < start:
            raise ValueError(f"backfill of schedule {name!r}: end {end} is before start {start}")
        with self.store.atomic():
            try:
                schedule = self.select_for_update().get(namespace=namespace, name=name)
            except self.model.DoesNotExist:
                raise self.model.DoesNotExist(
                    f"no workflow schedule is named {name!r} in namespace {namespace!r}"
                ) from None
            workflow = registered(schedule)
            ticks = []
            for tick in ticks_between(schedule.cron, schedule.timezone, start, end):
                ticks.append(tick)
                if len(ticks) > MAX_BACKFILL_TICKS:
                    raise ValueError(
                        f'backfill of schedule "{name}" from {start} to {end} has more than '
                        f"{MAX_BACKFILL_TICKS} ticks: backfill it in shorter ranges"
                    )
            have = set(
                self._runs(schedule)
                .filter(scheduled_at__gte=start, scheduled_at__lte=end)
                .values_list("scheduled_at", flat=True)
            )
            if progress is not None:
                progress(0, len(ticks))
            runs = []
            for done, tick in enumerate(ticks, 1):
                # Compared in UTC, as the database gives them: Python never finds a time of a
                # repeated hour (clocks going back) equal to a time of another zone.
                if tick.astimezone(dt_timezone.utc) not in have:
                    runs.append(start_tick(self.store, workflow, schedule, tick))
                if progress is not None:
                    progress(done, len(ticks))
            return runs

    def _runs(self, schedule: WorkflowSchedule) -> models.QuerySet[WorkflowRun]:
        from .models import WorkflowRun

        return WorkflowRun.objects.using(self.db).filter(
            namespace=schedule.namespace, schedule_name=schedule.name
        )

    # --- the admin's actions ------------------------------------------------------------

    def pause(self, schedule: WorkflowSchedule) -> WorkflowSchedule:
        """Stop starting runs until ``resume``."""
        return self._set_enabled(schedule, False)

    def resume(self, schedule: WorkflowSchedule) -> WorkflowSchedule:
        """Start runs again from the next tick on; the ticks missed while paused do not run."""
        return self._set_enabled(schedule, True)

    def _set_enabled(self, schedule: WorkflowSchedule, enabled: bool) -> WorkflowSchedule:
        with self.store.atomic():
            locked = self.select_for_update().annotate(clock=Now()).get(pk=schedule.pk)
            if locked.enabled != enabled:
                locked.enabled = enabled
                if enabled:
                    locked.reschedule(locked.clock)
                locked.updated_at = Now()
                locked.save(update_fields=["enabled", "next_run_at", "updated_at"])
        locked.refresh_from_db(fields=["updated_at"])
        return locked

    def run_now(self, schedule: WorkflowSchedule) -> WorkflowRun:
        """Start a run now, outside the ticks (``scheduled_at`` is now); the ticks go on."""
        with self.store.atomic():
            locked = self.select_for_update().annotate(clock=Now()).get(pk=schedule.pk)
            workflow = registered(locked)
            tick = locked.clock
            # (SQLite's clock has milliseconds: two "Run now"s may read one instant.)
            while self._runs(locked).filter(scheduled_at=tick).exists():
                tick += timedelta(microseconds=1)
            run = start_tick(self.store, workflow, locked, tick)
            locked.last_run_at = tick
            locked.save(update_fields=["last_run_at"])
        return run


def registered(schedule: WorkflowSchedule) -> Workflow:
    """The workflow a schedule starts, or ``LookupError`` naming both (backfill, Run now)."""
    from .registry import get_workflow

    workflow = get_workflow(schedule.workflow_name)
    if workflow is None:
        raise LookupError(
            f'schedule "{schedule.name}" starts workflow "{schedule.workflow_name}", which is '
            "not registered in this process"
        )
    return workflow


def start_tick(store: Store, workflow: Workflow, schedule: WorkflowSchedule, tick: datetime) -> Any:
    """Insert the run of one tick of ``schedule`` (in the caller's transaction)."""
    with starting(workflow.name) as trace_context:
        return store.insert_run(
            namespace=schedule.namespace,
            workflow_name=workflow.name,
            version=workflow.version,
            input=schedule.input,
            schedule_name=schedule.name,
            scheduled_at=tick,
            trace_context=trace_context,
            **workflow.placement(None, None, None),
        )
