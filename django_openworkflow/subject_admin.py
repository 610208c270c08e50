"""The runs of a model's objects on that model's own admin pages.

``WorkflowRunInline`` lists an object's runs on its change page;
``WorkflowRunsMixin`` adds "Resume failed workflow runs" and "Cancel active
workflow runs" to its changelist. Both are exported by
``django_openworkflow.admin``::

    from django_openworkflow.admin import WorkflowRunInline, WorkflowRunsMixin

    @admin.register(Order)
    class OrderAdmin(WorkflowRunsMixin, admin.ModelAdmin):
        inlines = [WorkflowRunInline]

The runs are those started with ``start(..., subject=order)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin
from django.contrib.admin.options import IS_POPUP_VAR
from django.contrib.contenttypes.admin import GenericTabularInline
from django.contrib.contenttypes.forms import BaseGenericInlineFormSet
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html
from django.utils.translation import gettext_lazy

from .admin_actions import RunTransitions, ShownOnly, canceled_message, resumed_message
from .managers import WorkflowRunQuerySet
from .models import WorkflowRun
from .subjects import filter_value
from .views import can_change_runs, can_view_runs, run_page_url

RUNS_SHOWN = 20


def run_link_url(run: WorkflowRun) -> str:
    """The run's page, or its admin change page when the project has no run pages."""
    return run_page_url(run.pk) or reverse(
        "admin:django_openworkflow_workflowrun_change", args=[run.pk]
    )


def all_runs_url(obj: Any) -> str:
    """The list of every run of ``obj``: the run list filtered by subject, or the admin's."""
    try:
        url = reverse("django_openworkflow:run-list")
    except NoReverseMatch:  # no run pages: the runs' changelist, filtered by the two columns
        subject_type_id, _, subject_id = filter_value(obj).partition(":")
        query = {"subject_type": subject_type_id, "subject_id": subject_id}
        return f"{reverse('admin:django_openworkflow_workflowrun_changelist')}?{urlencode(query)}"
    return f"{url}?{urlencode({'subject': filter_value(obj)})}"


class SubjectRunsFormSet(BaseGenericInlineFormSet):
    """The inline's formset: read-only, the latest ``runs_shown`` runs.

    Never bound: saving the object's change form neither reads nor checks
    anything of it (the runs may change while the form is open), and saves
    nothing.
    """

    runs_shown = RUNS_SHOWN

    def __init__(self, data: Any = None, files: Any = None, **kwargs: Any) -> None:
        super().__init__(data=None, files=None, **kwargs)

    def get_queryset(self) -> Any:
        if not hasattr(self, "_shown"):
            self._shown = list(super().get_queryset()[: self.runs_shown])
        return self._shown

    @property
    def run_count(self) -> int:
        """All the object's runs, shown or not."""
        assert self.queryset is not None  # set by BaseGenericInlineFormSet
        return self.queryset.count()

    @property
    def more(self) -> dict[str, Any] | None:
        """``{"count", "url"}`` when the object has more runs than are shown, else None."""
        if len(self.get_queryset()) < self.runs_shown:
            return None
        count = self.run_count
        if count <= self.runs_shown:
            return None
        return {"count": count, "url": all_runs_url(self.instance)}

    def is_valid(self) -> bool:
        return True

    def has_changed(self) -> bool:
        return False

    def save(self, commit: bool = True) -> list[Any]:
        self.new_objects: list[Any] = []
        self.changed_objects: list[Any] = []
        self.deleted_objects: list[Any] = []
        return []


class WorkflowRunInline(ShownOnly, GenericTabularInline):
    """An object's workflow runs on its admin change page, newest first (read-only).

    Status, workflow, current step, created and finished, and a link to each
    run's page; the latest ``runs_shown`` (20), with a link to all of them
    when there are more. Shown to staff with ``view_workflowrun`` or
    ``change_workflowrun``; nobody adds, changes or deletes runs here.
    """

    model = WorkflowRun
    ct_field = "subject_type"
    ct_fk_field = "subject_id"
    formset = SubjectRunsFormSet  # type: ignore[assignment]  # a generic inline's formset
    template = "django_openworkflow/admin/subject_runs_inline.html"
    fields = readonly_fields = (
        "status",
        "workflow_name",
        "step",
        "created_at",
        "finished_at",
        "run_link",
    )
    ordering = ["-created_at", "-id"]
    show_change_link = False
    view_on_site = False
    runs_shown = RUNS_SHOWN
    verbose_name = gettext_lazy("workflow run")
    verbose_name_plural = gettext_lazy("workflow runs")

    def get_queryset(self, request: HttpRequest) -> QuerySet[WorkflowRun]:
        # (Not the inline's own: it asks has_view_permission() without the object.)
        if not can_view_runs(request.user):
            return WorkflowRun.objects.none()
        runs: WorkflowRunQuerySet = WorkflowRun.objects.all()
        return runs.with_current_step().order_by(*self.get_ordering(request))

    def get_formset(self, request: HttpRequest, obj: Any = None, **kwargs: Any) -> Any:
        formset = super().get_formset(request, obj, **kwargs)
        formset.runs_shown = self.runs_shown  # type: ignore[attr-defined]  # a new class each time
        return formset

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Not on the add page: a new object has no runs.
        return obj is not None and can_view_runs(request.user)

    @admin.display(description=gettext_lazy("step"))
    def step(self, run: WorkflowRun) -> str:
        """The latest step attempt's name: the step the run is on, or the one that failed."""
        return getattr(run, "current_step", None) or "—"

    @admin.display(description=gettext_lazy("run"))
    def run_link(self, run: WorkflowRun) -> str:
        return format_html('<a href="{}" class="owf-run-link">{}</a>', run_link_url(run), run.pk)


class WorkflowRunsMixin(RunTransitions):
    """For the ``ModelAdmin`` of the models runs are about: actions on the selected objects' runs.

    "Resume failed workflow runs" and "Cancel active workflow runs" apply
    ``WorkflowRun.objects.resume()`` / ``.cancel()`` to every run of the
    selected objects (``WorkflowRun.objects.for_subjects()``) and report as
    the run admin's actions do ("2 runs resumed.", "1 run skipped: it is
    completed."). They need ``django_openworkflow.change_workflowrun``, not
    a permission on the selected objects' model. The ``ModelAdmin``'s own
    ``actions`` stay; these are added to them.
    """

    workflow_run_actions = ("resume_workflow_runs", "cancel_workflow_runs")
    # The runs are read for this many selected objects at a time: one statement binds
    # every key it looks for, and SQLite binds at most 32,766 values in one.
    workflow_runs_chunk = 500

    def runs_of_selected(self, queryset: QuerySet[Any]) -> Iterator[WorkflowRun]:
        """The runs of the selected objects (``for_subjects()``), a chunk of objects at a time."""
        keys = list(queryset.values_list("pk", flat=True))
        for start in range(0, len(keys), self.workflow_runs_chunk):
            chunk = [queryset.model(pk=pk) for pk in keys[start : start + self.workflow_runs_chunk]]
            yield from WorkflowRun.objects.for_subjects(chunk)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        if self.actions is None or IS_POPUP_VAR in request.GET:
            return actions  # the admin offers no actions here
        if self.has_workflowrun_permission(request):
            for name in self.workflow_run_actions:
                action = self.get_action(name)
                if action is not None:
                    actions.setdefault(name, action)
        return actions

    def has_workflowrun_permission(self, request: HttpRequest) -> bool:
        """Whether ``request.user`` may resume and cancel runs (``change_workflowrun``)."""
        return can_change_runs(request.user)

    @admin.action(
        permissions=["workflowrun"], description=gettext_lazy("Resume failed workflow runs")
    )
    def resume_workflow_runs(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._transition_each(
            request,
            self.runs_of_selected(queryset),
            WorkflowRun.objects.resume,
            log_message="Resumed",
            done=resumed_message,
        )

    @admin.action(
        permissions=["workflowrun"], description=gettext_lazy("Cancel active workflow runs")
    )
    def cancel_workflow_runs(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        self._transition_each(
            request,
            self.runs_of_selected(queryset),
            WorkflowRun.objects.cancel,
            log_message="Canceled",
            done=canceled_message,
        )
