"""Admin for the worker registry: read-only rows the workers keep themselves.

Nobody adds, edits or deletes a worker here: each ``runworker`` registers and
refreshes its own row, and rows of workers gone for a day are deleted by the
workers' sweep (``workers.py``). Users who may see the runs may see the workers.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.template.loader import render_to_string
from django.utils.translation import gettext_lazy

from .models import WorkflowWorker
from .views import can_view_runs


@admin.register(WorkflowWorker)
class WorkflowWorkerAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = [
        "worker_id",
        "state_shown",
        "namespace",
        "host",
        "pid",
        "queues_shown",
        "slots",
        "started_at",
        "last_seen_at",
    ]
    list_filter = ["namespace"]
    search_fields = ["worker_id", "host"]
    list_per_page = 50

    def get_queryset(self, request: HttpRequest) -> QuerySet[WorkflowWorker]:
        return super().get_queryset(request).with_state()  # type: ignore[attr-defined,no-any-return]

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_view_permission(request, obj) or can_view_runs(request.user)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return super().has_module_permission(request) or can_view_runs(request.user)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # workers register themselves

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the workers' sweep deletes the rows of long-gone workers

    @admin.display(description=gettext_lazy("state"), ordering="state")
    def state_shown(self, worker: WorkflowWorker) -> str:
        return render_to_string("django_openworkflow/worker_state.html", {"worker": worker})

    @admin.display(description=gettext_lazy("queues"))
    def queues_shown(self, worker: WorkflowWorker) -> str:
        if worker.queues is None:
            return str(gettext_lazy("every queue"))
        return ", ".join(worker.queues)

    @admin.display(description=gettext_lazy("slots busy"))
    def slots(self, worker: WorkflowWorker) -> str:
        return f"{worker.busy_slots} / {worker.concurrency}"
