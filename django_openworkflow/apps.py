from __future__ import annotations

from django.apps import AppConfig
from django.utils.module_loading import autodiscover_modules
from django.utils.translation import gettext_lazy as _


class OpenWorkflowConfig(AppConfig):
    name = "django_openworkflow"
    verbose_name = _("Workflows")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
        from .tracing import install

        install()  # when opentelemetry-api is installed (it is imported on first use)

        autodiscover_modules("workflows")
        if uses_task_backend():
            from . import tasks  # noqa: F401  (registers the built-in workflow "django-task")


def uses_task_backend() -> bool:
    """Whether ``settings.TASKS`` names ``WorkflowTaskBackend`` (then its workflow is needed)."""
    from django.conf import settings

    tasks = getattr(settings, "TASKS", None)
    return isinstance(tasks, dict) and any(
        isinstance(params, dict)
        and params.get("BACKEND") == "django_openworkflow.tasks.WorkflowTaskBackend"
        for params in tasks.values()
    )
