"""Workflow runs, their step attempts and their resume/cancel history."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.contenttypes.fields import GenericForeignKey
from django.db import models, router
from django.db.models import lookups
from django.db.models.functions import Now
from django.db.models.signals import pre_delete
from django.dispatch import receiver
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from . import clock, subjects
from .cron import next_tick, validate_cron, validate_timezone
from .exceptions import Refusal
from .ids import uuid7
from .managers import ACTIVE, StepAttemptQuerySet, WorkflowRunManager
from .schedules import WorkflowScheduleManager, default_timezone
from .workers import WorkflowWorkerManager

if TYPE_CHECKING:
    from .waiting import WaitingFor


class ExactCharField(models.CharField):  # type: ignore[type-arg]
    """A ``CharField`` for names and keys: equal only when equal as Python strings.

    PostgreSQL and SQLite compare text exactly. MySQL's and MariaDB's usual
    collations (``utf8mb4_general_ci``, ``utf8mb4_unicode_ci``) ignore case,
    accents and trailing spaces and hold all emoji equal, so the idempotency
    key "A" would return the run of "a", and a signal "order" would wake a
    waiter of "Order". On MySQL the column gets a binary NO PAD collation
    (MariaDB's ``utf8mb4_nopad_bin``, MySQL 8's ``utf8mb4_0900_bin``);
    elsewhere nothing changes. The case-insensitive lookups (the search)
    lower both sides there, as PostgreSQL's do.
    """

    def db_parameters(self, connection: Any) -> dict[str, Any]:
        params = super().db_parameters(connection)
        if connection.vendor == "mysql" and self.db_collation is None:
            mariadb = connection.mysql_is_mariadb
            params["collation"] = "utf8mb4_nopad_bin" if mariadb else "utf8mb4_0900_bin"
        return params


class _LowerBothSides:
    """``LOWER(column) LIKE LOWER(pattern)`` on MySQL, where the column's collation is binary."""

    def as_mysql(self, compiler: Any, connection: Any) -> tuple[str, list[Any]]:
        lhs_sql, lhs_params = self.process_lhs(compiler, connection)  # type: ignore[attr-defined]
        rhs_sql, rhs_params = self.process_rhs(compiler, connection)  # type: ignore[attr-defined]
        return f"LOWER({lhs_sql}) LIKE LOWER({rhs_sql})", [*lhs_params, *rhs_params]


for _lookup in (lookups.IExact, lookups.IContains, lookups.IStartsWith, lookups.IEndsWith):
    ExactCharField.register_lookup(type(_lookup.__name__, (_LowerBothSides, _lookup), {}))


class SubjectForeignKey(GenericForeignKey):
    """``run.subject``: the model instance a run is about (``start(..., subject=obj)``), or None.

    A ``GenericForeignKey`` (the admin's generic inlines rely on it) that
    reads the object where the routers send its model, with its base
    manager, and the content type where the routers send ``ContentType``:
    not on the run's database, which may be another one
    (``OPENWORKFLOW["DATABASE"]``). ``None`` when the object was deleted,
    its model no longer exists, or the stored id is not one of the model's
    primary keys: nothing cascades from a subject to its runs. The object
    is cached on the run, as ``GenericForeignKey`` does; assigning an
    instance (or None) sets both columns.
    """

    def contribute_to_class(  # type: ignore[override]  # GenericForeignKey's own signature
        self, cls: type[models.Model], name: str, **kwargs: Any
    ) -> None:
        super().contribute_to_class(cls, name, **kwargs)
        # This field is its own descriptor, as GenericForeignKey is on Django 5.2 (6.1
        # installs a GenericForeignKeyDescriptor, which would bypass __get__ and __set__).
        setattr(cls, name, self)

    @property
    def ct_attname(self) -> str:
        return str(self.model._meta.get_field(self.ct_field).attname)

    def get_content_type(
        self, obj: Any = None, id: Any = None, using: Any = None, model: Any = None
    ) -> Any:
        from django.contrib.contenttypes.models import ContentType

        if obj is not None:
            return subjects.content_type_of(type(obj))
        if id is not None:
            return ContentType.objects.get_for_id(id)
        return subjects.content_type_of(model)

    def __get__(self, instance: Any, cls: Any = None) -> Any:
        if instance is None:
            return self
        key = (getattr(instance, self.ct_attname), getattr(instance, self.fk_field))
        if self.is_cached(instance):
            cached = self.get_cached_value(instance)
            if cached is None or _subject_matches(cached, key):
                return cached
        obj = subjects.load_subject(*key)
        self.set_cached_value(instance, obj)
        return obj

    def __set__(self, instance: Any, value: Any) -> None:
        content_type_id = subject_id = None
        if value is not None:
            if not isinstance(value, models.Model):
                raise TypeError(
                    f"a run's subject must be a model instance, not {type(value).__name__} "
                    f"{value!r}"
                )
            if value.pk is None:  # as GenericForeignKey: the key is read when it is saved
                content_type_id = subjects.content_type_of(type(value)).pk
            else:  # a saved object's key is checked as start(subject=) checks it
                content_type_id, subject_id = subjects.subject_key(value, " of a run")
        setattr(instance, self.ct_attname, content_type_id)
        setattr(instance, self.fk_field, subject_id)
        self.set_cached_value(instance, value)

    def get_prefetch_querysets(self, instances: Any, querysets: Any = None) -> Any:
        """``prefetch_related("subject")``: one query per subject model, through its router."""
        if querysets:
            raise ValueError("prefetch_related('subject') takes no queryset")
        wanted: dict[type[models.Model], set[Any]] = {}
        for run in instances:
            model = subjects.model_of(run.subject_type_id)
            if model is None:
                continue
            try:
                wanted.setdefault(model, set()).add(subjects.pk_value(model, run.subject_id))
            except ValueError:
                continue
        found: list[models.Model] = []
        for model, pks in wanted.items():
            manager = model._base_manager.db_manager(router.db_for_read(model))
            found.extend(manager.filter(pk__in=pks))

        def run_key(run: Any) -> Any:
            model = subjects.model_of(run.subject_type_id)
            if model is None:
                return None
            try:
                return (subjects.pk_value(model, run.subject_id), model)
            except ValueError:
                return None

        return (
            found,
            lambda obj: (obj.pk, type(obj)),
            run_key,
            True,
            self.name,
            False,
        )


def _subject_matches(obj: Any, key: tuple[Any, Any]) -> bool:
    """Whether a cached subject is still the one the run's columns name."""
    content_type_id, subject_id = key
    return bool(
        obj.pk is not None
        and subjects.content_type_of(type(obj)).pk == content_type_id
        and str(obj.pk) == subject_id
    )


class WorkflowRun(models.Model):
    """One execution of a workflow: the queue entry and its durable state."""

    class Status(models.TextChoices):
        PENDING = "pending", _("pending")
        RUNNING = "running", _("running")
        COMPLETED = "completed", _("completed")
        FAILED = "failed", _("failed")
        CANCELED = "canceled", _("canceled")

    FINISHED_STATUSES = (Status.COMPLETED, Status.FAILED, Status.CANCELED)

    # Time-ordered (UUID version 7): new runs' index entries stay side by side (ids.py).
    id = models.UUIDField(primary_key=True, default=uuid7, editable=False)
    namespace = ExactCharField(_("namespace"), max_length=100, default="default")
    workflow_name = ExactCharField(_("workflow"), max_length=255)
    version = models.CharField(_("version"), max_length=100, null=True, blank=True)  # noqa: DJ001
    status = models.CharField(
        _("status"), max_length=16, choices=Status.choices, default=Status.PENDING
    )
    idempotency_key = ExactCharField(_("idempotency key"), max_length=255, null=True, blank=True)
    input = models.JSONField(_("input"), null=True, blank=True)
    output = models.JSONField(_("output"), null=True, blank=True)
    error = models.JSONField(_("error"), null=True, blank=True)
    attempts = models.PositiveIntegerField(
        _("workflow failures"),
        default=0,
        help_text=_("Workflow-level failures since creation or the last resume."),
    )
    worker_id = ExactCharField(_("worker"), max_length=255, null=True, blank=True)
    claim_token = models.UUIDField(_("claim token"), null=True, blank=True, editable=False)
    available_at = models.DateTimeField(
        _("available at"),
        null=True,
        blank=True,
        db_default=Now(),
        help_text=_("When a worker may take the run: due time, lease end or wake-up time."),
    )
    deadline_at = models.DateTimeField(_("deadline"), null=True, blank=True)
    started_at = models.DateTimeField(_("started at"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)
    created_at = models.DateTimeField(_("created at"), db_default=Now(), editable=False)
    updated_at = models.DateTimeField(_("updated at"), db_default=Now(), editable=False)
    parent_step_attempt = models.ForeignKey(
        "StepAttempt",
        verbose_name=_("parent step attempt"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="child_runs",
        db_index=False,  # covered by owf_run_parent_idx
    )
    resume_generation = models.PositiveIntegerField(_("resume generation"), default=0)
    queue = ExactCharField(_("queue"), max_length=100, default="default")
    priority = models.SmallIntegerField(
        _("priority"), default=0, help_text=_("From -100 to 100; higher runs first.")
    )
    concurrency_key = ExactCharField(
        _("concurrency key"),
        max_length=255,
        null=True,
        blank=True,
        help_text=_("Runs with one key share the queue's key_concurrency limit."),
    )
    schedule_name = ExactCharField(
        _("schedule"),
        max_length=255,
        null=True,
        blank=True,
        help_text=_("The WorkflowSchedule that started the run, by name."),
    )
    scheduled_at = models.DateTimeField(
        _("scheduled at"),
        null=True,
        blank=True,
        help_text=_("The schedule's tick this run is for (ctx.scheduled_at)."),
    )
    trace_context = models.JSONField(
        _("trace context"),
        null=True,
        blank=True,
        editable=False,
        help_text=_("The W3C trace context of the code that started the run (OpenTelemetry)."),
    )
    # The object the run is about (start(..., subject=order)). No database constraint
    # and nothing cascades: a deleted object (or content type) leaves its runs readable.
    subject_type = models.ForeignKey(
        "contenttypes.ContentType",
        verbose_name=_("subject type"),
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,  # covered by owf_run_subject_idx
        related_name="+",
        editable=False,
    )
    subject_id = ExactCharField(
        _("subject id"),
        max_length=255,
        null=True,
        blank=True,
        help_text=_("The primary key of the run's subject, as text."),
        editable=False,
    )
    subject = SubjectForeignKey("subject_type", "subject_id")

    objects = WorkflowRunManager()

    class Meta:
        verbose_name = _("workflow run")
        verbose_name_plural = _("workflow runs")
        ordering = ["-created_at"]
        indexes = [
            # The claim query: due runs of one namespace, highest priority first,
            # then oldest due first.
            models.Index(
                fields=["namespace", "-priority", "available_at"],
                condition=models.Q(status__in=["pending", "running"]),
                name="owf_run_claim_idx",
            ),
            # When the next parked run wakes (the worker's timer): oldest due first.
            models.Index(
                fields=["namespace", "available_at"],
                condition=models.Q(status__in=["pending", "running"]),
                name="owf_run_due_idx",
            ),
            # The claim in a queue with limits: its due runs in claim order.
            models.Index(
                fields=["namespace", "queue", "-priority", "available_at"],
                condition=models.Q(status__in=["pending", "running"]),
                name="owf_run_queue_claim_idx",
            ),
            # The limits: runs in progress (claimed at least once, not finished) per
            # queue and per concurrency key.
            models.Index(
                fields=["namespace", "queue", "concurrency_key"],
                condition=models.Q(status__in=["pending", "running"], started_at__isnull=False),
                name="owf_run_slot_idx",
            ),
            models.Index(
                fields=["deadline_at"],
                condition=models.Q(status__in=["pending", "running"], deadline_at__isnull=False),
                name="owf_run_deadline_idx",
            ),
            models.Index(
                fields=["namespace", "workflow_name", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="owf_run_idempotency_idx",
            ),
            models.Index(
                fields=["parent_step_attempt"],
                condition=models.Q(parent_step_attempt__isnull=False),
                name="owf_run_parent_idx",
            ),
            models.Index(fields=["status", "-created_at"], name="owf_run_status_idx"),
            # The run list and the admin: the newest runs first, whatever their status.
            models.Index(fields=["-created_at", "-id"], name="owf_run_created_idx"),
            models.Index(fields=["workflow_name", "-created_at"], name="owf_run_workflow_idx"),
            # for_subject(): an object's runs, newest first. (MySQL and MariaDB ignore the
            # condition and index every run.)
            models.Index(
                fields=["subject_type", "subject_id", "-created_at"],
                condition=models.Q(subject_id__isnull=False),
                name="owf_run_subject_idx",
            ),
        ]
        permissions = [
            (
                "correct_workflowrun",
                _("Can resume workflow runs with a corrected input or step outputs"),
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(
                    status__in=["pending", "running", "completed", "failed", "canceled"]
                ),
                name="owf_run_status_valid",
            ),
            models.CheckConstraint(
                condition=models.Q(priority__gte=-100, priority__lte=100),
                name="owf_run_priority_range",
            ),
            # One run per schedule tick: a double start is an IntegrityError. (MySQL and
            # MariaDB have no partial indexes: migration 0008 gives them the same columns
            # in a plain unique index, where NULLs never clash.)
            models.UniqueConstraint(
                fields=["namespace", "schedule_name", "scheduled_at"],
                condition=models.Q(schedule_name__isnull=False),
                name="owf_run_schedule_tick_uniq",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.workflow_name} {self.pk} ({self.status})"

    def get_absolute_url(self) -> str:
        return reverse("django_openworkflow:run-detail", args=[self.pk])

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED_STATUSES

    # --- the rules of resume, rerun and cancel: the managers, the admin and the pages ask here

    def resume_refusal(
        self, now: datetime | None = None, *, deadline_at: datetime | None = None
    ) -> Refusal | None:
        """Why ``WorkflowRun.objects.resume(run, deadline_at=...)`` would refuse it, or None.

        Only a failed run can be resumed, and only before its deadline: a run
        whose ``deadline_at`` has passed needs a new, future ``deadline_at``.
        ``now`` is the clock to judge deadlines by (the manager passes the
        database's, read under the row lock); ``QuerySet.resumable()`` is the
        same rule in SQL.
        """
        if self.status != self.Status.FAILED:
            return Refusal.STATUS
        return self._deadline_refusal(now, deadline_at)

    def can_resume(self, now: datetime | None = None) -> bool:
        """Whether ``WorkflowRun.objects.resume(run)`` would resume it (see ``resume_refusal``)."""
        return self.resume_refusal(now) is None

    def rerun_refusal(
        self, now: datetime | None = None, *, deadline_at: datetime | None = None
    ) -> Refusal | None:
        """Why ``WorkflowRun.objects.rerun(run, deadline_at=...)`` would refuse it, or None.

        Only a finished run (completed, failed or canceled) can be rerun, and
        its deadline is judged as ``resume_refusal`` judges it: a passed
        ``deadline_at`` needs a new, future one. ``QuerySet.rerunnable()`` is
        the same rule in SQL.
        """
        if self.status in ACTIVE:
            return Refusal.STATUS
        return self._deadline_refusal(now, deadline_at)

    def can_rerun(self, now: datetime | None = None) -> bool:
        """Whether ``WorkflowRun.objects.rerun(run)`` would rerun it (see ``rerun_refusal``)."""
        return self.rerun_refusal(now) is None

    def _deadline_refusal(
        self, now: datetime | None, deadline_at: datetime | None
    ) -> Refusal | None:
        now = timezone.now() if now is None else now
        if deadline_at is not None:
            return None if deadline_at > now else Refusal.NEW_DEADLINE
        if self.deadline_at is not None and self.deadline_at <= now:
            return Refusal.DEADLINE
        return None

    def correctable_steps(self) -> dict[str, StepAttempt]:
        """The steps ``WorkflowRun.objects.resume(run, step_outputs=...)`` may give an output
        (one query): those that failed in the run's current generation and have not
        completed since, each with its last failed attempt (its ``error``), in the order
        they first failed. Whether the run can be resumed at all is ``resume_refusal()``.
        """
        from .corrections import correctable_steps

        attempts = self.step_attempts.defer("output").order_by("id")
        return correctable_steps(self.resume_generation, attempts)

    def stored_path(self) -> list[str]:
        """The steps a replay of the run's generation meets, in call order (one query).

        The completed steps and those the last generation called, by their
        first place; what ``WorkflowRun.objects.rerun(run, from_step=...)``
        accepts as ``from_step``.
        """
        from .engine.history import stored_path

        attempts = self.step_attempts.only(
            "step_name", "position", "resume_generation", "status", "superseded_by"
        )
        return [name for _, name in stored_path(attempts, self.resume_generation)]

    def cancel_refusal(self) -> Refusal | None:
        """Why ``WorkflowRun.objects.cancel(run)`` would refuse it, or None.

        Only an active run (pending or running) can be canceled;
        ``QuerySet.active()`` is the same rule in SQL.
        """
        return None if self.status in ACTIVE else Refusal.STATUS

    def can_cancel(self) -> bool:
        """Whether ``WorkflowRun.objects.cancel(run)`` would cancel it."""
        return self.cancel_refusal() is None

    def result(self, timeout: float | None = None) -> object:
        """Wait for the run to finish and return its output.

        Raises ``WorkflowFailed`` or ``WorkflowCanceled`` for runs that ended so,
        and ``TimeoutError`` when ``timeout`` seconds pass first.
        """
        from .results import wait_for_result

        return wait_for_result(self, timeout)

    async def aresult(self, timeout: float | None = None) -> object:
        """``result()`` for async code: the same answers and errors, and no thread
        blocked while it waits (the pauses between reads are ``asyncio.sleep``)."""
        from .results import await_result

        return await await_result(self, timeout)

    def waiting_for(self) -> WaitingFor | None:
        """What this pending run waits for: a sleep, a retry, a child run or a signal.

        None when it is not pending, or pending with nothing to wait for (due,
        or not started yet). See ``django_openworkflow.waiting.WaitingFor``.
        """
        from .waiting import waiting_for

        return waiting_for(self)


class StepAttempt(models.Model):
    """One attempt at one step of a run; completed attempts are the run's memory."""

    class Kind(models.TextChoices):
        RUN = "run", _("run")
        SLEEP = "sleep", _("sleep")
        WORKFLOW = "workflow", _("child workflow")
        SIGNAL_SEND = "signal_send", _("send signal")
        SIGNAL_WAIT = "signal_wait", _("wait for signal")

    class Status(models.TextChoices):
        RUNNING = "running", _("running")
        COMPLETED = "completed", _("completed")
        FAILED = "failed", _("failed")

    id = models.BigAutoField(primary_key=True)
    workflow_run = models.ForeignKey(
        WorkflowRun,
        verbose_name=_("workflow run"),
        on_delete=models.CASCADE,
        related_name="step_attempts",
        db_index=False,  # covered by owf_step_run_idx
    )
    step_name = ExactCharField(_("step"), max_length=255)
    kind = models.CharField(_("kind"), max_length=16, choices=Kind.choices, default=Kind.RUN)
    atomic = models.BooleanField(
        _("atomic"),
        default=False,
        db_default=False,  # so raw INSERTs that leave it out stay valid
        help_text=_("A step.atomic step: its database writes commit with its result."),
    )
    status = models.CharField(
        _("status"), max_length=16, choices=Status.choices, default=Status.RUNNING
    )
    output = models.JSONField(_("output"), null=True, blank=True)
    error = models.JSONField(_("error"), null=True, blank=True)
    child_workflow_run = models.ForeignKey(
        WorkflowRun,
        verbose_name=_("child run"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        db_index=False,  # covered by owf_step_child_idx
    )
    resume_generation = models.PositiveIntegerField(_("resume generation"), default=0)
    position = models.PositiveIntegerField(
        _("position"),
        null=True,
        blank=True,
        help_text=_("The step's place among the step calls of the workflow function (from 0)."),
    )
    signal = ExactCharField(  # NULL: not a signal step
        _("signal"),
        max_length=255,
        null=True,
        blank=True,
        help_text=_("For signal steps: the signal sent or waited for."),
    )
    wake_at = models.DateTimeField(
        _("wake at"),
        null=True,
        blank=True,
        help_text=_("For sleeps and waits: when the step is over (or times out)."),
    )
    started_at = models.DateTimeField(_("started at"), db_default=Now())
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)
    created_at = models.DateTimeField(_("created at"), db_default=Now(), editable=False)
    worker_id = ExactCharField(  # NULL: stored by no worker (a resume's given output)
        _("worker"),
        max_length=255,
        null=True,
        blank=True,
        help_text=_("The worker whose claim stored this attempt."),
    )
    # Marks of people's changes, pointing at the event that made them. The events go
    # with their run, as the attempts do: no constraint, no index, nothing to cascade.
    given_in = models.ForeignKey(
        "WorkflowRunEvent",
        verbose_name=_("output given in"),
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        related_name="given_outputs",
        help_text=_("A completed step whose output a person gave (resume with changes)."),
    )
    superseded_by = models.ForeignKey(
        "WorkflowRunEvent",
        verbose_name=_("superseded by"),
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        related_name="superseded_attempts",
        help_text=_("The rerun after which this completed step runs again: replay ignores it."),
    )

    objects = StepAttemptQuerySet.as_manager()

    class Meta:
        verbose_name = _("step attempt")
        verbose_name_plural = _("step attempts")
        ordering = ["workflow_run", "id"]
        indexes = [
            models.Index(fields=["workflow_run", "id"], name="owf_step_run_idx"),
            # Signal delivery: the steps waiting for a signal. (No status in the
            # predicate, so completing a step can be a HOT update on PostgreSQL.)
            models.Index(
                fields=["signal"],
                condition=models.Q(kind="signal_wait"),
                name="owf_step_signal_idx",
            ),
            models.Index(
                fields=["child_workflow_run"],
                condition=models.Q(child_workflow_run__isnull=False),
                name="owf_step_child_idx",
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(status__in=["running", "completed", "failed"]),
                name="owf_step_status_valid",
            ),
            models.CheckConstraint(
                condition=models.Q(
                    kind__in=["run", "sleep", "workflow", "signal_send", "signal_wait"]
                ),
                name="owf_step_kind_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.step_name} ({self.status})"

    @property
    def kind_label(self) -> str:
        """The kind as shown on the pages and in the admin: "atomic" for step.atomic steps."""
        return str(_("atomic")) if self.atomic else self.get_kind_display()

    def is_interrupted(self, run: WorkflowRun) -> bool:
        """Left ``running`` on a finished run (failed, canceled): it never finished."""
        return self.status == self.Status.RUNNING and run.is_finished

    @property
    def duration(self):  # type: ignore[no-untyped-def]
        if self.finished_at and self.started_at:
            return self.finished_at - self.started_at
        return None


@receiver(pre_delete, sender=WorkflowRun, dispatch_uid="django_openworkflow.wake_parent")
def wake_parent_of_deleted_child(
    sender: type[WorkflowRun], instance: WorkflowRun, **kwargs: Any
) -> None:
    """A child run deleted from anywhere (ORM, shell, admin) wakes its waiting parent.

    ``pre_delete`` because it runs in the delete's own transaction while the
    parent's step still links the child (``SET_NULL`` clears the link next),
    so the parent is woken with the existing child-finished query, and it
    catches ``instance.delete()`` and ``QuerySet.delete()`` alike. On replay
    the parent finds no child and fails the step (``ChildWorkflowMissing``),
    unless the child had completed: then the step is completed here with the
    child's output, which the parent has not read yet and would otherwise lose.
    """
    using = kwargs.get("using")
    runs = WorkflowRun.objects.db_manager(using)
    # The lock order: parents, the run, its children (their link is cleared next),
    # before the delete changes any of them. (QuerySet.delete() locked them all already.)
    runs.lock_for_delete([instance.pk])
    if instance.parent_step_attempt_id is None:
        return
    runs.store.wake_parents([instance.pk])
    ended = runs.filter(pk=instance.pk).values("status", "output").first()  # under the lock
    if ended is not None and ended["status"] == WorkflowRun.Status.COMPLETED:
        StepAttempt.objects.using(using).filter(
            child_workflow_run_id=instance.pk, status=StepAttempt.Status.RUNNING
        ).update(
            status=StepAttempt.Status.COMPLETED, output=ended["output"], finished_at=clock.Now()
        )


def forget_deleted_user(collector: Any, field: Any, sub_objs: Any, using: str) -> None:
    """``on_delete`` of ``WorkflowRunEvent.by``: ``SET_NULL`` on the engine's database.

    The events live on ``OPENWORKFLOW["DATABASE"]``, the users perhaps elsewhere
    (so the column has no database constraint). Django looks for a deleted
    user's events on the user's database; this clears them on the events' own,
    when the deletion runs (the admin's confirmation page only collects).
    """
    from .conf import app_settings

    collector.add_field_update(field, None, sub_objs.using(app_settings.DATABASE))


forget_deleted_user.lazy_sub_objs = True  # type: ignore[attr-defined]  # never read on `using`


class WorkflowRunEvent(models.Model):
    """A resume, rerun or cancel of a run: who did it, when, the error it cleared,
    and what it changed (``details``)."""

    class Action(models.TextChoices):
        RESUME = "resume", _("resume")
        RERUN = "rerun", _("rerun")
        CANCEL = "cancel", _("cancel")

    id = models.BigAutoField(primary_key=True)
    run = models.ForeignKey(
        WorkflowRun, verbose_name=_("run"), on_delete=models.CASCADE, related_name="events"
    )
    action = models.CharField(_("action"), max_length=16, choices=Action.choices)
    by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("by"),
        null=True,
        blank=True,
        on_delete=forget_deleted_user,
        related_name="+",
        # An audit pointer: the users may live on another database than the engine's tables.
        db_constraint=False,
    )
    at = models.DateTimeField(_("at"), db_default=Now())
    cleared_error = models.JSONField(_("cleared error"), null=True, blank=True)
    details = models.JSONField(
        _("details"),
        null=True,
        blank=True,
        help_text=_("What a resume with changes or a rerun changed: the old and new values."),
    )

    class Meta:
        verbose_name = _("workflow run event")
        verbose_name_plural = _("workflow run events")
        ordering = ["run", "at", "id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(action__in=["resume", "rerun", "cancel"]),
                name="owf_event_action_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.action} of {self.run_id} at {self.at}"


class WorkflowSignal(models.Model):
    """A signal sent with an idempotency key: a repeat within 24 hours delivers nothing."""

    id = models.BigAutoField(primary_key=True)
    namespace = ExactCharField(_("namespace"), max_length=100, default="default")
    signal = ExactCharField(_("signal"), max_length=255)
    idempotency_key = ExactCharField(_("idempotency key"), max_length=255)
    data = models.JSONField(_("data"), null=True, blank=True)
    delivered_to = models.JSONField(_("delivered to"), default=list, blank=True)
    sent_at = models.DateTimeField(_("sent at"), db_default=Now())

    class Meta:
        verbose_name = _("sent signal")
        verbose_name_plural = _("sent signals")
        ordering = ["-sent_at"]
        indexes = [
            models.Index(
                fields=["namespace", "signal", "idempotency_key", "-sent_at"],
                name="owf_signal_idempotency_idx",
            ),
            # The purge: the signals a purged run may have received, by when they were sent.
            models.Index(fields=["namespace", "sent_at"], name="owf_signal_sent_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.signal} ({self.idempotency_key})"


class WorkflowKeyLock(models.Model):
    """A row that MySQL and MariaDB lock for an idempotency key (``MysqlStore.lock_key``).

    PostgreSQL takes a transaction-level advisory lock and SQLite's IMMEDIATE
    transactions hold the write lock; MySQL has neither. There a key hashes to
    one of ``KEY_LOCK_SLOTS`` slots, and ``INSERT ... ON DUPLICATE KEY UPDATE``
    locks the slot's row until the outermost transaction commits or rolls back.
    The table never holds more rows than slots; two keys that share a slot
    only wait for each other.
    """

    slot = models.PositiveIntegerField(_("slot"), primary_key=True)

    class Meta:
        verbose_name = _("idempotency key lock")
        verbose_name_plural = _("idempotency key locks")

    def __str__(self) -> str:
        return f"key lock {self.slot}"


class QueueStart(models.Model):
    """A first execution of a run in a rate-limited queue, kept for the rate window.

    The claim counts these rows to keep ``rate_limit`` ("at most N first
    executions in any window") and deletes them once they are older than the
    window. A run that is resumed and starts again adds a row again.
    """

    namespace = ExactCharField(_("namespace"), max_length=100)
    queue = ExactCharField(_("queue"), max_length=100)
    run_id = models.UUIDField(_("run id"))
    started_at = models.DateTimeField(_("started at"))

    class Meta:
        verbose_name = _("queue start")
        verbose_name_plural = _("queue starts")
        indexes = [
            models.Index(fields=["namespace", "queue", "started_at"], name="owf_queue_start_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.queue} {self.run_id} at {self.started_at}"


class WorkflowSchedule(models.Model):
    """A cron schedule that starts one run of a workflow at each tick.

    Declared in code with ``@workflow(schedule=...)`` (created or updated when a
    worker starts) or added in the admin. ``next_run_at`` is the tick a worker
    fires next; firing it inserts the run and moves ``next_run_at`` on in one
    transaction, under this row's lock (``WorkflowScheduleManager.fire_due``).
    """

    id = models.BigAutoField(primary_key=True)
    namespace = ExactCharField(_("namespace"), max_length=100, default="default")
    name = ExactCharField(_("name"), max_length=255)
    workflow_name = ExactCharField(_("workflow"), max_length=255)
    cron = models.CharField(
        _("cron"),
        max_length=100,
        validators=[validate_cron],
        help_text=_('Five fields: minute hour day-of-month month day-of-week ("0 3 * * *").'),
    )
    timezone = models.CharField(
        _("time zone"),
        max_length=64,
        default=default_timezone,
        validators=[validate_timezone],
        help_text=_('The zone the cron expression is read in ("Europe/Berlin").'),
    )
    input = models.JSONField(_("input"), null=True, blank=True)
    enabled = models.BooleanField(_("enabled"), default=True)
    declared_in_code = models.BooleanField(
        _("declared in code"),
        default=False,
        editable=False,
        help_text=_("Declared with @workflow(schedule=...): a worker's start updates it."),
    )
    next_run_at = models.DateTimeField(_("next run at"), null=True, blank=True)
    last_run_at = models.DateTimeField(
        _("last run at"), null=True, blank=True, help_text=_("The tick of the last run started.")
    )
    created_at = models.DateTimeField(_("created at"), db_default=Now(), editable=False)
    updated_at = models.DateTimeField(_("updated at"), db_default=Now(), editable=False)

    objects = WorkflowScheduleManager()

    class Meta:
        verbose_name = _("workflow schedule")
        verbose_name_plural = _("workflow schedules")
        ordering = ["namespace", "name"]
        indexes = [
            # The worker's look for due ticks.
            models.Index(
                fields=["namespace", "next_run_at"],
                condition=models.Q(enabled=True),
                name="owf_schedule_due_idx",
            ),
        ]
        constraints = [
            models.UniqueConstraint(fields=["namespace", "name"], name="owf_schedule_name_uniq"),
        ]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("django_openworkflow:schedules") + f"#schedule-{self.pk}"

    def reschedule(self, now: datetime) -> None:
        """Set ``next_run_at`` to the first tick after ``now`` (the database's clock, as
        workers fire by it: ``WorkflowSchedule.objects.clock``); no tick before runs."""
        self.next_run_at = next_tick(self.cron, self.timezone, now)


class WorkflowLease(models.Model):
    """A named lease that one worker of the cluster holds at a time (``leases.py``).

    The background purge of a namespace takes ``"purge:<namespace>"``: its
    holder purges, and when it is done it keeps the lease until the next purge
    is due, so workers purge at most once per ``retention.PURGE_INTERVAL``
    between them.
    """

    name = models.CharField(_("name"), max_length=255, primary_key=True)
    holder = models.CharField(_("holder"), max_length=255)
    expires_at = models.DateTimeField(_("expires at"))

    objects: models.Manager[WorkflowLease] = models.Manager()

    class Meta:
        verbose_name = _("lease")
        verbose_name_plural = _("leases")

    def __str__(self) -> str:
        return f"{self.name} held by {self.holder} until {self.expires_at}"


class WorkflowWorker(models.Model):
    """One ``runworker`` process: registered when it starts, seen at every heartbeat.

    ``last_seen_at`` is kept fresh while the process lives; ``stopped_at`` is
    set when it stops cleanly. A worker neither stopped nor seen for a while
    died (``workers.py`` says how long); its row is deleted after a day.
    ``WorkflowWorker.objects.live()``, ``.recently_dead()``, ``.with_state()``.
    """

    worker_id = ExactCharField(_("worker"), max_length=255, primary_key=True)
    namespace = ExactCharField(_("namespace"), max_length=100, default="default")
    host = models.CharField(_("host"), max_length=255)
    pid = models.PositiveIntegerField(_("process id"))
    queues = models.JSONField(
        _("queues"), null=True, blank=True, help_text=_("The queues it serves; empty: every queue.")
    )
    workflows = models.JSONField(
        _("workflows"), default=list, blank=True, help_text=_("The workflows it has registered.")
    )
    concurrency = models.PositiveIntegerField(_("slots"))
    busy_slots = models.PositiveIntegerField(_("busy slots"), default=0)
    started_at = models.DateTimeField(_("started at"), db_default=Now())
    last_seen_at = models.DateTimeField(_("last seen at"), db_default=Now())
    stopped_at = models.DateTimeField(_("stopped at"), null=True, blank=True)

    objects: WorkflowWorkerManager = WorkflowWorkerManager()

    class Meta:
        verbose_name = _("worker")
        verbose_name_plural = _("workers")
        ordering = ["namespace", "-last_seen_at"]
        indexes = [models.Index(fields=["namespace", "-last_seen_at"], name="owf_worker_seen_idx")]

    def __str__(self) -> str:
        return self.worker_id
