"""Admin for workflow runs: read-only records, with Resume, Cancel and Rerun actions.

``WorkflowRunInline`` and ``WorkflowRunsMixin`` (``subject_admin.py``) are
for the admin of the models runs are about (``start(..., subject=obj)``).

Runs are owned by the engine: nobody adds or edits them here. State changes
go through ``WorkflowRun.objects.resume()`` / ``.cancel()`` / ``.rerun()``,
from the changelist actions or from the buttons on a run's change page (which
post to the run pages' endpoints).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, cast

from django.contrib import admin, messages
from django.contrib.admin.actions import delete_selected as django_delete_selected
from django.contrib.admin.views.main import ERROR_FLAG
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from .admin_actions import (
    RunTransitions,
    ShownOnly,
    canceled_message,
    rerun_message,
    resumed_message,
)
from .conf import app_settings
from .display import attempt_note, attempt_status, error_summary, event_details
from .managers import WorkflowRunQuerySet
from .models import StepAttempt, WorkflowRun, WorkflowRunEvent, WorkflowSchedule
from .queues import configured_queues
from .registry import workflow_names
from .store import LockWaitExpired, get_store
from .subject_admin import WorkflowRunInline, WorkflowRunsMixin
from .subjects import subject_shown
from .views import can_correct_runs, can_view_runs, run_page_url

__all__ = ["WorkflowRunAdmin", "WorkflowRunInline", "WorkflowRunsMixin"]


class StepAttemptColumns:
    """Kind and status of an attempt as the run page shows them ("atomic", "interrupted")."""

    @admin.display(description=gettext_lazy("kind"), ordering="kind")
    def kind_shown(self, attempt: StepAttempt) -> str:
        return attempt.kind_label

    @admin.display(description=gettext_lazy("status"), ordering="status")
    def status_shown(self, attempt: StepAttempt) -> str:
        # (only a running attempt reads its run: no query per row for the others)
        return attempt_status(attempt)[1]


class ReadOnlyInline(ShownOnly, admin.TabularInline):
    """An inline of records that belong to the run: shown, never added, changed or deleted.

    Visible to whoever may view the run, without separate permissions on the
    inline's model (step attempts and events are part of the run).
    """

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return can_view_runs(request.user)


class StepAttemptInline(StepAttemptColumns, ReadOnlyInline):
    model = StepAttempt
    fk_name = "workflow_run"
    fields = readonly_fields = (
        "step_name",
        "kind_shown",
        "status_shown",
        "resume_generation",
        "started_at",
        "finished_at",
        "error_summary",
        "child_run",
        "note",
    )
    ordering = ["id"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[StepAttempt]:
        # The events that gave or superseded an attempt's output, with a join; their users
        # with a prefetch (the users may live on another database than the events).
        return (
            super()
            .get_queryset(request)
            .select_related("given_in", "superseded_by")
            .prefetch_related("given_in__by")
        )

    @admin.display(description=gettext_lazy("note"))
    def note(self, attempt: StepAttempt) -> str:
        """Who gave its output (resume with changes), or the rerun that superseded it."""
        return attempt_note(attempt)

    @admin.display(description=gettext_lazy("error"))
    def error_summary(self, attempt: StepAttempt) -> str:
        return error_summary(attempt.error)

    @admin.display(description=gettext_lazy("child run"))
    def child_run(self, attempt: StepAttempt) -> str:
        if attempt.child_workflow_run_id is None:
            return ""
        url = reverse(
            "admin:django_openworkflow_workflowrun_change", args=[attempt.child_workflow_run_id]
        )
        return format_html('<a href="{}">{}</a>', url, attempt.child_workflow_run_id)


class WorkflowRunEventInline(ReadOnlyInline):
    model = WorkflowRunEvent
    fields = readonly_fields = ("action", "by", "at", "cleared_error_summary", "details_shown")
    verbose_name_plural = gettext_lazy("history")

    def get_queryset(self, request: HttpRequest) -> QuerySet[WorkflowRunEvent]:
        # prefetch, not a join: the users may live on another database than the events
        return super().get_queryset(request).prefetch_related("by")

    @admin.display(description=gettext_lazy("cleared error"))
    def cleared_error_summary(self, event: WorkflowRunEvent) -> str:
        return error_summary(event.cleared_error)

    @admin.display(description=gettext_lazy("details"))
    def details_shown(self, event: WorkflowRunEvent) -> str:
        """A rerun's step and canceled children, or the values a correction replaced."""
        shown = event_details(event)
        if shown is None:
            return "—"
        if shown.rerun:
            children = format_html_join(
                ", ",
                '<a href="{}">{}</a>',
                (
                    (reverse("admin:django_openworkflow_workflowrun_change", args=[pk]), pk)
                    for pk in shown.canceled_children
                ),
            )
            return format_html(
                "{}{}{}",
                shown.rerun_from,
                format_html("; {} {}", _("steps run again:"), ", ".join(shown.rerun_steps))
                if shown.rerun_steps
                else "",
                format_html("; {} {}", _("child runs canceled:"), children)
                if shown.canceled_children
                else "",
            )
        return format_html_join(
            mark_safe("<br>"),  # a literal tag; the values are escaped by format_html_join
            "{}: {} → {}",
            ((change.what, change.old, change.new) for change in shown.changes),
        )


LATEST_FAILURES = 1000


class NamesFilter(admin.SimpleListFilter):
    """A filter by a name column whose choices cost no scan of every run ever stored.

    Django's field filter lists the column's DISTINCT values, a read of the whole
    table once it holds a long history; these are ``names_to_offer()``, as on the
    run list.
    """

    field = ""

    def known(self) -> list[str]:
        return []

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        runs = WorkflowRun.objects.db_manager(model_admin.get_queryset(request).db)
        names = runs.names_to_offer(self.field, self.known(), self.value())
        return [(name, name) for name in names]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        return queryset.filter(**{self.field: self.value()}) if self.value() else queryset


class WorkflowNameFilter(NamesFilter):
    title = gettext_lazy("workflow")
    parameter_name = field = "workflow_name"

    def known(self) -> list[str]:
        return workflow_names()


class QueueFilter(NamesFilter):
    title = gettext_lazy("queue")
    parameter_name = field = "queue"

    def known(self) -> list[str]:
        return sorted(configured_queues())


class ScheduleFilter(NamesFilter):
    title = gettext_lazy("schedule")
    parameter_name = field = "schedule_name"

    def known(self) -> list[str]:
        schedules = WorkflowSchedule.objects.in_namespace(app_settings.NAMESPACE)
        return list(schedules.values_list("name", flat=True))


class FailedStepFilter(admin.SimpleListFilter):
    """Failed runs by the step they failed on (their latest step attempt)."""

    title = gettext_lazy("failed step")
    parameter_name = "failed_step"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        # The steps of the latest failures (not of every failed run ever stored: each one's
        # latest attempt is a subquery).
        runs = cast(WorkflowRunQuerySet, model_admin.get_queryset(request)).failed()
        # (ids, not a subquery: MariaDB refuses LIMIT in an IN subquery)
        latest = list(runs.order_by("-created_at").values_list("pk", flat=True)[:LATEST_FAILURES])
        # current_step is annotated by get_queryset(); django-stubs cannot see annotations.
        names = (
            runs.filter(pk__in=latest)
            .exclude(current_step=None)  # type: ignore[misc]
            .order_by("current_step")
            .values_list("current_step", flat=True)
            .distinct()[:100]
        )
        return [(name, name) for name in names]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value():
            return queryset.filter(status=WorkflowRun.Status.FAILED, current_step=self.value())
        return queryset


RUN_FIELDS = (
    "id",
    "workflow_name",
    "version",
    "namespace",
    "status",
    "idempotency_key",
    "parent_run",
)
RUN_DATA_FIELDS = ("input", "output", "error", "traceback")
RUN_SCHEDULING_FIELDS = (
    "schedule_name",
    "scheduled_at",
    "queue",
    "priority",
    "concurrency_key",
    "attempts",
    "resume_generation",
    "worker_id",
    "available_at",
    "deadline_at",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
)


class NulSafeChangelist(admin.ModelAdmin):
    """Filters and searches with U+0000 go to the admin's "bad lookup" page, not a 500.

    PostgreSQL refuses NUL in text parameters (psycopg raises ``DataError``
    while the list renders); other bad lookups already take this path.
    """

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if any("\x00" in key + "".join(values) for key, values in request.GET.lists()):
            return HttpResponseRedirect(f"{request.path}?{ERROR_FLAG}=1")
        return super().changelist_view(request, extra_context)


@admin.register(WorkflowRun)
class WorkflowRunAdmin(RunTransitions, NulSafeChangelist):
    list_display = [
        "id",
        "workflow_name",
        "status",
        "step",
        "queue",
        "priority",
        "concurrency_key",
        "created_at",
        "started_at",
        "finished_at",
    ]
    list_filter = ["status", WorkflowNameFilter, QueueFilter, ScheduleFilter, FailedStepFilter]
    show_full_result_count = False  # a filtered list does not count every run too
    search_fields = ["idempotency_key"]  # shows the search box; the rule is matching()
    search_help_text = gettext_lazy(
        "A run id or its first characters, or part of the idempotency key or workflow name."
    )
    list_per_page = 50
    actions = ["resume_runs", "cancel_runs", "rerun_runs", "delete_selected"]
    inlines = [StepAttemptInline, WorkflowRunEventInline]
    change_form_template = "django_openworkflow/admin/workflowrun_change_form.html"
    view_on_site = False  # the change page links to the run page itself
    fieldsets = [
        (None, {"fields": RUN_FIELDS}),
        (gettext_lazy("Data"), {"fields": RUN_DATA_FIELDS}),
        (gettext_lazy("Scheduling"), {"fields": RUN_SCHEDULING_FIELDS}),
    ]
    readonly_fields = (*RUN_FIELDS, *RUN_DATA_FIELDS, *RUN_SCHEDULING_FIELDS)

    def get_queryset(self, request: HttpRequest) -> QuerySet[WorkflowRun]:
        return cast(WorkflowRunQuerySet, super().get_queryset(request)).with_current_step()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # runs are started by code (Workflow.start), never typed in

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[WorkflowRun], search_term: str
    ) -> tuple[QuerySet[WorkflowRun], bool]:
        """The run list's search (``WorkflowRunQuerySet.matching``), not the admin's own."""
        return cast(WorkflowRunQuerySet, queryset).matching(search_term), False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """An active run cannot be deleted here (its worker or its waiting parent needs it)."""
        if obj is not None and not obj.is_finished:
            return False
        return super().has_delete_permission(request, obj)

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> Any:
        """A run's step attempts and events go with it: no permission of their own is asked.

        (They cannot be deleted on their own, so asking would refuse every run
        that has any.)
        """
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        parts = {str(StepAttempt._meta.verbose_name), str(WorkflowRunEvent._meta.verbose_name)}
        return deleted, counts, {name for name in perms_needed if str(name) not in parts}, protected

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        # Every field is read-only: saving would only write back a stale copy of
        # the row over the engine's work. Changes go through resume / cancel.
        if request.method == "POST":
            return HttpResponseNotAllowed(["GET"])
        extra_context = {
            **(extra_context or {}),
            "show_save": False,
            "show_save_and_continue": False,
            "show_save_and_add_another": False,
        }
        return super().changeform_view(request, object_id, form_url, extra_context)

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: WorkflowRun | None = None,
    ) -> HttpResponse:
        context["can_resume"] = context["can_cancel"] = context["can_correct"] = False
        context["subject"] = subject_shown(obj, request.user) if obj is not None else None
        # The buttons post to the run pages' endpoints: without the pages, the
        # changelist actions are the way to resume or cancel.
        context["run_page_url"] = run_page_url(obj.pk) if obj is not None else None
        if obj is not None and context["run_page_url"] and self.has_change_permission(request, obj):
            context["can_resume"] = obj.can_resume()
            context["can_cancel"] = obj.can_cancel()
            context["can_correct"] = context["can_resume"] and can_correct_runs(request.user)
        return super().render_change_form(request, context, add, change, form_url, obj)

    # --- columns and fields --------------------------------------------------

    @admin.display(description=gettext_lazy("step"), ordering="current_step")
    def step(self, run: WorkflowRun) -> str | None:
        """The latest step attempt's name: the step the run is on, or the one that failed."""
        return getattr(run, "current_step", None)

    @admin.display(description=gettext_lazy("parent run"))
    def parent_run(self, run: WorkflowRun) -> str:
        parent = run.parent_step_attempt
        if parent is None:
            return "—"
        url = reverse("admin:django_openworkflow_workflowrun_change", args=[parent.workflow_run_id])
        return format_html(
            '<a href="{}">{}</a> ({})', url, parent.workflow_run_id, parent.step_name
        )

    @admin.display(description=gettext_lazy("traceback"))
    def traceback(self, run: WorkflowRun) -> str:
        if not isinstance(run.error, dict) or not run.error.get("traceback"):
            return "—"
        return format_html('<pre class="owf-admin-traceback">{}</pre>', run.error["traceback"])

    # --- actions -------------------------------------------------------------

    @admin.action(permissions=["change"], description=gettext_lazy("Resume selected failed runs"))
    def resume_runs(self, request: HttpRequest, queryset: QuerySet[WorkflowRun]) -> None:
        self._transition_each(
            request,
            queryset,
            WorkflowRun.objects.resume,
            log_message="Resumed",
            done=resumed_message,
        )

    @admin.action(permissions=["change"], description=gettext_lazy("Cancel selected runs"))
    def cancel_runs(self, request: HttpRequest, queryset: QuerySet[WorkflowRun]) -> None:
        self._transition_each(
            request,
            queryset,
            WorkflowRun.objects.cancel,
            log_message="Canceled",
            done=canceled_message,
        )

    @admin.action(
        permissions=["change"], description=gettext_lazy("Rerun selected runs from the start")
    )
    def rerun_runs(self, request: HttpRequest, queryset: QuerySet[WorkflowRun]) -> None:
        self._transition_each(
            request,
            queryset,
            WorkflowRun.objects.rerun,
            log_message=None,  # the manager writes the admin history of a rerun
            done=rerun_message,
        )

    @admin.action(
        permissions=["delete"], description=gettext_lazy("Delete selected %(verbose_name_plural)s")
    )
    def delete_selected(
        self, request: HttpRequest, queryset: QuerySet[WorkflowRun]
    ) -> HttpResponse | None:
        """Django's delete action for finished runs; active runs are skipped and counted.

        The deletion (the confirmed POST) waits ``PAGE_LOCK_TIMEOUT`` at most for
        the rows it locks (the runs' parents and children may be busy in a step):
        then nothing is deleted and the message says so.
        """
        active = cast(WorkflowRunQuerySet, queryset).active()
        self._report_skipped(
            request,
            Counter(
                _("it is %(status)s (cancel it first)")
                % {"status": WorkflowRun.Status(status).label}
                for status in active.values_list("status", flat=True)
            ),
        )
        finished = cast(WorkflowRunQuerySet, queryset).finished()
        if not finished.exists():
            return None
        if not request.POST.get("post"):  # the confirmation page
            return django_delete_selected(self, request, finished)  # type: ignore[no-any-return]
        try:
            with get_store(finished.db).atomic_with_lock_timeout(app_settings.PAGE_LOCK_TIMEOUT):
                return django_delete_selected(self, request, finished)  # type: ignore[no-any-return]
        except LockWaitExpired:
            self.message_user(
                request,
                _("No run deleted: a run they lock is busy in a step; try again in a moment."),
                messages.WARNING,
            )
            return None


@admin.register(StepAttempt)
class StepAttemptAdmin(StepAttemptColumns, NulSafeChangelist):
    """Step attempts, read-only (no change permission); usually seen inline on their run's page."""

    list_display = [
        "id",
        "run_link",
        "step_name",
        "kind_shown",
        "status_shown",
        "resume_generation",
        "started_at",
        "finished_at",
    ]
    list_filter = ["status", "kind", "atomic"]
    search_fields = ["=workflow_run__id", "step_name"]
    list_select_related = ["workflow_run"]
    list_per_page = 50

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description=gettext_lazy("workflow run"), ordering="workflow_run")
    def run_link(self, attempt: StepAttempt) -> str:
        url = reverse(
            "admin:django_openworkflow_workflowrun_change", args=[attempt.workflow_run_id]
        )
        return format_html('<a href="{}">{}</a>', url, attempt.workflow_run)


# Register the other models' admins (each in its own module).
from . import schedule_admin, worker_admin  # noqa: E402, F401
