"""Admin for workflow schedules: add and edit them, pause, resume and "Run now".

A schedule declared in code (``@workflow(schedule=...)``) is updated from the
code when a worker starts, so its cron expression, time zone, input and
workflow are read-only here; pausing and resuming it work, and a pause stays
across deploys.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext

from .clock import Now
from .conf import app_settings
from .models import WorkflowSchedule
from .registry import workflow_names
from .serialization import ensure_json

CODE_FIELDS = ("name", "workflow_name", "cron", "timezone", "input")


class WorkflowScheduleForm(forms.ModelForm):  # type: ignore[type-arg]
    """The workflow is chosen among the workflows this project registers."""

    class Meta:
        model = WorkflowSchedule
        fields = ["name", "workflow_name", "cron", "timezone", "input", "enabled"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.instance.pk:
            self.instance.namespace = app_settings.NAMESPACE
        field = self.fields.get("workflow_name")
        if field is not None:
            current = self.instance.workflow_name if self.instance.pk else None
            names = sorted({*workflow_names(), *([current] if current else [])})
            self.fields["workflow_name"] = forms.ChoiceField(
                label=field.label,
                choices=[("", "---------"), *((name, name) for name in names)],
                help_text=_("A workflow registered with @workflow in this project."),
            )

    def clean_input(self) -> Any:
        value = self.cleaned_data.get("input")
        try:
            ensure_json(value, "the input")
        except (TypeError, ValueError) as exc:
            raise forms.ValidationError(str(exc), code="invalid") from None
        return value

    def _get_validation_exclusions(self) -> set[str]:
        # The namespace is not on the form, but the unique (namespace, name) is checked.
        exclusions: set[str] = super()._get_validation_exclusions()  # type: ignore[misc]
        exclusions.discard("namespace")
        return exclusions


@admin.register(WorkflowSchedule)
class WorkflowScheduleAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    form = WorkflowScheduleForm
    list_display = [
        "name",
        "workflow_name",
        "cron",
        "timezone",
        "enabled",
        "next_run_at",
        "last_run_at",
        "declared_in_code",
    ]
    list_filter = ["enabled", "declared_in_code", "workflow_name"]
    search_fields = ["name", "workflow_name"]
    actions = ["pause_schedules", "resume_schedules", "run_schedules_now"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[WorkflowSchedule]:
        return super().get_queryset(request).filter(namespace=app_settings.NAMESPACE)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        fixed = ("namespace", "declared_in_code", "next_run_at", "last_run_at")
        if obj is not None and obj.declared_in_code:
            return (*fixed, *CODE_FIELDS)
        return fixed

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        """Save what the form changed; plan the next tick when the schedule is new or its
        cron expression, zone or state changed (by the database's clock, as workers fire).

        Only the form's fields are written: ``next_run_at`` and ``last_run_at`` are the
        workers', and one may have fired a tick since this request read the row.
        """
        if not change:
            super().save_model(request, obj, form, change)
            obj.reschedule(WorkflowSchedule.objects.clock(obj.pk))
            obj.save(update_fields=["next_run_at"])
            return
        fields = [name for name in form.changed_data if name in form.fields]
        if {"cron", "timezone", "enabled"} & set(fields):
            obj.reschedule(WorkflowSchedule.objects.clock(obj.pk))
            fields.append("next_run_at")
        if fields:
            obj.updated_at = Now()
            obj.save(update_fields=[*fields, "updated_at"])

    # --- actions ------------------------------------------------------------------------

    @admin.action(permissions=["change"], description=gettext_lazy("Pause selected schedules"))
    def pause_schedules(self, request: HttpRequest, queryset: QuerySet[WorkflowSchedule]) -> None:
        self._each(
            request,
            queryset.filter(enabled=True),
            WorkflowSchedule.objects.pause,
            log_message="Paused",
            done=lambda n: ngettext("%(count)d schedule paused.", "%(count)d schedules paused.", n),
            skipped=Counter({_("it is paused already"): queryset.filter(enabled=False).count()}),
        )

    @admin.action(permissions=["change"], description=gettext_lazy("Resume selected schedules"))
    def resume_schedules(self, request: HttpRequest, queryset: QuerySet[WorkflowSchedule]) -> None:
        self._each(
            request,
            queryset.filter(enabled=False),
            WorkflowSchedule.objects.resume,
            log_message="Resumed",
            done=lambda n: ngettext(
                "%(count)d schedule resumed.", "%(count)d schedules resumed.", n
            ),
            skipped=Counter({_("it is active already"): queryset.filter(enabled=True).count()}),
        )

    @admin.action(permissions=["change"], description=gettext_lazy("Run selected schedules now"))
    def run_schedules_now(self, request: HttpRequest, queryset: QuerySet[WorkflowSchedule]) -> None:
        self._each(
            request,
            queryset,
            WorkflowSchedule.objects.run_now,
            log_message="Started a run now",
            done=lambda n: ngettext(
                "%(count)d schedule started a run.", "%(count)d schedules started a run.", n
            ),
        )

    def _each(
        self,
        request: HttpRequest,
        queryset: QuerySet[WorkflowSchedule],
        action: Callable[[WorkflowSchedule], Any],
        *,
        log_message: str,
        done: Callable[[int], str],
        skipped: Counter[str] | None = None,
    ) -> None:
        """Apply ``action`` to each schedule; count the done and the skipped, by reason."""
        skipped = Counter({k: v for k, v in (skipped or Counter()).items() if v})
        changed = 0
        for schedule in queryset:
            try:
                action(schedule)
            except LookupError:  # run now: the workflow is not registered here
                skipped[_("its workflow is not registered in this project")] += 1
            except ValueError as exc:  # run now: its workflow's queue is not configured
                skipped[str(exc)] += 1
            except WorkflowSchedule.DoesNotExist:
                skipped[_("it no longer exists")] += 1
            else:
                changed += 1
                self.log_change(request, schedule, log_message)
        self.message_user(
            request,
            done(changed) % {"count": changed},
            messages.SUCCESS if changed else messages.WARNING,
        )
        for reason, count in sorted(skipped.items()):
            self.message_user(
                request,
                ngettext(
                    "%(count)d schedule skipped: %(reason)s.",
                    "%(count)d schedules skipped: %(reason)s.",
                    count,
                )
                % {"count": count, "reason": reason},
                messages.WARNING,
            )
